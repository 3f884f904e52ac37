"""The grid of a sweep: cells (one Patchscope each) and tasks (batches of cells).

A cell is one point of model x (source prompt, target prompt) row x source layer x source
position x target layer x target position. Its id is a hash of those parameters and the
generation settings, so the same cell has the same id in every run (resume relies on it).
A task holds cells of one model and one source prompt, at most batch_size of them, so the
worker extracts that prompt's hidden states once per task. What travels to a worker is plain
data (`Task.payload`, `worker_settings`): workers import `patchscope_core` only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

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

    @property
    def cell_id(self) -> str:
        return _digest([
            self.model, self.source_prompt, self.source_layer, self.source_position,
            self.target_prompt, self.target_layer, self.target_position,
            [list(r) for r in self.refs], self.generation_key,
        ])

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


def expand(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> list[Cell]:
    """Every cell of the grid, in a fixed order, without duplicates."""
    gen = generation_key(config)
    cells: dict[str, Cell] = {}
    for model in config.models:
        plan = plans[model]
        for row in rows:
            positions = config.source.positions
            if positions == "all":
                positions = list(range(plan.n_tokens[row.source_prompt]))
            for layer in plan.source_layers:
                for pos in positions:
                    for t_layer in plan.target_layers or [layer]:
                        for t_pos in config.target.positions:
                            cell = Cell(model, row.source_prompt, layer, pos, row.target_prompt, t_layer, t_pos,
                                        row.index, row.refs, gen, config.generation.max_new_tokens)
                            cells.setdefault(cell.cell_id, cell)
    return list(cells.values())


def make_tasks(cells: Iterable[Cell], batch_size: int) -> list[Task]:
    """Group cells by (model, source prompt), in first-seen order, and cut to batch_size."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.source_prompt), []).append(cell)
    tasks = []
    for (model, prompt), group in groups.items():
        for start in range(0, len(group), batch_size):
            tasks.append(Task(model, prompt, tuple(group[start:start + batch_size])))
    return tasks
