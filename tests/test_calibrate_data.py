"""Data sources: the latents format round trip, write_latents with a tiny VAE, the image folder
source, digits, resumable ordering, and each DataError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dynconvert.calibration.data import (
    IterableSource,
    LatentShards,
    TensorSource,
    as_source,
    check_batch,
)
from dynconvert.calibration.latents import read_index, write_latent_shards, write_latents
from dynconvert.calibration.stream import StepIndices, batch_stream
from dynconvert.demo.data import digits
from dynconvert.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls, count, size in (("cat", 3, (20, 16)), ("dog", 2, (16, 24))):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def test_latent_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 2, 2, generator=g)
    y = torch.arange(7) % 3
    cond = torch.randn(7, 5, 6, generator=g)
    mask = (torch.rand(7, 5, generator=g) > 0.5).long()
    index = write_latent_shards(
        tmp_path / "lat", x, y, cond, mask, shard_size=3, scaling_factor=0.18215
    )
    assert [s["count"] for s in index["shards"]] == [3, 3, 1]
    assert (tmp_path / "lat" / "shard-00000.safetensors").is_file()
    on_disk = json.loads((tmp_path / "lat" / "index.json").read_text())
    assert on_disk["format"] == "dynconvert-latents" and on_disk["version"] == 1
    assert on_disk["count"] == 7 and on_disk["latent_shape"] == [4, 2, 2]
    assert (
        on_disk["scaling_factor"] == 0.18215
        and on_disk["has_cond"]
        and on_disk["cond_shape"] == [5, 6]
    )
    src = as_source(tmp_path / "lat")
    assert isinstance(src, LatentShards) and len(src) == 7
    batch = src.get_batch([6, 0, 4])
    assert torch.equal(batch["x"], x[[6, 0, 4]]) and torch.equal(batch["y"], y[[6, 0, 4]])
    assert torch.equal(batch["cond"], cond[[6, 0, 4]]) and torch.equal(
        batch["cond_mask"], mask[[6, 0, 4]]
    )
    assert batch["y"].dtype == torch.int64


def test_latents_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        as_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no latents"):
        as_source(tmp_path / "empty")
    # Shards without an index: an interrupted writer.
    write_latent_shards(tmp_path / "a", torch.zeros(2, 4, 2, 2), shard_size=1)
    (tmp_path / "a" / "index.json").unlink()
    with pytest.raises(DataError, match="interrupted"):
        LatentShards(tmp_path / "a")
    # A shard with the wrong keys.
    from safetensors.torch import save_file

    write_latent_shards(tmp_path / "b", torch.zeros(2, 4, 2, 2), torch.zeros(2, dtype=torch.long))
    save_file({"images": torch.zeros(2, 3)}, str(tmp_path / "b" / "shard-00000.safetensors"))
    with pytest.raises(DataError, match="'latents'"):
        LatentShards(tmp_path / "b")
    # An index that lists no shards (an empty set).
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "index.json").write_text(
        json.dumps({"format": "dynconvert-latents", "version": 1, "count": 0, "shards": []})
    )
    with pytest.raises(DataError, match="empty"):
        read_index(tmp_path / "c")
    with pytest.raises(DataError, match="already holds"):
        write_latent_shards(tmp_path / "b", torch.zeros(1, 4, 2, 2))
    with pytest.raises(DataError, match="empty"):
        TensorSource(torch.zeros(0, 4, 2, 2))


def test_write_latents_with_tiny_vae(tmp_path, image_folder, tiny_vae):
    seen = []
    index = write_latents(
        image_folder,
        tmp_path / "lat",
        tiny_vae,
        image_size=16,
        batch_size=2,
        on_progress=lambda done, total: seen.append((done, total)),
        shard_size=4,
    )
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert index["count"] == 5 and index["latent_shape"] == [4, 8, 8]
    assert index["classes"] == ["cat", "dog"] and index["num_classes"] == 2
    assert index["scaling_factor"] == pytest.approx(0.18215) and index["image_size"] == 16
    src = LatentShards(tmp_path / "lat")
    batch = src.get_batch(list(range(5)))
    assert batch["y"].tolist() == [0, 0, 0, 1, 1]
    assert batch["x"].shape == (5, 4, 8, 8) and torch.isfinite(batch["x"]).all()
    # Same seed, same latents: the writer is deterministic.
    again = write_latents(image_folder, tmp_path / "lat2", tiny_vae, 16, batch_size=2)
    assert again["count"] == 5
    assert torch.equal(LatentShards(tmp_path / "lat2").get_batch([3])["x"], batch["x"][3:4])


def test_write_latents_errors(tmp_path, image_folder, tiny_vae):
    with pytest.raises(DataError, match="does not exist"):
        write_latents(tmp_path / "nope", tmp_path / "o1", tiny_vae, 16)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        write_latents(tmp_path / "flat", tmp_path / "o2", tiny_vae, 16)
    (tmp_path / "flat" / "cls").mkdir()
    with pytest.raises(DataError, match="no images"):
        write_latents(tmp_path / "flat", tmp_path / "o3", tiny_vae, 16)
    with pytest.raises(DataError, match="VAE folder"):
        write_latents(image_folder, tmp_path / "o4", tmp_path / "novae", 16)
    with pytest.raises(DataError, match="multiple"):
        write_latents(image_folder, tmp_path / "o5", tiny_vae, 15)
    with pytest.raises(DataError, match="image folder"):
        as_source(image_folder)


def test_image_folder_source_encodes_on_the_fly(image_folder, tiny_vae):
    from dynconvert.calibration.data import ImageFolderSource

    src = ImageFolderSource(image_folder, tiny_vae, image_size=16)
    assert len(src) == 5
    raw = src.get_batch([0, 4])
    assert raw["image"].shape == (2, 3, 16, 16) and raw["image"].abs().max() <= 1.0
    batch = check_batch(src.prepare(raw, torch.device("cpu")))
    assert batch["x"].shape == (2, 4, 8, 8) and batch["y"].tolist() == [0, 1]


def test_digits():
    src = digits(16)
    assert len(src) == 1797
    batch = src.get_batch(list(range(1797)))
    assert batch["x"].shape == (1797, 1, 16, 16)
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert batch["x"].min() == -1.0 and batch["x"].max() > 0.9
    assert sorted(batch["y"].unique().tolist()) == list(range(10))
    assert digits(8).get_batch([0])["x"].shape == (1, 1, 8, 8)


def test_check_batch_errors():
    with pytest.raises(DataError, match="dict"):
        check_batch(torch.zeros(2, 4, 2, 2))
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        check_batch({"x": torch.zeros(2, 4)})
    with pytest.raises(DataError, match="integer labels"):
        check_batch({"x": torch.zeros(2, 4, 2, 2), "y": torch.zeros(2)})
    with pytest.raises(DataError, match="cond_mask"):
        check_batch({"x": torch.zeros(2, 4, 2, 2), "cond_mask": torch.ones(2, 3)})


def test_order_is_resumable_and_split_over_ranks():
    n, global_batch = 10, 4
    full = [ix for ix in StepIndices(n, global_batch, 7, 0, 1, 0, 10)]
    tail = [ix for ix in StepIndices(n, global_batch, 7, 0, 1, 6, 10)]
    assert full[6:] == tail
    # Each epoch (10 rows) is a permutation: positions 0..9 and 10..19 each cover every row.
    flat = [i for ix in full for i in ix]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation per epoch
    r0 = list(StepIndices(n, global_batch, 7, 0, 2, 0, 10))
    r1 = list(StepIndices(n, global_batch, 7, 1, 2, 0, 10))
    assert [a + b for a, b in zip(r0, r1, strict=True)] == full
    src = TensorSource(torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10))
    a = [b["y"].tolist() for b in batch_stream(src, 4, seed=7, stop=5)]
    b = [b["y"].tolist() for b in batch_stream(src, 4, seed=7, start=2, stop=5, num_workers=1)]
    assert a[2:] == b
    with pytest.raises(DataError, match="divisible"):
        next(batch_stream(src, 3, seed=0, world=2, stop=1))


def test_iterable_source_skip_split_and_exhaustion():
    batches = [{"x": torch.full((4, 1, 1, 1), float(i)), "y": torch.arange(4)} for i in range(3)]
    out = [
        b["x"][0].item() for b in batch_stream(IterableSource(batches), 4, seed=0, start=1, stop=5)
    ]
    assert out == [1.0, 2.0, 0.0, 1.0]  # re-iterated when it runs out
    r1 = next(batch_stream(IterableSource(batches), 4, seed=0, rank=1, world=2, stop=1))
    assert r1["y"].tolist() == [2, 3]
    gen = (b for b in batches)
    with pytest.raises(DataError, match="ran out after 3"):
        list(batch_stream(as_source(gen), 4, seed=0, stop=5))
    assert isinstance(as_source(iter(batches)), IterableSource)
