"""Routable fraction and reachable minimum of Flux.2-dev and Mochi 1 at their published configs.

Run: python benchmarks/real_config_routable.py [--only flux2-dev mochi-1] [--probe 4]

Each model is built on the meta device from ``/work/shared/data/real-configs.json`` (no
weights, published depth and width). Analysis time grows with the token count (issue 20, item
1, which another change addresses), so the sites are found by ``dynconvert.analyze`` on meta
inputs of a few tokens (``--probe``: latent height and width, text tokens x 2; the sites depend
on channels and heads, not on the token count), and every count is then taken at the usual
resolution: the graph is captured once at the real shapes (torch.export on meta), its MACs
summed op by op, and each site's cost computed by the accountant (``flops.site_cost``) at the
tokens its Linears see in that graph. Reported, in MACs, batch 1:

- routable: the converted sites' MACs over the whole forward's;
- minimum: one head per attention, one group per MLP, no token where tokens are routed, plus
  the token routers and everything not converted (``flops.min_ratio``'s rule, at real size).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from dynconvert.analysis import analyze, capture
from dynconvert.analysis.costs import node_macs
from dynconvert.flops import site_cost
from dynconvert.plan import AttentionSite, MlpSite, Plan

CONFIGS = Path("/work/shared/data/real-configs.json")
FAMILIES = ("flux2-dev", "mochi-1")


def inputs(name: str, cfg: dict[str, Any], res: dict[str, int]) -> dict[str, Any]:
    """Meta inputs of one sample at resolution ``res`` (as the family's pipeline calls it)."""
    meta = {"device": "meta"}
    if name == "flux2-dev":
        n, t = res["h"] * res["w"], res["txt"]
        return {
            "hidden_states": torch.empty(1, n, cfg["in_channels"], **meta),
            "encoder_hidden_states": torch.empty(1, t, cfg["joint_attention_dim"], **meta),
            "timestep": torch.empty(1, **meta),
            "img_ids": torch.empty(1, n, 4, dtype=torch.long, **meta),
            "txt_ids": torch.empty(1, t, 4, dtype=torch.long, **meta),
            "guidance": torch.empty(1, **meta),
        }
    if name == "mochi-1":  # latent frames, height, width (2x2 patches)
        f, h, w = res["f"], res["h"], res["w"]
        return {
            "hidden_states": torch.empty(1, cfg["in_channels"], f, h, w, **meta),
            "encoder_hidden_states": torch.empty(1, res["txt"], cfg["text_embed_dim"], **meta),
            "timestep": torch.empty(1, **meta),
            "encoder_attention_mask": torch.ones(1, res["txt"], dtype=torch.bool, **meta),
        }
    raise KeyError(name)


def _tokens(node: Any) -> tuple[int, int]:
    """(tokens per row, rows) of a Linear node's input (B, N..., C)."""
    shape = node.args[0].shape
    return math.prod(shape[1:-1]), shape[0]


def real_costs(plan: Plan, graph: Any, token_reduction: int = 16) -> dict[str, float]:
    """Whole-model MACs, converted sites' MACs and the reachable minimum's MACs at the
    shapes of ``graph`` (batch 1), from the plan's sites and the accountant."""
    calls: dict[str, list[Any]] = {}
    for n in graph.nodes:
        if n.kind == "linear" and n.linear:
            calls.setdefault(n.linear, []).append(n)
    static = float(sum(node_macs(n) for n in graph.nodes))
    full, low = 0.0, 0.0
    for s in plan.sites:
        if isinstance(s, AttentionSite):
            names = {x for st in s.every_stream() for x in (st.q, st.k, st.v, st.out) if x}
            names |= {p.linear for p in s.parts.values() if getattr(p, "linear", "")}
            seen = {x: _tokens(calls[x][0])[0] for x in names if x in calls}
            fold = _tokens(calls[s.q or s.k][0])[1]
            cost = site_cost(s, None, None, token_reduction, seen=seen, fold=fold)
            least = site_cost(s, 1 / s.units, None, token_reduction, seen=seen, fold=fold)
        else:
            assert isinstance(s, MlpSite)
            n = sum(_tokens(c)[0] for c in calls[s.fc1[0]])
            fold = _tokens(calls[s.fc1[0]][0])[1]
            cost = site_cost(s, None, None, token_reduction, n=n, fold=fold)
            width = 1 / s.units if s.units > 1 else None
            least = site_cost(s, width, 0.0, token_reduction, n=n, fold=fold)
        full += cost.static
        low += float(least.dynamic) + least.router
    return {"static": static, "sites": full, "min_macs": static - full + low}


def measure(name: str, entry: dict[str, Any], probe: int) -> dict[str, Any]:
    """Find the sites on a probe, then count at the usual resolution."""
    import diffusers

    cfg, res = entry["config"], entry["resolution"]
    with torch.device("meta"):
        model = getattr(diffusers, entry["class"])(**cfg)
    small = {
        k: (probe if k in ("h", "w") else 2 * probe if k == "txt" else min(v, 2))
        for k, v in res.items()
    }
    start = time.perf_counter()
    plan = analyze(model, inputs(name, cfg, small))
    analysed = time.perf_counter() - start
    args = inputs(name, cfg, res)
    graph = capture(model, (), args, "export", any_linear=True)
    costs = real_costs(plan, graph)
    return {
        "family": name,
        "probe": small,
        "resolution": res,
        "analyse_s": round(analysed, 1),
        "count_s": round(time.perf_counter() - start - analysed, 1),
        "sites": [len(plan.attention), len(plan.mlp)],
        "token_routed_mlps": sum(s.token for s in plan.mlp),
        "skipped": sorted({s.reason for s in plan.skipped})[:3],
        "capture": f"{plan.capture} / {graph.capture}",
        "static_gmacs": round(costs["static"] / 1e9, 1),
        "routable": round(costs["sites"] / costs["static"], 4),
        "minimum": round(costs["min_macs"] / costs["static"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=list(FAMILIES))
    parser.add_argument("--probe", type=int, default=4, help="latent h and w of the probe")
    args = parser.parse_args()
    entries = json.loads(CONFIGS.read_text())
    for name in args.only:
        print(json.dumps(measure(name, entries[name], args.probe)), flush=True)


if __name__ == "__main__":
    main()
