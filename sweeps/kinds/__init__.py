"""The registry of sweep kinds: `KINDS` maps each `kind:` name of a sweep config to the object
that implements the `SweepKind` protocol (`sweeps/kinds/base.py`) for it. The config, the plan,
the grid, the records, the sinks and the driver look a kind up here and never name one.

To add a kind: one module beside these with a `KIND` object, listed below (docs/architecture.md).
The modules without a `KIND` hold what kinds share and are no kinds: `base` (the protocol),
`prompts` (the `prompts` section and its rows), `pairs` (the two pair kinds' common part).
A test may register a kind of its own with `register`.
"""

from __future__ import annotations

from . import (
    activation_patching,
    attribution_patching,
    causal_trace,
    feature_explanation,
    intervention,
    patchscope,
    recipe,
)
from .base import SweepKind

KINDS: dict[str, SweepKind] = {
    m.KIND.name: m.KIND
    for m in (
        patchscope,
        intervention,
        causal_trace,
        recipe,
        activation_patching,
        attribution_patching,
        feature_explanation,
    )
}
DEFAULT = patchscope.KIND.name  # the kind of a config that leaves out `kind:`


def register(kind: SweepKind) -> SweepKind:
    """Add a kind (a plugin, a test's toy kind); its name must be new."""
    if kind.name in KINDS:
        raise ValueError(f"sweep kind {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


def kind_of(columns) -> str:
    """Which kind of sweep stored rows with these columns: the first kind whose marks they hold
    (a kind with no marks, patchscope, when none does)."""
    columns = set(columns)
    marked = [k for k in KINDS.values() if k.marks]
    for kind in sorted(marked, key=lambda k: -len(k.marks)):
        if kind.marks <= columns:
            return kind.name
    return next(k.name for k in KINDS.values() if not k.marks)
