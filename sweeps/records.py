"""Result records: the columns of a sweep's results, defined here once for each kind.

A worker sends back the engine's records; `records(task, output)` makes one result row per cell:
the cell's parameters (`grid.PARAM_COLUMNS`, `INTERVENTION_COLUMNS`, `TRACE_COLUMNS`, then its
`ref_<name>` reference columns), what the engine produced (the kind's `results`), where and when
it ran (`RUN_COLUMNS`, then `time_*` timings). The sinks (the Parquet store, W&B, the report)
take rows in this shape; a kind's `table` is what a person reads in the W&B tables and
results.csv, with the derived columns `enrich` adds.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass

from .grid import INTERVENTION_COLUMNS, PARAM_COLUMNS, TRACE_COLUMNS, Task
from .recipe_grid import RECIPE_COLUMNS

# What the engine produced for a cell.
RESULT_COLUMNS = (
    "source_position_abs", "target_position_abs", "source_token_ids", "target_token_ids",
    "generated_token_ids", "generated_text", "top_token_ids", "top_logprobs", "max_new_tokens",
)
# Which task and worker computed it (timings follow as time_<name>).
RUN_COLUMNS = ("task_id", "worker_node", "worker_pid", "worker_device", "worker_peak_mb", "time_task_s")
# What a person reads (W&B tables, results.csv), in this order; ref_<name> and match_<name> follow.
TABLE_COLUMNS = (
    "cell_id", "model", "source_prompt", "source_layer", "source_position", "target_layer",
    "target_position", "generated_text", "top1_logprob", "target_prompt", "generated_token_ids",
)
# Token-id lists, shown as space-separated text in tables.
TOKEN_COLUMNS = ("generated_token_ids", "source_token_ids", "target_token_ids")


@dataclass(frozen=True)
class Schema:
    params: tuple[str, ...]  # the cell's parameters (ref_<name> columns follow)
    results: tuple[str, ...]  # what the engine produced
    table: tuple[str, ...]  # what a person reads, in this order (ref_ and match_ columns follow)
    tokens: tuple[str, ...]  # token-id lists, shown as text in tables


INTERVENTION_RESULTS = (
    "delta_logprob", "answer_logprob", "clean_answer_logprob", "p_answer", "p_answer_clean", "generated_text",
    "clean_generated_text", "generated_token_ids", "clean_generated_token_ids", "answer_token_ids",
    "answer_logprobs", "prompt_token_ids", "top_token_ids", "top_logprobs", "max_new_tokens",
)
TRACE_RESULTS = ("token", "is_subject", "p_clean", "p_corrupt", "p_restored", "indirect_effect", "samples")

# A recipe's probe: its score by the recipe's metric and what it produced (patchscope_core.recipes).
RECIPE_RESULTS = (
    "score", "control_score", "surprisal", "predicted_token_id", "expected_token_id", "predicted_token",
    "expected_token", "generated_text", "generated_token_ids", "top_token_ids", "top_logprobs",
    "source_position_abs", "target_position_abs", "max_new_tokens",
)

SCHEMAS = {
    "patchscope": Schema(PARAM_COLUMNS, RESULT_COLUMNS, TABLE_COLUMNS, TOKEN_COLUMNS),
    "intervention": Schema(
        INTERVENTION_COLUMNS, INTERVENTION_RESULTS,
        ("cell_id", "model", "row", "prompt", "answer", "site", "layer", "head", "neuron", "kind", "alpha", "factor",
         "noise_scale", "seed", "positions", "delta_logprob", "answer_logprob", "clean_answer_logprob", "p_answer",
         "p_answer_clean", "generated_text", "clean_generated_text", "generated_token_ids"),
        ("generated_token_ids",)),
    "causal_trace": Schema(TRACE_COLUMNS, TRACE_RESULTS, TRACE_COLUMNS + TRACE_RESULTS, ()),
    "recipe": Schema(
        RECIPE_COLUMNS, RECIPE_RESULTS,
        ("cell_id", "model", "recipe", "row", "role", "method", "relation", "subject", "source_layer", "target_layer",
         "source_position", "score", "control_score", "surprisal", "predicted_token", "expected_token", "expected",
         "generated_text", "source_prompt", "target_prompt", "prompt", "generated_token_ids"),
        ("generated_token_ids",)),
}


def kind_of(columns) -> str:
    """Which kind of sweep stored rows with these columns."""
    columns = set(columns)
    if {"role", "score"} <= columns:
        return "recipe"
    if "indirect_effect" in columns:
        return "causal_trace"
    return "intervention" if "delta_logprob" in columns else "patchscope"


def records(task: Task, output: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per cell of `task` from a worker's output (`workers.actor.run_task`)."""
    if task.kind == "intervention":
        return _intervention_records(task, output)
    if task.kind == "causal_trace":
        return _trace_records(task, output)
    if task.kind == "recipe":
        return _recipe_records(task, output)
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


def _run(output: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    return {"task_id": output["task_id"], "time_task_s": output["time_task_s"],
            **{k: v for k, v in rec.items() if k.startswith("time_")}, **output["worker"]}


def _intervention_records(task: Task, output: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for cell, rec in zip(task.cells, output["records"], strict=True):
        row = cell.params()
        row.update({c: rec.get(c) for c in INTERVENTION_RESULTS if c in rec})
        row["max_new_tokens"] = cell.max_new_tokens
        a, c = rec["answer_logprob"], rec["clean_answer_logprob"]
        row["delta_logprob"] = None if a is None or c is None else a - c
        row.update(_run(output, rec))
        rows.append(row)
    return rows


def _trace_records(task: Task, output: dict[str, Any]) -> list[dict[str, Any]]:
    (rec,) = output["records"]
    start, end = rec["subject"]
    samples = task.context["settings"]["samples"]
    rows = []
    for cell, p in zip(task.cells, rec["p_restored"], strict=True):
        row = cell.params()
        row.update(token=rec["tokens"][cell.position], is_subject=start <= cell.position < end, p_clean=rec["p_clean"],
                   p_corrupt=rec["p_corrupt"], p_restored=p, indirect_effect=p - rec["p_corrupt"], samples=samples,
                   **_run(output, rec))
        rows.append(row)
    return rows


def _recipe_records(task: Task, output: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for cell, rec in zip(task.cells, output["records"], strict=True):
        row = cell.params()
        row.update({c: rec.get(c) for c in RECIPE_RESULTS})
        row["generated_token_ids"] = rec.get("generated_token_ids") or []  # lenses generate nothing
        row["max_new_tokens"] = cell.probe.max_new_tokens
        row.update(_run(output, rec))
        rows.append(row)
    return rows


def top1_logprob(top_logprobs) -> float:
    """Log-probability of the first generated token (the head of a record's top_logprobs)."""
    return float(top_logprobs[0]) if top_logprobs is not None and len(top_logprobs) else float("nan")


def enrich(df):
    """Add the derived columns: top1_logprob and, per reference column, match_<name> (the
    generated text contains the row's reference value)."""
    df = df.copy()
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
