"""The grid of a sweep, for every kind (the kind's cells: `sweeps.kinds`): counted
arithmetically (`count_cells`, `count_todo`) and expanded lazily (`iter_cells`, `iter_tasks`),
so a grid of millions of cells is sized and planned without holding it in memory.

A `Task` holds cells of one model and one task group (a source prompt, a prompt, a fact, a
recipe row), at most batch_size of them (a kind with `one_task`: the whole group). What travels
to a worker is plain data (`Task.payload`, `worker_settings`): workers import `patchscope_core`
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
    """Cells of one model and one group (a source prompt, a prompt, a fact), in cell order."""

    model: str
    source_prompt: str  # the group
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
        "batch_size": ex.batch_size,
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


def count_cells(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> int:
    return sum(n for _, n, _ in group_sizes(config, rows, plans, context))


def count_tasks(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> int:
    return sum(
        _tasks_of(n, one, config.execution.batch_size) for _, n, one in group_sizes(config, rows, plans, context)
    )


def count_todo(
    config, rows: list, plans: dict[str, ModelPlan], stored: set[str] | frozenset, context: Any = None
) -> dict[str, tuple[int, int]]:
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


def cell_ids(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> Iterator[str]:
    """The id of every cell, in the grid's order (counting what a run would do)."""
    return KINDS[config.kind].cell_ids(config, rows, plans, context)


def iter_cells(
    config, rows: list, plans: dict[str, ModelPlan], skip: set[str] | frozenset = frozenset(), context: Any = None
) -> Iterator[Any]:
    """Every cell of the grid whose id is not in `skip`, in a fixed order, without duplicates,
    one at a time; the cells of one task group come together."""
    return (c for c in KINDS[config.kind].cells(config, rows, plans, context) if c.cell_id not in skip)


def expand(config, rows: list, plans: dict[str, ModelPlan], context: Any = None) -> list:
    """Every cell of the grid as a list (small grids, tests; a sweep uses iter_cells)."""
    return list(iter_cells(config, rows, plans, context=context))


def iter_tasks(cells: Iterable[Any], batch_size: int, context: Any = None) -> Iterator[Task]:
    """Cut a stream of cells, whose (model, group) groups come together, into tasks of at most
    batch_size cells (a kind with `one_task`: one task per group; batch_size is then rows per
    forward pass)."""
    for (model, key), group in itertools.groupby(cells, key=lambda c: (c.model, c.group)):
        first = next(group)
        group = itertools.chain([first], group)
        size = None if KINDS[first.KIND].one_task else batch_size
        while batch := tuple(itertools.islice(group, size)):
            yield Task(model, key, batch, context)


def make_tasks(cells: Iterable[Any], batch_size: int, context: Any = None) -> list[Task]:
    """Group cells by (model, group), in first-seen order, and cut them into tasks (iter_tasks)."""
    groups: dict[tuple[str, str], list] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.group), []).append(cell)
    return list(iter_tasks(itertools.chain.from_iterable(groups.values()), batch_size, context))
