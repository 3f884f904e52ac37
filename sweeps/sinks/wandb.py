"""Weights & Biases: one run per sweep directory and model, fed as tasks finish; at the end its
tables, pictures, line plots, the kind's summary figures and the store as an artifact.

Runs: each model of a sweep has its own run, in the sweep's group (so W&B's workspace compares
the models side by side), named after the sweep (and the model, when there are several). The
runs' ids are kept in output.dir/wandb_runs.json and every invocation resumes them with W&B's
own resume (`wandb.init(id=..., resume="allow")`): an interrupted sweep's run is marked
preempted and continues when the command is run again, and a rerun with nothing to compute
still updates it (its tables and summary show the current cells). `--restart` starts new runs.
Offline, each invocation writes a directory of the same run id; `wandb sync` uploads them into
one run, in order.

At the end each run gets: its model's rows as the `results` table; the report's pictures
(`heatmap/<key>`) and CSV tables (`table/<key>`: a table with a `model` column, its model's
rows) whose file names name its model, or name no model of the sweep; the kind's line plots
(`SweepKind.curves`, as `curve/<name>`); the summary (the counts and
`SweepKind.summary_figures`); the results store as an artifact by reference
(`wandb_runs.store_artifact`, `results-<sweep>`: the Parquet files' paths and checksums, the
files staying where they are). The logged config holds the kind's own sections
(`wandb_runs.logged_config`), not the other kinds' empty ones.

The local store is the record of truth and is always written first: every W&B call here is
guarded, and a failure prints one warning and turns the sink off, losing nothing.

mode: auto (online when credentials exist: WANDB_API_KEY or a ~/.netrc entry for the W&B host;
otherwise offline; a WANDB_MODE in the environment wins) | online | offline | disabled.
Offline runs are written under output.dir/wandb/ and uploaded later with `wandb sync DIR`.

At scale (W&B cuts a table at 200,000 rows) the per-cell tables hold at most
`output.wandb.max_table_rows` rows: a sweep of more cells logs a seeded sample, chosen by each
cell's `sample_key` (its cell id's 64 bits mixed with the seed by splitmix64: the same cells at
every run, whatever order the tasks finish in), in grid order, and says so once (a line printed
at the end, and `results_table_sampled` in the run's summary). The final `results` table is the
max_table_rows cells of smallest key; the live `cells` table keeps a cell when its key falls in
the first max_table_rows / cells of the key range (about as many, never more). The report's
tables (its per-layer means, its samples) are logged whole (up to W&B's own cut, WANDB_TABLE_ROWS).
"""

from __future__ import annotations

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
from ..pictures import safe_name
from ..records import as_table, enrich, token_text, top1_logprob
from .cell_ids import id_numbers
from .columns import kind_of_store, read_columns, store_columns
from .report import read_report_frame
from .store import ResultStore
from .wandb_runs import read_runs, run_ids, store_artifact, write_runs

TABLE_SEED = 0  # the seed of the per-cell tables' sample


_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment
_MASK = (1 << 64) - 1


def sample_keys(cell_ids, seed: int = TABLE_SEED):
    """Where each cell falls in the sample's order (a numpy uint64 array): its id as a 64-bit
    number (`cell_ids.id_numbers`: a cell id's 16 hex digits) plus (seed + 1) x 0x9E3779B97F4A7C15,
    through splitmix64's mixing function (Steele et al. 2014), all modulo 2^64. Vectorized: a
    sweep of 10^7 cells is sampled in a second."""
    import numpy as np
    import pyarrow as pa

    column = cell_ids if isinstance(cell_ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(cell_ids), pa.string())
    z = id_numbers(column) + np.uint64(((seed + 1) * _GOLDEN) & _MASK)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def sample_key(cell_id: str, seed: int = TABLE_SEED) -> int:
    """`sample_keys` of one cell id."""
    return int(sample_keys([cell_id], seed)[0])


def sample_ids(cell_ids, k: int, seed: int = TABLE_SEED) -> set[str]:
    """The `k` cell ids of smallest `sample_key` (all of them when there are at most k)."""
    import numpy as np

    ids = list(cell_ids)
    if len(ids) <= k:
        return set(ids)
    chosen = np.argpartition(sample_keys(ids, seed), k - 1)[:k]
    return {ids[i] for i in chosen.tolist()}


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
    """One W&B run: `log_task` as tasks finish, `finish` with the final tables and summary."""

    def __init__(
        self,
        cfg: WandbConfig,
        name: str,
        config: dict[str, Any],
        out_dir: Path,
        run_id: str | None = None,
        run_name: str | None = None,
        step: int = 0,
    ) -> None:
        self.mode = resolve_mode(cfg.mode)
        self.step = step  # the next history step: a resumed run goes on after its last one
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
                name=run_name or name,
                id=run_id,
                resume="allow" if run_id else None,  # W&B's resume: the same run, continued
                job_type="sweep",
                tags=list(cfg.tags) or None,
                dir=str(self.out_dir),  # W&B writes under <dir>/wandb/
                mode=self.mode,
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.run.config.update(config, allow_val_change=True)  # a resumed run shows the current config
            # Online, W&B's resume says where the run's history ended; offline, wandb_runs.json does
            # (so the directories `wandb sync` uploads into one run have increasing steps).
            self.step = max(self.step, int(getattr(self.run, "starting_step", 0) or 0))
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

    def log_task(self, rows, cells_done: int, cells_total: int, cells_per_s: float) -> None:
        """The rows of one finished task (a pyarrow Table, or dicts), and the progress; called
        after the store wrote them. Only the rows the live table keeps become Python rows."""
        if self.run is None or not len(rows):
            return
        try:
            import pyarrow as pa
            import wandb

            table = as_table(rows)
            kind = kind_of(table.column_names)
            if self.live is None:
                self.ref_columns = sorted(c for c in table.column_names if c.startswith("ref_"))
                columns, _ = table_rows([], self.ref_columns, kind)
                # An incremental table: each log sends only the rows added since the last one,
                # and W&B shows one table that grows while the sweep runs.
                self.live = wandb.Table(columns=columns, log_mode="INCREMENTAL")
            kept = table.filter(pa.array(self._keep(table.column("cell_id"), cells_total))).to_pylist()
            self.live_rows += len(kept)
            for row in table_rows(kept, self.ref_columns, kind)[1]:
                self.live.add_data(*row)
            self.pending += len(kept)
            self.unsent += table.num_rows
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
            self._log(progress)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def _log(self, payload: dict[str, Any]) -> None:
        self.run.log(payload, step=self.step)
        self.step += 1

    def _keep(self, cell_ids, cells_total: int):
        """Which of a task's cells (an Arrow column of ids) the live table takes, as a numpy bool
        array: every cell of a sweep of at most max_rows; else those whose sample_key falls in the
        first max_rows / cells_total of the range, while it holds fewer than max_rows."""
        import numpy as np

        if cells_total <= self.max_rows:
            return np.ones(len(cell_ids), bool)
        keep = sample_keys(cell_ids) < np.uint64((self.max_rows << 64) // cells_total)
        room = self.max_rows - self.live_rows
        keep[np.flatnonzero(keep)[max(room, 0) :]] = False
        return keep

    def finish(
        self,
        records: Sequence[dict[str, Any]],
        images: dict[str, Path],
        summary: dict[str, Any],
        curves: dict[str, Any] | None = None,
        store: Path | None = None,
        model: str | None = None,
        stale: Sequence[str] = (),
    ) -> str | None:
        """Final table of the cells given (every cell, or WandbPeer's sample), the pictures (PNG),
        the report's other tables (CSV, whole; a `model` column: that model's rows), the line
        plots (`kinds.base.Curve`), the summary (less the `stale` keys: figures of an earlier
        config) and the store in `store` as an artifact by reference; returns the offline run's
        directory."""
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
                    payload[f"table/{key}"] = wandb.Table(dataframe=_csv_table(path, model))
            for key, c in (curves or {}).items():
                frame = c.frame[[x for x in (c.x, c.y, c.series) if x is not None]].copy()
                if c.series is not None:
                    frame[c.series] = frame[c.series].astype(str)  # a line per value, named
                payload[f"curve/{key}"] = wandb.plot.line(
                    wandb.Table(dataframe=frame), c.x, c.y, stroke=c.series, title=c.title or key
                )
            self._log(payload)
            self.run.summary.update(summary)
            for key in stale:
                del self.run.summary[key]
            if store is not None:
                self.run.log_artifact(store_artifact(store, summary, self.run.group or store.name))
            run_dir = str(Path(self.run.dir).parent)
            self.url = self.run.url if self.mode == "online" else None
            self.run.finish()
            self.run = None
            return run_dir
        except Exception as exc:  # noqa: BLE001
            self._fail("finish", exc)
            return None

    def abort(self) -> None:
        """The sweep stopped short: the run is marked preempted (W&B's state for a run that will
        be resumed) and closed; the next invocation continues it."""
        if self.run is not None:
            try:
                self.run.mark_preempting()
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
            self.run = None


def _csv_table(path: Path, model: str | None):
    """A report table as W&B logs it: its first WANDB_TABLE_ROWS rows; one with a `model` column
    cut to `model`'s rows."""
    import pandas as pd

    df = pd.read_csv(path, nrows=WANDB_TABLE_ROWS)
    if model is not None and "model" in df.columns:
        df = df[df["model"].astype(str) == model].reset_index(drop=True)
    return df


def belongs(key: str, model: str, models: Sequence[str]) -> bool:
    """Whether the report's file `key` goes to `model`'s run: it names that model (its
    `pictures.safe_name` between underscores; of several that match, the longest), or it names
    no model of the sweep (every run gets it)."""
    padded = f"_{key}_"
    named = {m: safe_name(m) for m in models if f"_{safe_name(m)}_" in padded}
    if not named:
        return True
    longest = max(len(n) for n in named.values())
    return model in named and len(named[model]) == longest


class WandbPeer:
    """W&B as a sink (`sinks.base.Sink`): one run per model (`WandbSink`), started when the sweep
    starts (with or without work); the final tables get the report's pictures and tables."""

    name = "W&B"

    def __init__(
        self,
        cfg: WandbConfig,
        name: str,
        config: dict[str, Any],
        out_dir: Path,
        models: Sequence[str] | None = None,
        restart: bool = False,
    ) -> None:
        self.args = (cfg, name, config, out_dir)
        self.models = list(models or [])
        self.restart = restart
        self.runs: dict[str | None, WandbSink] = {}
        self.book: dict[str, dict[str, Any]] = {}  # wandb_runs.json as it was at the start
        self.figures: dict[str, list[str]] = {}  # the summary figures each run shows now

    @property
    def run(self) -> WandbSink:
        """The first model's run (one model: the sweep's run)."""
        return next(iter(self.runs.values()), None) or WandbSink(
            self.args[0].model_copy(update={"mode": "disabled"}), self.args[1], {}, self.args[3]
        )

    def start(self) -> None:
        cfg, name, config, out_dir = self.args
        if resolve_mode(cfg.mode) == "disabled":
            return
        if not self.models:  # a sink without models (a test's): one run, a new id
            self.runs[None] = WandbSink(cfg, name, config, out_dir)
            return
        runs = self.book = run_ids(out_dir, self.models, self.restart)
        self.restart = False  # a second start (a test's) continues the runs just begun
        several = len(self.models) > 1
        for model in self.models:
            run_name = f"{name} {safe_name(model)}" if several else name
            self.runs[model] = WandbSink(
                cfg, name, {**config, "model": model}, out_dir, runs[model]["id"], run_name, runs[model]["step"]
            )

    def _save(self) -> None:
        """Each model's next history step and summary figures into wandb_runs.json."""
        if not self.models or not self.runs:
            return
        runs = read_runs(self.args[3])
        for model, sink in self.runs.items():
            if model in runs:
                runs[model]["step"] = max(runs[model]["step"], sink.step)
                runs[model]["figures"] = self.figures.get(model, runs[model]["figures"])
        write_runs(self.args[3], runs)

    def write(self, rows, done: int, total: int, cells_per_s: float) -> None:
        import pyarrow.compute as pc

        if None in self.runs:
            self.runs[None].log_task(rows, done, total, cells_per_s)
            return
        table = as_table(rows)
        for model in pc.unique(table.column("model")).to_pylist():
            if model in self.runs:
                self.runs[model].log_task(table.filter(pc.equal(table["model"], model)), done, total, cells_per_s)

    def finish(self, end) -> None:
        images = {k: v for k, v in end.made.items() if k != "table"}
        active = {m: r for m, r in self.runs.items() if r.active}
        try:
            read = self.read(end.frame) if end.summary["cells_done"] and active else None
        except Exception as exc:  # noqa: BLE001 - reading the store for W&B must not leave the runs open
            for r in active.values():
                r._fail("finish", exc)
            self._save()
            return
        for model, sink in active.items():
            try:
                records, sampled, figures, curves = self._of(read, model)
            except Exception as exc:  # noqa: BLE001 - a kind's figures failing must not leave the run open
                sink._fail("finish", exc)
                continue
            summary = {**end.summary, **figures, **({"results_table_sampled": sampled} if sampled else {})}
            mine = images if model is None else {k: v for k, v in images.items() if belongs(k, model, self.models)}
            before = self.book.get(model, {}).get("figures", [])
            stale = [k for k in before if k not in figures and k not in end.summary]
            run_dir = sink.finish(records, mine, summary, curves, self.args[3] if read else None, model, stale)
            if run_dir and model is not None:
                self.figures[model] = sorted(figures)
            if run_dir and sampled:
                end.notes.append(
                    f"W&B:      the results table{'' if model is None else f' of {model}'} holds {sampled} "
                    "(output.wandb.max_table_rows); the report's tables and pictures cover every row"
                )
            if run_dir and sink.mode == "offline":
                end.notes.append(f"W&B:      offline run in {run_dir}; upload it with: wandb sync {run_dir}")
            elif run_dir:
                end.notes.append(f"W&B:      {sink.url or 'run'} (files in {run_dir})")
        self._save()

    def _of(self, read, model: str | None):
        """(table rows, sample in words, summary figures, curves) of one model's run."""
        if read is None:
            return [], None, {}, {}
        kind, df, sampled, frame = read
        if model is not None:
            df = df[df["model"] == model]
            frame = frame[frame["model"] == model]
            k = self.args[0].max_table_rows
            sampled = sampled_text(k, int(frame["cell_id"].nunique())) if len(frame) > k else None
            if sampled:
                df = df[df["cell_id"].isin(sample_ids(frame["cell_id"], k))]
        return df.to_dict("records"), sampled, kind.summary_figures(frame), kind.curves(frame)

    def read(self, frame=None):
        """(kind, the results table's rows: only its columns, only the sampled cells, in grid order;
        the sample in words or None; the report's frame: its columns, enriched, in its order);
        `frame`: the report's frame where the report sink has just read it."""
        store = ResultStore(self.args[3])
        names = store_columns(store)
        kind = KINDS[kind_of_store(store.manifest() or {}, names)]
        if frame is None:
            frame = read_report_frame(store, kind, names)
        ids = frame["cell_id"] if len(frame) else []
        k = self.args[0].max_table_rows
        per_model = frame.groupby("model")["cell_id"] if len(frame) and self.models else None
        if per_model is not None:  # each model's run samples its own cells
            chosen = set().union(*(sample_ids(g, k) for _, g in per_model)) if per_model.size().max() > k else None
        else:
            chosen = sample_ids(ids, k) if len(ids) > k else None
        wanted = [*kind.order, *kind.schema.table, *[c for c in names if c.startswith("ref_")]]
        if "top1_logprob" in kind.schema.table:
            wanted.append("top_logprobs")
        df = read_columns(store, [c for c in dict.fromkeys(wanted) if c in names], cells=chosen)
        df = df.sort_values([c for c in kind.order if c in df.columns], kind="stable")
        frame = enrich(frame).sort_values([c for c in kind.order if c in frame.columns], kind="stable")
        return kind, df, None if chosen is None else sampled_text(len(chosen), len(ids)), frame

    def fail(self) -> None:
        for r in self.runs.values():
            r.abort()
        self._save()
