"""Tables and pictures from a sweep's stored results (`patchscope report DIR`, and the end of a
sweep): reads only the Parquet store, so it works on a finished sweep, a stopped one, or one
copied from a cluster. Writes `results.csv` (one row per cell: the kind's table columns, then
ref_<name> and match_<name>) and the kind's pictures and tables (`SweepKind.report`)."""

from __future__ import annotations

import sys
from pathlib import Path

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
    out.update(kind.report(out_dir, df))
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
    return [f"table:    {made['table']}"] + [f"{'picture:  ' if Path(path).suffix == '.png' else 'table:    '}{path}"
                                             for key, path in made.items() if key != "table"]


def text_table(df) -> str:
    """What to read first in the terminal (the kind's summary)."""
    return KINDS[kind_of(df.columns)].summary(enrich(df))


def main(args) -> int:
    out_dir = Path(args.dir)
    store = ResultStore(out_dir)
    if not store.results_dir.is_dir():
        print(f"error: dir: {out_dir} holds no sweep results (no {store.results_dir})", file=sys.stderr)
        return 2
    df = store.read()
    if df.empty:
        print(f"error: dir: {store.results_dir} holds no result files yet", file=sys.stderr)
        return 2
    manifest = store.manifest() or {}
    total = manifest.get("cells_total")
    print(text_table(df))
    paths = write_report(out_dir, df)
    done = df["cell_id"].nunique()
    print(f"\n{done} cells stored" + (f" of {total}" if total else "") + f" ({len(store.files())} files in {store.results_dir})")
    for line in made_lines(paths):
        print(line)
    return 0
