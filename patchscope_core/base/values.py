"""Checks of plain values every input shares, in one place: a seed within the range every
random generator here takes (`MAX_SEED`), numbers that are finite (the first bad index of a
tensor), `str.format` templates that use only the fields they may, and `quiet_torch_load`
(tensor files read without unpickling code or printing torch's warnings). Each returns a problem
or raises a `PatchscopeError` naming the field; callers add where the value came from.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable
from typing import Any

from .errors import PatchscopeError

# Seeds go into torch and numpy generators and into `seed * 1_000_003 + position` (the noise of
# `interventions.noise_at`), which must stay below 2**63: 2**32 - 1 is every generator's range.
MAX_SEED = 2**32 - 1


def seed_problem(value: Any) -> str | None:
    """Why `value` is no seed (an integer 0 .. MAX_SEED), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer seed, got {value!r}"
    if not 0 <= value <= MAX_SEED:
        return f"{value} is out of range 0 .. {MAX_SEED} (2**32 - 1)"
    return None


def check_seed(value: Any, field_name: str) -> int:
    problem = seed_problem(value)
    if problem:
        raise PatchscopeError(f"{field_name}: {problem}")
    return value


def number_problem(value: Any, positive: bool = False) -> str | None:
    """Why `value` is no finite number (> 0 when `positive`), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {value!r}"
    if not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if positive and not value > 0:
        return f"must be > 0, got {value!r}"
    return None


def nonfinite_index(values) -> tuple[int, ...] | None:
    """The index of the first NaN or infinite entry of a tensor (or array), or None."""
    import torch

    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if not t.is_floating_point():
        return None
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    flat = int(torch.nonzero(bad.flatten())[0])
    index = []
    for size in reversed(t.shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def check_finite(values, field_name: str, where: str) -> None:
    """A tensor with a NaN or infinite entry is an error naming the field, where it came from and
    the first bad index."""
    index = nonfinite_index(values)
    if index is not None:
        value = float(values[index]) if index else float(values)
        raise PatchscopeError(f"{field_name}: {where} holds {value} at index {list(index)}; every value must be finite")


def quiet_torch_load(path):
    """`torch.load` with weights_only (never unpickling code), without the warnings torch prints
    on the way (a refused pickle is the caller's one-line error, not a page of advice)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def template_problem(template: str, allowed: Iterable[str], needs: Iterable[str] = ()) -> str | None:
    """Why a `str.format` template cannot be filled with the `allowed` fields (as text), or None:
    a field it may not use, a positional `{}`, an attribute or index (`{a.b}`, `{a[0]}`), a
    conversion other than !r !s !a, a format spec text cannot take, broken braces, or a field of
    `needs` it does not use."""
    allowed = tuple(allowed)
    if not template.strip():
        return "empty template"
    names = ", ".join("{" + a + "}" for a in allowed)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"not a valid template ({exc}; write {{{{ and }}}} for literal braces)"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed:
            what = "a positional field {}" if name == "" or name.isdigit() else f"{{{name}}}"
            return f"a template may use {names} only, not {what}"
        if conversion not in (None, "r", "s", "a"):
            return f"the conversion !{conversion} on {{{name}}} is not one of !r, !s, !a"
        if "{" in spec:
            return f"a nested field in the format spec of {{{name}}} is not allowed"
    used = {name for _, name, _, _ in parts if name is not None}
    missing = [n for n in needs if n not in used]
    if missing:
        return "the template must use " + ", ".join("{" + n + "}" for n in missing)
    try:
        template.format(**{a: "" for a in allowed})
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        return f"the template cannot be filled ({type(exc).__name__}: {exc})"
    return None
