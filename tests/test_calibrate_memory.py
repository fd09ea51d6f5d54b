"""The memory plan (calibration/memory.py), the refusal up front (fit.py), gradient accumulation
and gradient checkpointing in calibration, the heartbeat, and ``inspect --calibration``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import dynconvert
from dynconvert.calibration import CalibrationConfig, calibrate, fit
from dynconvert.calibration.memory import MemorySettings, ModelFacts, estimate
from dynconvert.calibration.memory_facts import model_facts, skeleton_facts
from dynconvert.calibration.memory_release import release_freed_memory
from dynconvert.calibration.recompute import gradient_checkpointing
from dynconvert.cli import app, render
from dynconvert.errors import MemoryPlanError
from dynconvert.models import build_model
from dynconvert.runs.memory import Heartbeat, stop_note
from dynconvert.runtime.routing import set_routing
from dynconvert.runtime.state import get_state
from dynconvert.testing import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")
GIB = 2**30


def latents(n: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(n, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def quick(**overrides) -> CalibrationConfig:
    base = dict(target=0.5, steps=4, batch_size=8, lambda_hold_steps=0, warmup_steps=0, lr=1e-3,
                ema_decay=0.9, seed=0)  # fmt: skip
    return CalibrationConfig(**{**base, **overrides})


def saved_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes autograd saves in one training forward (storages counted once, weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x, t, y = model.example_inputs(batch_size=batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, y)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["all", "routers"])
def test_site_formulas_match_what_autograd_saves(mode):
    model = dynconvert.convert(build_model("dit-tiny"), budget=0.5)
    bank = get_state(model)
    if mode == "routers":
        ids = {id(p) for p in bank.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
    model.train()
    set_routing(model, "train")
    per_sample = saved_bytes(model, 4) - saved_bytes(model, 2)  # the part that grows with batch
    half, full = model_facts(model, bank.plan).saved[mode]
    assert 4 * (half + full) == pytest.approx(per_sample / 2, rel=0.12)


def test_a_meta_skeleton_gives_the_converted_models_facts():
    with torch.device("meta"):
        skeleton = build_model("dit-tiny")
    _, before = skeleton_facts(skeleton)
    model = dynconvert.convert(build_model("dit-tiny"), budget=0.5)
    after = model_facts(model, get_state(model).plan)
    assert before.router_numel == after.router_numel > 0
    assert before.trainable_numel == after.trainable_numel
    assert before.saved == after.saved and before.boundary == after.boundary
    assert before.param_bytes == pytest.approx(after.param_bytes, abs=64)  # the bank's buffers


def facts() -> ModelFacts:
    """A 1 GiB model (float32) whose activations are 64 MiB per sample."""
    n = GIB // 4
    return ModelFacts(
        param_bytes=GIB, param_size=4, trainable_numel=n, router_numel=n // 1000,
        weight_numel=n, block_numel=n // 20, root_numel=n // 10,
        saved={"all": (2**24, 0), "routers": (2**23, 0)},
        block_saved={"all": (2**20, 0), "routers": (2**19, 0)}, boundary=2**18,
    )  # fmt: skip


def test_the_estimate_term_by_term():
    one = estimate(facts(), MemorySettings(batch_size=8, device="cuda"))
    assert one.terms["gradients"] == GIB and one.terms["optimizer"] == 2 * GIB
    assert one.terms["ema"] == GIB and one.terms["activations"] == 8 * 2**26
    assert one.total == GIB + 2 * GIB + GIB + max(GIB, 8 * 2**26)
    fsdp = estimate(
        facts(), MemorySettings(batch_size=64, processes=8, sharding="fsdp", device="cuda")
    )
    assert fsdp.terms["weights"] == GIB // 8 and fsdp.terms["optimizer"] == 2 * GIB // 8
    assert (
        fsdp.terms["fsdp_unsharded"] > 0 and fsdp.terms["activations"] == one.terms["activations"]
    )
    ddp = estimate(facts(), MemorySettings(batch_size=64, processes=8, device="cuda"))
    assert ddp.terms["ddp_buckets"] == GIB and ddp.total > fsdp.total
    accum = estimate(facts(), MemorySettings(batch_size=8, grad_accum_steps=4, device="cuda"))
    assert accum.terms["activations"] == one.terms["activations"] // 4
    ckpt = estimate(
        facts(), MemorySettings(batch_size=8, gradient_checkpointing=True, device="cuda")
    )
    assert ckpt.terms["activations"] < one.terms["activations"] // 10
    half = estimate(facts(), MemorySettings(batch_size=8, mixed_precision="bf16", device="cuda"))
    assert half.terms["activations"] == 8 * 2**25 + 2 * facts().weight_numel  # + autocast copies
    routers = estimate(facts(), MemorySettings(batch_size=8, trainable="routers", device="cuda"))
    assert routers.terms["optimizer"] < GIB // 100
    cpu = estimate(facts(), MemorySettings(batch_size=8))
    assert cpu.total > one.total and cpu.terms["runtime"] > 0  # the interpreter, on CPU


def test_the_refusal_gives_the_estimate_and_settings_that_fit():
    settings = MemorySettings(batch_size=256, device="cuda")
    free = 6 * GIB
    message = fit.refusal(facts(), settings, free, "free on the GPU")
    assert (
        message.startswith("calibration needs about")
        and "but 6.0 GiB is free on the GPU" in message
    )
    found = fit.suggestions(facts(), settings, free)
    assert found and all(est.total * fit.HEADROOM <= free for _, est in found)
    assert f"--set {fit.describe(found[0][0], settings).split()[0]}" in message
    for s, _ in found:  # the global batch is kept
        assert s.batch_size == 256 and s.micro_batch * s.grad_accum_steps == 256
    assert "shard over" in message and "force=True" in message
    assert fit.refusal(facts(), settings, 10**15, "free") is None
    starved = fit.refusal(facts(), settings, GIB // 4, "free on the GPU")
    assert "Nothing fits on this device: the smallest setting" in starved
    assert "calibration.grad_accum_steps=256" in starved  # one row at a time


def test_calibrate_refuses_an_impossible_batch_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(fit, "device_free", lambda device: (64 * 2**20, "available RAM"))
    model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
    out = tmp_path / "run"
    with pytest.raises(MemoryPlanError, match="calibration needs about .* available RAM"):
        calibrate(model, latents(), quick(batch_size=8192, output_dir=str(out)))
    assert not out.exists()
    calibrate(model, latents(), quick(steps=1, check_memory=False))  # check_memory=False: runs


def test_the_cli_refuses_before_building_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(fit, "device_free", lambda device: (64 * 2**20, "available RAM"))
    out = tmp_path / "r"
    args = [
        "convert",
        "--model",
        "dit-tiny",
        "--random-init",
        "--target-flops",
        "0.5",
        "--data",
        "synthetic",
        "--steps",
        "1",
        "--out",
        str(out),
        "--set",
        "calibration.batch_size=4096",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "calibration needs about" in errors[0] and "--force" in errors[0]
    assert "--set calibration.grad_accum_steps=" in errors[0]
    assert not out.exists()  # refused before the first step: the run removed what it wrote


def test_inspect_calibration_json_is_keyed_by_trainable_mode():
    args = ["inspect", "--model", "dit-tiny", "--calibration", "--batch", "16", "--processes", "2",
            "--sharding", "fsdp", "--device", "cuda", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    bytes_ = s["calibration_memory_bytes"]
    assert set(bytes_) == {"all", "routers", "lora"}
    assert bytes_["all"] > bytes_["lora"] > bytes_["routers"] > 0
    assert s["settings"]["processes"] == 2 and s["micro_batch"] == 8
    assert "fsdp_unsharded" in s["calibration_memory"]["all"]
    table = CliRunner().invoke(app, args[:-1])
    assert table.exit_code == 0 and "peak per process" in table.stdout
    sized = CliRunner().invoke(app, [*args[:4], "--height", "512"])  # a preset has one size
    assert sized.exit_code == 1 and "published configuration" in sized.output


def test_gradient_accumulation_resumes_exactly(tmp_path):
    def run(steps: int, resume: bool = False) -> dict[str, torch.Tensor]:
        model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
        cfg = quick(steps=steps, grad_accum_steps=2, output_dir=str(tmp_path / "run"),
                    checkpoint_every=2, resume=resume)  # fmt: skip
        return calibrate(model, latents(), cfg).train_state_dict

    straight = calibrate(
        dynconvert.convert(tiny_dit(seed=0), budget=0.5), latents(), quick(grad_accum_steps=2)
    )
    run(2)
    resumed = run(4, resume=True)
    assert all(torch.equal(straight.train_state_dict[k], resumed[k]) for k in resumed)
    plain = calibrate(dynconvert.convert(tiny_dit(seed=0), budget=0.5), latents(), quick(steps=1))
    once = calibrate(
        dynconvert.convert(tiny_dit(seed=0), budget=0.5),
        latents(),
        quick(steps=1, grad_accum_steps=4),
    )
    assert once.losses[0] == pytest.approx(plain.losses[0], rel=1e-4)  # same rows, same noise


def test_gradient_checkpointing_keeps_less_and_changes_nothing():
    model = dynconvert.convert(tiny_dit(seed=0), budget=0.5)
    model.train()
    set_routing(model, "train")
    full = saved_bytes(model, 4)
    with gradient_checkpointing(model, True) as kind:
        assert kind == "blocks" and saved_bytes(model, 4) < full / 2
        x, t, y = model.example_inputs(batch_size=4)
        out = model(x, t, y)
        records = get_state(model).records
        masks = {i: r["tokens"] for i, r in records.items() if r.get("tokens") is not None}
        out.float().pow(2).mean().backward()
        # the recomputation recorded into copies: its graph (the activations) is not kept
        assert masks and all(records[i]["tokens"] is m for i, m in masks.items())
    assert saved_bytes(model, 4) == full  # put back
    a = calibrate(dynconvert.convert(tiny_dit(seed=0), budget=0.5), latents(), quick())
    b = calibrate(
        dynconvert.convert(tiny_dit(seed=0), budget=0.5),
        latents(),
        quick(gradient_checkpointing=True),
    )
    assert a.losses == b.losses
    assert all(
        torch.equal(a.train_state_dict[k], b.train_state_dict[k]) for k in a.train_state_dict
    )


def test_a_heartbeat_says_how_a_killed_run_stopped(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"status": "running"}))
    with Heartbeat(path, every=0.05) as beat:
        beat.wrap(None)(type("Info", (), {"step": 7})())
        beat.beat()
    data = json.loads(path.read_text())
    assert data["heartbeat"]["step"] == 7 and data["heartbeat"]["rss_bytes"] > 0
    starved = {**data["heartbeat"], "available_bytes": 2**20}
    assert "lack of memory" in stop_note({"status": "running", "heartbeat": starved})
    assert stop_note({**data, "status": "finished"}) == ""


def test_settings_must_divide_the_batch():
    with pytest.raises(dynconvert.errors.ConfigError, match="divisible"):
        MemorySettings(batch_size=10, processes=4)
    with pytest.raises(dynconvert.errors.ConfigError, match="grad_accum_steps"):
        quick(batch_size=8, grad_accum_steps=3)
    assert replace(MemorySettings(batch_size=8), grad_accum_steps=2).micro_batch == 4


@pytest.mark.slow  # two exports of a small Flux: about 15 s
def test_inspect_calibration_plans_a_published_configuration_with_its_probe(monkeypatch):
    # A Flux at a few blocks stands in for flux-dev's 57: the same path (meta skeleton, the
    # inputs at the run's size, analysis through the probe's few tokens).
    from dynconvert.cli import inspect_models
    from dynconvert.testing.configs import Size, build, real_config

    entry = real_config("flux-dev")
    small = {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16,
             "axes_dims_rope": [4, 6, 6]}  # fmt: skip

    def tiny_flux(name, cls, config, pixels):
        net = build(entry.class_name, {**entry.config(), **small})
        big, probe = Size(8, 8, 1, 16), Size(2, 3, 1, 5)
        return net, entry.inputs(net, big), entry.inputs(net, probe)

    plans = []

    def facts(*args, **kwargs):
        plan_and_facts = skeleton_facts(*args, **kwargs)
        plans.append(plan_and_facts[0])
        return plan_and_facts

    monkeypatch.setattr(inspect_models, "real_size_model", tiny_flux)
    monkeypatch.setattr("dynconvert.calibration.memory_facts.skeleton_facts", facts)
    args = ["inspect", "--model", "flux-dev", "--calibration", "--batch", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert s["calibration_memory_bytes"]["all"] > s["calibration_memory_bytes"]["routers"] > 0
    # the plan has the run's 64 image + 16 text tokens, not the probe's 6 + 5
    joint = plans[0].attention[0]
    assert joint.tokens_q + sum(st.tokens_q for st in joint.streams) == 80


_RETAINED = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("release", sys.argv[1])  # torch is not needed
release = importlib.util.module_from_spec(spec)
spec.loader.exec_module(release)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def held_after_freeing():
    libc.free(libc.malloc(16 * 2**20))  # mmapped and freed: the adaptive threshold rises
    base = rss()
    blocks = [libc.malloc(2**20) for _ in range(200)]
    for b in blocks:
        ctypes.memset(b, 1, 2**20)
    for b in blocks[:-1]:  # the last one pins the top of the heap
        libc.free(b)
    return (rss() - base) / 2**20
print(held_after_freeing(), release.release_freed_memory("cpu"), held_after_freeing())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_release_freed_memory_gives_freed_blocks_back(tmp_path):
    # Why calibrate fixes glibc's mmap threshold on the CPU: with the adaptive one, 199 freed
    # 1 MiB blocks of 200 stay resident (what made the checkpointing row's peak 2.28 GiB).
    import dynconvert.calibration.memory_release as module

    script = tmp_path / "retained.py"
    script.write_text(_RETAINED)
    out = subprocess.run([sys.executable, str(script), module.__file__], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    default, fixed, after = float(out[0]), out[1], float(out[2])
    assert default > 150  # MiB the process keeps without the fix
    assert fixed == "True" and after < 20
    assert not release_freed_memory("cuda")


def test_calibrate_changes_the_allocator_only_when_its_plan_is_tight(monkeypatch):
    # The fix costs CPU time (+34% on DiT-S/2): a run that needs a small share of the memory
    # keeps glibc's default; one that needs more than TIGHT_SHARE of it gets the fix.
    import dynconvert.calibration.memory_release as module

    calls = []
    monkeypatch.setattr(module, "release_freed_memory", lambda device: calls.append(device) or 1)
    gib = 1 << 30
    assert not module.release_when_tight("cpu", None)  # not planned (check_memory off)
    assert not module.release_when_tight("cpu", gib, free=4 * gib)
    assert module.release_when_tight("cpu", 3 * gib, free=4 * gib)
    assert calls == ["cpu"]


def test_an_accumulating_step_reports_its_micro_batches_as_they_finish(caplog):
    # A step of DiT-XL/2's batch 256 on a CPU takes minutes: its pace is known after the first
    # micro-batch, in the log at once, and by on_micro_batch after every one.
    seen = []
    cfg = quick(steps=2, grad_accum_steps=4, progress="log")
    with caplog.at_level("INFO", logger="dynconvert"):
        calibrate(dynconvert.convert(tiny_dit(seed=0), budget=0.5), latents(), cfg,
                  on_micro_batch=seen.append)  # fmt: skip
    assert [(i.step, i.done, i.parts) for i in seen] == [
        (s, d, 4) for s in (1, 2) for d in range(1, 5)
    ]
    assert all(i.seconds_each > 0 for i in seen) and seen[-1].eta_seconds == 0
    lines = [r.getMessage() for r in caplog.records]
    first = next(i for i, line in enumerate(lines) if "micro-batch" in line)
    assert lines[first].startswith("step 1/2  micro-batch 1/4 ") and "ETA" in lines[first]
    assert lines[first + 1].startswith("step 1/2  loss")  # one micro line a minute at most
    assert sum("micro-batch" in line for line in lines) == 1
    out = io.StringIO()
    cli = render.StepProgress(2, Console(file=out, width=200))  # off a terminal: a line
    cli.micro_batch(seen[0])
    cli.micro_batch(seen[1])
    assert (
        out.getvalue().count("micro-batch") == 1 and "step 1/2  micro-batch 1/4" in out.getvalue()
    )
