"""Weights & Biases: one run per sweep, fed as tasks finish, a table and heatmaps at the end.

The local store is the record of truth and is always written first: every W&B call here is
guarded, and a failure prints one warning and turns the sink off, losing nothing.

mode: auto (online when credentials exist: WANDB_API_KEY or a ~/.netrc entry for the W&B host;
otherwise offline; a WANDB_MODE in the environment wins) | online | offline | disabled.
Offline runs are written under output.dir/wandb/ and uploaded later with `wandb sync DIR`.

At scale (W&B cuts a table at 200,000 rows) the per-cell tables hold at most
`output.wandb.max_table_rows` rows: a sweep of more cells logs a seeded sample, chosen by each
cell's `sample_key` (a digest of the seed and its cell id: the same cells at every run, whatever
order the tasks finish in), in grid order, and says so once (a line printed at the end, and
`results_table_sampled` in the run's summary). The final `results` table is the
max_table_rows cells of smallest key; the live `cells` table keeps a cell when its key falls in
the first max_table_rows / cells of the key range (about as many, never more). The report's
tables (its per-layer means, its samples) are logged whole (up to W&B's own cut, WANDB_TABLE_ROWS).
"""

from __future__ import annotations

import hashlib
import heapq
import math
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import WandbConfig
from ..kinds import KINDS, kind_of
from ..records import token_text, top1_logprob
from .columns import kind_of_store, read_columns, store_columns
from .store import ResultStore

TABLE_SEED = 0  # the seed of the per-cell tables' sample


def sample_key(cell_id: str, seed: int = TABLE_SEED) -> int:
    """Where a cell falls in the sample's order: the first 8 bytes of sha256(f"{seed}:{cell_id}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{cell_id}".encode()).digest()[:8], "big")


def sample_ids(cell_ids, k: int, seed: int = TABLE_SEED) -> set[str]:
    """The `k` cell ids of smallest `sample_key` (all of them when there are at most k)."""
    ids = list(cell_ids)
    if len(ids) <= k:
        return set(ids)
    return set(heapq.nsmallest(k, ids, key=lambda c: sample_key(c, seed)))


def sampled_text(k: int, n: int) -> str:
    return f"{k:,} of {n:,} rows (seeded sample)"


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if has_credentials() else "offline"


def table_rows(
    records: Sequence[dict[str, Any]], ref_columns: Sequence[str] = (), kind: str | None = None
) -> tuple[list[str], list[list[Any]]]:
    """The W&B table of some result rows: the kind's table columns (records.SCHEMAS)."""
    schema = KINDS[kind or kind_of(records[0] if records else ())].schema
    columns = list(schema.table) + list(ref_columns)
    rows = []
    for r in records:
        row = []
        for c in columns:
            if c == "top1_logprob":
                v = r["top1_logprob"] if "top1_logprob" in r else top1_logprob(r.get("top_logprobs"))
                v = None if v is None or v != v else float(v)  # NaN (no log-probabilities) as an empty cell
            elif c in schema.tokens:
                v = token_text(r.get(c, []))
            else:
                v = r.get(c)
                if hasattr(v, "item"):
                    v = v.item()
            row.append(v)
        rows.append(row)
    return columns, rows


WANDB_TABLE_ROWS = 200_000  # W&B cuts a table here; the report's tables are logged up to it
MAX_INCREMENTS = 90  # of the live table; W&B's workspace shows the last 100


class WandbSink:
    def __init__(self, cfg: WandbConfig, name: str, config: dict[str, Any], out_dir: Path) -> None:
        self.mode = resolve_mode(cfg.mode)
        self.run = None
        self.out_dir = Path(out_dir)
        self.ref_columns: list[str] = []
        self.live = None  # the incremental table of cells, created at the first finished task
        self.unsent = 0  # cells finished since its last log
        self.pending = 0  # rows added to it since its last log
        self.live_rows = 0  # rows it holds
        self.max_rows = cfg.max_table_rows
        self.url: str | None = None
        if self.mode == "disabled":
            return
        try:
            import wandb

            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=name,
                name=name,
                job_type="sweep",
                tags=list(cfg.tags) or None,
                dir=str(self.out_dir),  # W&B writes under <dir>/wandb/
                mode=self.mode,
                config=config,
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.run.define_metric("cells_done")
            self.run.define_metric("*", step_metric="cells_done")
            if self.mode == "online":
                print(f"W&B:      streaming to {self.run.url}")
            else:
                print(f"W&B:      offline, writing to {Path(self.run.dir).parent}")
        except Exception as exc:  # noqa: BLE001 - W&B must never cost a result
            self._fail("start", exc)

    @property
    def active(self) -> bool:
        return self.run is not None

    def _fail(self, what: str, exc: BaseException) -> None:
        print(
            f"warning: W&B {what} failed ({type(exc).__name__}: {exc}); results are safe in the local store, "
            "W&B logging is off for the rest of this sweep",
            file=sys.stderr,
        )
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def log_task(
        self, records: Sequence[dict[str, Any]], cells_done: int, cells_total: int, cells_per_s: float
    ) -> None:
        """The rows of one finished task, and the progress; called after the store wrote them."""
        if self.run is None or not records:
            return
        try:
            import wandb

            if self.live is None:
                self.ref_columns = sorted(k for k in records[0] if k.startswith("ref_"))
                columns, _ = table_rows([], self.ref_columns, kind_of(records[0]))
                # An incremental table: each log sends only the rows added since the last one,
                # and W&B shows one table that grows while the sweep runs.
                self.live = wandb.Table(columns=columns, log_mode="INCREMENTAL")
            kept = []
            for r in records:
                if self._keep(r["cell_id"], cells_total):
                    kept.append(r)
                    self.live_rows += 1
            for row in table_rows(kept, self.ref_columns, kind_of(records[0]))[1]:
                self.live.add_data(*row)
            self.pending += len(kept)
            self.unsent += len(records)
            progress = {
                "cells_done": cells_done,
                "fraction_done": cells_done / max(cells_total, 1),
                "cells_per_s": cells_per_s,
            }
            # W&B shows only the last 100 increments of a table: send the rows in at most
            # MAX_INCREMENTS batches of the sweep's size, whatever its number of tasks.
            if self.pending and (self.unsent >= math.ceil(cells_total / MAX_INCREMENTS) or cells_done >= cells_total):
                progress["cells"] = self.live
                self.unsent = self.pending = 0
            self.run.log(progress)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def _keep(self, cell_id: str, cells_total: int) -> bool:
        """Whether the live table takes this cell: every cell of a sweep of at most max_rows; else
        those whose sample_key falls in the first max_rows / cells_total of the range, at most max_rows."""
        if cells_total <= self.max_rows:
            return True
        return self.live_rows < self.max_rows and sample_key(cell_id) < (self.max_rows << 64) // cells_total

    def finish(self, records: Sequence[dict[str, Any]], images: dict[str, Path], summary: dict[str, Any]) -> str | None:
        """Final table of the cells given (every cell, or WandbPeer's sample), the pictures (PNG)
        and the report's other tables (CSV, whole); returns the offline run's directory."""
        if self.run is None:
            return None
        try:
            import wandb

            ref_columns = sorted({k for r in records[:1] for k in r if k.startswith("ref_")})
            columns, rows = table_rows(records, ref_columns)
            payload: dict[str, Any] = {"cells_done": summary.get("cells_done", len(records))}
            if self.live is not None and self.pending:
                payload["cells"] = self.live  # the last rows of a sweep that ended short
            payload["results"] = wandb.Table(columns=columns, data=rows)
            for key, path in images.items():
                if Path(path).suffix == ".png":
                    payload[f"heatmap/{key}"] = wandb.Image(str(path))
                elif Path(path).suffix == ".csv":
                    import pandas as pd

                    payload[f"table/{key}"] = wandb.Table(dataframe=pd.read_csv(path, nrows=WANDB_TABLE_ROWS))
            self.run.log(payload)
            self.run.summary.update(summary)
            run_dir = str(Path(self.run.dir).parent)
            self.url = self.run.url if self.mode == "online" else None
            self.run.finish()
            self.run = None
            return run_dir
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)
            return None

    def abort(self) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
            self.run = None


class WandbPeer:
    """W&B as a sink (`sinks.base.Sink`): the run starts when there is work; the final table gets
    the report's pictures and tables."""

    name = "W&B"

    def __init__(self, cfg: WandbConfig, name: str, config: dict[str, Any], out_dir: Path) -> None:
        self.args = (cfg, name, config, out_dir)
        self.run = WandbSink(cfg.model_copy(update={"mode": "disabled"}), name, {}, out_dir)

    def start(self) -> None:
        self.run = WandbSink(*self.args)

    def write(self, rows, done: int, total: int, cells_per_s: float) -> None:
        self.run.log_task(rows, done, total, cells_per_s)

    def finish(self, end) -> None:
        images = {k: v for k, v in end.made.items() if k != "table"}
        try:
            records, sampled = self.rows() if end.summary["cells_done"] and self.run.active else ([], None)
        except Exception as exc:  # noqa: BLE001 - reading the store for W&B must not leave the run open
            self.run._fail("finish", exc)
            return
        summary = {**end.summary, **({"results_table_sampled": sampled} if sampled else {})}
        run_dir = self.run.finish(records, images, summary)
        if run_dir and sampled:
            end.notes.append(
                f"W&B:      the results table holds {sampled} (output.wandb.max_table_rows); "
                "the report's tables and pictures cover every row"
            )
        if run_dir and self.run.mode == "offline":
            end.notes.append(f"W&B:      offline run in {run_dir}; upload it with: wandb sync {run_dir}")
        elif run_dir:
            end.notes.append(f"W&B:      {self.run.url or 'run'} (files in {run_dir})")

    def rows(self) -> tuple[list[dict[str, Any]], str | None]:
        """The rows of the final results table, read from the store (only the table's columns, only
        the sampled cells), in grid order; and what the sample is, in words (None: every row)."""
        store = ResultStore(self.args[3])
        names = store_columns(store)
        kind = KINDS[kind_of_store(store.manifest() or {}, names)]
        ids = read_columns(store, [])["cell_id"]
        k = self.args[0].max_table_rows
        chosen = sample_ids(ids, k) if len(ids) > k else None
        wanted = [*kind.order, *kind.schema.table, *[c for c in names if c.startswith("ref_")]]
        if "top1_logprob" in kind.schema.table:
            wanted.append("top_logprobs")
        df = read_columns(store, [c for c in dict.fromkeys(wanted) if c in names], cells=chosen)
        df = df.sort_values([c for c in kind.order if c in df.columns], kind="stable")
        return df.to_dict("records"), None if chosen is None else sampled_text(len(chosen), len(ids))

    def fail(self) -> None:
        self.run.abort()
