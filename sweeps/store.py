"""The record of truth of a sweep: Parquet files under output.dir/results/ and a manifest.

- One file per finished task (`task-<task_id>.parquet`), written under a temporary name and
  renamed into place, so a file is either complete or absent (a crash leaves at most a
  `.tmp-*` file, removed at the next start).
- `manifest.json`: the config, its hash and the grid size. Resuming with a config whose
  hash differs is refused (the stored cells would not be this config's cells).
- Resume reads the stored `cell_id`s. `write` drops every cell already stored, so a cell is
  stored exactly once even if Ray ran its task twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from .config import ConfigError

RESULTS = "results"
MANIFEST = "manifest.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultStore:
    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.results_dir = self.dir / RESULTS
        self.manifest_path = self.dir / MANIFEST
        self._stored: set[str] | None = None

    # ------------------------------------------------------------ opening

    def open(self, config_dump: dict[str, Any], config_hash: str, cells_total: int, restart: bool = False) -> int:
        """Prepare the directory for a run of this config; returns how many cells are already stored."""
        if restart:
            self.clear()
        old = self.manifest()
        if old and old.get("config_hash") != config_hash and self.files():
            raise ConfigError(
                f"output.dir: {self.dir} holds results of another config (hash {old.get('config_hash')}, "
                f"this config {config_hash}); run with --restart to start over, or choose another output.dir"
            )
        self.results_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.results_dir.glob(".tmp-*"):
            tmp.unlink()  # a write interrupted before its rename
        manifest = {
            "name": config_dump.get("name"),
            "config_hash": config_hash,
            "config": config_dump,
            "cells_total": cells_total,
            "created": (old or {}).get("created", _now()),
            "updated": _now(),
        }
        _atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, default=str))
        self._stored = None
        return len(self.stored_cell_ids())

    def clear(self) -> None:
        """Forget every stored result (--restart)."""
        if self.results_dir.exists():
            shutil.rmtree(self.results_dir)
        if self.manifest_path.exists():
            self.manifest_path.unlink()
        self._stored = set()

    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        return json.loads(self.manifest_path.read_text())

    # ------------------------------------------------------------ reading

    def files(self) -> list[Path]:
        return sorted(self.results_dir.glob("task-*.parquet")) if self.results_dir.is_dir() else []

    def stored_cell_ids(self) -> set[str]:
        if self._stored is None:
            import pyarrow.parquet as pq

            self._stored = set()
            for f in self.files():
                self._stored.update(pq.read_table(f, columns=["cell_id"]).column("cell_id").to_pylist())
        return self._stored

    def read(self):
        """Every stored row as one pandas DataFrame (empty when nothing is stored)."""
        import pandas as pd
        import pyarrow.parquet as pq

        frames = [pq.read_table(f).to_pandas() for f in self.files()]
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------ writing

    def write(self, task_id: str, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store the records of cells not stored yet, in one new file; returns those records."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        stored = self.stored_cell_ids()
        new, seen = [], set()
        for r in records:
            if r["cell_id"] not in stored and r["cell_id"] not in seen:
                seen.add(r["cell_id"])
                new.append(r)
        if not new:
            return []
        self.results_dir.mkdir(parents=True, exist_ok=True)
        final = self.results_dir / f"task-{task_id}.parquet"
        if final.exists():  # same task id, other cells: cannot happen for a fixed grid, but never overwrite
            final = self.results_dir / f"task-{task_id}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.results_dir / f".tmp-{uuid.uuid4().hex}.parquet"
        pq.write_table(pa.Table.from_pylist(new), tmp)
        os.replace(tmp, final)
        stored.update(seen)
        return new
