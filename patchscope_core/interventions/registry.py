"""The intervention kinds by name, and their plain-data form.

`KINDS` is the one table the sweep config, the CLI and the workers read; `make_kind` builds a
kind from plain data (what travels to a sweep's workers: vectors as lists of numbers, prompt
sets as lists of strings) and refuses fields the kind does not take; `kind_values` is its
inverse. A new kind is added here after its class (`kinds.py`, or a module of its own such as
`knockout.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..base.errors import PatchscopeError
from .kinds import Add, Kind, Mean, Noise, Replace, Resample, Scale, Zero
from .knockout import Knockout

KINDS: dict[str, type[Kind]] = {k.name: k for k in (Replace, Add, Scale, Zero, Mean, Resample, Noise, Knockout)}


ACTIVATION_KINDS = {name: k for name, k in KINDS.items() if not k.edits_attention}  # kinds that write a site's value


def kind_fields(name: str) -> list[str]:
    """The typed fields of a registered kind (for the CLI and the sweep config)."""
    from dataclasses import fields

    return [_key(f) for f in fields(KINDS[name])]


def _key(f) -> str:
    """A field's config key (`from` for Knockout.from_, a Python keyword)."""
    return f.metadata.get("key", f.name)


def make_kind(name: str, values: dict[str, Any], field_name: str = "kind") -> Kind:
    """A registered kind from plain data (what travels to a sweep's workers): vectors as lists of
    numbers, prompt sets as lists of strings; fields the kind does not take are refused."""
    from dataclasses import fields

    if name not in KINDS:
        raise PatchscopeError(f"{field_name}: unknown kind {name!r} (allowed: {', '.join(KINDS)})")
    takes = set(kind_fields(name))
    extra = sorted(set(values) - takes)
    if extra:
        raise PatchscopeError(
            f"{field_name}: {name} takes {', '.join(sorted(takes)) or 'no fields'}, not {', '.join(extra)}"
        )
    typed = {}
    for key, value in values.items():
        if key == "vector" and value is not None and not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=torch.float32)
        elif key in ("reference", "positive", "negative", "from", "to", "heads") and value is not None:
            value = tuple(value)
        typed[key] = value
    attrs = {_key(f): f.name for f in fields(KINDS[name])}
    return KINDS[name](**{attrs[k]: v for k, v in typed.items()})


def kind_values(kind: Kind) -> dict[str, Any]:
    """The plain data of a kind, the inverse of `make_kind` (vectors as lists)."""
    from dataclasses import fields

    out = {}
    for f in fields(kind):
        value = getattr(kind, f.name)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        out[_key(f)] = value
    return out
