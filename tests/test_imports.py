"""Imports point one way: config -> grid (cells, tasks) -> workers -> records -> sinks, with the
core (patchscope_core) under all of them and the driver and CLI on top. Reads every module's
imports (top-level and inside functions) from its source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("patchscope_core", "workers", "sweeps")

# Each module's place in the flow; a module may import only from its own place or earlier ones.
# The core's layers first (patchscope_core/*/__init__.py says what each is for), then the sweep's flow.
STAGES = {
    "patchscope_core.base": 0,  # errors, checked values, text files
    "patchscope_core.models": 1,  # loading, ModelInfo, sites, tokens and positions
    "patchscope_core.interventions": 2,  # the kinds (knockout's edges included), the registry, runs
    "patchscope_core.forward": 3,  # hooks under the KV cache, dispatch, readings, partial forward passes
    "patchscope_core.engine": 4,
    "patchscope_core.methods": 5,  # patchscope, tracing, patching, attribution
    "patchscope_core.recipes": 6,  # the paper's recipes
    "patchscope_core": 7,  # the facade (its __init__ only: EXACT): the public names of every layer
    "sweeps.config": 8,
    "sweeps.pictures": 8,  # the shared config stage (no kind named), drawing helpers
    "sweeps.kinds": 9,  # one module per sweep kind, and the registry
    "sweeps.config.sweep": 10,  # the whole config: shared sections + each registered kind's
    "sweeps.plan": 11,  # rows, checks against the models, context, hash (through the kind)
    "sweeps.grid": 12,  # cells and tasks
    "workers": 13,
    "sweeps.run.scheduler": 13,  # the actors, and the driver's side of them
    "sweeps.records": 14,
    "sweeps.sinks": 15,  # the store, the report, W&B
    "sweeps.run": 16,  # the driver and the cluster connection
    "sweeps.cli": 17,
    "sweeps.cli_patch": 17,
    "sweeps.examples": 18,  # scripts that build the examples' data
}
EXACT = {"patchscope_core"}  # places that hold only the module of that name, not those below it


def stage(module: str) -> int:
    for prefix in sorted(STAGES, key=len, reverse=True):
        if module == prefix or (module.startswith(prefix + ".") and prefix not in EXACT):
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
            # `from pkg import name`: the module pkg.name where it is one, else pkg (resolved by the callers)
            targets = [f"{base}.{a.name}" for a in node.names]
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
                and stage(target) > stage(name)
            ):
                wrong.append(f"{name} imports {target} (a package marker importing a later stage)")
            if name.startswith("workers") and not target.startswith(("patchscope_core", "workers")):
                wrong.append(f"{name} imports {target} (workers import patchscope_core only)")
    assert not wrong, "imports pointing against the flow:\n" + "\n".join(sorted(wrong))


def test_the_check_catches_a_backward_import(tmp_path):
    """The checker itself: a worker importing sweeps.config is found."""
    bad = tmp_path / "actor.py"
    bad.write_text("def f():\n    from sweeps.config import ExecutionConfig\n")
    assert project_imports("workers.actor", bad) == {"sweeps.config.ExecutionConfig"}
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
    """In the whole project, the core's layers included."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_private_names_imported_across_modules():
    """`from x import _name` between project modules."""
    allowed: set[tuple[str, str]] = set()
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


# What `from patchscope_core import ...` gave before the core was cut into layers: it keeps working.
PUBLIC = """ALIASES Add Affine Decoding Engine HookContext Identity InputError Intervention InterventionResult
InterventionRun KINDS Mean ModelInfo Noise Patchscope PatchscopeEngine PatchscopeError PatchscopeResult Positions
Replace Resample SITES Scale Site Source Target UnknownModelError Zero cache_dir info_of load_model model_info
resid_post resolve run_patchscopes tokenize""".split()


def test_the_core_keeps_its_public_names():
    import patchscope_core

    assert sorted(patchscope_core.__all__) == sorted(PUBLIC)
    assert all(getattr(patchscope_core, name) is not None for name in PUBLIC)


def test_a_lower_layer_importing_a_higher_one_is_refused(tmp_path):
    """The checker on the core: the hooks (forward) naming a knockout kind's module (interventions)
    is fine; the models naming the engine is not."""
    assert stage("patchscope_core.forward.hooks") > stage("patchscope_core.interventions.knockout")
    assert stage("patchscope_core.models.sites") < stage("patchscope_core.engine")
    assert stage("patchscope_core") > stage("patchscope_core.recipes.probes")
    bad = tmp_path / "sites.py"
    bad.write_text("def f():\n    from ..engine import Engine\n")
    assert project_imports("patchscope_core.models.sites", bad) == {"patchscope_core.engine.Engine"}
