"""The reference models: official layouts and sizes, presets, example inputs, checkpoint loading."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from dynconvert.errors import CheckpointError, ConfigError, ModelNotFoundError
from dynconvert.models import (
    ALIASES,
    PRESETS,
    build_from_checkpoint,
    build_model,
    list_presets,
    load_checkpoint,
    register_preset,
    resolve_name,
)
from dynconvert.models.dit import DiT
from dynconvert.models.uvit import UViT


def _meta(name: str, **overrides) -> torch.nn.Module:
    """Build a preset on the meta device: shapes and counts without allocating weights."""
    with torch.device("meta"):
        return build_model(name, **overrides)


def _randomized(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny preset in eval mode with every parameter random (zero-init layers would hide bugs)."""
    torch.manual_seed(seed)
    model = build_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def _inputs(model: torch.nn.Module, batch_size: int = 2, seed: int = 0) -> tuple:
    return model.example_inputs(batch_size, generator=torch.Generator().manual_seed(seed))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


#################################################################################
#                                    Presets                                    #
#################################################################################

DIT_NAMES = [
    f"DiT-{size}/{patch}{suffix}"
    for size in ("S", "B", "L", "XL")
    for patch in (2, 4, 8)
    for suffix in ("", "-512")
]
UVIT_NAMES = [
    "U-ViT-S/2",
    "U-ViT-S/4",
    "U-ViT-M/4",
    "U-ViT-L/4",
    "U-ViT-L/2",
    "U-ViT-H/2",
    "U-ViT-L/4-512",
    "U-ViT-H/4-512",
]


def test_list_presets_holds_every_published_size_and_the_tiny_ones():
    names = list_presets()
    assert set(DIT_NAMES + UVIT_NAMES + ["dit-tiny", "uvit-tiny"]) <= set(names)
    assert names == list(PRESETS)
    assert len(names) == len(set(n.lower() for n in names))  # unique regardless of case


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("dit-xl", "DiT-XL/2"),
        ("dit-b", "DiT-B/2"),
        ("dit-s", "DiT-S/2"),
        ("dit-l", "DiT-L/2"),
        ("uvit-l", "U-ViT-L/2"),
        ("uvit-h", "U-ViT-H/2"),
        ("U-ViT-H/4", "U-ViT-H/4-512"),
        ("dit-xl/2-512", "DiT-XL/2-512"),
        ("  DIT-TINY ", "dit-tiny"),
    ],
)
def test_names_resolve_case_insensitively(alias, canonical):
    assert resolve_name(alias) == canonical
    assert ALIASES.get(alias, canonical) == canonical


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("DiT-S/8", dict(depth=12, hidden=384, heads=6, patch=8, size=32)),
        ("DiT-B/4", dict(depth=12, hidden=768, heads=12, patch=4, size=32)),
        ("DiT-L/2-512", dict(depth=24, hidden=1024, heads=16, patch=2, size=64)),
        ("DiT-XL/2", dict(depth=28, hidden=1152, heads=16, patch=2, size=32)),
    ],
)
def test_dit_presets_have_the_published_sizes(name, config):
    model = _meta(name)
    assert len(model.blocks) == config["depth"]
    assert model.pos_embed.shape == (1, (config["size"] // config["patch"]) ** 2, config["hidden"])
    assert model.blocks[0].attn.num_heads == config["heads"]
    assert model.blocks[0].mlp.fc1.out_features == 4 * config["hidden"]
    assert model.x_embedder.patch_size == (config["patch"], config["patch"])
    assert model.y_embedder.embedding_table.num_embeddings == 1001


# Values of the official configs (thu-ml/U-ViT configs/*.py).
UVIT_CONFIGS = {
    "U-ViT-S/2": (32, 2, 3, 512, 12, 8, -1, True),
    "U-ViT-S/4": (64, 4, 3, 512, 12, 8, -1, True),
    "U-ViT-M/4": (64, 4, 3, 768, 16, 12, 1000, True),
    "U-ViT-L/4": (64, 4, 3, 1024, 20, 16, 1000, True),
    "U-ViT-L/2": (32, 2, 4, 1024, 20, 16, 1001, True),
    "U-ViT-H/2": (32, 2, 4, 1152, 28, 16, 1001, False),
    "U-ViT-L/4-512": (64, 4, 4, 1024, 20, 16, 1001, True),
    "U-ViT-H/4-512": (64, 4, 4, 1152, 28, 16, 1001, False),
}


@pytest.mark.parametrize("name", UVIT_NAMES)
def test_uvit_presets_match_the_official_configs(name):
    img, patch, chans, dim, depth, heads, classes, conv = UVIT_CONFIGS[name]
    model = _meta(name)
    assert (model.img_size, model.in_chans, model.embed_dim, model.num_classes) == (
        img,
        chans,
        dim,
        classes,
    )
    assert model.patch_embed.proj.kernel_size == (patch, patch)
    assert len(model.in_blocks) == len(model.out_blocks) == depth // 2
    assert model.mid_block.attn.num_heads == heads
    assert model.mid_block.attn.qkv.bias is None  # qkv_bias=False
    assert model.mid_block.mlp.fc1.out_features == 4 * dim
    assert isinstance(model.time_embed, torch.nn.Identity)  # mlp_time_embed=False
    assert isinstance(model.final_layer, torch.nn.Conv2d) == conv
    extras = 2 if classes > 0 else 1
    assert model.pos_embed.shape == (1, extras + (img // patch) ** 2, dim)


#################################################################################
#                          Official layouts and sizes                           #
#################################################################################


def test_dit_xl2_has_the_official_parameter_count_and_keys():
    model = _meta("DiT-XL/2")
    assert _n_params(model) == 675_129_632
    state = model.state_dict()
    # 1 pos_embed + 2 x_embedder + 4 t_embedder + 1 y_embedder + 28 * 10 block + 4 final.
    assert len(state) == 292
    official = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.qkv.bias": (3456,),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
        "blocks.27.adaLN_modulation.1.bias": (6912,),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for key, shape in official.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("norm" in k for k in state)  # affine-free layer norms, as the original
    assert not model.pos_embed.requires_grad


def _uvit_count(img, patch, chans, dim, depth, classes, conv) -> int:
    """U-ViT parameters by hand: blocks, skips, embeddings, head (an independent cross-check)."""
    block = 12 * dim * dim + 10 * dim  # norms 4D, qkv 3D^2, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D
    blocks = (2 * (depth // 2) + 1) * block + (depth // 2) * (2 * dim * dim + dim)
    tokens = (img // patch) ** 2 + (2 if classes > 0 else 1)
    embed = chans * patch * patch * dim + dim + max(classes, 0) * dim + tokens * dim
    head = 2 * dim + dim * patch * patch * chans + patch * patch * chans
    return blocks + embed + head + (chans * chans * 9 + chans if conv else 0)


@pytest.mark.parametrize(
    ("name", "count", "published_millions"),
    [
        ("U-ViT-S/2", 44_255_328, 44),
        ("U-ViT-M/4", 130_940_292, 131),
        ("U-ViT-L/2", 286_763_172, 287),
        ("U-ViT-H/2", 500_832_016, 501),
    ],
)
def test_uvit_parameter_counts_match_the_paper(name, count, published_millions):
    img, patch, chans, dim, depth, _, classes, conv = UVIT_CONFIGS[name]
    model = _meta(name)
    assert _n_params(model) == count
    assert _uvit_count(img, patch, chans, dim, depth, classes, conv) == count
    assert round(count / 1e6) == published_millions  # U-ViT paper, Table 1


def test_uvit_keys_match_the_official_checkpoints():
    state = _meta("U-ViT-L/2").state_dict()
    official = {
        "pos_embed": (1, 258, 1024),
        "patch_embed.proj.weight": (1024, 4, 2, 2),
        "label_emb.weight": (1001, 1024),
        "in_blocks.0.norm1.weight": (1024,),
        "in_blocks.0.attn.qkv.weight": (3072, 1024),
        "in_blocks.0.attn.proj.weight": (1024, 1024),
        "in_blocks.9.mlp.fc2.weight": (1024, 4096),
        "mid_block.norm2.bias": (1024,),
        "mid_block.mlp.fc1.weight": (4096, 1024),
        "out_blocks.0.skip_linear.weight": (1024, 2048),
        "out_blocks.9.skip_linear.bias": (1024,),
        "norm.weight": (1024,),
        "decoder_pred.weight": (16, 1024),
        "final_layer.weight": (4, 4, 3, 3),
    }
    for key, shape in official.items():
        assert tuple(state[key].shape) == shape, key
    assert "in_blocks.0.skip_linear.weight" not in state
    assert "mid_block.skip_linear.weight" not in state
    assert not any(k.startswith("time_embed") for k in state)
    assert not any(k.endswith("qkv.bias") for k in state)
    huge = _meta("U-ViT-H/2").state_dict()
    assert "out_blocks.13.skip_linear.weight" in huge and "final_layer.weight" not in huge


#################################################################################
#                               Forward and inputs                              #
#################################################################################


@pytest.mark.parametrize(
    ("name", "out_shape"),
    [("dit-tiny", (3, 8, 8, 8)), ("uvit-tiny", (3, 4, 8, 8))],
)
def test_tiny_models_run_on_their_example_inputs(name, out_shape):
    model = _randomized(name)
    x, t, y = _inputs(model, batch_size=3)
    assert x.shape == (3, 4, 8, 8) and x.dtype == torch.float32
    assert t.dtype == torch.float32 and len(set(t.tolist())) == 3
    assert bool(((t >= 0) & (t <= 999)).all())
    assert y.dtype == torch.long and bool(((y >= 0) & (y < model.num_classes)).all())
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == out_shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_example_inputs_are_reproducible_and_distinct_for_large_batches():
    model = build_model("dit-tiny")
    a, b = _inputs(model, 4, seed=1), _inputs(model, 4, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    t = model.example_inputs(2000)[1]
    assert t.unique().numel() == 2000 and t.min() >= 0 and t.max() <= 999


def test_full_size_models_run_on_the_meta_device():
    dit = _meta("DiT-XL/2-512")
    x, t, y = dit.example_inputs(2)
    assert x.device.type == "meta" and dit(x, t, y).shape == (2, 8, 64, 64)
    uvit = _meta("U-ViT-H/2")
    assert uvit(*uvit.example_inputs(2)).shape == (2, 4, 32, 32)


def test_unconditional_uvit_takes_no_labels():
    model = _randomized("uvit-tiny", num_classes=-1)
    inputs = _inputs(model)
    assert len(inputs) == 2 and model.extras == 1
    assert model(*inputs).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="num_classes"):
        model(*inputs, torch.zeros(2, dtype=torch.long))


def test_fresh_dit_is_zero_initialised_like_the_original():
    torch.manual_seed(0)
    model = build_model("dit-tiny").eval()
    out = model(*_inputs(model))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero and zeroed final layer
    assert "pos_embed" in model.state_dict()


def test_dit_pos_embed_is_the_mae_sincos_layout():
    model = build_model("dit-tiny")  # grid 4 x 4, width 32
    pos, dim, grid = model.pos_embed[0], 32, 4
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    for row, col in [(0, 0), (1, 3), (3, 2)]:
        token = pos[row * grid + col].double()
        expected = torch.cat(
            [
                torch.sin(col * omega),
                torch.cos(col * omega),
                torch.sin(row * omega),
                torch.cos(row * omega),
            ]
        )
        torch.testing.assert_close(token, expected, rtol=0, atol=1e-6)


def test_forward_with_cfg_mixes_conditional_and_unconditional_halves():
    model = _randomized("dit-tiny")
    x, t, _ = _inputs(model, 4)
    y = torch.tensor([1, 2, 10, 10])  # second half: the null label
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = plain[:2, :4], plain[2:, :4]
    torch.testing.assert_close(out[:2, :4], uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(out[2:, :4], out[:2, :4])
    torch.testing.assert_close(out[:, 4:], plain[:, 4:])


def test_uvit_attention_runs_with_physically_removed_heads():
    model = _randomized("uvit-tiny")
    attn, heads, head_dim = model.mid_block.attn, 2, 16
    tokens = torch.randn(2, 18, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        masked = attn.proj(_head_zero_output(attn, tokens, keep=0, heads=heads))
        rows = torch.cat(
            [torch.arange(k * heads * head_dim, k * heads * head_dim + head_dim) for k in range(3)]
        )
        attn.qkv.weight = torch.nn.Parameter(attn.qkv.weight[rows].clone())
        attn.proj.weight = torch.nn.Parameter(attn.proj.weight[:, :head_dim].clone())
        attn.num_heads = 1
        pruned = attn(tokens)
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)


def _head_zero_output(attn, tokens, keep, heads):
    """Attention output before the out-projection with every head but ``keep`` zeroed."""
    qkv = attn.qkv(tokens).reshape(2, 18, 3, heads, -1).permute(2, 0, 3, 1, 4)
    out = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, Dh)
    mask = torch.zeros(heads, 1, 1)
    mask[keep] = 1
    return (out * mask).transpose(1, 2).reshape(2, 18, -1)


#################################################################################
#                               build_model options                             #
#################################################################################


def test_models_report_their_preset():
    assert _meta("dit-xl").preset == "DiT-XL/2"
    tiny = build_model("DIT-tiny", depth=1, num_classes=5)
    assert tiny.preset == "dit-tiny" and tiny.preset_kwargs == {"depth": 1, "num_classes": 5}
    assert len(tiny.blocks) == 1
    assert build_model("uvit-tiny").preset == "uvit-tiny"
    direct = DiT(input_size=8, hidden_size=32, depth=1, num_heads=2)
    assert direct.preset is None and direct.preset_kwargs == {}
    assert UViT(img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=2).preset is None


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelNotFoundError) as info:
        build_model("DiT-XL/3")
    message = str(info.value)
    assert "DiT-XL/2" in message and "dynconvert.models.list_presets()" in message
    with pytest.raises(ModelNotFoundError, match="U-ViT-H/2"):
        build_model("uvit-hh")


def test_unknown_override_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="hidden_size"):
        build_model("dit-tiny", hidden=64)


def test_register_preset_adds_a_name_and_refuses_duplicates():
    def factory(**overrides):
        return UViT(**{"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1, **overrides})

    factory.model_cls = UViT
    try:
        register_preset("uvit-test-one", factory, aliases=("uvit-one",))
        model = build_model("UVIT-ONE", num_heads=2)
        assert model.preset == "uvit-test-one" and model.preset_kwargs == {"num_heads": 2}
        assert "uvit-test-one" in list_presets()
        with pytest.raises(ConfigError, match="already taken"):
            register_preset("UVIT-test-one", factory)
        with pytest.raises(ConfigError, match="already taken"):
            register_preset("another", factory, aliases=("dit-xl",))
        register_preset("uvit-test-one", factory, overwrite=True)
    finally:
        PRESETS.pop("uvit-test-one", None)
        ALIASES.pop("uvit-one", None)
    assert "uvit-test-one" not in list_presets()


#################################################################################
#                                Checkpoint loading                             #
#################################################################################


def _outputs(model, seed=0):
    with torch.no_grad():
        return model(*_inputs(model, 2, seed))


@pytest.mark.parametrize("name", ["dit-tiny", "uvit-tiny"])
def test_pt_and_safetensors_round_trip(tmp_path, name):
    source = _randomized(name, seed=1)
    state = source.state_dict()
    torch.save(state, tmp_path / "raw.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for file in ("raw.pt", "w.safetensors"):
        target = _randomized(name, seed=2)
        assert not torch.equal(_outputs(target), _outputs(source))
        assert load_checkpoint(target, tmp_path / file) is target
        assert torch.equal(_outputs(target), _outputs(source))


def test_training_checkpoint_prefers_ema_and_key_selects(tmp_path):
    ema, raw = _randomized("dit-tiny", seed=1), _randomized("dit-tiny", seed=2)
    checkpoint = {
        "model": {f"module.{k}": v for k, v in raw.state_dict().items()},  # saved from DDP
        "ema": ema.state_dict(),
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256),  # DiT's train.py stores it
    }
    torch.save(checkpoint, tmp_path / "0050000.pth")
    target = build_model("dit-tiny").eval()
    load_checkpoint(target, tmp_path / "0050000.pth")
    assert torch.equal(_outputs(target), _outputs(ema))
    load_checkpoint(target, tmp_path / "0050000.pth", key="model")
    assert torch.equal(_outputs(target), _outputs(raw))
    built = build_from_checkpoint("DIT-TINY", tmp_path / "0050000.pth").eval()
    assert built.preset == "dit-tiny" and torch.equal(_outputs(built), _outputs(ema))


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def tiny_and_state():
    model = _randomized("dit-tiny", seed=5)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_missing_file_and_unknown_extension(tmp_path, tiny_and_state):
    model, before = tiny_and_state
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        load_checkpoint(model, tmp_path / "absent.pt")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"unknown extension '\.bin'.*\.safetensors"):
        load_checkpoint(model, tmp_path / "weights.bin")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(model, tmp_path)
    _assert_unchanged(model, before)


def test_corrupt_and_truncated_files(tmp_path, tiny_and_state):
    model, before = tiny_and_state
    torch.save(model.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    save_file(dict(model.state_dict()), tmp_path / "good.safetensors")
    st = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) // 2])
    for name in ("truncated.pt", "garbage.pth", "empty.pt", "truncated.safetensors"):
        with pytest.raises(CheckpointError, match="corrupt, truncated"):
            load_checkpoint(model, tmp_path / name)
    _assert_unchanged(model, before)


class _NotAllowed:
    """An arbitrary class: weights_only unpickling refuses it."""


def test_file_with_arbitrary_objects_is_refused_with_the_fix(tmp_path, tiny_and_state):
    model, before = tiny_and_state
    torch.save({"ema": model.state_dict(), "extra": _NotAllowed()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(model, tmp_path / "pickled.pt")
    torch.save({"step": torch.tensor(3), "weights": [1, 2]}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="key=..."):
        load_checkpoint(model, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="no entry 'ema_model'"):
        load_checkpoint(model, tmp_path / "odd.pt", key="ema_model")
    _assert_unchanged(model, before)


def test_key_mismatch_names_counts_and_keys(tmp_path, tiny_and_state):
    model, before = tiny_and_state
    torch.save(build_model("dit-tiny", depth=1).state_dict(), tmp_path / "shallow.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tmp_path / "shallow.pt")
    message = str(info.value)
    assert "10 missing key(s)" in message and "blocks.1.attn.qkv.weight" in message
    assert "strict=False" in message
    torch.save(build_model("uvit-tiny").state_dict(), tmp_path / "uvit.pt")
    with pytest.raises(CheckpointError, match=r"missing key.*unexpected key.*other architecture"):
        load_checkpoint(model, tmp_path / "uvit.pt")
    wrapped = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match="starts with 'model.'"):
        load_checkpoint(model, tmp_path / "wrapped.pt", strict=False)  # nothing matches at all
    _assert_unchanged(model, before)
    load_checkpoint(model, tmp_path / "shallow.pt", strict=False)  # block 1 keeps its weights
    assert torch.equal(model.blocks[1].attn.qkv.weight, before["blocks.1.attn.qkv.weight"])
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


def test_shape_mismatch_names_key_shapes_and_likely_preset(tmp_path, tiny_and_state):
    model, before = tiny_and_state
    torch.save(build_model("dit-tiny", input_size=16).state_dict(), tmp_path / "bigger.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, tmp_path / "bigger.pt")
    message = str(info.value)
    assert "'pos_embed'" in message and "(1, 64, 32)" in message and "(1, 16, 32)" in message
    assert "image size" in message and "'dit-tiny'" in message
    torch.save(build_model("dit-tiny", num_classes=20).state_dict(), tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match="num_classes"):
        load_checkpoint(model, tmp_path / "classes.pt", strict=False)
    _assert_unchanged(model, before)


def test_fp16_checkpoint_loads_into_an_fp32_model(tmp_path):
    source = _randomized("uvit-tiny", seed=4)
    save_file({k: v.half() for k, v in source.state_dict().items()}, tmp_path / "half.safetensors")
    target = build_from_checkpoint("uvit-tiny", tmp_path / "half.safetensors").eval()
    assert target.pos_embed.dtype == torch.float32
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value.half().float()), key


@pytest.mark.parametrize("name", ["dit-tiny", "uvit-tiny"])
def test_tiny_models_export_with_torch_export(name):
    model = _randomized(name)
    inputs = _inputs(model)
    program = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), model(*inputs))
