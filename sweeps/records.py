"""Result records: a worker's output -> one result row per cell, through the task's kind.

A row holds the cell's parameters (the kind's `schema.params`, then its `ref_<name>` reference
columns), what the engine produced (`schema.results`), where and when it ran (`RUN_COLUMNS`,
then `time_*` timings). The sinks (the Parquet store, W&B, the report) take a task's rows in
this shape, as one Arrow table (`table`); a kind's `schema.table` is what a person reads in the
W&B tables and results.csv, with the derived columns `enrich` adds.
"""

from __future__ import annotations

from typing import Any

from .kinds import KINDS, kind_of
from .kinds.base import RUN_COLUMNS, Schema

__all__ = [
    "RUN_COLUMNS",
    "Schema",
    "arrow_token_text",
    "arrow_top1_logprob",
    "as_table",
    "enrich",
    "kind_of",
    "records",
    "schema_of",
    "table",
    "token_text",
    "top1_logprob",
]


def records(task, output: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per cell of `task` from a worker's output (`workers.actor.run_task`)."""
    return KINDS[task.kind].to_rows(task, output)


def table(task, output: dict[str, Any]):
    """`records` as one pyarrow Table: what the store and the sinks take (`SweepKind.to_table`)."""
    return KINDS[task.kind].to_table(task, output)


def as_table(rows):
    """A task's rows as a pyarrow Table: a Table as it is, dicts (a test's, a caller's) converted."""
    import pyarrow as pa

    return rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))


def schema_of(kind: str) -> Schema:
    return KINDS[kind].schema


def top1_logprob(top_logprobs) -> float:
    """Log-probability of the first generated token (the head of a record's top_logprobs)."""
    return float(top_logprobs[0]) if top_logprobs is not None and len(top_logprobs) else float("nan")


def enrich(df):
    """Add the derived columns: top1_logprob and, per reference column, match_<name> (the
    generated text contains the row's reference value); `df` itself is left as it is (pandas'
    copy-on-write: a shallow copy, its new columns its own, no row copied)."""
    df = df.copy(deep=False)
    if "top_logprobs" in df.columns:
        df["top1_logprob"] = [top1_logprob(v) for v in df["top_logprobs"]]
    if "generated_text" not in df.columns:
        return df
    for ref in [c for c in df.columns if c.startswith("ref_")]:
        name = ref[4:]
        df[f"match_{name}"] = [
            bool(r) and str(r).strip().lower() in str(t).lower() for r, t in zip(df[ref], df["generated_text"])
        ]
    return df


def token_text(ids) -> str:
    return " ".join(str(int(t)) for t in ids)


def arrow_token_text(column):
    """`token_text` of every row of a pyarrow column of token-id lists, computed by Arrow: the ids
    as decimal text joined by spaces (an empty or null list: empty text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return column
    text = pc.binary_join(pc.cast(column, pa.list_(pa.string())), " ")
    return pc.fill_null(text, "")


def arrow_top1_logprob(column):
    """`top1_logprob` of every row of a pyarrow column of log-probability lists: the first value
    as a float, NaN for an empty or null list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return pc.fill_null(pc.cast(column, pa.float64()), float("nan"))
    values = pc.cast(column, pa.list_(pa.float64()))
    filled = pc.if_else(
        pc.greater(pc.fill_null(pc.list_value_length(values), 0), 0), values, pa.scalar([float("nan")], values.type)
    )
    return pc.fill_null(pc.list_element(filled, 0), float("nan"))
