"""The registries that must agree, held together: every sweep kind has its sections, a schema,
a report and a worker operation; every recipe of the core has its sweep side; the intervention
kinds the CLI offers are the core's KINDS."""

from __future__ import annotations

from pydantic import BaseModel

from patchscope_core import KINDS as INTERVENTION_KINDS
from patchscope_core.recipes import RECIPES
from sweeps.config.sweep import sweep_config_model
from sweeps.kinds import KINDS
from sweeps.kinds.base import SweepKind
from sweeps.kinds.recipe import PARTS
from workers.actor import OPERATIONS


def test_every_sweep_kind_implements_the_protocol_and_has_a_worker_operation():
    import importlib
    import pkgutil

    import sweeps.kinds

    declared = {}  # every module of sweeps/kinds that declares a KIND must be in the registry
    for info in pkgutil.iter_modules(sweeps.kinds.__path__):
        module = importlib.import_module(f"sweeps.kinds.{info.name}")
        if hasattr(module, "KIND"):
            declared[module.KIND.name] = module.KIND
    assert declared and {n: KINDS[n] for n in declared if n in KINDS} == declared, sorted(declared)
    assert {"patchscope", "intervention", "causal_trace", "recipe", "activation_patching"} <= set(KINDS)
    fields = sweep_config_model().model_fields
    for name, kind in KINDS.items():
        assert isinstance(kind, SweepKind) and kind.name == name
        assert kind.operation in OPERATIONS, f"{name}: no worker operation {kind.operation!r}"
        assert kind.schema.params[0] == "cell_id" and kind.schema.table and kind.sections
        assert all(s in fields for s in kind.sections)
        assert callable(kind.report) and callable(kind.summary) and callable(kind.describe)
    assert len({frozenset(k.marks) for k in KINDS.values()}) == len(KINDS)  # stored rows tell their kind


def test_every_core_recipe_has_its_sweep_side_and_section():
    assert sorted(PARTS) == sorted(RECIPES)
    for name, part in PARTS.items():
        assert issubclass(part.Section, BaseModel) and part.Section.model_fields["name"].annotation.__args__ == (name,)


def test_the_cli_offers_exactly_the_core_intervention_kinds():
    from sweeps.cli import build_parser

    parser = build_parser()
    intervene = next(a for a in parser._subparsers._actions if a.dest == "command").choices["intervene"]
    kind = next(a for a in intervene._actions if a.dest == "kind")
    assert list(kind.choices) == list(INTERVENTION_KINDS)


def test_no_kind_imports_another_kind():
    """What kinds share lives in modules without a KIND (base, prompts, pairs), which they import;
    a kind's module importing another kind's (the pair kinds did) is refused."""
    import ast
    import importlib
    import pkgutil
    from pathlib import Path

    import sweeps.kinds

    root = Path(sweeps.kinds.__path__[0])
    kinds = set()
    for info in pkgutil.iter_modules(sweeps.kinds.__path__):
        if hasattr(importlib.import_module(f"sweeps.kinds.{info.name}"), "KIND"):
            kinds.add(info.name)
    assert {"activation_patching", "attribution_patching"} <= kinds and "pairs" not in kinds
    wrong = set()
    for kind in sorted(kinds):
        for path in sorted((root / kind).rglob("*.py")) if (root / kind).is_dir() else [root / f"{kind}.py"]:
            package = list(path.relative_to(root.parent.parent).parts[:-1])  # sweeps, kinds[, recipe]
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = package[: len(package) - node.level + 1] if node.level else []
                    module = ".".join(base + ([node.module] if node.module else []))
                    targets = [module] + [f"{module}.{a.name}" for a in node.names]
                else:
                    continue
                for target in targets:
                    other = target.split(".")[2] if target.startswith("sweeps.kinds.") else None
                    if other in kinds - {kind}:
                        wrong.add(f"{path.relative_to(root)} imports sweeps.kinds.{other}")
    assert not wrong, sorted(wrong)
