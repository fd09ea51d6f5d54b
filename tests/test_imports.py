"""The import graph of the package flows one way (issue: "a one-way house").

Read with ``ast`` from the source, function-level imports included (a late import is still a
dependency), so a cycle cannot hide behind ``import`` inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dynconvert"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every absolute import in a module."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
    return out


def _edges(name: str) -> set[str]:
    """Modules of this package that ``name`` imports (``from pkg import sub`` counts as sub)."""
    out = set()
    for module, names, _ in _imports(name):
        if not module.startswith("dynconvert"):
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        out.update(subs or [module])
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _edges(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_is_read():
    assert "dynconvert.runtime.state" in GRAPH["dynconvert.runtime.routing"]
    assert "dynconvert.flops" in GRAPH["dynconvert.convert"]


def test_no_import_cycles():
    assert _cycles() == []


# The stages, lowest first: a module may import its own layer and the layers below it, never one
# above (the data flow analyze -> convert -> calibrate -> save/export -> run, then the product).
LAYERS = [
    ["dynconvert.errors", "dynconvert.version", "dynconvert.fields", "dynconvert.plugins"],
    ["dynconvert.config", "dynconvert.inputs", "dynconvert.plan", "dynconvert.sites"],
    ["dynconvert.analysis", "dynconvert.models"],
    ["dynconvert.runtime"],
    ["dynconvert.flops", "dynconvert.verify"],
    ["dynconvert.convert", "dynconvert.testing"],
    ["dynconvert.calibration", "dynconvert.io"],
    ["dynconvert.sampling"],
    ["dynconvert.measure", "dynconvert.deploy"],
    ["dynconvert.recipes", "dynconvert.demo"],
    ["dynconvert.runs"],
    ["dynconvert.cli", "dynconvert.__main__", "dynconvert"],
]
# Modules that sit in another layer than their folder, and why.
PLACED = {
    # importance scores read only the plan and the weights; ConvertConfig checks their names
    "dynconvert.analysis.importance": 1,
    # routing set by hand solves for a FLOPs ratio with the accountant
    "dynconvert.runtime.synthetic": 4,
}


# An attention form's modules sit at their stage (dynconvert/sites/__init__.py): ``<form>`` is
# plan data (the sites package's own layer), ``<form>_find`` an analysis rule, ``<form>_run`` a
# runtime hook.
FORM_STAGES = {"_find": 2, "_run": 3}


def _layer(name: str) -> int:
    if name in PLACED:
        return PLACED[name]
    if name.startswith("dynconvert.sites."):
        suffix = next((s for s in FORM_STAGES if name.endswith(s)), None)
        if suffix is not None:
            return FORM_STAGES[suffix]
    for rank, packages in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in packages if p != "dynconvert"):
            return rank
    assert name == "dynconvert", f"{name} is in no layer: add its package to LAYERS"
    return len(LAYERS) - 1


def test_every_module_has_a_layer():
    assert all(_layer(m) >= 0 for m in MODULES)


def test_the_form_stages_are_the_layers_they_name():
    assert LAYERS[FORM_STAGES["_find"]] == ["dynconvert.analysis", "dynconvert.models"]
    assert LAYERS[FORM_STAGES["_run"]] == ["dynconvert.runtime"]
    assert _layer("dynconvert.sites.gate") == _layer("dynconvert.plan")


def test_every_form_module_is_a_part_or_a_stage_of_one():
    """sites/<form>.py holds the part; sites/<form>_find.py and <form>_run.py need it."""
    names = {m.rsplit(".", 1)[1] for m in MODULES if m.startswith("dynconvert.sites.")}
    stages = {n for n in names if n.endswith(tuple(FORM_STAGES))}
    orphans = sorted(n for n in stages if n.rsplit("_", 1)[0] not in names)
    assert orphans == []


def test_layers():
    bad = sorted(
        f"{m} (layer {_layer(m)}) -> {dep} (layer {_layer(dep)})"
        for m in GRAPH
        for dep in GRAPH[m]
        if _layer(dep) > _layer(m)
    )
    assert bad == []


def test_no_library_module_imports_the_test_helpers():
    # the support matrix (a product feature) runs over the zoo of tiny test models
    # and the published configurations (testing/configs: data and input makers) are read by
    # inspect --model flux-dev and the real-size table
    allowed = {
        "dynconvert.measure.support",
        "dynconvert.measure.realsize",
        "dynconvert.cli.inspect_models",
    }
    bad = sorted(
        f"{m} -> {d}"
        for m in GRAPH
        if not _in(m, "dynconvert.testing") and m not in allowed
        for d in GRAPH[m]
        if _in(d, "dynconvert.testing")
    )
    assert bad == []


def test_the_package_root_stays_small():
    root = [p.name for p in ROOT.glob("*.py")]
    assert len(root) <= 12, sorted(root)


def test_only_the_cli_imports_typer_click_or_rich():
    bad = []
    for name in MODULES:
        if _in(name, "dynconvert.cli"):
            continue
        for module, _, line in _imports(name):
            if module.split(".")[0] in ("typer", "click", "rich"):
                bad.append(f"{name}:{line} imports {module}")
    assert bad == []


def test_only_the_cli_uses_the_package_facade():
    """Library modules import what they use from its own module, not ``import dynconvert``."""
    bad = sorted(
        m
        for m in GRAPH
        if "dynconvert" in GRAPH[m] and not _in(m, "dynconvert.cli", "dynconvert.__main__")
    )
    assert bad == []


def test_no_private_names_across_modules():
    bad = []
    for name in MODULES:
        for module, names, line in _imports(name):
            if not module.startswith("dynconvert") or module == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{name}:{line} imports {', '.join(private)} from {module}")
    assert bad == []
