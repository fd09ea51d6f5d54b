"""Masks behave as specified, and the fast path equals the masked reference path."""

from __future__ import annotations

import torch

import dynconvert
from dynconvert.inputs import default_inputs, with_timestep
from dynconvert.plan import AttentionSite, MlpSite
from dynconvert.testing import call, randomize_routing, tiny_dit


def test_fast_path_equals_masked_path(family):
    name, model, inputs = family
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, seed=3, example_inputs=inputs)
    bank = dynconvert.get_state(model)
    for ts in ([10, 10, 10], [999, 999, 999], [0, 500, 999], [250, 251, 900]):
        x = with_timestep(model, inputs, ts)
        with torch.no_grad():
            fast = call(model, x)
            with dynconvert.routing(model, "eval", "masked"):
                masked = call(model, x)
        torch.testing.assert_close(fast, masked, atol=2e-5, rtol=1e-4)
        widths = [
            m
            for m in (bank.records[s.index].get("width") for s in bank.plan.sites)
            if m is not None
        ]
        assert any(not bool(m.all()) for m in widths), "routing should switch some units off"


def test_switched_off_units_contribute_nothing():
    model = tiny_dit()
    inputs = default_inputs(model, batch_size=2)
    args = with_timestep(model, inputs, [300, 300])
    dynconvert.convert(model, 0.5, example_inputs=args)
    randomize_routing(model, keep=0.5, seed=1, vary_with_t=False, tokens=1.0, example_inputs=args)
    bank = dynconvert.get_state(model)
    with dynconvert.routing(model, "eval", "masked"):
        before = call(model, args)
        modules = dict(model.named_modules())
        table = bank.width_table(torch.tensor([300.0]))
        with torch.no_grad():
            for s in bank.plan.sites:
                off = (~table[s.index][0]).nonzero().flatten().tolist()
                assert off, f"{s.name} should have a unit off"
                for u in off:  # scramble every weight the switched-off unit owns
                    for m in [*s.in_maps, s.out_map]:
                        lin = modules[m.linear]
                        idx = torch.tensor(m.indices(u))
                        if m.axis == "rows":
                            lin.weight[idx] = torch.randn_like(lin.weight[idx]) * 10
                            if lin.bias is not None:
                                lin.bias[idx] = 7.0
                        else:
                            lin.weight[:, idx] = torch.randn_like(lin.weight[:, idx]) * 10
        after = call(model, args)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    bank.clear_cache()
    torch.testing.assert_close(call(model, args), before, atol=2e-5, rtol=1e-4)  # fast path too


def test_skipped_token_gets_exactly_zero_mlp_update():
    model = tiny_dit()
    inputs = default_inputs(model, batch_size=2)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=1.0, tokens=0.5, seed=2, example_inputs=inputs)
    bank = dynconvert.get_state(model)
    site = next(s for s in bank.plan.sites if isinstance(s, MlpSite))
    fc2 = dict(model.named_modules())[site.fc2]
    with torch.no_grad():
        fc2.bias.fill_(3.0)  # a bias that would leak if skipping were done before the bias
    seen = []
    hook = fc2.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        for execution in ("masked", "fast"):
            seen.clear()
            with dynconvert.routing(model, "eval", execution):
                call(model, inputs)
            tokens = bank.records[site.index]["tokens"]
            assert 0 < int(tokens.sum()) < tokens.numel()
            out = seen[0]
            assert torch.equal(out[~tokens], torch.zeros_like(out[~tokens])), execution
            assert bool((out[tokens].abs().sum(-1) > 0).all()), execution
    finally:
        hook.remove()


def test_zero_selected_tokens_and_all_heads_but_one():
    model = tiny_dit()
    inputs = default_inputs(model, batch_size=2)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.0, tokens=0.0, vary_with_t=False, example_inputs=inputs)
    bank = dynconvert.get_state(model)
    fast = call(model, inputs)
    with dynconvert.routing(model, "eval", "masked"):
        masked = call(model, inputs)
    torch.testing.assert_close(fast, masked, atol=2e-5, rtol=1e-4)
    for s in bank.plan.sites:
        rec = bank.records[s.index]
        if isinstance(s, AttentionSite):
            assert bool((rec["width"].sum(-1) == 1).all())  # only the always-on head
        else:
            assert int(rec["tokens"].sum()) == 0


def test_training_masks_are_straight_through():
    model = tiny_dit()
    inputs = default_inputs(model, batch_size=4)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    bank = dynconvert.get_state(model)
    with dynconvert.routing(model, "train"):
        out = call(model, inputs)
        ratio = dynconvert.last_flops_ratio(bank)
    for s in bank.plan.sites:
        w = bank.records[s.index]["width"]
        assert set(w.detach().unique().tolist()) <= {0.0, 1.0}
        assert bool((w[:, int(bank.always_on[s.index])] == 1).all())
    (out.pow(2).mean() + ratio.mean()).backward()
    grads = [p.grad for p in bank.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert ratio.shape == (4,) and bool(((ratio > 0) & (ratio < 1.01)).all())


def test_routers_decide_in_float32_under_a_bf16_autocast():
    # Rounded to bf16, logits near the threshold flip decisions (issue 23, item 7).
    model = tiny_dit()
    inputs = default_inputs(model, batch_size=3)
    dynconvert.convert(model, 0.5, example_inputs=inputs)
    randomize_routing(model, keep=0.5, example_inputs=inputs)
    bank = dynconvert.get_state(model)
    t = torch.arange(0.0, 1000.0, 3.0)
    tokens = torch.randn(2, 5, bank.token["1"].net[0].in_features)
    expected, token_logits = bank.width_table(t), bank.token["1"](tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bank.width_table(t)
        assert bank.t_embed(t).dtype == bank.token["1"](tokens).dtype == torch.float32
        assert torch.equal(
            bank.token["1"](tokens.bfloat16()), bank.token["1"](tokens.bfloat16().float())
        )
        bank.begin(torch.tensor([10.0, 990.0]), training=True)  # the Gumbel masks' logits too
        assert bank.current_call().train_masks[0].dtype == torch.float32
    assert all(torch.equal(got[i], expected[i]) for i in expected)
    assert torch.equal(bank.token["1"](tokens), token_logits)
