"""Tables and pictures from a sweep's stored results (`patchscope report DIR`, and the end of a
sweep): reads only the Parquet store, so it works on a finished sweep, a stopped one, or one
copied from a cluster. Writes `results.csv` (one row per cell: the kind's table columns, then
ref_<name> and match_<name>) and the kind's pictures and tables (`SweepKind.report`)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import ConfigError
from ..kinds import KINDS, kind_of
from ..records import enrich, token_text
from .store import ResultStore


def write_report(out_dir: str | Path, df=None) -> dict[str, Path]:
    """results.csv and the kind's pictures; returns {name: path} (the table under 'table')."""
    out_dir = Path(out_dir)
    if df is None:
        df = ResultStore(out_dir).read()
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
        table[c] = [token_text(v) for v in table[c]]
    out: dict[str, Path] = {"table": out_dir / "results.csv"}
    table.to_csv(out["table"], index=False)
    settings = ((ResultStore(out_dir).manifest() or {}).get("config") or {}).get("report")
    out.update(kind.report(out_dir, df, settings))
    return out


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
        if end.summary["cells_done"]:
            end.made.update(write_report(self.out_dir, end.df))

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


def text_table(df) -> str:
    """What to read first in the terminal (the kind's summary)."""
    return KINDS[kind_of(df.columns)].summary(enrich(df))


def _kind_of_store(manifest: dict, df) -> str:
    """The sweep's kind: the manifest's config says it; else the stored columns."""
    config = manifest.get("config")
    kind = config.get("kind") if isinstance(config, dict) else None
    return kind if kind in KINDS else kind_of(df.columns)


def check_results(store: ResultStore, df, kind_name: str) -> None:
    """The rows `report` reads (`df`, the current config's) hold the columns its kind's report
    reads, numbers where numbers are expected; a ConfigError names the file (the first one with
    the fault; else the results directory), the column and what it holds."""
    import pandas as pd

    schema = KINDS[kind_name].schema
    needed = list(dict.fromkeys(["cell_id", "model", *sorted(KINDS[kind_name].marks), *schema.numbers, *schema.needs]))
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
    df = store.read()
    if df.empty:
        print(f"error: dir: {store.results_dir} holds no result files yet", file=sys.stderr)
        return 2
    check_results(store, df, _kind_of_store(manifest, df))
    total = manifest.get("cells_total")
    print(text_table(df))
    paths = write_report(out_dir, df)
    done = df["cell_id"].nunique()
    print(
        f"\n{done} cells stored"
        + (f" of {total}" if total else "")
        + f" ({len(store.files())} files in {store.results_dir})"
    )
    for line in made_lines(paths):
        print(line)
    return 0
