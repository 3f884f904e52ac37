"""The grid of a sweep: cells and tasks (batches of cells), for each kind of sweep.

- patchscope: a `Cell` is one point of model x (source prompt, target prompt) row x source
  layer x source position x target layer x target position; a task holds cells of one model and
  one source prompt, at most batch_size of them, so the worker extracts that prompt's hidden
  states once per task.
- intervention: an `InterventionCell` is one point of model x prompt row x site x layer x head
  or neuron x kind x strength; a task holds cells of one prompt, at most batch_size of them (one
  batch, one clean baseline).
- causal_trace: a `TraceCell` is one point of model x fact x site x layer x position; a task
  holds every cell of one fact, so the clean and corrupted runs of a fact are done once.
A cell's id is a hash of its parameters and the settings that decide its result, so the same
cell has the same id in every run (resume relies on it). What travels to a worker is plain data
(`Task.payload`, `worker_settings`): workers import `patchscope_core` only.

The grid is counted arithmetically (`count_cells`, `count_todo`) and expanded lazily
(`iter_cells`, `iter_tasks`), so a grid of millions of cells is sized and planned without
holding it in memory. `context` is what every task of a study shares (its table of kinds, its
trace settings: `study_context`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Iterator

from patchscope_core import Patchscope, Source, Target

from .config import SweepConfig
from .plan import ModelPlan, intervention_kinds, site_hooks, units
from .rows import PromptRow, Row

# A cell's parameters, in this order (ref_<name> columns follow); the first columns of every
# result row (sweeps/records.py).
PARAM_COLUMNS = (
    "cell_id", "model", "source_prompt", "source_layer", "source_position",
    "target_prompt", "target_layer", "target_position", "row",
)


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _id_parts(model: str, source_prompt: str, target_prompt: str, refs, generation_key: str) -> tuple[str, str, str]:
    """The JSON fragments of a cell id that do not depend on layers and positions."""
    head = f"[{json.dumps(model)}, {json.dumps(source_prompt)}, "
    tail = f"{json.dumps([list(r) for r in refs], default=str)}, {json.dumps(generation_key)}]"
    return head, json.dumps(target_prompt), tail


def _cell_digest(parts: tuple[str, str, str], layer: int, position: int, t_layer: int, t_position: int) -> str:
    """A cell's id: the digest of the JSON list [model, source prompt, source layer, source
    position, target prompt, target layer, target position, refs, generation key], written
    from fragments so that a grid encodes each prompt once (the text json.dumps gives the list)."""
    head, target, tail = parts
    text = f"{head}{layer}, {position}, {target}, {t_layer}, {t_position}, {tail}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    model: str
    source_prompt: str
    source_layer: int
    source_position: int  # as asked for (e.g. -1); results also carry the absolute index
    target_prompt: str
    target_layer: int
    target_position: int
    row: int = 0  # the input row (source.prompts / source.file) it came from; not part of the id
    refs: tuple[tuple[str, Any], ...] = ()
    generation_key: str = ""  # digest of the generation settings
    max_new_tokens: int = 20  # part of the generation settings (so of the id through generation_key)

    @cached_property
    def cell_id(self) -> str:
        parts = _id_parts(self.model, self.source_prompt, self.target_prompt, self.refs, self.generation_key)
        return _cell_digest(parts, self.source_layer, self.source_position, self.target_layer, self.target_position)

    def params(self) -> dict[str, Any]:
        """The cell's columns of a result row."""
        out = {k: getattr(self, k) for k in PARAM_COLUMNS[1:]}
        out = {"cell_id": self.cell_id, **out}
        out.update({f"ref_{k}": v for k, v in self.refs})
        return out

    @property
    def group(self) -> str:
        return self.source_prompt

    @staticmethod
    def payload(task: "Task") -> dict[str, Any]:
        return {"kind": "patchscope", "patchscopes": [c.patchscope(c.max_new_tokens).to_dict() for c in task.cells]}

    def patchscope(self, max_new_tokens: int) -> Patchscope:
        return Patchscope(
            source=Source(self.source_prompt, self.source_layer, self.source_position, model=self.model),
            target=Target(self.target_prompt, self.target_layer, (self.target_position,), model=self.model),
            max_new_tokens=max_new_tokens,
        )


INTERVENTION_COLUMNS = (
    "cell_id", "model", "row", "prompt", "answer", "site", "layer", "head", "neuron", "kind", "alpha", "factor",
    "noise_scale", "seed", "positions",
)


@dataclass(frozen=True)
class InterventionCell:
    model: str
    prompt: str
    answer: str | None
    site: str  # the TransformerLens hook name, layer filled in
    layer: int | None
    head: int | None
    neuron: int | None
    kind: str
    variant: str  # digest of the kind's field values: its entry in the task's table of kinds
    alpha: float | None  # add
    factor: float | None  # scale
    noise_scale: float | None  # noise
    seed: int | None  # noise
    positions: Any  # as in the config: 'all', 'prompt', 'generated' or a list of prompt positions
    row: int = 0
    refs: tuple[tuple[str, Any], ...] = ()
    generation_key: str = ""
    max_new_tokens: int = 20

    @property
    def cell_id(self) -> str:
        return _digest(["intervention", self.model, self.prompt, self.answer, self.site, self.head, self.neuron,
                        self.kind, self.variant, self.positions, [list(r) for r in self.refs], self.generation_key])

    @property
    def group(self) -> str:
        return self.prompt

    def params(self) -> dict[str, Any]:
        from patchscope_core import Positions

        out = {k: getattr(self, k) for k in INTERVENTION_COLUMNS[1:]}
        out.update(cell_id=self.cell_id, positions=str(Positions.parse(self.positions)))
        out.update({f"ref_{k}": v for k, v in self.refs})
        return out

    @staticmethod
    def payload(task: "Task") -> dict[str, Any]:
        """Each cell as the core's InterventionRun, in the core's plain-data form (run_to_dict)."""
        from patchscope_core import Intervention, InterventionRun, Site
        from patchscope_core.interventions import make_kind, run_to_dict

        kinds = {v: make_kind(*task.context[v]) for v in dict.fromkeys(c.variant for c in task.cells)}
        runs = []
        for c in task.cells:
            site = Site(c.site, head=() if c.head is None else (c.head,), neuron=() if c.neuron is None else (c.neuron,))
            run = InterventionRun(c.prompt, (Intervention(site, kinds[c.variant], c.positions),), c.answer, c.max_new_tokens)
            runs.append(run_to_dict(run))
        return {"kind": "intervention", "runs": runs}


def fact_key(prompt: str, subject: str | None, answer: str | None) -> str:
    """A causal trace's task group: one fact."""
    return json.dumps([prompt, subject, answer])


TRACE_COLUMNS = ("cell_id", "model", "row", "prompt", "subject", "answer", "site", "layer", "position")


@dataclass(frozen=True)
class TraceCell:
    model: str
    prompt: str
    subject: str
    answer: str
    site: str  # resid_post, mlp_out or attn_out
    layer: int
    position: int  # absolute prompt position (BOS counted)
    row: int = 0
    refs: tuple[tuple[str, Any], ...] = ()
    trace_key: str = ""  # digest of the trace settings and the noise's reference prompts

    @property
    def cell_id(self) -> str:
        return _digest(["causal_trace", self.model, self.prompt, self.subject, self.answer, self.site, self.layer,
                        self.position, [list(r) for r in self.refs], self.trace_key])

    @property
    def group(self) -> str:
        return fact_key(self.prompt, self.subject, self.answer)

    def params(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in TRACE_COLUMNS[1:]}
        out["cell_id"] = self.cell_id
        out.update({f"ref_{k}": v for k, v in self.refs})
        return out

    @staticmethod
    def payload(task: "Task") -> dict[str, Any]:
        c = task.cells[0]
        return {"kind": "causal_trace", "fact": {"prompt": c.prompt, "subject": c.subject, "answer": c.answer},
                "settings": task.context["settings"], "reference": task.context["reference"],
                "cells": [[x.site, x.layer, x.position] for x in task.cells]}


@dataclass(frozen=True)
class Task:
    """Cells of one model and one group (a source prompt, a prompt, a fact), in cell order."""

    model: str
    source_prompt: str  # the group
    cells: tuple[Any, ...]
    context: Any = None  # what every cell of the task shares (the table of kinds, trace settings)

    @property
    def task_id(self) -> str:
        return _digest(sorted(c.cell_id for c in self.cells), 12)

    @property
    def kind(self) -> str:
        cls = type(self.cells[0])
        return getattr(cls, "KIND", None) or {Cell: "patchscope", InterventionCell: "intervention", TraceCell: "causal_trace"}[cls]

    def payload(self) -> dict[str, Any]:
        """What travels to a worker: plain data, one entry per cell, in cell order."""
        return {"task_id": self.task_id, "model": self.model, **type(self.cells[0]).payload(self)}


def worker_settings(config: SweepConfig) -> dict[str, Any]:
    """What a worker needs to know of the config, as plain data."""
    ex, gen = config.execution, config.generation
    decoding = gen.decoding()
    return {
        "decoding": {f: getattr(decoding, f) for f in ("do_sample", "temperature", "top_p", "seed", "stop_at_eos")},
        "top_k": gen.top_logprobs,
        "batch_size": ex.batch_size,
        "batch_tokens": ex.batch_tokens,
        "gpus_per_worker": ex.gpus_per_worker,
        "cpus_per_worker": ex.cpus_per_worker,
        "device_map": ex.device_map,
        "dtype": ex.dtype,
    }


def generation_key(config: SweepConfig) -> str:
    return _digest(config.generation.model_dump(mode="json"))


def _unique_rows(rows: list[Row]) -> list[Row]:
    """Rows that give distinct cells: the same (source, target, references) twice is one row."""
    seen: set = set()
    out = []
    for row in rows:
        key = (row.source_prompt, row.target_prompt, row.refs)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _by_source(rows: list[Row]) -> list[list[Row]]:
    """Rows grouped by source prompt, groups in first-seen order (one task group each)."""
    groups: dict[str, list[Row]] = {}
    for row in _unique_rows(rows):
        groups.setdefault(row.source_prompt, []).append(row)
    return list(groups.values())


def _row_axes(config: SweepConfig, plan: ModelPlan, row: Row) -> tuple[list[int], list[int], list[int | None]]:
    """Source layers, source positions and target layers (None: the source layer) of one row."""
    positions = config.source.positions
    if positions == "all":
        positions = list(range(plan.n_tokens[row.source_prompt]))
    return plan.source_layers, positions, plan.target_layers or [None]


def group_sizes(config: SweepConfig, rows: list, plans: dict[str, ModelPlan],
                context: Any = None) -> Iterator[tuple[str, int, bool]]:
    """(model, cells, one task) for each task group (one model and one source prompt, prompt or
    fact), counted without expanding; `one task`: the group's cells form a single task."""
    if config.kind == "recipe":
        from .recipe_grid import recipe_group_sizes

        yield from recipe_group_sizes(config, rows, plans, context)
        return
    if config.kind != "patchscope":
        for model, group in _study_groups(config, rows, plans):
            yield model, sum(_study_row_size(config, plans[model], row, context) for row in group), \
                config.kind == "causal_trace"
        return
    for model in config.models:
        plan = plans[model]
        for group in _by_source(rows):
            n = 0
            for row in group:
                layers, positions, t_layers = _row_axes(config, plan, row)
                n += len(layers) * len(positions) * len(t_layers) * len(config.target.positions)
            yield model, n, False


def _tasks_of(n: int, one_task: bool, batch_size: int) -> int:
    return (1 if n else 0) if one_task else math.ceil(n / batch_size)


def count_cells(config: SweepConfig, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> int:
    return sum(n for _, n, _ in group_sizes(config, rows, plans, context))


def count_tasks(config: SweepConfig, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> int:
    return sum(_tasks_of(n, one, config.execution.batch_size) for _, n, one in group_sizes(config, rows, plans, context))


def count_todo(config: SweepConfig, rows: list, plans: dict[str, ModelPlan],
               stored: set[str] | frozenset, context: Any = None) -> dict[str, tuple[int, int]]:
    """{model: (cells, tasks)} of what is not in `stored` yet, without building any cell (and
    without a look at a single cell when nothing is stored)."""
    ids = cell_ids(config, rows, plans, context) if stored else None
    out: dict[str, tuple[int, int]] = {}
    for model, n, one_task in group_sizes(config, rows, plans, context):
        if ids is not None:
            n = sum(1 for cid in itertools.islice(ids, n) if cid not in stored)
        cells, tasks = out.get(model, (0, 0))
        out[model] = (cells + n, tasks + _tasks_of(n, one_task, config.execution.batch_size))
    return out


def _walk(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> Iterator[tuple]:
    """(cell_id, model, row, source layer, source position, target layer, target position) of
    every cell, in the grid's order; the cells of one model and source prompt come together."""
    gen = generation_key(config)
    for model in config.models:
        plan = plans[model]
        for group in _by_source(rows):
            for row in group:
                parts = _id_parts(model, row.source_prompt, row.target_prompt, row.refs, gen)
                layers, positions, t_layers = _row_axes(config, plan, row)
                for layer in layers:
                    for pos in positions:
                        for t_layer in (layer,) if t_layers == [None] else t_layers:
                            for t_pos in config.target.positions:
                                yield _cell_digest(parts, layer, pos, t_layer, t_pos), model, row, layer, pos, t_layer, t_pos


def cell_ids(config: SweepConfig, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> Iterator[str]:
    """The id of every cell, in the grid's order (counting what a run would do)."""
    if config.kind != "patchscope":
        return (c.cell_id for c in _study_cells(config, rows, plans, context))
    return (w[0] for w in _walk(config, rows, plans))


def iter_cells(config: SweepConfig, rows: list, plans: dict[str, ModelPlan],
               skip: set[str] | frozenset = frozenset(), context: Any = None) -> Iterator[Any]:
    """Every cell of the grid whose id is not in `skip`, in a fixed order, without duplicates,
    one at a time; the cells of one task group come together."""
    if config.kind != "patchscope":
        yield from (c for c in _study_cells(config, rows, plans, context) if c.cell_id not in skip)
        return
    gen, max_new = generation_key(config), config.generation.max_new_tokens
    for cid, model, row, layer, pos, t_layer, t_pos in _walk(config, rows, plans):
        if cid not in skip:
            cell = Cell(model, row.source_prompt, layer, pos, row.target_prompt, t_layer, t_pos, row.index,
                        row.refs, gen, max_new)
            cell.__dict__["cell_id"] = cid  # computed above: fill the cached property
            yield cell


def expand(config: SweepConfig, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> list:
    """Every cell of the grid as a list (small grids, tests; a sweep uses iter_cells)."""
    return list(iter_cells(config, rows, plans, context=context))


def iter_tasks(cells: Iterable[Any], batch_size: int, context: Any = None) -> Iterator[Task]:
    """Cut a stream of cells, whose (model, group) groups come together, into tasks of at most
    batch_size cells (a causal trace's fact: one task, batch_size is then rows per forward pass)."""
    for (model, key), group in itertools.groupby(cells, key=lambda c: (c.model, c.group)):
        first = next(group)
        group = itertools.chain([first], group)
        size = None if isinstance(first, TraceCell) else batch_size
        while batch := tuple(itertools.islice(group, size)):
            yield Task(model, key, batch, context)


def make_tasks(cells: Iterable[Any], batch_size: int, context: Any = None) -> list[Task]:
    """Group cells by (model, group), in first-seen order, and cut them into tasks (iter_tasks)."""
    groups: dict[tuple[str, str], list] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.group), []).append(cell)
    return list(iter_tasks(itertools.chain.from_iterable(groups.values()), batch_size, context))


# ---------------------------------------------------------------- intervention and causal-trace grids


def study_context(config: SweepConfig, rows: list[PromptRow], base=None) -> dict[str, Any]:
    """What every task of a study shares: the kinds of an intervention grid (by the digest of
    their values), a trace's settings and the prompts that set its noise, or a recipe's settings
    and fit windows."""
    if config.kind == "recipe":
        from .recipe_rows import recipe_context

        context = recipe_context(config, rows, base)
        return {**context, "key": _digest([context["settings"], context["fit_texts"], context["source_model"]])}
    if config.kind == "causal_trace":
        tr = config.trace
        settings = {"sites": list(tr.sites), "window": tr.window, "noise": tr.noise, "samples": tr.samples, "seed": tr.seed}
        reference = list(dict.fromkeys(r.prompt for r in rows))
        return {"settings": settings, "reference": reference, "key": _digest([settings, reference])}
    return {_digest([k, v]): (k, v) for k, v in intervention_kinds(config, rows, base)}


def _study_groups(config: SweepConfig, rows: list[PromptRow], plans) -> Iterator[tuple[str, list[PromptRow]]]:
    """(model, the distinct rows of one prompt), in first-seen order."""
    groups: dict[str, dict] = {}
    for row in rows:
        key = fact_key(row.prompt, row.subject, row.answer) if config.kind == "causal_trace" else row.prompt
        groups.setdefault(key, {}).setdefault((row.answer, row.subject, row.refs), row)
    for model in config.models:
        for group in groups.values():
            yield model, list(group.values())


def _hooks_andunits(config: SweepConfig, plan: ModelPlan) -> list[tuple[str, int | None, int | None]]:
    iv, info = config.intervention, plan.info
    out = []
    for hook in site_hooks(config, plan.source_layers):
        heads = units(iv.heads, info.n_heads) if hook.endswith("attn.hook_z") else [None]
        neurons = units(iv.neurons, info.d_mlp) if hook.endswith("mlp.hook_post") else [None]
        out += [(hook, h, n) for h in heads for n in neurons]
    return out


def _trace_positions(config: SweepConfig, plan: ModelPlan, row: PromptRow) -> list[int]:
    n = plan.n_tokens[row.prompt]
    return list(range(n)) if config.trace.positions == "all" else sorted({p % n for p in config.trace.positions})


def _study_row_size(config: SweepConfig, plan: ModelPlan, row: PromptRow, context: Any) -> int:
    if config.kind == "causal_trace":
        return len(config.trace.sites) * len(plan.source_layers) * len(_trace_positions(config, plan, row))
    return len(_hooks_andunits(config, plan)) * len(context)


def _study_cells(config: SweepConfig, rows: list[PromptRow], plans, context: Any) -> Iterator[Any]:
    """Every cell of an intervention, causal-trace or recipe grid, one task group after another."""
    if config.kind == "recipe":
        from .recipe_grid import recipe_cells

        yield from recipe_cells(config, rows, plans, context)
        return
    gen, max_new = generation_key(config), config.generation.max_new_tokens
    for model, group in _study_groups(config, rows, plans):
        plan = plans[model]
        for row in group:
            if config.kind == "causal_trace":
                for site in config.trace.sites:
                    for layer in plan.source_layers:
                        for pos in _trace_positions(config, plan, row):
                            yield TraceCell(model, row.prompt, row.subject, row.answer, site, layer, pos, row.index,
                                            row.refs, context["key"])
                continue
            for hook, head, neuron in _hooks_andunits(config, plan):
                layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else None
                for variant, (kind, values) in context.items():
                    yield InterventionCell(model, row.prompt, row.answer, hook, layer, head, neuron, kind, variant,
                                           values.get("alpha"), values.get("factor"), values.get("scale"),
                                           values.get("seed"), config.intervention.positions, row.index, row.refs,
                                           gen, max_new)
