"""The `SweepKind` protocol: everything one kind of sweep (`kind:` in the config) brings, so that
the config, the plan, the grid, the records, the sinks and the workers never name a kind.

A kind is one object registered in `sweeps.kinds.KINDS` under its `kind:` name. Through the flow
config -> rows -> checks -> grid -> tasks -> workers -> records -> sinks it declares:

- config: `sections` (its config sections, pydantic models, by key; `tagged` for a section
  that is a union told apart by a tag) and `check_config` (checks across its sections);
- rows: `load_rows` (its input rows, from the config or the files it names);
- checks: `check` (every setting against each model's config and tokenizer, no weights: one
  `ModelPlan` per model) and `context` (what every task shares: a table of kinds, settings);
- identity: `science` (the part of the config its config hash covers) and `other_models` (models
  besides the sweep's whose weights decide its results: their keys join each model's);
- grid: `group_sizes` (cells per task group, counted without building a cell), `cells` (every
  cell, lazily, the cells of a task group together), `cell_ids` (the same ids, possibly faster)
  `one_task` (a task group is one task, whatever batch_size) and `packs` (a task may carry the
  cells of many groups: the operation batches any of its cells together);
- tasks: `operation` (the worker operation, `workers.actor.OPERATIONS`, that runs its
  payloads) and `payload` (a task as plain data);
- records: `schema` (its result columns), `to_rows` (a worker's output -> one row per cell),
  `to_table` (the same rows as one Arrow table, what the store and the sinks take: by default
  built from `to_rows`; a kind of cheap cells builds it a column at a time) and `renamed`
  (columns renamed since: old stores are read with the new names);
- sinks: `marks` (columns that tell its stored rows apart), `order` (how results.csv is sorted),
  `report` (its pictures and extra tables, for `patchscope report` and W&B, measuring what the
  config's `report` section names where the kind declares `report_metrics`) and `summary` (what
  the terminal shows first), `summary_figures` (one model's headline numbers, {name: number or
  text}: W&B's run summary, what a runs table sorts by), `curves` (one model's line plots, as
  `Curve`s: W&B draws them beside the PNGs) and `report_needs` (the columns a stored config's
  report reads besides its schema's, which `patchscope report` checks are there). All get only the columns the kind declares they read
  (`report_columns`: its schema's `numbers`, `needs` and `optional`, with `cell_id`, `model`,
  `marks`, `order` and the `ref_<name>` columns; `top_logprobs` arrives as `top1_logprob`): the
  report reads those columns of the store and no other (results.csv, the full table, is
  written from `schema.table` batch by batch). Past the readable size (`pictures.READABLE_ROWS`
  input rows) `report` draws aggregates, not one line per row;
- `describe`: one model's grid in words, for `--dry-run`.

A cell is a frozen dataclass with `KIND` (its kind's name), `model`, `group` (its task group),
`cell_id` (a digest of everything that decides its result: resume relies on it) and `params()`
(its parameter columns). Every error is a `ConfigError` whose message starts with the field.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

# Which task and worker computed a row (timings follow as time_<name>): every kind's last columns.
RUN_COLUMNS = ("task_id", "worker_node", "worker_pid", "worker_device", "worker_peak_mb", "time_task_s")
# How the rows of the study kinds are sorted in results.csv (the columns present, in this order).
STUDY_ORDER = (
    "model",
    "row",
    "site",
    "layer",
    "head",
    "neuron",
    "kind",
    "alpha",
    "position",
    "role",
    "source_layer",
    "target_layer",
)


@dataclass(frozen=True)
class Schema:
    """A kind's result columns."""

    params: tuple[str, ...]  # the cell's parameters (ref_<name> columns follow)
    results: tuple[str, ...]  # what the engine produced
    table: tuple[str, ...]  # what a person reads, in this order (ref_ and match_ columns follow)
    tokens: tuple[str, ...]  # token-id lists, shown as text in tables
    numbers: tuple[str, ...] = ()  # columns every stored row has, as numbers (`patchscope report` checks them)
    needs: tuple[str, ...] = ()  # other columns the report and summary read (`patchscope report` checks them)
    optional: tuple[str, ...] = ()  # columns the report and summary read where a store holds them


@dataclass(frozen=True)
class Curve:
    """A line plot as plain data (W&B draws it at the edge): `y` against `x` of `frame` (a pandas
    DataFrame), one line per value of `series` (None: one line)."""

    frame: Any
    x: str
    y: str
    series: str | None = None
    title: str = ""


def report_columns(kind, names) -> list[str]:
    """The stored columns `kind`'s report and summary read, of a store whose files hold `names`:
    cell_id, model, its marks, its order, its schema's numbers, needs and optional (a kind that
    declares none of these three: its table and token columns) and every ref_<name> column
    (match_<name> derives from it; `report.contrast` names one). Columns the store lacks are left
    out (`patchscope report` names the missing ones it needs)."""
    schema = kind.schema
    declared = (*schema.numbers, *schema.needs, *schema.optional) or (*schema.table, *schema.tokens)
    wanted = ["cell_id", "model", *sorted(kind.marks), *kind.order, *declared]
    wanted += [c for c in names if c.startswith("ref_")]
    if "top1_logprob" in wanted:  # derived from the first of top_logprobs
        wanted.append("top_logprobs")
    present = set(names)
    return [c for c in dict.fromkeys(wanted) if c in present]


def digest(obj: Any, n: int = 16) -> str:
    """The hex digest that names cells, tasks and settings: sha256 of sorted-key JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def generation_key(config) -> str:
    """The digest of the generation settings (part of a generating cell's id)."""
    return digest(config.generation.model_dump(mode="json"))


def check_generates(config, kind: str) -> None:
    """A kind whose result is generated text needs at least one new token (0, score only, is for
    the kinds that score an answer without generating)."""
    if config.generation.max_new_tokens < 1:
        raise ValueError(
            f"generation.max_new_tokens: a {kind} sweep generates text; give 1 or more "
            "(0, score only, is for intervention sweeps)"
        )


def run_columns(output: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """Where and when a row was computed: the task, the worker, the timings."""
    return {
        "task_id": output["task_id"],
        "time_task_s": output["time_task_s"],
        **{k: v for k, v in rec.items() if k.startswith("time_")},
        **output["worker"],
    }


def run_column_lists(output: dict[str, Any], recs: list[dict[str, Any]]) -> dict[str, list]:
    """`run_columns` of every record of a task, a list per column (what `to_table` builds)."""
    n = len(recs)
    columns: dict[str, list] = {"task_id": [output["task_id"]] * n, "time_task_s": [output["time_task_s"]] * n}
    for name in dict.fromkeys(k for r in recs for k in r if k.startswith("time_")):
        columns[name] = [r.get(name) for r in recs]
    columns.update({name: [value] * n for name, value in output["worker"].items()})
    return columns


@runtime_checkable
class SweepKind(Protocol):
    """One kind of sweep; see the module docstring for where each member is used."""

    name: str
    sections: dict[str, type]
    tagged: dict[str, dict[str, type]]
    operation: str
    schema: Schema
    marks: frozenset[str]
    order: tuple[str, ...]
    one_task: bool
    packs: bool
    report_metrics: tuple[str, ...]
    renamed: dict[str, str]

    def check_config(self, config) -> None:
        """Checks across this kind's sections, after their types; raise ValueError('field: ...')."""

    def load_rows(self, config, base: Path | None) -> list: ...

    def check(self, config, rows: list, base: Path | None) -> dict[str, Any]:
        """{model: ModelPlan}; a ConfigError for anything a run would refuse. No weights."""

    def context(self, config, rows: list, base: Path | None) -> Any: ...

    def science(self, science: dict[str, Any], config, rows: list, context: Any) -> dict[str, Any]:
        """`science` (the config's kind, models, generation and this kind's sections, as JSON)
        with what else decides the results (the rows, the context): what the config hash covers."""

    def other_models(self, config) -> tuple[str, ...]:
        """Models besides `config.models` whose weights decide the results (a recipe's source model)."""

    def group_sizes(self, config, rows: list, plans: dict, context: Any) -> Iterator[tuple[str, int]]: ...

    def cells(self, config, rows: list, plans: dict, context: Any) -> Iterator[Any]: ...

    def cell_ids(self, config, rows: list, plans: dict, context: Any) -> Iterator[str]: ...

    def payload(self, task) -> dict[str, Any]:
        """{'kind': self.operation, ...}: the task's cells as plain data for the worker."""

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]: ...

    def to_table(self, task, output: dict[str, Any]) -> Any:
        """`to_rows`'s rows as one pyarrow Table (the same columns, order and types)."""

    def describe(self, config, plan, context: Any) -> str: ...

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        """Pictures and tables; `settings`: the config's `report` section (kinds that declare
        `report_metrics` honour it)."""

    def summary(self, df) -> str: ...

    def summary_figures(self, df) -> dict[str, Any]:
        """One model's headline numbers from its rows (the report's columns, enriched, in the
        report's order): {name: number or text}, what W&B's run summary holds at the end."""

    def curves(self, df) -> dict[str, Curve]:
        """One model's line plots from its rows (as `summary_figures` gets them), by name."""

    def report_needs(self, config: dict[str, Any] | None) -> tuple[str, ...]:
        """Columns the report reads for this stored config besides `schema.numbers` and `needs`."""


class KindDefaults:
    """What most kinds share: no cross-section checks, no tagged sections, no context, ids from
    the cells, a task group cut into batches."""

    tagged: ClassVar[dict[str, dict[str, type]]] = {}
    one_task: ClassVar[bool] = False
    packs: ClassVar[bool] = False
    order: ClassVar[tuple[str, ...]] = STUDY_ORDER
    report_metrics: ClassVar[tuple[str, ...]] = ()  # the measures `report.metric` may name (none: no report section)
    renamed: ClassVar[dict[str, str]] = {}  # result columns renamed since: old name -> new, applied on reading

    def check_config(self, config) -> None:
        return None

    def context(self, config, rows: list, base: Path | None) -> Any:
        return None

    def other_models(self, config) -> tuple[str, ...]:
        return ()

    def report_needs(self, config: dict[str, Any] | None) -> tuple[str, ...]:
        """Columns the report reads for this config besides the schema's `numbers` and `needs`
        (`config`: the stored config as JSON, None when the store has none); `patchscope report`
        checks them with the others."""
        return ()

    def cell_ids(self, config, rows: list, plans: dict, context: Any) -> Iterator[str]:
        return (c.cell_id for c in self.cells(config, rows, plans, context))

    def to_table(self, task, output: dict[str, Any]) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist(self.to_rows(task, output))

    def summary_figures(self, df) -> dict[str, Any]:
        return {}

    def curves(self, df) -> dict[str, Curve]:
        return {}
