"""The sweep's input rows, read after the config (`sweeps.config`) and before the checks against
the models (`sweeps.plan`): `load_rows` turns `source.prompts` / `source.file` (a Patchscope
sweep), `prompts.file` / `prompts.rows` (an intervention or causal-trace sweep) or a recipe's data
(`sweeps.recipe_rows`) into rows. Files named in the config are read from the current directory,
or else beside the config file. Every error is a `ConfigError` naming the field.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, SweepConfig, read_text


@dataclass(frozen=True)
class Row:
    """One (source prompt, target prompt) pair with its reference values."""

    source_prompt: str
    target_prompt: str
    refs: tuple[tuple[str, Any], ...] = ()
    where: str = "source.prompts"  # for error messages
    index: int = 0  # position in source.prompts or source.file (orders tables and pictures)


@dataclass(frozen=True)
class PromptRow:
    """One prompt of an intervention or causal-trace sweep, with its answer, subject and references."""

    prompt: str
    answer: str | None = None
    subject: str | None = None
    refs: tuple[tuple[str, Any], ...] = ()
    where: str = "prompts.rows"
    index: int = 0


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = read_text(path, "source.file", encoding="utf-8-sig")  # a spreadsheet's byte-order mark is not a column name
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(read_text(path, "source.file").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"source.file: {path} line {i} is not JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise ConfigError(f"source.file: {path} line {i} is not a JSON object")
                rows.append(obj)
        return rows
    raise ConfigError(f"source.file: {path} must end in .csv, .tsv or .jsonl")


def _ref_value(v: Any) -> str | None:
    """Reference values are stored as text (one type per Parquet column whatever the file held)."""
    if v is None or isinstance(v, str):
        return v
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _checked_columns(columns: list[str], named: Sequence[tuple[str, str | None]], references: list[str] | None,
                    references_field: str, where: Any) -> list[str]:
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


def load_rows(config: SweepConfig, base: Path | None = None) -> list[Row]:
    """The (source, target) pairs of the sweep, from source.prompts or source.file.

    A relative source.file is read from the current directory, or else from `base` (the
    config file's directory)."""
    if config.kind == "recipe":
        from .recipe_rows import load_recipe_rows

        return load_recipe_rows(config, base)
    if config.kind != "patchscope":
        return load_prompt_rows(config, base)
    src, tgt = config.source, config.target
    if src.prompts is not None:
        return [Row(p, tgt.prompt, (), f"source.prompts[{i}]", i) for i, p in enumerate(src.prompts)]
    path = locate(src.file, base, "source.file")
    table = _read_table(path)
    if not table:
        raise ConfigError(f"source.file: {path} has no rows")
    refs = _checked_columns(list(table[0]), (("source.prompt_column", src.prompt_column),
                                              ("target.prompt_column", tgt.prompt_column)),
                            src.reference_columns, "source.reference_columns", path)
    rows = []
    for i, rec in enumerate(table):
        where = f"source.file row {i + 1}"
        s = rec.get(src.prompt_column)
        t = rec.get(tgt.prompt_column) if tgt.prompt_column else tgt.prompt
        for field_name, v in (("source.prompt_column", s), ("target.prompt_column", t)):
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{field_name}: {where} has an empty or missing prompt ({v!r})")
        rows.append(Row(s, t, tuple((c, _ref_value(rec.get(c))) for c in refs), where, i))
    return rows


def load_prompt_rows(config: SweepConfig, base: Path | None = None) -> list[PromptRow]:
    """The prompts of an intervention or causal-trace sweep, from prompts.file or prompts.rows."""
    pc = config.prompts
    where = "prompts.rows"
    table = pc.rows
    if pc.file is not None:
        path = locate(pc.file, base, "prompts.file")
        table, where = _read_table(path), "prompts.file"
        if not table:
            raise ConfigError(f"prompts.file: {path} has no rows")
    names = ("prompt_column", "answer_column", "subject_column")
    named = [(f"prompts.{name}", getattr(pc, name)) for name in names]
    refs = _checked_columns(list(dict.fromkeys(c for rec in table for c in rec)), named, pc.reference_columns,
                            "prompts.reference_columns", where)
    rows = []
    for i, rec in enumerate(table):
        at = f"{where} row {i + 1}"
        values = {}
        for name in names:
            col = getattr(pc, name)
            v = rec.get(col) if col is not None else None
            if col is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(f"prompts.{name}: {at} has an empty or missing {col} ({v!r})")
            values[name] = v
        rows.append(PromptRow(values["prompt_column"], values["answer_column"], values["subject_column"],
                              tuple((c, _ref_value(rec.get(c))) for c in refs), at, i))
    return rows


def prompt_list(value: str | list[str] | None, base: Path | None, field_name: str) -> tuple[str, ...] | None:
    """Prompts given as a list, or as a file of one prompt a line."""
    if value is None:
        return None
    if isinstance(value, str):
        lines = locate(value, base, field_name).read_text().splitlines()
        value = [line for line in lines if line.strip()]
    if not value:
        raise ConfigError(f"{field_name}: no prompts")
    return tuple(value)
