"""Reading the text files that inputs name (prompt lists, CSV / TSV tables, corpora), in one
place: UTF-8 only, no binary files, a CSV row with more fields than its header refused. Every
error is a `PatchscopeError` naming the field, the file and the line (the sweep's config stage
turns it into a `ConfigError`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .errors import PatchscopeError


def read_text(path: str | Path, field_name: str, encoding: str = "utf-8") -> str:
    """A text file as UTF-8; other bytes, or a NUL byte (a binary file), are an error naming
    the field, the file and the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PatchscopeError(f"{field_name}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PatchscopeError(
            f"{field_name}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})"
        ) from None
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data[:nul].count(b"\n") + 1
        raise PatchscopeError(f"{field_name}: {path} is a binary file, not text (a NUL byte on line {line})")
    return text


def read_lines(path: str | Path, field_name: str) -> list[str]:
    """The non-blank lines of a text file (a file of prompts, one a line)."""
    return [line for line in read_text(path, field_name).splitlines() if line.strip()]


def read_csv(path: str | Path, field_name: str, delimiter: str = ",") -> list[dict[str, Any]]:
    """The rows of a CSV (or, with delimiter '\\t', TSV) file as dicts by header; a byte-order
    mark is not part of the first column's name. A row with more fields than the header (an
    unquoted comma inside a value) is an error naming the file and the line: csv would drop the
    extra fields silently."""
    text = read_text(path, field_name, encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, restkey=_EXTRA)
    what = "tab" if delimiter == "\t" else repr(delimiter)
    rows = []
    try:
        for rec in reader:
            if _EXTRA in rec:
                header = reader.fieldnames or []
                raise PatchscopeError(
                    f"{field_name}: {path} line {reader.line_num} has {len(header) + len(rec[_EXTRA])} fields, more than "
                    f"the header's {len(header)} (a {what} inside a value must be quoted)"
                )
            rows.append(rec)
    except csv.Error as exc:
        raise PatchscopeError(f"{field_name}: {path} line {reader.line_num} is not valid CSV ({exc})") from None
    return rows


_EXTRA = object()  # csv's key for the fields past the header's
