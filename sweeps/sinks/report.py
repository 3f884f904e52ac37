"""Tables and pictures from a sweep's stored results (`patchscope report DIR`, and the end of a
sweep): reads only the Parquet store, so it works on a finished sweep, a stopped one, or one
copied from a cluster. Writes `results.csv` (one row per cell: the kind's table columns, then
ref_<name> and match_<name>) and the kind's pictures and tables (`SweepKind.report`).

Reading the store it reads only what it writes: results.csv from the table's columns (token ids
turned to text by Arrow, the file written in batches), the pictures and the summary from the
columns the kind's report declares (`kinds.base.report_columns`), never the rest (`columns.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import ConfigError
from ..kinds import KINDS, kind_of
from ..kinds.base import report_columns
from ..records import enrich, token_text
from .columns import kind_of_store, read_columns, store_columns
from .store import ResultStore

CSV_BATCH = 50_000  # rows of results.csv formatted at once


def write_report(out_dir: str | Path, df=None) -> dict[str, Path]:
    """results.csv and the kind's pictures; returns {name: path} (the table under 'table').
    Without `df` (the end of a sweep): from the store, reading only the columns each needs; with
    it (rows in memory: a notebook's, a test's): both from `df`."""
    out_dir = Path(out_dir)
    if df is not None:
        return _from_frame(out_dir, df)
    return report_from_store(out_dir)[0]


def report_from_store(out_dir: Path):
    """`write_report` from the store: ({name: path}, the frame the pictures were drawn from: the
    report's columns as `read_report_frame` gives them, None when nothing is stored)."""
    store = ResultStore(out_dir)
    names = store_columns(store)
    if not names:
        return {}, None
    kind = KINDS[kind_of_store(store.manifest() or {}, names)]
    frame = read_report_frame(store, kind, names)
    return _report(out_dir, store, kind, frame), frame


def read_report_frame(store: ResultStore, kind, names: list[str] | None = None):
    """The store's current rows with only the columns `kind`'s report and summary read."""
    return read_columns(store, report_columns(kind, store_columns(store) if names is None else names))


def _settings(out_dir: Path) -> dict | None:
    return ((ResultStore(out_dir).manifest() or {}).get("config") or {}).get("report")


def _draw(out_dir: Path, kind, df) -> dict[str, Path]:
    """The kind's pictures and tables from `df` (sorted as results.csv is)."""
    df = enrich(df)
    df = df.sort_values([c for c in kind.order if c in df.columns], kind="stable")
    return kind.report(out_dir, df, _settings(out_dir))


def _report(out_dir: Path, store: ResultStore, kind, frame) -> dict[str, Path]:
    if frame.empty:
        return {}
    out: dict[str, Path] = {"table": out_dir / "results.csv"}
    write_table(store, kind, out["table"])
    out.update(_draw(out_dir, kind, frame))
    return out


def _from_frame(out_dir: Path, df) -> dict[str, Path]:
    if df.empty:
        return {}
    df = enrich(df)
    kind = KINDS[kind_of(df.columns)]
    df = df.sort_values([c for c in kind.order if c in df.columns], kind="stable")
    schema = kind.schema
    columns = [c for c in schema.table if c in df.columns] + [c for c in df.columns if c.startswith(("ref_", "match_"))]
    columns += [c for c in schema.tokens if c not in columns and c in df.columns]
    table = df[columns].copy()
    for c in schema.tokens:
        if c in table.columns:
            table[c] = [token_text(v) for v in table[c]]
    out: dict[str, Path] = {"table": out_dir / "results.csv"}
    table.to_csv(out["table"], index=False)
    out.update(kind.report(out_dir, df, _settings(out_dir)))
    return out


def write_table(store: ResultStore, kind, path: Path) -> int:
    """results.csv from the store: the columns it shows (`_from_frame`'s, in the same order and
    form), read with pyarrow (token ids as text), written CSV_BATCH rows at a time; returns the rows."""
    schema = kind.schema
    names = store_columns(store)
    wanted = [*kind.order, *schema.table, *schema.tokens, "generated_text"]
    wanted += [c for c in names if c.startswith("ref_")]
    if "top1_logprob" in schema.table:
        wanted.append("top_logprobs")
    df = read_columns(store, [c for c in wanted if c in names], tokens=schema.tokens)
    if df.empty:
        path.write_text("")
        return 0
    df = enrich(df)
    order = grid_order(df, kind)  # the rows are taken in order a batch at a time: no sorted copy of all
    columns = [c for c in schema.table if c in df.columns] + [c for c in df.columns if c.startswith(("ref_", "match_"))]
    columns += [c for c in schema.tokens if c not in columns and c in df.columns]
    df = df[columns]
    with open(path, "w", newline="") as fh:
        for start in range(0, len(df), CSV_BATCH):
            df.take(order[start : start + CSV_BATCH]).to_csv(fh, header=start == 0, index=False)
    return len(df)


def grid_order(df, kind):
    """The row positions of `df` sorted by the kind's order columns (stable), computed on those
    columns alone."""
    keys = [c for c in kind.order if c in df.columns]
    if not keys:
        return list(range(len(df)))
    return df[keys].reset_index(drop=True).sort_values(keys, kind="stable").index.to_numpy()


class ReportSink:
    """The report as a sink: results.csv and the pictures once every row is stored."""

    name = "report"

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)

    def start(self) -> None:
        return None

    def write(self, rows, done: int, total: int, cells_per_s: float) -> None:
        return None

    def finish(self, end) -> None:
        if end.summary["cells_done"]:  # from the store, only the columns drawn (not end.df's every column)
            made, end.frame = report_from_store(self.out_dir)  # W&B's figures reuse the frame
            end.made.update(made)

    def fail(self) -> None:
        return None


def made_lines(made: dict[str, Path]) -> list[str]:
    """What a report wrote, one line a file, as the sweep and `patchscope report` both print it:
    results.csv first, then each picture (`picture:`) and each table (`table:`, e.g. steering_<model>.csv)."""
    if "table" not in made:
        return []
    return [f"table:    {made['table']}"] + [
        f"{'picture:  ' if Path(path).suffix == '.png' else 'table:    '}{path}"
        for key, path in made.items()
        if key != "table"
    ]


def text_table(df, kind: str | None = None) -> str:
    """What to read first in the terminal (the kind's summary)."""
    return KINDS[kind or kind_of(df.columns)].summary(enrich(df))


def check_results(store: ResultStore, df, kind_name: str, config: dict | None = None) -> None:
    """The rows `report` reads (`df`, the current config's) hold the columns its kind's report
    reads (for the stored `config`: `report_needs`), numbers where numbers are expected; a
    ConfigError names the file (the first one with the fault; else the results directory), the
    column and what it holds."""
    import pandas as pd

    kind = KINDS[kind_name]
    schema = kind.schema
    needed = ["cell_id", "model", *sorted(kind.marks), *schema.numbers, *schema.needs, *kind.report_needs(config)]
    needed = list(dict.fromkeys(needed))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        renamed = KINDS[kind_name].renamed  # a file written before a rename holds the old name
        where = _file_with(
            store,
            lambda names, types: any(c not in names and c not in [renamed.get(n, n) for n in names] for c in missing),
        )
        raise ConfigError(
            f"dir: {where} lacks the column(s) {', '.join(missing)} of a {kind_name} sweep's results "
            "(written by another program or version?); move it away to report the rest"
        )
    for c in schema.numbers:
        values = df[c]
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values) or values.isna().all()):
            bad = next(v for v in values if v is not None and not isinstance(v, (int, float)))
            where = _file_with(
                store, lambda names, types, c=c: c in names and types[c] not in ("int", "float", "null", "bool")
            )
            raise ConfigError(
                f"dir: {where}: column {c} holds {type(bad).__name__} values such as {bad!r}, not numbers "
                "(written by another program?); move the file away to report the rest"
            )


def _file_with(store: ResultStore, fault) -> Path:
    """The first result file whose columns (names, {name: int|float|null|bool|other}) show the fault; else the directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def kind(t) -> str:
        for name, test in (
            ("int", pa.types.is_integer),
            ("float", pa.types.is_floating),
            ("null", pa.types.is_null),
            ("bool", pa.types.is_boolean),
        ):
            if test(t):
                return name
        return "other"

    for f in store.files():
        try:
            arrow = pq.read_schema(f)
        except Exception:  # noqa: BLE001 - a damaged file is the store's to set aside
            continue
        if fault(arrow.names, {fld.name: kind(fld.type) for fld in arrow}):
            return f
    return store.results_dir


def main(args) -> int:
    out_dir = Path(args.dir)
    store = ResultStore(out_dir)
    if not store.results_dir.is_dir():
        print(f"error: dir: {out_dir} holds no sweep results (no {store.results_dir})", file=sys.stderr)
        return 2
    try:
        manifest = store.manifest() or {}
    except ConfigError as exc:
        raise ConfigError(f"dir: {str(exc).removeprefix('output.dir: ')}") from None
    names = store_columns(store)
    kind_name = kind_of_store(manifest, names)
    df = read_report_frame(store, KINDS[kind_name], names)  # only the columns the report reads
    if df.empty:
        print(f"error: dir: {store.results_dir} holds no result files yet", file=sys.stderr)
        return 2
    config = manifest.get("config")
    check_results(store, df, kind_name, config if isinstance(config, dict) else None)
    total = manifest.get("cells_total")
    print(text_table(df, kind_name))
    paths = _report(out_dir, store, KINDS[kind_name], df)
    done = df["cell_id"].nunique()
    print(
        f"\n{done} cells stored"
        + (f" of {total}" if total else "")
        + f" ({len(store.files())} files in {store.results_dir})"
    )
    for line in made_lines(paths):
        print(line)
    return 0
