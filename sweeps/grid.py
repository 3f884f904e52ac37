"""The grid of a sweep, for every kind (the kind's cells: `sweeps.kinds`): counted
arithmetically (`count_cells`, `count_todo`) and expanded lazily (`iter_cells`, `iter_tasks`),
so a grid of millions of cells is sized and planned without holding it in memory.

A `Task` holds cells of one model. Tasks are sized for the device, not for a task group: a kind
whose operation batches any cells together (`packs`: Patchscopes, intervention runs, recipe
probes) gets tasks of up to `execution.batch_size x execution.batches_per_task` cells across many
groups (source prompts, prompts, recipe rows), so a task is several full forward batches, not
one group's few rows; a kind whose cells share per-group work (`one_task`: a fact's causal
trace, a pair's runs) gets one task per group. What travels to a worker is plain data (`Task.payload`, `worker_settings`): workers import `patchscope_core`
only. `context` is what every task of a sweep shares (`sweeps.plan.study_context`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .config.models import ModelPlan
from .kinds import KINDS
from .kinds.base import digest


@dataclass(frozen=True)
class Task:
    """Cells of one model, in cell order: of one group (a source prompt, a prompt, a fact), or of
    consecutive groups where the kind `packs`."""

    model: str
    source_prompt: str  # the group (the first cell's, where the task packs several)
    cells: tuple[Any, ...]
    context: Any = None  # what every cell of the task shares (the table of kinds, trace settings)

    @property
    def task_id(self) -> str:
        return digest(sorted(c.cell_id for c in self.cells), 12)

    @property
    def kind(self) -> str:
        return self.cells[0].KIND

    def payload(self) -> dict[str, Any]:
        """What travels to a worker: plain data, one entry per cell, in cell order."""
        return {"task_id": self.task_id, "model": self.model, **KINDS[self.kind].payload(self)}


def worker_settings(config) -> dict[str, Any]:
    """What a worker needs to know of the config, as plain data."""
    ex, gen = config.execution, config.generation
    decoding = gen.decoding()
    return {
        "decoding": {f: getattr(decoding, f) for f in ("do_sample", "temperature", "top_p", "seed", "stop_at_eos")},
        "top_k": gen.top_logprobs,
        "batch_size": ex.batch_size,  # "auto": the worker sizes its batches (`workers.actor`)
        "batch_rows": ex.batch_rows,
        "batch_tokens": ex.batch_tokens,
        "gpus_per_worker": ex.gpus_per_worker,
        "cpus_per_worker": ex.cpus_per_worker,
        "device_map": ex.device_map,
        "dtype": ex.dtype,
    }


def group_sizes(
    config, rows: list, plans: dict[str, ModelPlan], context: Any = None
) -> Iterator[tuple[str, int, bool]]:
    """(model, cells, one task) for each task group, counted without expanding; `one task`: the
    group's cells form a single task."""
    kind = KINDS[config.kind]
    for model, n in kind.group_sizes(config, rows, plans, context):
        yield model, n, kind.one_task


def _tasks_of(n: int, one_task: bool, batch_size: int) -> int:
    return (1 if n else 0) if one_task else math.ceil(n / batch_size)


def per_task(config, n_cells: int) -> int | None:
    """Cells of one task of a model with n_cells to run, where the sweep's kind packs groups (None:
    it does not): `execution.batches_per_task` forward batches of `execution.batch_size` rows, or
    fewer where that would leave a worker without a task to start with (never less than a batch)."""
    if not KINDS[config.kind].packs:
        return None
    ex = config.execution
    batches = math.ceil(n_cells / (ex.workers * ex.max_in_flight_per_worker) / ex.batch_rows)
    return ex.batch_rows * max(1, min(ex.batches_per_task, batches))


ID_CHUNK = 1 << 20  # cell ids turned into Arrow strings at a time


def _id_chunks(ids: Iterator[str]) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(ids, ID_CHUNK)):
        yield chunk


def _arrow_chunks(ids: Iterator[str]):
    import pyarrow as pa

    return (pa.array(c, pa.string()) for c in _id_chunks(ids))


def _stored_in(stored, chunk):
    """Which ids of an Arrow chunk are in `stored` (a `CellIdSet`: vectorized; or any set)."""
    import numpy as np

    if hasattr(stored, "contains_many"):
        return stored.contains_many(chunk)
    return np.array([cid in stored for cid in chunk.to_pylist()], bool)


def cell_id_array(config, rows: list, plans: dict[str, ModelPlan], context: Any = None):
    """Every cell id in the grid's order as one Arrow string column, built a chunk at a time (10^7
    ids: about 200 MB, no Python object per cell kept): what a run matches against the store
    (`count_todo`) and what the store records as its current cells, computed once per run."""
    import pyarrow as pa

    return pa.chunked_array(list(_arrow_chunks(cell_ids(config, rows, plans, context))), pa.string())


def _count(config, rows, plans, context, stored_ids=None, ids=None) -> dict[str, tuple[int, int]]:
    """{model: (cells, tasks)}: of the whole grid, or of the cells whose ids are not in the set
    `stored_ids` (when given and not empty); `ids`: the grid's `cell_id_array`, if at hand."""
    if stored_ids:
        chunks = ids.chunks if ids is not None else _arrow_chunks(cell_ids(config, rows, plans, context))
        todo = itertools.chain.from_iterable((~_stored_in(stored_ids, c)).tolist() for c in chunks)
    packs = KINDS[config.kind].packs
    out: dict[str, tuple[int, int]] = {}
    for model, n, one_task in group_sizes(config, rows, plans, context):
        if stored_ids:
            n = sum(itertools.islice(todo, n))
        cells, tasks = out.get(model, (0, 0))
        out[model] = (cells + n, tasks + (0 if packs else _tasks_of(n, one_task, config.execution.batch_rows)))
    if packs:  # a model's cells are cut into tasks across groups
        out = {m: (n, math.ceil(n / per_task(config, n)) if n else 0) for m, (n, _) in out.items()}
    return out


def count_cells(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> int:
    return sum(n for _, n, _ in group_sizes(config, rows, plans, context))


def count_tasks(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> int:
    return sum(t for _, t in _count(config, rows, plans, context).values())


def count_todo(
    config, rows: list, plans: dict[str, ModelPlan], stored: set[str] | frozenset, context: Any = None, ids=None
) -> dict[str, tuple[int, int]]:
    """{model: (cells, tasks)} of what is not in `stored` yet, without building any cell (and
    without a look at a single cell when nothing is stored); `ids`: the grid's `cell_id_array`
    when the caller has it (else the ids are computed here)."""
    return _count(config, rows, plans, context, stored, ids)


def cell_ids(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> Iterator[str]:
    """The id of every cell, in the grid's order (counting what a run would do)."""
    return KINDS[config.kind].cell_ids(config, rows, plans, context)


def iter_cells(
    config, rows: list, plans: dict[str, ModelPlan], skip: set[str] | frozenset = frozenset(), context: Any = None
) -> Iterator[Any]:
    """Every cell of the grid whose id is not in `skip`, in a fixed order, without duplicates,
    one at a time; the cells of one task group come together."""
    cells = KINDS[config.kind].cells(config, rows, plans, context)
    return (c for c in cells if c.cell_id not in skip) if skip else cells


def expand(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> list:
    """Every cell of the grid as a list (small grids, tests; a sweep uses iter_cells)."""
    return list(iter_cells(config, rows, plans, context=context))


def iter_tasks(
    cells: Iterable[Any], batch_size: int, context: Any = None, per_task: dict[str, int] | None = None
) -> Iterator[Task]:
    """Cut a stream of cells, whose (model, group) groups come together, into tasks: with
    `per_task` ({model: cells a task}, `grid.per_task`), tasks of that many cells of one model
    across groups; else tasks of at most batch_size cells of one group (a kind with `one_task`:
    one task per group; batch_size is then rows per forward pass)."""
    if per_task:
        for model, stream in itertools.groupby(cells, key=lambda c: c.model):
            while batch := tuple(itertools.islice(stream, per_task[model])):
                yield Task(model, batch[0].group, batch, context)
        return
    for (model, key), group in itertools.groupby(cells, key=lambda c: (c.model, c.group)):
        first = next(group)
        group = itertools.chain([first], group)
        size = None if KINDS[first.KIND].one_task else batch_size
        while batch := tuple(itertools.islice(group, size)):
            yield Task(model, key, batch, context)


def make_tasks(
    cells: Iterable[Any], batch_size: int, context: Any = None, per_task: dict[str, int] | None = None
) -> list[Task]:
    """Group cells by (model, group), in first-seen order, and cut them into tasks (iter_tasks)."""
    groups: dict[tuple[str, str], list] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.group), []).append(cell)
    return list(iter_tasks(itertools.chain.from_iterable(groups.values()), batch_size, context, per_task))
