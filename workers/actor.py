"""Ray actors that hold one model for their lifetime and turn tasks into result records.

`PatchscopeWorker` is a plain class (usable and testable without Ray); `start_workers` wraps it
with `ray.remote` and Ray's own fault tolerance: `max_restarts` restarts a crashed actor (which
reloads its model) and `max_task_retries` re-runs the tasks it was running. There is no
hand-written retry loop.

Devices: Ray assigns GPUs (`execution.gpus_per_worker`, fractional allowed so several actors
can share one GPU) and sets CUDA_VISIBLE_DEVICES, so "cuda" is the actor's own GPU. With more
than one GPU per worker (or an explicit `execution.device_map`) accelerate spreads the model
over the GPUs Ray gave the actor. Without GPUs the actor runs on the CPU with as many torch
threads as CPUs Ray reserved for it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from patchscope_core import PatchscopeEngine, load_model


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node
        pass
    return socket.gethostname()


def choose_device(gpus_per_worker: float, device_map: str | None) -> tuple[str | None, str | None]:
    """(device, device_map) for load_model, from what this process was given."""
    import torch

    if gpus_per_worker > 0 and torch.cuda.is_available():
        if device_map or gpus_per_worker > 1:
            return None, device_map or "auto"
        return "cuda", None
    return "cpu", None


class PatchscopeWorker:
    """Holds `model` (loaded once, in __init__) and runs tasks of that model."""

    def __init__(self, model: str, generation: dict[str, Any], execution: dict[str, Any]) -> None:
        import torch

        from sweeps.config import ExecutionConfig, GenerationConfig

        t0 = time.perf_counter()
        self.generation = GenerationConfig(**generation)
        self.execution = ExecutionConfig(**execution)
        self.model_name = model
        self.device, self.device_map = choose_device(self.execution.gpus_per_worker, self.execution.device_map)
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(self.execution.cpus_per_worker)))
        self.model = load_model(
            model, device=self.device, dtype=getattr(torch, self.execution.dtype), device_map=self.device_map
        )
        self.engine = PatchscopeEngine(
            self.model, name=model, decoding=self.generation.decoding(), top_k=self.generation.top_logprobs
        )
        self.where = {
            "worker_node": _node_id(),
            "worker_pid": os.getpid(),
            "worker_device": self.device or f"device_map={self.device_map}",
        }
        self.load_s = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        return {**self.where, "model": self.model_name, "load_s": self.load_s}

    def run(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """One task: a batch of cells of this model -> one record per cell, in cell order."""
        return run_task(self.engine, payload, self.generation.max_new_tokens, self.execution.batch_size, self.where)


def run_task(
    engine: PatchscopeEngine, payload: dict[str, Any], max_new_tokens: int, batch_size: int, where: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Records of one task: each cell's parameters, then what the engine produced."""
    from sweeps.grid import Cell

    if payload["model"] != engine.target_info.name:
        raise ValueError(f"model: task {payload['task_id']} is for {payload['model']}, this worker holds {engine.target_info.name}")
    cells = payload["cells"]
    t0 = time.perf_counter()
    results = engine.run([Cell.from_params(p).patchscope(max_new_tokens) for p in cells], batch_size)
    task_s = time.perf_counter() - t0
    records = []
    for params, result in zip(cells, results):
        rec = result.to_record()
        row = dict(params)
        row.update(
            source_position_abs=result.source_position,
            target_position_abs=result.target_positions[0],
            source_token_ids=rec["source_token_ids"],
            target_token_ids=rec["target_token_ids"],
            generated_token_ids=rec["generated_token_ids"],
            generated_text=rec["generated_text"],
            top_token_ids=rec["top_token_ids"],
            top_logprobs=rec["top_logprobs"],
            max_new_tokens=max_new_tokens,
            task_id=payload["task_id"],
            time_task_s=task_s,
            **{k: v for k, v in rec.items() if k.startswith("time_")},
            **(where or {}),
        )
        records.append(row)
    return records


def start_workers(model: str, config, n: int | None = None) -> list:
    """`n` (default execution.workers) Ray actors holding `model`, with Ray's restart and retry options."""
    import ray

    ex = config.execution
    cls = ray.remote(PatchscopeWorker).options(
        num_cpus=ex.cpus_per_worker,
        num_gpus=ex.gpus_per_worker,
        max_restarts=ex.max_restarts,
        max_task_retries=ex.max_task_retries,
    )
    gen = config.generation.model_dump(mode="json")
    exe = ex.model_dump(mode="json")
    return [cls.remote(model, gen, exe) for _ in range(n or ex.workers)]
