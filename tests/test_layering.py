"""moescale's packages import downwards only, and no module imports itself round a cycle.

    layers, config, checks, registry, presets  <-  networks, envs, replay, data  <-  agents  <-  train
        <-  study, analysis  <-  cli, api, demo

Every `import` and `from ... import` of a moescale module counts, those inside functions included (an import
deferred into a function is still an edge the code depends on).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "moescale"
LEVELS = {
    "checks": 0, "registry": 0, "config": 0, "config_docs": 0, "presets": 0, "layers": 0,
    "networks": 1, "envs": 1, "replay": 1, "data": 1,
    "agents": 2,
    "train": 3,
    "study": 4, "analysis": 4,
    "cli": 5, "api": 5, "demo": 5, "": 5,  # "": the package itself, moescale/__init__.py
}


def module_names() -> dict[str, Path]:
    """moescale.x.y -> its file, for every module of the package."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(path: Path, names: dict[str, Path]) -> set[str]:
    """The moescale modules a file imports (a `from package import name` of a submodule counts the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moescale")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moescale"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in names else node.module)
    return found


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports(path, names) & set(names) for name, path in names.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Edges into a higher level, or across the sibling packages study and analysis."""
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = package(source), package(target)
            if LEVELS[b] > LEVELS[a] or (a != b and LEVELS[a] == LEVELS[b] == LEVELS["study"]):
                bad.append(f"{source} -> {target}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk meets, as "a -> b -> a"."""
    found, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_every_package_has_a_level():
    assert {package(m) for m in graph()} <= set(LEVELS)


def test_no_module_imports_upward_or_across_siblings():
    assert violations(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_planted_faults(tmp_path):
    assert violations({"moescale.layers.x": {"moescale.train.run"}}) == ["moescale.layers.x -> moescale.train.run"]
    assert violations({"moescale.study.a": {"moescale.analysis.b"}}) == ["moescale.study.a -> moescale.analysis.b"]
    assert violations({"moescale.train.run": {"moescale.layers.x"}}) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    # the walk reads deferred imports too: an import inside a function of a low module is an edge
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from moescale.cli import main\n    return main\n")
    assert imports(path, module_names()) == {"moescale.cli"}
