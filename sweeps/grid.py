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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

from patchscope_core import Patchscope, Source, Target

from .config import ModelPlan, PromptRow, Row, SweepConfig, _units, intervention_kinds, site_hooks

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
        runs = []
        for c in task.cells:
            kind, values = task.context[c.variant]
            runs.append({"prompt": c.prompt, "answer": c.answer, "max_new_tokens": c.max_new_tokens,
                         "interventions": [{"site": c.site, "head": [] if c.head is None else [c.head],
                                            "neuron": [] if c.neuron is None else [c.neuron], "kind": kind,
                                            "values": values, "positions": _positions(c.positions)}]})
        return {"kind": "intervention", "runs": runs}


def _positions(value: Any) -> dict[str, Any]:
    from patchscope_core import Positions

    p = Positions.parse(value)
    return {"indices": list(p.indices), "prompt": p.prompt, "generated": p.generated}


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
        return self.prompt

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
        return {Cell: "patchscope", InterventionCell: "intervention", TraceCell: "causal_trace"}[type(self.cells[0])]

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
        "gpus_per_worker": ex.gpus_per_worker,
        "cpus_per_worker": ex.cpus_per_worker,
        "device_map": ex.device_map,
        "dtype": ex.dtype,
    }


def generation_key(config: SweepConfig) -> str:
    return _digest(config.generation.model_dump(mode="json"))


def expand(config: SweepConfig, rows: list[Row], plans: dict[str, ModelPlan]) -> list[Cell]:
    """Every cell of the grid, in a fixed order, without duplicates."""
    if config.kind != "patchscope":
        raise ValueError(f"expand: a {config.kind} sweep's cells come from expand_study")
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


def expand_study(config: SweepConfig, rows: list[PromptRow], plans: dict[str, ModelPlan],
                 base=None) -> tuple[list, Any]:
    """Every cell of an intervention or causal-trace grid, and the context its tasks share."""
    cells: dict[str, Any] = {}
    if config.kind == "causal_trace":
        tr = config.trace
        settings = {"sites": list(tr.sites), "window": tr.window, "noise": tr.noise, "samples": tr.samples, "seed": tr.seed}
        reference = list(dict.fromkeys(r.prompt for r in rows))
        key = _digest([settings, reference])
        for model in config.models:
            plan = plans[model]
            for row in rows:
                n = plan.n_tokens[row.prompt]
                positions = range(n) if tr.positions == "all" else sorted({p % n for p in tr.positions})
                for site in tr.sites:
                    for layer in plan.source_layers:
                        for pos in positions:
                            cell = TraceCell(model, row.prompt, row.subject, row.answer, site, layer, pos, row.index,
                                             row.refs, key)
                            cells.setdefault(cell.cell_id, cell)
        return list(cells.values()), {"settings": settings, "reference": reference}
    iv, gen = config.intervention, generation_key(config)
    table = {_digest([k, v]): (k, v) for k, v in intervention_kinds(config, rows, base)}
    for model in config.models:
        plan = plans[model]
        info = plan.info
        for row in rows:
            for hook in site_hooks(config, plan.source_layers):
                layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else None
                heads = _units(iv.heads, info.n_heads) if hook.endswith("attn.hook_z") else [None]
                neurons = _units(iv.neurons, info.d_mlp) if hook.endswith("mlp.hook_post") else [None]
                for head in heads:
                    for neuron in neurons:
                        for variant, (kind, values) in table.items():
                            cell = InterventionCell(
                                model, row.prompt, row.answer, hook, layer, head, neuron, kind, variant,
                                values.get("alpha"), values.get("factor"), values.get("scale"), values.get("seed"),
                                iv.positions, row.index, row.refs, gen, config.generation.max_new_tokens)
                            cells.setdefault(cell.cell_id, cell)
    return list(cells.values()), table


def make_tasks(cells: Iterable[Any], batch_size: int, context: Any = None) -> list[Task]:
    """Group cells by (model, group), in first-seen order, and cut to batch_size (the cells of a
    causal trace's fact stay in one task: batch_size is then rows per forward pass)."""
    groups: dict[tuple[str, str], list] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.group), []).append(cell)
    tasks = []
    for (model, group_key), group in groups.items():
        size = len(group) if isinstance(group[0], TraceCell) else batch_size
        for start in range(0, len(group), size):
            tasks.append(Task(model, group_key, tuple(group[start:start + size]), context))
    return tasks
