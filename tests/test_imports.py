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
    "sweeps.config": 1, "sweeps.rows": 1, "sweeps.plan": 1, "sweeps.recipe_rows": 1,
    "sweeps.grid": 2, "sweeps.recipe_grid": 2,
    "workers": 3, "sweeps.scheduler": 3,  # the actors, and the driver's side of them
    "sweeps.records": 4,
    "sweeps.store": 5, "sweeps.wandb_sink": 5, "sweeps.report": 5, "sweeps.report_studies": 5,  # the sinks
    "sweeps.report_recipes": 5,
    "sweeps.driver": 6,
    "sweeps.cli": 7, "sweeps.cli_patch": 7,
    "sweeps.examples": 8,  # scripts that build the examples' data
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
            if name.startswith("workers") and not target.startswith(("patchscope_core", "workers")):
                wrong.append(f"{name} imports {target} (workers import patchscope_core only)")
    assert not wrong, "imports pointing against the flow:\n" + "\n".join(sorted(wrong))


def test_the_check_catches_a_backward_import(tmp_path):
    """The checker itself: a worker importing sweeps.config is found."""
    bad = tmp_path / "actor.py"
    bad.write_text("def f():\n    from sweeps.config import ExecutionConfig\n")
    assert project_imports("workers.actor", bad) == {"sweeps.config", "sweeps.config.ExecutionConfig"}
    assert stage("sweeps.config") > 0 and stage("workers.actor") < stage("sweeps.records")
