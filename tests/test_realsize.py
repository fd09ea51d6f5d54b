"""Real models at real size (issue 20): analysis on a reduced problem, planning without weights.

- The plan analysis makes with a probe (the model at a few tokens) and twin blocks (each group
  of structurally identical blocks analysed once) equals the slow path's plan: every call's
  own ops replayed at the example's size.
- A model converted on the meta device, then given its weights (``load_state_dict(...,
  assign=True)`` or diffusers' loading), equals the same model converted with its weights:
  the same plan, routers, always-on units and outputs under random routing.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynconvert
from dynconvert.analysis import analyze, capture
from dynconvert.analysis.planning import plan_from_graph
from dynconvert.analysis.reduced import Deriver
from dynconvert.config import ConvertConfig
from dynconvert.inputs import find_timestep_arg
from dynconvert.testing import randomize_routing
from dynconvert.testing.configs import Size
from dynconvert.testing.configs.inputs import MAKERS
from dynconvert.testing.zoo import ZOO


class Mixer(nn.Module):
    """A pre-norm block as small repositories write it: fused qkv, rotary by halves, a
    hand-written softmax attention, a GELU MLP, adaLN-style scale from the timestep."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.mod = nn.Linear(dim, 2 * dim)

    def forward(self, x, c, cos, sin):
        b, n, d = x.shape
        g1, g2 = self.mod(c)[:, None].chunk(2, dim=-1)
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (b, heads, n, head_dim)
        q, k = (t * cos + torch.cat([-t[..., 1::2], t[..., ::2]], -1) * sin for t in (q, k))
        att = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1)
        x = x + g1 * self.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + g2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Tower(nn.Module):
    """Patches in, three twin blocks, patches out: any number of tokens."""

    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed, self.time = nn.Linear(8, dim), nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Mixer(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 8)

    def forward(self, x, t):
        n, hd = x.shape[1], self.blocks[0].qkv.in_features // self.blocks[0].heads
        angle = torch.arange(n)[:, None] / 10 ** (torch.arange(hd) / hd)  # (n, head_dim)
        cos, sin = angle.cos(), angle.sin()
        c = F.silu(self.time(t[:, None].float()))
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x, c, cos, sin)
        return self.out(x)


def _tower_inputs(tokens: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(tokens)
    return {"x": torch.randn(batch, tokens, 8, generator=g), "t": torch.tensor([10, 700][:batch])}


def test_reduced_problem_plan_equals_the_slow_path_on_a_hand_written_model():
    torch.manual_seed(0)
    model = Tower().eval()
    inputs = _tower_inputs(24)
    fast = analyze(model, inputs, probe_inputs=_tower_inputs(4))
    assert "decided on the probe's shapes" in fast.coverage
    assert "did not carry" not in fast.coverage
    assert len(fast.attention) == 3 and all(s.tokens_q == 24 for s in fast.attention)
    assert _without_coverage(fast) == _without_coverage(_slow_plan(model, inputs))


def test_tower_converted_on_meta_then_loaded_equals_converted_with_weights():
    torch.manual_seed(0)
    model = Tower().eval()
    with torch.device("meta"):
        meta = Tower().eval()
    _check_meta_then_load(model, meta, _tower_inputs(6), budget=0.6, seed=5, run_early=True)


def _check_meta_then_load(model, meta, inputs, budget, seed, run_early=False):
    """Convert both alike, load the weights into the meta one: the same model in every way."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dynconvert.convert(model, budget, example_inputs=inputs, seed=seed)
    dynconvert.convert(meta, budget, example_inputs=inputs, seed=seed)
    assert all(p.is_meta for p in meta.parameters())  # nothing materialised yet
    # Planning needs no weights: the plan and the fresh cost are already those of the model.
    assert dynconvert.count_flops(meta, inputs).ratio == dynconvert.count_flops(model, inputs).ratio
    if run_early:
        with pytest.raises(dynconvert.errors.CheckpointError, match="load_state_dict"):
            _out(meta, inputs)  # no weights yet: says what to do
    meta.load_state_dict(state, assign=True)  # strict: the routers are made, not missing
    a, b = model.state_dict(), meta.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dynconvert.get_state(meta).plan == dynconvert.get_state(model).plan
    for m in (model, meta):
        randomize_routing(m, keep=0.5, seed=0, example_inputs=inputs)
    assert torch.equal(_out(model, inputs), _out(meta, inputs))


class ListTower(Tower):
    """Its rotary angles made once at construction, in a Python list (not a buffer), and moved
    to the input's device in forward, as Lumina 2 does: built on meta, the list is on meta."""

    def __init__(self):
        super().__init__()
        hd = self.blocks[0].qkv.in_features // self.blocks[0].heads
        self.angles = [torch.arange(64)[:, None] / 10 ** (torch.arange(hd) / hd)]

    def forward(self, x, t):
        angle = self.angles[0][: x.shape[1]].to(x.device)
        c = F.silu(self.time(t[:, None].float()))
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x, c, angle.cos(), angle.sin())
        return self.out(x)


def test_a_table_made_at_construction_stays_on_meta_in_an_eager_run():
    # The torch.fx capture runs the model eagerly on the CPU inputs: moving the meta list to
    # the CPU failed ("Cannot copy out of meta tensor"); it now keeps its shapes on meta.
    torch.manual_seed(0)
    model = ListTower().eval()
    with torch.device("meta"):
        meta = ListTower().eval()
    inputs, fx = _tower_inputs(6), ConvertConfig(capture="fx")
    plan = analyze(meta, inputs, fx)
    assert len(plan.attention) == 3 and len(plan.mlp) == 3
    assert _without_coverage(plan) == _without_coverage(analyze(model, inputs, fx))


class AutocastTower(Tower):
    """Its timestep embedding in float32 under torch.autocast on its weights' device (Mochi's
    rotary frequencies): a device that has no autocast when the weights are on meta."""

    def forward(self, x, t):
        with torch.autocast(self.time.weight.device.type, torch.float32):
            return super().forward(x, t)


def test_a_meta_model_that_opens_autocast_on_its_weights_device_is_refused_by_name():
    with torch.device("meta"):
        meta = AutocastTower().eval()
    with pytest.raises(dynconvert.errors.ExampleInputsError, match="torch.autocast on the dev"):
        analyze(meta, _tower_inputs(4))


# zoo entry -> (the example's size, the probe's size), in latent cells
SIZES = {
    "flux": (Size(4, 6, 1, 7), Size(2, 3, 1, 5)),
    "sd35": (Size(8, 12, 1, 7), Size(4, 6, 1, 5)),
    "pixart": (Size(8, 12, 1, 7), Size(4, 6, 1, 5)),
    "wan": (Size(6, 8, 3, 7), Size(4, 6, 2, 5)),
    "ltx": (Size(3, 4, 3, 7), Size(2, 3, 2, 5)),
}


def _model_and_inputs(name: str, size: Size):
    entry = ZOO[name]
    model = entry.build(0)
    return model, MAKERS[entry.class_name](model, size, 2)


def _slow_plan(model, inputs):
    """Every attention call's head-locality replayed on its own ops, at the example's size."""
    graph = capture(model, (), inputs)
    return plan_from_graph(model, graph, (), inputs, find_timestep_arg(model), ConvertConfig())


def _without_coverage(plan):
    d = plan.to_dict()
    d.pop("coverage")  # says how head-locality was decided: the only field allowed to differ
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SIZES))
def test_reduced_problem_plan_equals_the_slow_path(name):
    size, probe = SIZES[name]
    model, inputs = _model_and_inputs(name, size)
    _, small = _model_and_inputs(name, probe)
    fast = analyze(model, inputs, probe_inputs=small)
    assert "decided on the probe's shapes" in fast.coverage
    assert "did not carry" not in fast.coverage  # every answer carried to the real shapes
    assert _without_coverage(fast) == _without_coverage(_slow_plan(model, inputs))


@pytest.mark.slow
def test_twin_blocks_are_analysed_once():
    entry = ZOO["flux"]
    import diffusers

    config = {**dict(entry.build(0).config), "num_layers": 4, "num_single_layers": 4}
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**config).eval()
    inputs = MAKERS["FluxTransformer2DModel"](model, Size(2, 3, 1, 5), 1)
    graph = capture(model, (), inputs)
    derive = Deriver(graph)
    plan = plan_from_graph(model, graph, (), inputs, "timestep", ConvertConfig(), derive=derive)
    assert len(plan.attention) == 8
    # The first block (fed by the embedding, not by a block), the middle ones (one
    # analysis for all), the last of each kind (read by another kind of block): 5 groups.
    reps = {t.rep for name, t in derive._twins.items() if "blocks." in name}
    assert len(reps) == 5
    assert _without_coverage(plan) == _without_coverage(_slow_plan(model, inputs))


@pytest.mark.slow
def test_a_probe_with_another_graph_is_not_used():
    model, inputs = _model_and_inputs("flux", Size(4, 6, 1, 7))
    other = dynconvert.testing.tiny_dit()
    graph, probe = capture(model, (), inputs), capture(other, other.example_inputs(1), {})
    derive = Deriver(graph, probe, ((), {}))
    assert derive.graph is graph and "the probe was not used" in derive.coverage()


def _meta_twin(name: str):
    """The zoo model with weights, and the same architecture built without them (accelerate's
    ``init_empty_weights``: parameters on the meta device, buffers made as usual)."""
    from accelerate import init_empty_weights

    entry = ZOO[name]
    model = entry.build(0)
    with init_empty_weights():
        if hasattr(model, "config"):
            meta = type(model).from_config(model.config).eval()
        else:
            from dynconvert.models import build_model

            meta = build_model("dit-tiny").eval()
    return model, meta, entry.inputs(model, batch=2)


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


# One per family kind: self-attention DiT, cross-attention (PixArt), joint attention with
# parallel blocks (Flux), video with qk-norm across heads (Wan: partial sites), per-head rotary
# tables handed in (LTX), linear attention and convolutional MLPs (Sana), grouped-query
# attention with data-dependent caption lengths (Lumina 2). LTX's tables are matched with its
# attention's arguments by value: on meta, the exported graph reruns on the CPU inputs
# (analysis/tables.py), where tables made from the inputs alone have their values.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit", "pixart", "flux", "wan", "ltx", "sana", "lumina2"])
def test_convert_on_meta_then_load_equals_convert_with_weights(name):
    _check_meta_then_load(*_meta_twin(name), budget=0.9, seed=3)


@pytest.mark.slow
def test_diffusers_loading_into_a_model_converted_on_meta():
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    model, meta, inputs = _meta_twin("flux")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dynconvert.convert(model, 0.9, example_inputs=inputs)
    dynconvert.convert(meta, 0.9, example_inputs=inputs)
    load_model_dict_into_meta(meta, state)  # sets each parameter: no hook of ours runs
    out = _out(meta, inputs)  # the first call makes the routers
    assert torch.equal(out, _out(model, inputs))
    a, b = model.state_dict(), meta.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_model_converted_on_meta_says_to_load_its_weights():
    _, meta, inputs = _meta_twin("flux")
    dynconvert.convert(meta, 0.9, example_inputs=inputs)
    with pytest.raises(dynconvert.errors.CheckpointError, match="load_state_dict"):
        _out(meta, inputs)
    dynconvert.revert(meta)  # and it can be taken off again
    assert not dynconvert.is_converted(meta)


def test_inspect_a_diffusers_config_without_weights(tmp_path):
    from typer.testing import CliRunner

    from dynconvert.cli import app

    config = tmp_path / "config.json"
    config.write_text(
        '{"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, '
        '"attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2, '
        '"sample_size": 8, "patch_size": 2, "norm_type": "ada_norm_zero"}'
    )
    run = CliRunner().invoke(
        app, ["inspect", "--diffusers", "DiTTransformer2DModel", "--config", str(config),
              "--height", "64", "--width", "64", "--json"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    s = json.loads(run.stdout)
    assert s["params"] > 0 and len(s["sites"]) == 4 and s["min_budget"] < 0.5
    assert 0 < s["calibration_gib"]["routers"] < s["calibration_gib"]["all"]
    assert s["input_shapes"]["hidden_states"] == [1, 4, 8, 8]  # 64 px / 8 px per latent cell
    bad = CliRunner().invoke(app, ["inspect", "--diffusers", "DiTTransformer2DModel"])
    assert bad.exit_code == 1 and "--config" in bad.output
