"""The seam for attention forms (issue 19, item 2): parts registered once, their MACs terms
summed by the site, the version-2 field names kept readable, and the migration's edges."""

from __future__ import annotations

import pytest

from dynconvert.errors import RecordError
from dynconvert.plan import PLAN_VERSION, AttentionSite, Plan, UnitMap, migrate
from dynconvert.sites import AttentionPart, load, part_classes, register_part
from dynconvert.sites.gate import Gate
from dynconvert.sites.kv_compression import KvCompression
from dynconvert.sites.linear import LinearAttention


def _site(**parts) -> AttentionSite:
    """Self-attention, 4 heads of 8 on 32 features, 16 tokens, separate q/k/v."""
    rows = [UnitMap(n, "rows", 4, [(0, 8, 8)]) for n in ("q", "k", "v")]
    return AttentionSite(
        name="attn", block="blocks.0", module_class="m.Attn", kind="self", heads=4, head_dim=8,
        v_head_dim=8, q="q", k="k", v="v", out="o", q_in=32, kv_in=32, out_features=32,
        tokens_q=16, tokens_kv=16, in_maps=rows, out_map=UnitMap("o", "cols", 4, [(0, 8, 8)]),
        parts=parts,
    )  # fmt: skip


def test_every_shipped_form_is_registered_with_its_stages():
    assert sorted(part_classes()) == [
        "fused_in",
        "gate",
        "kv_compression",
        "linear",
        "partial",
        "table",
    ]
    load("find")
    load("run")
    from dynconvert.sites import FINDERS, RUNTIMES

    assert sorted(FINDERS) == [
        "fused_in",
        "gate",
        "kv_compression",
        "linear",
        "partial",
    ]  # table: resolve
    assert sorted(RUNTIMES) == ["partial", "table"]


def test_the_site_sums_the_core_and_its_parts_terms():
    core = 3 * 16 * 32 * 32 + 16 * 32 * 32  # q, k, v and out projections
    attention = 16 * 16 * 4 * (8 + 8)  # QK^T + AV
    assert _site().macs() == core + attention
    assert _site(gate=Gate("g", 32, 32)).macs() == core + attention + 16 * 32 * 32
    assert _site(kv_compression=KvCompression(4)).macs() == core + attention // 4
    linear = _site(linear=LinearAttention(1000))
    assert linear.macs() == core + 1000
    assert linear.macs(seen={"q": 32, "k": 32, "v": 32, "o": 32}) == 2 * core + 2000
    assert _site().fixed_macs() == 0


def test_version_2_names_read_from_the_parts_and_refuse_to_be_set():
    plain, gated = _site(), _site(gate=Gate("g", 32, 16))
    assert (plain.gate, plain.kv_stride, plain.linear_macs, plain.unsliced) == ("", 1, 0, [])
    assert (gated.gate, gated.gate_in, gated.gate_rows) == ("g", 32, 16)
    plain.table_args.append("not kept")  # a fresh default every time
    assert plain.table_args == []
    with pytest.raises(AttributeError, match=r"site.parts\['table'\]"):
        plain.table_args = []
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = plain.nothing


def test_a_version_2_site_dict_migrates_into_parts():
    site = _site(gate=Gate("g", 32, 16), kv_compression=KvCompression(4))
    v3 = Plan.from_dict(_plan_dict(site)).attention[0]
    flat = {k: v for k, v in _plan_dict(site)["attention"][0].items() if k != "parts"}
    flat.update(gate="g", gate_in=32, gate_rows=16, kv_stride=4, linear_macs=0, cut_maps=[])
    flat.update(unsliced=[], table_args=[])
    old = {**_plan_dict(site), "version": 2, "attention": [flat]}
    assert migrate(old)["version"] == PLAN_VERSION
    assert Plan.from_dict(old).attention[0] == v3 == site


def test_an_unknown_form_is_refused_naming_the_fix():
    data = _plan_dict(_site())
    data["attention"][0]["parts"] = {"from_the_future": {}}
    with pytest.raises(RecordError, match="does not know.*upgrade dynconvert"):
        Plan.from_dict(data)


def test_a_form_registers_once():
    with pytest.raises(ValueError, match="two parts registered"):

        @register_part("gate")
        class Another(AttentionPart):
            pass


def _plan_dict(site: AttentionSite) -> dict:
    site.index = 0
    plan = Plan(
        model_class="m.M", timestep_arg="t", capture="torch.export", coverage="all", batch=1,
        input_shapes={}, attention=[site], mlp=[], skipped=[], static_macs=0, other_macs=0,
    )  # fmt: skip
    return plan.to_dict()
