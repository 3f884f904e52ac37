"""The files a config names, read before any weights load: tables of rows (CSV, TSV, JSONL),
prompt lists, and `locate` (a file from the current directory, or else beside the config).
Every error is a `ConfigError` naming the field."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .loader import read_text


def read_table(path: Path, field_name: str = "source.file") -> list[dict[str, Any]]:
    """The rows of a CSV, TSV or JSONL file; every error names `field_name`, the file and the line."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        from patchscope_core import PatchscopeError
        from patchscope_core.base.textfiles import read_csv

        try:
            return read_csv(path, field_name, delimiter="\t" if suffix == ".tsv" else ",")
        except PatchscopeError as exc:
            raise ConfigError(str(exc)) from None
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(read_text(path, field_name).splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise ConfigError(f"{field_name}: {path} line {i} is not JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(f"{field_name}: {path} line {i} is not a JSON object (one object a line)")
                rows.append(obj)
        return rows
    raise ConfigError(f"{field_name}: {path} must end in .csv, .tsv or .jsonl")


def ref_value(v: Any) -> str | None:
    """Reference values are stored as text (one type per Parquet column whatever the file held)."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def checked_columns(
    columns: list[str],
    named: Sequence[tuple[str, str | None]],
    references: list[str] | None,
    references_field: str,
    where: Any,
) -> list[str]:
    """Every named column (field, column; None: not used) and reference column must be in
    `where`; the reference columns default to every column not named. Returns them."""
    for field_name, col in list(named) + [(references_field, c) for c in references or ()]:
        if col is not None and col not in columns:
            raise ConfigError(f"{field_name}: no column {col!r} in {where} (columns: {', '.join(columns)})")
    used = {col for _, col in named}
    return references if references is not None else [c for c in columns if c not in used]


def locate(name: str, base: Path | None, field_name: str, directory: bool = False) -> Path:
    """A file (or a directory) named in the config: from the current directory, or else beside
    the config."""
    exists = Path.is_dir if directory else Path.is_file
    path = Path(name).expanduser()
    if not exists(path) and base is not None and exists(base / path):
        path = base / path
    if not exists(path):
        raise ConfigError(f"{field_name}: no such {'directory' if directory else 'file'} {name!r}")
    return path


def prompt_list(value: str | list[str] | None, base: Path | None, field_name: str) -> tuple[str, ...] | None:
    """Prompts given as a list, or as a file of one prompt a line."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [line for line in read_text(locate(value, base, field_name), field_name).splitlines() if line.strip()]
    if not value:
        raise ConfigError(f"{field_name}: no prompts")
    return tuple(value)
