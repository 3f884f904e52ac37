"""Ray actors that hold one model for their lifetime and turn tasks into result records.

`PatchscopeWorker` is a plain class (usable and testable without Ray, and what the local backend,
`sweeps.run.local`, runs in the driver's process); `start_workers` wraps it
with `ray.remote` and Ray's own fault tolerance: `max_restarts` restarts a crashed actor (which
reloads its model) and `max_task_retries` re-runs the tasks it was running. There is no
hand-written retry loop.

Workers import `patchscope_core` only: a task arrives as plain data (`sweeps.grid.Task.payload`, made by the sweep kind:
Patchscopes as dicts) with plain settings (`sweeps.grid.worker_settings`), and what goes back is
the engine's own records; `sweeps.records` turns them into result rows.

Devices: Ray assigns GPUs (`execution.gpus_per_worker`, fractional allowed so several actors
can share one GPU) and sets CUDA_VISIBLE_DEVICES, so "cuda" is the actor's own GPU. With more
than one GPU per worker (or an explicit `execution.device_map`) accelerate spreads the model
over the GPUs Ray gave the actor. Without GPUs the actor runs on the CPU with as many torch
threads as CPUs Ray reserved for it.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from typing import Any

from patchscope_core import Decoding, Patchscope, PatchscopeEngine, load_model
from patchscope_core.interventions import run_from_dict
from patchscope_core.methods.tracing import Fact, Tracer, TraceSettings
from patchscope_core.models import batch_rows_for

from .recipes import recipe_records


def _node_id() -> str:
    if "ray" not in sys.modules:  # the local backend: no Ray, and none imported for this
        return socket.gethostname()
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
    """Holds `model` (loaded once, in __init__) and runs tasks of that model.

    settings (plain data): decoding (Decoding's fields), top_k, batch_size (or "auto", with
    batch_rows the driver's nominal size), batch_tokens, gpus_per_worker, cpus_per_worker,
    device_map, dtype.
    """

    def __init__(self, model: str, settings: dict[str, Any]) -> None:
        import torch

        t0 = time.perf_counter()
        self.settings = dict(settings)
        self.model_name = model
        self.device, self.device_map = choose_device(settings["gpus_per_worker"], settings.get("device_map"))
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(settings["cpus_per_worker"])))
        self.model = load_model(
            model,
            device=self.device,
            dtype=getattr(torch, settings.get("dtype", "float32")),
            device_map=self.device_map,
        )
        self.engine = PatchscopeEngine(
            self.model, name=model, decoding=Decoding(**settings["decoding"]), top_k=settings["top_k"]
        )
        self.engine.batch_tokens = settings.get("batch_tokens")  # and a batch out of memory is halved
        self.where = {
            "worker_node": _node_id(),
            "worker_pid": os.getpid(),
            "worker_device": self.device or f"device_map={self.device_map}",
        }
        self.batch_size = self._batch_size(settings)
        self.load_s = time.perf_counter() - t0
        # What is alive now (torch, the model, every module imported) lives as long as the worker:
        # out of the cyclic collector's reach, whose full collections would otherwise walk it every
        # few thousand cells (5.6 s a 10^5 cheap cells, in process; gc.freeze's documented use).
        # The local backend, whose process goes on after its tasks, unfreezes it (`local.run_model`).
        gc.freeze()

    def _batch_size(self, settings: dict[str, Any]) -> int:
        """execution.batch_size, or for auto on a GPU as many rows as its free memory holds after
        the weights (`batch_rows_for`, sequences of the model's context up to 512 tokens)."""
        import torch

        if settings["batch_size"] != "auto":
            return int(settings["batch_size"])
        if self.device != "cuda":
            return int(settings.get("batch_rows", 16))
        free, _ = torch.cuda.mem_get_info()
        info = self.engine.info
        n_tokens = min(info.n_ctx or 512, 512)
        return batch_rows_for(
            info, free, n_tokens, torch.finfo(getattr(torch, settings.get("dtype", "float32"))).bits // 8
        )

    def ready(self) -> dict[str, Any]:
        return {**self.where, "model": self.model_name, "load_s": self.load_s}

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One task: a batch of cells of this model -> the engine's record of each, in order."""
        return run_task(self.engine, payload, self.batch_size, self.where)


def run_task(
    engine: PatchscopeEngine, payload: dict[str, Any], batch_size: int, where: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The engine's records of one task (Patchscopes, intervention runs, a causal trace or a
    recipe's probes), with the worker and the task's time."""
    if payload["model"] != engine.target_info.name:
        raise RuntimeError(
            f"task {payload['task_id']} is for {payload['model']}, this worker holds {engine.target_info.name}"
        )
    t0 = time.perf_counter()
    records = OPERATIONS[payload.get("kind", "patchscope")](engine, payload, batch_size)
    return {
        "task_id": payload["task_id"],
        "records": records,
        "worker": {**(where or {}), "worker_peak_mb": peak_memory_mb()},
        "time_task_s": time.perf_counter() - t0,
    }


def peak_memory_mb() -> float:
    """The worker's peak memory so far: what the accelerator allocated at most, or on the CPU
    the process's peak resident size."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trace_record(engine, payload: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """One causal trace: the fact's clean and corrupted probabilities and every cell's."""
    tracer = Tracer(engine, batch_size=batch_size)
    cells = [tuple(c) for c in payload["cells"]]
    result = tracer.trace(
        Fact(**payload["fact"]),
        TraceSettings(**{**payload["settings"], "sites": tuple(payload["settings"]["sites"])}),
        payload["reference"],
        cells,
    )
    tok = engine.model.tokenizer
    return {
        "token_ids": result.token_ids,
        "tokens": [tok.decode([t]) for t in result.token_ids],
        "subject": list(result.subject),
        "p_clean": result.p_clean,
        "p_corrupt": result.p_corrupt,
        "p_restored": [result.p_restored[c] for c in cells],
    }


def patchscope_records(engine, payload: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Patchscopes, in order: as columns (`Patchscope.to_columns`, a sweep's tasks) or one dict each
    (`Patchscope.to_dict`)."""
    if "patchscope_columns" in payload:
        specs = Patchscope.from_columns(payload["patchscope_columns"])
    else:
        specs = [Patchscope.from_dict(p) for p in payload["patchscopes"]]
    return [r.to_record() for r in engine.run(specs, batch_size)]


def intervention_records(engine, payload: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Intervention runs (each with its clean baseline), in order; a steering run (`add`) also
    records its vector's norm against the site's (`engine.steering_norms`)."""
    runs = [run_from_dict(r) for r in payload["runs"]]
    return [
        {**r.to_record(), **(engine.steering_norms(run) or {})}
        for run, r in zip(runs, engine.run_interventions(runs, batch_size), strict=True)
    ]


# The engine operation that runs each payload kind (a sweep kind's `operation`): (engine, payload,
# batch_size) -> the engine's records, one per cell (a causal trace: one per fact).
def patching_record(engine, payload: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """One pair's activation patching (issue 16): its clean and corrupted runs once, every cell's
    patched value (in the payload's order), the metrics of both runs and the clean tokens."""
    from patchscope_core.methods.patcher import Patcher
    from patchscope_core.methods.patching import Cell, Pair

    t0 = time.perf_counter()
    cells = [tuple(c) for c in payload["cells"]]
    core = list(dict.fromkeys(Cell(s, l, p, h, None, w) for s, l, p, h, w, _, _ in cells))
    directions = list(dict.fromkeys(c[5] for c in cells))
    metrics = list(dict.fromkeys(c[6] for c in cells))
    result = Patcher(engine, batch_size=batch_size).patch(Pair(**payload["pair"]), core, directions, metrics)
    got = {(r.cell, r.direction, r.metric): r.patched for r in result.cells}
    tok = engine.info.tokenizer
    return {
        "patched": [got[(Cell(s, l, p, h, None, w), d, m)] for s, l, p, h, w, d, m in cells],
        "clean_value": result.clean_values,
        "corrupted_value": result.corrupted_values,
        "tokens": [tok.decode([t]) for t in result.checked.clean_ids],
        "time_patch_s": time.perf_counter() - t0,
    }


def attribution_records(engine, payload: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Attribution patching of a batch of pairs (issue 17): each pair's estimates and scores per
    (method, site), flat ([layers, positions, units] and [layers, units]), and with `verify` the
    exact effects of its verified nodes, keyed by flat index."""
    from patchscope_core.methods.attribution import Attributor, units
    from patchscope_core.methods.attribution_verify import verify
    from patchscope_core.methods.patcher import Patcher
    from patchscope_core.methods.patching import Pair

    t0 = time.perf_counter()
    pairs = [Pair(p["clean"], p["corrupted"], p["answer"], p["wrong_answer"]) for p in payload["pairs"]]
    results = Attributor(engine, batch_size=len(pairs)).attribute(
        pairs, payload["sites"], payload["layers"], payload["methods"], payload["metric"]
    )
    share = (time.perf_counter() - t0) / len(pairs)
    tok, spec = engine.info.tokenizer, payload["verify"]
    patcher = Patcher(engine, batch_size=batch_size)
    out = []
    for p, pair, res in zip(payload["pairs"], pairs, results):
        t1 = time.perf_counter()
        exact = {}
        if spec is not None:
            for v in verify(patcher, [pair], [res], spec["top_k"], spec["random"], spec["positions"], seed=p["seed"]):
                exact[v.site] = {
                    "positions": spec["positions"],
                    "full": v.full,
                    "index": {n: i for i, n in enumerate(v.nodes)},
                    "exact": v.exact.tolist(),
                    "sampled": set(v.sampled),
                }
        flat = {f"{m}|{s}": [t.flatten().tolist() for t in pair_t] for (m, s), pair_t in res.estimates.items()}
        scores = {f"{m}|{s}": [t.flatten().tolist() for t in pair_t] for (m, s), pair_t in res.scores.items()}
        out.append(
            {
                "row": p["row"],
                "layers": list(res.layers),
                "units": {s: units(s, engine.info) for s in payload["sites"]},
                "tokens": [tok.decode([t]) for t in res.checked.clean_ids],
                "clean_value": res.clean_value,
                "corrupted_value": res.corrupted_value,
                "estimates": flat,
                "scores": scores,
                "exact": exact,
                "time_attribution_s": share,
                "time_verify_s": time.perf_counter() - t1,
            }
        )
    return out


def explanation_records(engine, payload: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Directions written at explanation templates' placeholders (issue 27), one record per cell
    with its measures and `chosen` (`patchscope_core.methods.directions.explain_cells`)."""
    from patchscope_core.methods.directions import explain_cells

    return explain_cells(engine, payload, batch_size)


OPERATIONS = {
    "patchscope": patchscope_records,
    "intervention": intervention_records,
    "causal_trace": lambda engine, payload, batch_size: [trace_record(engine, payload, batch_size)],
    "recipe": recipe_records,
    "activation_patching": lambda engine, payload, batch_size: [patching_record(engine, payload, batch_size)],
    "attribution_patching": attribution_records,
    "feature_explanation": explanation_records,
}


def start_workers(
    model: str,
    settings: dict[str, Any],
    n: int,
    *,
    num_cpus: float,
    num_gpus: float,
    max_restarts: int,
    max_task_retries: int,
) -> list:
    """`n` Ray actors holding `model`, with Ray's restart and retry options."""
    import ray

    cls = ray.remote(PatchscopeWorker).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=max_task_retries
    )
    return [cls.remote(model, settings) for _ in range(n)]
