"""The `Sink` protocol: where a sweep's rows go after the store, with a narrow lifecycle (as
Ray's `Datasink` and Tune's `LoggerCallback` have): `start` once there is work, `write` a
finished task's rows (already stored; one pyarrow Table), `finish` with every stored row, `fail`
when the run stops short. The Parquet store (`sinks.store.ResultStore`) is the record of truth and is always
written first; `Peers` calls the other sinks (the report, W&B) in order, each guarded: a failing
sink prints one warning and is dropped, and the stored rows are never lost.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class End:
    """What `finish` gets: the counts and what earlier sinks made (a sink reads the rows it needs
    from the store, only the columns it draws: `sinks/columns.py`)."""

    df: Any  # None: the rows are not read for the sinks (kept for sinks written against it)
    summary: dict[str, Any]  # cells_done, cells_total, cells_computed, elapsed_s
    made: dict[str, Path] = field(default_factory=dict)  # files earlier sinks wrote (the report's table, pictures)
    # the report's frame (`sinks.report.read_report_frame`: its columns of the current rows), once
    # the report sink has read it: a later sink reuses it instead of reading the store again
    frame: Any = None
    notes: list[str] = field(default_factory=list)  # lines for the terminal


class Sink(Protocol):
    name: str

    def start(self) -> None: ...

    def write(self, rows: Any, done: int, total: int, cells_per_s: float) -> None: ...

    def finish(self, end: End) -> None: ...

    def fail(self) -> None: ...


class Peers:
    """The sinks after the store, each guarded so that one failing costs only itself."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)

    def _call(self, what: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, what)(*args)
            except Exception as exc:  # noqa: BLE001 - a sink must never cost a stored result
                print(
                    f"warning: {sink.name} {what} failed ({type(exc).__name__}: {exc}); results are safe in the "
                    f"local store, {sink.name} is off for the rest of this sweep",
                    file=sys.stderr,
                )
                self.sinks.remove(sink)

    def start(self) -> None:
        self._call("start")

    def write(self, rows, done: int, total: int, cells_per_s: float) -> None:
        self._call("write", rows, done, total, cells_per_s)

    def finish(self, end: End) -> End:
        self._call("finish", end)
        return end

    def fail(self) -> None:
        self._call("fail")
