"""Layer 2, interventions: what may be done to a run, as data. May import `base` and `models`.

- `kinds`: `Positions`, `Action` and the kinds that write a site's value (`Replace`, `Add`,
  `Scale`, `Zero`, `Mean`, `Resample`, `Noise`), each a frozen dataclass that checks itself
  before weights load and prepares an `Action`.
- `knockout`: the kind that blocks attention edges instead (its edges on a prompt, and which
  models can carry it).
- `registry`: `KINDS`, the one table of kinds by name, and their plain-data form.
- `runs`: `Intervention`, `InterventionRun` and `resolve_run`, a run checked against its model.

A new kind is one class in `kinds.py` (or its own module) plus its line in `registry.py`
(docs/architecture.md, "How to add").
"""

from .kinds import (
    Action,
    Add,
    Kind,
    Mean,
    Noise,
    Positions,
    Reader,
    Replace,
    Resample,
    Scale,
    Zero,
    load_vector,
    noise_at,
    site_vector,
)
from .knockout import KEY_WORDS, QUERY_WORDS, Edges, Knockout, check_attention, code_names, refusal, resolve_edges
from .registry import ACTIVATION_KINDS, KINDS, kind_fields, kind_values, make_kind
from .runs import (
    Intervention,
    InterventionRun,
    ResolvedIntervention,
    ResolvedRun,
    resolve_run,
    run_from_dict,
    run_to_dict,
)

__all__ = [
    "ACTIVATION_KINDS",
    "Action",
    "Add",
    "Edges",
    "Intervention",
    "InterventionRun",
    "KEY_WORDS",
    "KINDS",
    "Kind",
    "Knockout",
    "Mean",
    "Noise",
    "Positions",
    "QUERY_WORDS",
    "Reader",
    "Replace",
    "Resample",
    "ResolvedIntervention",
    "ResolvedRun",
    "Scale",
    "Zero",
    "check_attention",
    "code_names",
    "kind_fields",
    "kind_values",
    "load_vector",
    "make_kind",
    "noise_at",
    "refusal",
    "resolve_edges",
    "resolve_run",
    "run_from_dict",
    "run_to_dict",
    "site_vector",
]
