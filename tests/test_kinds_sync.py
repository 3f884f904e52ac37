"""The registries that must agree, held together: every sweep kind has its sections, a schema,
a report and a worker operation; every recipe of the core has its sweep side; the intervention
kinds the CLI offers are the core's KINDS. And the kinds stay behind their protocol: no kind's
module imports another's, and outside sweeps/kinds/ (and the worker's operation table) no code
branches on a kind's name."""

from __future__ import annotations

import ast
from pathlib import Path

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
    import importlib
    import pkgutil

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


def kinds_named(source: str, operation_table: bool = False) -> list[str]:
    """Where `source` branches on a kind's name: a comparison with a registered sweep kind's name
    or a core intervention kind's (`==`, `in (...)`), or a dict keyed by a sweep kind's name
    (`operation_table`: the worker's `OPERATIONS = {...}`, keyed by operation, is allowed)."""
    sweep_kinds, every_kind = set(KINDS), set(KINDS) | set(INTERVENTION_KINDS)
    tree = ast.parse(source)
    allowed = set()
    if operation_table:
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OPERATIONS" for t in node.targets):
                allowed.add(id(node.value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = []
            for op in (node.left, *node.comparators):
                operands += op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
            names = [c.value for c in operands if isinstance(c, ast.Constant) and c.value in every_kind]
        elif isinstance(node, ast.Dict) and id(node) not in allowed:
            names = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in sweep_kinds]
        else:
            continue
        found += [f"line {node.lineno}: {name!r}" for name in names]
    return found


def test_no_kind_is_named_outside_the_kinds():
    """The CLI, config, plan, grid, records, sinks, driver and workers ask a kind (its SweepKind
    members; a core intervention kind's class attributes, such as `edits_attention`) instead of
    branching on its name; sweeps/kinds/ and the worker's operation table name kinds."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted([*(root / "sweeps").rglob("*.py"), *(root / "workers").rglob("*.py")]):
        if (root / "sweeps" / "kinds") in path.parents:
            continue
        table = path == root / "workers" / "actor.py"
        found += [f"{path.relative_to(root)} {at}" for at in kinds_named(path.read_text(), operation_table=table)]
    assert not found, found


def test_the_kind_name_check_finds_a_branch_on_a_name():
    assert kinds_named('if config.kind == "knockout":\n    pass\n') == ["line 1: 'knockout'"]
    assert kinds_named('ok = kind in ("recipe", "other")\n') == ["line 1: 'recipe'"]
    assert kinds_named('TABLE = {"causal_trace": 1, "scale": 2}\n') == ["line 1: 'causal_trace'"]  # scale: a field
    assert kinds_named('OPERATIONS = {"patchscope": f}\n', operation_table=True) == []
    assert kinds_named('OPERATIONS = {"patchscope": f}\n') == ["line 1: 'patchscope'"]
    assert kinds_named('print("knockout", kind.edits_attention)\n') == []  # a message, not a branch
