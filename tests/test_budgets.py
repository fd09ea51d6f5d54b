"""Budget-conditioned routers (issue 26): one model converted with a budget range, the budget
chosen per model, per thread and per call; refusals naming the range; a range's 1.0 is the
original; save/load keeps the range; planned and fast equal masked at a budget; the grid."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dynconvert
from dynconvert.calibration import CalibrationConfig, calibrate
from dynconvert.cli.app import app
from dynconvert.errors import BudgetError, RecordError
from dynconvert.runtime.budgets import parse_budget
from dynconvert.runtime.synthetic import randomize_routing

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyBlock(nn.Module):
    """A transformer block written the way small research codebases write one: separate q/k/v
    projections, hand-written attention, an MLP as a Sequential."""

    def __init__(self, dim: int = 32, n_heads: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln_a, self.ln_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.ln_a(x)
        q, k, v = (
            f(h).view(b, n, self.n_heads, -1).transpose(1, 2)
            for f in (self.to_q, self.to_k, self.to_v)
        )
        att = torch.softmax(q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5), dim=-1)
        x = x + self.to_out((att @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln_b(x))


class TinyDenoiser(nn.Module):
    """Patch tokens, a timestep embedding added to every token, two blocks."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.inp, self.out = nn.Linear(4, dim), nn.Linear(dim, 4)
        self.temb = nn.Sequential(nn.Linear(1, dim), nn.SiLU())
        self.blocks = nn.ModuleList([TinyBlock(dim), TinyBlock(dim)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.temb(timestep.float()[:, None, None] / 1000)
        for blk in self.blocks:
            h = blk(h)
        return self.out(h)


def _inputs(batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 16, 4, generator=g), torch.tensor([900, 100][:batch])


def _dialled(model: nn.Module) -> nn.Module:
    """Routers whose decisions change with the budget (as calibration would leave them): the
    width routers read the budget alone, each unit turning on or off between 0.45 and 0.6."""
    bank = dynconvert.get_state(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in [*bank.b_embed.parameters(), *bank.token_budget.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g))
        for p in bank.t_embed.mlp[-1].parameters():
            p.zero_()
        lo, hi = bank.b_embed(torch.tensor([0.45, 0.6]))  # (embed,) each
        d = (hi - lo) / (hi - lo).norm() ** 2  # d . (emb(b) - emb(0.45)) is 0 at 0.45, 1 at 0.6
        for r in bank.width.values():
            v = torch.randn(r.out_features, generator=g)
            r.weight.copy_(v[:, None] * d[None])
            r.bias.copy_(-v * (d @ lo + 0.5))
    return model.eval()


@pytest.fixture(scope="module")
def ranged():
    torch.manual_seed(0)
    model = TinyDenoiser()
    reference = {}
    x, t = _inputs()
    with torch.no_grad():
        reference["out"] = model(x, t)
    dynconvert.convert(model, (0.45, 1.0), example_inputs=(x, t))
    return _dialled(model), reference


def test_parse_budget_and_refusals():
    assert parse_budget("0.3:1.0") == (0.3, (0.3, 1.0))
    for bad in ("0.7:0.3", (0.3,), "a:b", (0.0, 1.0), (0.3, 1.2)):
        with pytest.raises(BudgetError):
            parse_budget(bad)


def test_set_budget_context_and_call_choose_the_budget(ranged):
    model, _ = ranged
    x, t = _inputs()
    ratios = {}
    with torch.no_grad():
        for b in (0.45, 0.6, 1.0):
            dynconvert.set_budget(model, b)
            default = model(x, t)
            ratios[b] = dynconvert.last_flops_ratio(model).clone()
            with dynconvert.budget(model, 0.5):
                model(x, t)
                inner = dynconvert.last_flops_ratio(model).clone()
                torch.testing.assert_close(model(x, t, dynconvert_budget=b), default)
            dynconvert.set_budget(model, 0.5)
            torch.testing.assert_close(inner, (model(x, t), dynconvert.last_flops_ratio(model))[1])
    dynconvert.set_budget(model, 0.45)
    assert not torch.equal(ratios[0.45], ratios[0.6]) and bool((ratios[1.0] == 1.0).all())


def test_budget_per_thread(ranged):
    model, _ = ranged
    x, t = _inputs()
    alone = {}
    with torch.no_grad():
        for b in (0.5, 0.9):
            alone[b] = model(x, t, dynconvert_budget=b)
    got, barrier = {}, threading.Barrier(2)

    def worker(b: float) -> None:
        with dynconvert.budget(model, b), torch.no_grad():
            barrier.wait()
            for _ in range(5):
                got[b] = model(x, t)

    threads = [threading.Thread(target=worker, args=(b,)) for b in alone]
    [th.start() for th in threads]
    [th.join() for th in threads]
    for b, out in alone.items():
        torch.testing.assert_close(got[b], out)
    assert dynconvert.get_state(model).budget == 0.45  # the default, untouched


def test_range_refusals_name_the_range(ranged):
    model, _ = ranged
    x, t = _inputs()
    for call in (
        lambda: dynconvert.set_budget(model, 0.2),
        lambda: dynconvert.budget(model, 1.5).__enter__(),
        lambda: model(x, t, dynconvert_budget=0.1),
    ):
        with pytest.raises(BudgetError, match=r"0\.45\.\.1"):
            call()
    single = dynconvert.convert(TinyDenoiser(), 0.5, example_inputs=_inputs())
    with pytest.raises(BudgetError, match="single budget 0.5"):
        dynconvert.set_budget(single, 0.4)
    dynconvert.set_budget(single, 0.5)  # its own budget is fine


def test_budget_one_is_the_original(ranged):
    model, reference = ranged
    x, t = _inputs()
    with torch.no_grad(), dynconvert.budget(model, 1.0):
        out = model(x, t)
    assert torch.equal(out, reference["out"])
    assert bool((dynconvert.last_flops_ratio(model) == 1.0).all())
    with torch.no_grad():
        assert not torch.allclose(model(x, t, dynconvert_budget=0.45), reference["out"])


@pytest.mark.parametrize("execution", ["fast", "planned"])
def test_sliced_paths_equal_masked_at_a_budget(ranged, execution):
    model, _ = ranged
    x, t = _inputs()
    dynconvert.set_routing(model, "eval", execution="masked")
    with torch.no_grad():
        masked = {b: model(x, t, dynconvert_budget=b) for b in (0.45, 0.7)}
    dynconvert.set_routing(model, "eval", execution=execution)
    with torch.no_grad():
        for b, want in masked.items():
            torch.testing.assert_close(model(x, t, dynconvert_budget=b), want, atol=1e-5, rtol=0)
    bank = dynconvert.get_state(model)
    assert {k[0] for k in bank._table} >= {0.45, 0.7}  # keyed on (budget, t)
    if execution == "planned":
        assert {b for b, _ in bank.planner._id_of_t} >= {0.45, 0.7}
    dynconvert.set_routing(model, None, execution="fast")


def test_save_load_keeps_the_range(tmp_path):
    model = _dialled(dynconvert.convert(dynconvert.testing.tiny_dit(), (0.4, 0.9)))
    dynconvert.set_budget(model, 0.6)
    dynconvert.save(model, tmp_path / "m")
    loaded = dynconvert.load(tmp_path / "m")
    bank = dynconvert.get_state(loaded)
    assert bank.budget_range == (0.4, 0.9) and bank.budget == 0.6
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([700, 50]), torch.tensor([1, 2])
    with torch.no_grad():
        for b in (0.4, 0.85):
            want = model(x, t, y, dynconvert_budget=b)
            torch.testing.assert_close(loaded(x, t, y, dynconvert_budget=b), want)
    with pytest.raises(BudgetError, match=r"0\.4\.\.0\.9"):
        dynconvert.set_budget(loaded, 1.0)
    record = tmp_path / "m" / "dynconvert.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "budget_range": [0.4, 1.7]}))
    with pytest.raises(RecordError, match="budget_range"):
        dynconvert.load(tmp_path / "m")


def test_calibration_draws_a_budget_per_step():
    model = dynconvert.convert(dynconvert.testing.tiny_dit(), (0.3, 1.0))
    bank = dynconvert.get_state(model)
    before = [p.detach().clone() for p in bank.b_embed.parameters()]
    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(32, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (32,))}
    cfg = CalibrationConfig(target=0.3, steps=4, batch_size=8, lambda_hold_steps=0,
                            warmup_steps=0, seed=0, lr=1e-2, ema_decay=0.0)  # fmt: skip
    infos = []
    calibrate(model, data, cfg, on_step=infos.append)
    lams = [i.lambda_target for i in infos]
    assert len(set(lams)) == 4 and all(0.3 <= v <= 1.0 for v in lams)
    after = list(dynconvert.get_state(model).b_embed.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # it learns the budget


def test_budget_grid_rows(ranged):
    model, _ = ranged
    rows = dynconvert.budget_grid(model, _inputs(), budgets=[0.45, 1.0], speed=False)
    assert [r["budget"] for r in rows] == [0.45, 1.0]
    assert rows[1]["flops_ratio"] == 1.0 and rows[1]["executed_flops_ratio"] == 1.0
    assert rows[0]["flops_ratio"] < 1.0 and rows[0]["speedup"] is None
    with pytest.raises(BudgetError, match="single budget"):
        dynconvert.budget_grid(dynconvert.convert(TinyDenoiser(), 0.5, example_inputs=_inputs()))


def test_cli_refuses_a_bad_budget_with_exit_code_1(tmp_path):
    result = CliRunner().invoke(app, ["convert", "--model", "dit-tiny", "--target-flops",
                                      "0.9:0.3", "--out", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 1 and "range low:high" in result.output
    model = dynconvert.convert(dynconvert.testing.tiny_dit(), (0.4, 1.0))
    dynconvert.save(model, tmp_path / "m")
    result = CliRunner().invoke(app, ["bench", "--run", str(tmp_path / "m"), "--budget", "0.2"])
    assert result.exit_code == 1 and "0.4..1" in result.output
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def saved_range(tmp_path_factory):
    """A tiny DiT converted with a range, routed at its default budget 0.4, saved."""
    model = dynconvert.convert(dynconvert.testing.tiny_dit(), (0.4, 1.0)).eval()
    _dialled(model)
    randomize_routing(model, keep=0.5)
    path = tmp_path_factory.mktemp("range") / "m"
    dynconvert.save(model, path)
    return model, path


def test_randomize_routing_keeps_its_fractions_at_the_model_budget(saved_range):
    model, _ = saved_range
    bank = dynconvert.get_state(model)
    assert any(float(lin.weight.abs().sum()) > 0 for lin in bank.token_budget.values())
    on = torch.cat([m.float().mean(0) for m in bank.width_table(budget=0.4).values()])
    assert abs(float(on.mean()) - 0.5) < 0.05  # each unit on for half of the timesteps
    with torch.no_grad():
        model(*model.example_inputs(4))
        kept = dynconvert.calibration.objectives.token_keep(bank)
    assert abs(float(kept.mean()) - 0.5) < 0.1  # the budget's token offsets counted


def test_budget_grid_executed_matches_the_accountant(saved_range):
    model, _ = saved_range
    rows = dynconvert.budget_grid(model, budgets=[0.4, 0.7], speed=False)
    for row in rows:  # one timestep per call: no batch at the union of its samples' units
        assert abs(row["executed_flops_ratio"] - row["flops_ratio"]) < 0.005, row


def test_cli_sample_and_bench_at_a_budget(saved_range, tmp_path):
    model, path = saved_range
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["sample", "--run", str(path), "--budget", "0.7", "--out",
                                      str(out), "--steps", "2", "--labels", "1,2", "--raw",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and json.loads(result.stdout)["budget"] == 0.7
    ratios = {}
    for b in ("0.4", "1.0"):
        args = ["--budget", b, "--batch", "2", "--repeats", "1", "--no-memory", "--json"]
        result = CliRunner().invoke(app, ["bench", "--run", str(path), *args])
        assert result.exit_code == 0, result.output
        ratios[b] = json.loads(result.stdout)["flops_ratio"]
    assert ratios["1.0"] == 1.0 and ratios["0.4"] < 0.9


@pytest.mark.slow
def test_a_range_run_fits_every_grid_budget_and_keeps_the_table(tmp_path):
    out = tmp_path / "run"
    args = ["convert", "--model", "digits", "--target-flops", "0.5:1.0", "--out", str(out),
            "--json", "--steps", "2", "--set", "calibration.batch_size=4",
            "--set", "report.profile_timesteps=2", "--set", "report.profile_batch=2",
            "--set", "report.executed_timesteps=1", "--set", "report.bench=false",
            "--set", "evaluate.kind=none", "--set", "samples.grid=false",
            "--set", "samples.steps=2", "--set", "report.sampling_budget=10"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)["calibration"]["sampling_budget"]
    budgets = [m["budget"] for m in fit["budgets"]]
    assert fit["kind"] == "grid" and fit["reached"] and budgets == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(abs(m["after"] - m["target"]) < 0.01 for m in fit["budgets"])
    model = dynconvert.load(out)
    table = dynconvert.get_state(model).budget_shift  # (grid, [token, width]), saved and loaded
    assert table.shape == (6, 2) and bool(table[:5, 0].ne(0).any())
