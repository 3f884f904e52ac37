"""The field types every config section shares, written once: layer specs (`'all'`, `'same'`,
`'start:stop:step'`, an int, a list), token positions, grid axes, the strict base model
(unknown keys rejected, frozen), and lists of sites given as names or mappings (`site_entries`). Ranges are checked later, against each model
(`sweeps.config.models.checked_layers`)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

_SLICE = re.compile(r"^\s*(-?\d*)\s*:\s*(-?\d*)\s*(?::\s*(-?\d*)\s*)?$")


def parse_layers(value: Any, allow_same: bool) -> str | list[int]:
    """'all', 'same' (targets), 'start:stop:step' (kept as text until the model is known), an
    int, or a list of ints. Ranges are checked later, against each model."""
    if isinstance(value, bool):
        raise ValueError(f"expected 'all', 'start:stop:step' or a list of layers, got {value!r}")
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if text == "all" or (allow_same and text == "same"):
            return text
        m = _SLICE.match(text)
        if not m:
            allowed = "'same', 'all'" if allow_same else "'all'"
            raise ValueError(f"expected {allowed}, 'start:stop:step' or a list of layers, got {value!r}")
        start, stop, step = (int(g) if g else None for g in m.groups())
        if any(x is not None and x < 0 for x in (start, stop)):
            raise ValueError(f"{value!r}: start and stop must be >= 0")
        if step is not None and step < 1:
            raise ValueError(f"{value!r}: step must be >= 1")
        return text
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty list of layers")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected integer layers, got {v!r}")
            out.append(v)
        return out
    raise ValueError(f"expected 'all', 'start:stop:step' or a list of layers, got {value!r}")


def expand_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """The layers a parsed spec names for a model with n_layers blocks (unchecked: the caller
    checks each against the model so the error can name the model)."""
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, str):
        start, stop, step = (int(g) if g else None for g in _SLICE.match(spec).groups())
        start = 0 if start is None else start
        stop = n_layers if stop is None else stop
        out = list(range(start, stop, step or 1))
        if not out:
            raise ValueError(f"{spec!r} names no layer")
        return out  # a stop past the last layer is caught by the range check, naming the layer
    return list(dict.fromkeys(spec))


def parse_positions(value: Any, allow_all: bool) -> str | list[int]:
    if isinstance(value, bool):
        raise ValueError(f"expected a list of token positions, got {value!r}")
    if isinstance(value, int):
        return [value]
    if allow_all and value == "all":
        return "all"
    if isinstance(value, (list, tuple)) and value:
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"expected integer positions, got {v!r}")
        return list(dict.fromkeys(value))
    allowed = "'all' or " if allow_all else ""
    raise ValueError(f"expected {allowed}a non-empty list of integer positions, got {value!r}")


def axis(value: Any) -> list:
    """A grid axis: a list as it is, a single value as a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Strict(BaseModel):
    """A config section: unknown keys are errors, values cannot change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# The annotated types of config fields (a default is kept as written: pydantic does not validate it).
Layers = Annotated[Any, AfterValidator(lambda v: parse_layers(v, allow_same=False))]
TargetLayers = Annotated[Any, AfterValidator(lambda v: parse_layers(v, allow_same=True))]  # 'same' allowed
Positions = Annotated[Any, AfterValidator(lambda v: parse_positions(v, allow_all=True))]
TargetPositions = Annotated[Any, AfterValidator(lambda v: parse_positions(v, allow_all=False))]


def site_entries(v: Any, model: type, field: str) -> list:
    """A list of sites: each a hook name (a string, kept) or a mapping validated as `model`; a bad
    entry is one error naming `field[i]` and the key (`unknown key ... (allowed: ...)`)."""
    if not isinstance(v, list):
        return v  # the field's own type refuses it
    out = []
    for i, x in enumerate(v):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            try:
                out.append(model.model_validate(x))
            except ValidationError as exc:
                lines = []
                for e in exc.errors():
                    key = ".".join(str(k) for k in e["loc"])
                    msg = e["msg"].removeprefix("Value error, ")
                    if e["type"] == "extra_forbidden":
                        msg = f"unknown key {e['loc'][-1]!r} (allowed: {', '.join(model.model_fields)})"
                    lines.append(f"{field}[{i}]{'.' + key if key else ''}: {msg}")
                raise ValueError("; ".join(lines)) from None
        else:
            raise ValueError(
                f"{field}[{i}]: expected a site name or a mapping {{site: ..., positions: ...}}, got {x!r}"
            )
    return out
