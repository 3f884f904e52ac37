"""Result records: the columns of a sweep's results, defined here once.

A worker sends back the engine's records (`PatchscopeResult.to_record`); `records(task, output)`
makes one result row per cell: the cell's parameters (`grid.PARAM_COLUMNS`, then its `ref_<name>`
reference columns), what the engine produced (`RESULT_COLUMNS`), where and when it ran
(`RUN_COLUMNS`, then `time_*` timings). The sinks (the Parquet store, W&B, the report) take
rows in this shape; `TABLE_COLUMNS` is what a person reads in the W&B tables and results.csv,
with the derived columns `enrich` adds.
"""

from __future__ import annotations

from typing import Any

from .grid import Task

# What the engine produced for a cell.
RESULT_COLUMNS = (
    "source_position_abs", "target_position_abs", "source_token_ids", "target_token_ids",
    "generated_token_ids", "generated_text", "top_token_ids", "top_logprobs", "max_new_tokens",
)
# Which task and worker computed it (timings follow as time_<name>).
RUN_COLUMNS = ("task_id", "worker_node", "worker_pid", "worker_device", "time_task_s")
# What a person reads (W&B tables, results.csv), in this order; ref_<name> and match_<name> follow.
TABLE_COLUMNS = (
    "cell_id", "model", "source_prompt", "source_layer", "source_position", "target_layer",
    "target_position", "generated_text", "top1_logprob", "target_prompt", "generated_token_ids",
)
# Token-id lists, shown as space-separated text in tables.
TOKEN_COLUMNS = ("generated_token_ids", "source_token_ids", "target_token_ids")


def records(task: Task, output: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per cell of `task` from a worker's output (`workers.actor.run_task`)."""
    rows = []
    for cell, rec in zip(task.cells, output["records"], strict=True):
        row = cell.params()
        row.update(
            source_position_abs=rec["source_position"],
            target_position_abs=rec["target_positions"][0],
            **{c: rec[c] for c in RESULT_COLUMNS[2:]},
            task_id=output["task_id"],
            time_task_s=output["time_task_s"],
            **{k: v for k, v in rec.items() if k.startswith("time_")},
            **output["worker"],
        )
        rows.append(row)
    return rows


def top1_logprob(top_logprobs) -> float:
    """Log-probability of the first generated token (the head of a record's top_logprobs)."""
    return float(top_logprobs[0]) if top_logprobs is not None and len(top_logprobs) else float("nan")


def enrich(df):
    """Add the derived columns: top1_logprob and, per reference column, match_<name> (the
    generated text contains the row's reference value)."""
    df = df.copy()
    df["top1_logprob"] = [top1_logprob(v) for v in df["top_logprobs"]]
    for ref in [c for c in df.columns if c.startswith("ref_")]:
        name = ref[4:]
        df[f"match_{name}"] = [
            bool(r) and str(r).strip().lower() in str(t).lower() for r, t in zip(df[ref], df["generated_text"])
        ]
    return df


def token_text(ids) -> str:
    return " ".join(str(int(t)) for t in ids)
