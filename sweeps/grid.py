"""The grid of a sweep: cells (one Patchscope each) and tasks (batches of cells).

A cell is one point of model x (source prompt, target prompt) row x source layer x source
position x target layer x target position. Its id is a hash of those parameters and the
generation settings, so the same cell has the same id in every run (resume relies on it).
A task holds cells of one model and one source prompt, at most batch_size of them, so the
worker extracts that prompt's hidden states once per task. What travels to a worker is plain
data (`Task.payload`, `worker_settings`): workers import `patchscope_core` only.

The grid is counted arithmetically (`count_cells`, `count_tasks`) and expanded lazily
(`iter_cells`, `iter_tasks`), so a grid of millions of cells is sized and planned without
holding it in memory.
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

from .config import ModelPlan, Row, SweepConfig

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

    def patchscope(self, max_new_tokens: int) -> Patchscope:
        return Patchscope(
            source=Source(self.source_prompt, self.source_layer, self.source_position, model=self.model),
            target=Target(self.target_prompt, self.target_layer, (self.target_position,), model=self.model),
            max_new_tokens=max_new_tokens,
        )


@dataclass(frozen=True)
class Task:
    """Cells of one model and one source prompt; at most batch_size of them."""

    model: str
    source_prompt: str
    cells: tuple[Cell, ...]

    @property
    def task_id(self) -> str:
        return _digest(sorted(c.cell_id for c in self.cells), 12)

    def payload(self) -> dict[str, Any]:
        """What travels to a worker: plain data, one Patchscope per cell, in cell order."""
        return {"task_id": self.task_id, "model": self.model,
                "patchscopes": [c.patchscope(c.max_new_tokens).to_dict() for c in self.cells]}


def worker_settings(config: SweepConfig) -> dict[str, Any]:
    """What a worker needs to know of the config, as plain data."""
    ex, gen = config.execution, config.generation
    decoding = gen.decoding()
    return {
        "decoding": {f: getattr(decoding, f) for f in ("do_sample", "temperature", "top_p", "seed", "stop_at_eos")},
        "top_k": gen.top_logprobs,
        "batch_size": ex.batch_size,
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


def group_sizes(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> Iterator[tuple[str, int]]:
    """(model, cells) for each task group (one model, one source prompt), counted without expanding."""
    for model in config.models:
        plan = plans[model]
        for group in _by_source(rows):
            n = 0
            for row in group:
                layers, positions, t_layers = _row_axes(config, plan, row)
                n += len(layers) * len(positions) * len(t_layers) * len(config.target.positions)
            yield model, n


def count_cells(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> int:
    return sum(n for _, n in group_sizes(config, rows, plans))


def count_tasks(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> int:
    return sum(math.ceil(n / config.execution.batch_size) for _, n in group_sizes(config, rows, plans))


def count_todo(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan],
               stored: set[str] | frozenset) -> dict[str, tuple[int, int]]:
    """{model: (cells, tasks)} of what is not in `stored` yet, without building any cell (and
    without a look at a single cell when nothing is stored)."""
    ids = cell_ids(config, rows, plans) if stored else None
    out: dict[str, tuple[int, int]] = {}
    for model, n in group_sizes(config, rows, plans):
        if ids is not None:
            n = sum(1 for cid in itertools.islice(ids, n) if cid not in stored)
        cells, tasks = out.get(model, (0, 0))
        out[model] = (cells + n, tasks + math.ceil(n / config.execution.batch_size))
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


def cell_ids(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> Iterator[str]:
    """The id of every cell, without building the cells (counting what a run would do)."""
    return (w[0] for w in _walk(config, rows, plans))


def iter_cells(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan],
               skip: set[str] | frozenset = frozenset()) -> Iterator[Cell]:
    """Every cell of the grid whose id is not in `skip`, in a fixed order, without duplicates,
    one at a time."""
    gen, max_new = generation_key(config), config.generation.max_new_tokens
    for cid, model, row, layer, pos, t_layer, t_pos in _walk(config, rows, plans):
        if cid not in skip:
            cell = Cell(model, row.source_prompt, layer, pos, row.target_prompt, t_layer, t_pos, row.index,
                        row.refs, gen, max_new)
            cell.__dict__["cell_id"] = cid  # computed above: fill the cached property
            yield cell


def expand(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> list[Cell]:
    """Every cell of the grid as a list (small grids, tests; a sweep uses iter_cells)."""
    return list(iter_cells(config, rows, plans))


def iter_tasks(cells: Iterable[Cell], batch_size: int) -> Iterator[Task]:
    """Cut a stream of cells, whose (model, source prompt) groups come together, into tasks
    of at most batch_size cells."""
    for (model, prompt), group in itertools.groupby(cells, key=lambda c: (c.model, c.source_prompt)):
        while batch := tuple(itertools.islice(group, batch_size)):
            yield Task(model, prompt, batch)


def make_tasks(cells: Iterable[Cell], batch_size: int) -> list[Task]:
    """Group cells by (model, source prompt), in first-seen order, and cut to batch_size."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.source_prompt), []).append(cell)
    return list(iter_tasks(itertools.chain.from_iterable(groups.values()), batch_size))
