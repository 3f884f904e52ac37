"""Config errors: `ConfigError` (an `InputError` whose message starts with the field it is
about) and `format_errors`, pydantic's validation errors in that form, e.g.
`source.layers: expected 'all', 'start:stop:step' or a list of layers, got 'x'`."""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import ValidationError

from patchscope_core import InputError


class ConfigError(InputError):
    """A sweep config that cannot run; the message starts with the field it is about."""


_NAMES_FIELD = re.compile(r"^[A-Za-z_][\w\[\]]*(\.[\w\[\]]+)+: ")


def _loc(loc: tuple) -> str:
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _allowed_keys(root: type, loc: tuple, tagged: dict[str, dict[str, type]]) -> list[str]:
    if len(loc) == 2 and loc[0] in tagged and loc[1] in tagged[loc[0]]:
        return list(tagged[loc[0]][loc[1]].model_fields)
    model: Any = _section(root)
    for key in loc:
        info = getattr(model, "model_fields", {}).get(key)
        if info is None:
            return []
        model = _section(info.annotation)
    return list(getattr(model, "model_fields", {}))


def _section(annotation: Any) -> Any:
    """The model of an annotation: `X | None` (an optional kind section) is X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and hasattr(args[0], "model_fields"):
        return args[0]
    return annotation


def format_errors(exc: ValidationError, root: type, tagged: dict[str, dict[str, type]]) -> str:
    """One line per error, each starting with its field. `tagged`: for a section that is a
    union told apart by a tag (recipe.name), its models by tag (the tag is not a key)."""
    lines = []
    for err in exc.errors():
        where = err["loc"]
        if len(where) > 1 and where[0] in tagged and where[1] in tagged[where[0]]:
            where = where[:1] + where[2:]  # pydantic's union tag, not a key
        loc = _loc(where)
        msg = err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {err['loc'][-1]!r} (allowed: {', '.join(_allowed_keys(root, err['loc'][:-1], tagged))})"
        if not loc or _NAMES_FIELD.match(msg):
            lines.append(msg)  # the check already names its field
        else:
            lines.append(f"{loc}: {msg}")
    return "; ".join(lines)
