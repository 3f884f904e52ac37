"""Imports point one way: config -> grid (cells, tasks) -> workers -> records -> sinks, with the
core (patchscope_core) under all of them and the driver and CLI on top. Reads every module's
imports (top-level and inside functions) from its source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("patchscope_core", "workers", "sweeps")

# Each module's place in the flow; a module may import only from its own place or earlier ones.
STAGES = {
    "patchscope_core": 0,
    "sweeps.config": 1,
    "sweeps.pictures": 1,  # the shared config stage (no kind named), drawing helpers
    "sweeps.kinds": 2,  # one module per sweep kind, and the registry
    "sweeps.config.sweep": 3,  # the whole config: shared sections + each registered kind's
    "sweeps.plan": 4,  # rows, checks against the models, context, hash (through the kind)
    "sweeps.grid": 5,  # cells and tasks
    "workers": 6,
    "sweeps.run.scheduler": 6,  # the actors, and the driver's side of them
    "sweeps.records": 7,
    "sweeps.sinks": 8,  # the store, the report, W&B
    "sweeps.run": 9,  # the driver and the cluster connection
    "sweeps.cli": 10,
    "sweeps.cli_patch": 10,
    "sweeps.examples": 11,  # scripts that build the examples' data
}


def stage(module: str) -> int:
    for prefix in sorted(STAGES, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return STAGES[prefix]
    raise KeyError(module)


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def project_imports(name: str, path: Path) -> set[str]:
    """The project modules `name` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in PACKAGES)
    return found


def test_every_module_has_a_place_in_the_flow():
    for name in modules():
        if name not in PACKAGES:
            stage(name)  # raises for a module nobody placed


def test_imports_point_one_way():
    known = modules()
    wrong = []
    for name, path in known.items():
        if name in PACKAGES and name != "patchscope_core":
            continue  # empty package markers
        for target in project_imports(name, path):
            if target in ("sweeps", "workers"):
                continue  # `from sweeps import driver`: the module itself is checked as sweeps.driver
            while target not in known and "." in target:
                target = target.rpartition(".")[0]  # `from pkg.mod import name`: the module
            if stage(target) > stage(name):
                wrong.append(f"{name} imports {target}")
            if (
                target.startswith(name + ".")
                and name in known
                and known[name].name == "__init__.py"
                and stage(target) != stage(name)
            ):
                wrong.append(f"{name} imports {target} (a package marker importing a later stage)")
            if name.startswith("workers") and not target.startswith(("patchscope_core", "workers")):
                wrong.append(f"{name} imports {target} (workers import patchscope_core only)")
    assert not wrong, "imports pointing against the flow:\n" + "\n".join(sorted(wrong))


def test_the_check_catches_a_backward_import(tmp_path):
    """The checker itself: a worker importing sweeps.config is found."""
    bad = tmp_path / "actor.py"
    bad.write_text("def f():\n    from sweeps.config import ExecutionConfig\n")
    assert project_imports("workers.actor", bad) == {"sweeps.config", "sweeps.config.ExecutionConfig"}
    assert stage("sweeps.config") > 0 and stage("workers.actor") < stage("sweeps.records")


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (top level and inside functions)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = set()
        for target in project_imports(name, path):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle (one path each), by depth-first search."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_even_inside_functions():
    """In the sweep layer and the workers (patchscope_core's own cycles are the core's to fix)."""
    graph = {k: v for k, v in import_graph().items() if not k.startswith("patchscope_core")}
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_private_names_imported_across_modules():
    """`from x import _name` between project modules (the core's lenses._aligned excepted: the core is not ours to change here)."""
    allowed = {("sweeps.kinds.recipe.cross_model", "patchscope_core.recipes.lenses._aligned")}
    wrong = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        target = f"{node.module}.{a.name}" if node.module else a.name
                        if (name, target) not in allowed:
                            wrong.append(f"{name}: from {node.module} import {a.name}")
    assert not wrong, "private names imported:\n" + "\n".join(wrong)
