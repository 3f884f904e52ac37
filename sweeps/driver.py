"""The sweep driver (`patchscope sweep CONFIG`): config -> grid -> tasks -> Ray actors -> store, W&B.

1. Load and validate the config against every model's config and tokenizer (no weights).
2. Expand the grid; skip the cells the store already holds (resume) unless --restart.
3. Per model: start `execution.workers` actors that each load the model once; keep at most
   `execution.max_in_flight_per_worker` tasks queued on each; take results in completion
   order with `ray.wait`; write each task's records to the store, then to W&B.
4. At the end: results.csv and heatmaps in output.dir, the final W&B table and images.
Actor restarts and task retries are Ray's (`max_restarts`, `max_task_retries`); a task that
still fails is reported and its cells are left for the next run of the same command.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from .config import ConfigError, check_against_models, check_studies, config_hash, load_config, load_rows
from .grid import Task, expand, expand_study, make_tasks, worker_settings
from .records import records as result_rows
from .store import ResultStore


def plan(config_path: str):
    """Config, rows, per-model plans, every cell and what the cells' tasks share; raises
    ConfigError before any weights load."""
    config = load_config(config_path)
    base = Path(config_path).parent
    rows = load_rows(config, base=base)
    if config.kind == "patchscope":
        plans = check_against_models(config, rows)
        return config, rows, plans, expand(config, rows, plans), None
    plans = check_studies(config, rows, base)
    cells, context = expand_study(config, rows, plans, base)
    return config, rows, plans, cells, context


def _check_reachable(address: str, timeout: float = 10) -> None:
    """Fail fast on a HOST:PORT where nothing listens (Ray itself would retry for minutes)."""
    import re
    import socket

    m = re.fullmatch(r"([\w.\-]+):(\d+)", address.strip())
    if not m:
        return  # auto, ray://...: Ray reports those itself
    try:
        socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"--address: no Ray cluster answers at {address} ({exc})") from None


def connect(address: str | None, config) -> bool:
    """Join `address`, or start a local Ray big enough for every worker; True if we started it."""
    address = address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    if address:
        _check_reachable(address)
    if not address and "ray" not in sys.modules:
        # A local cluster serves this machine only: keep Ray on the loopback interface (as Ray
        # does on macOS and Windows) rather than on the machine's network address. Ray reads
        # this when it is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():  # e.g. a test or a notebook that already connected
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise ConfigError(f"--address: cannot join a Ray cluster at {address!r} ({exc})") from None
    else:
        ex = config.execution
        need = ex.workers * ex.cpus_per_worker  # never fewer CPUs than the workers ask for
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False, log_to_driver=False)
    return True


def _check_resources(config, local: bool) -> None:
    """Print what the cluster has; a local cluster that can never place a worker is an error."""
    import ray

    ex = config.execution
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0), res.get("CPU", 0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    print(f"ray: {nodes} node(s), {cpus:g} CPUs, {gpus:g} GPUs; "
          f"{ex.workers} worker(s) per model with {ex.cpus_per_worker:g} CPU / {ex.gpus_per_worker:g} GPU each")
    if ex.gpus_per_worker > gpus:
        if local:
            raise ConfigError(
                f"execution.gpus_per_worker: {ex.gpus_per_worker:g} GPU per worker, but this machine has "
                f"{gpus:g}; use 0 to run on the CPU, or join a GPU cluster with --address"
            )
        print("ray: not enough GPUs in the cluster yet: the workers wait until the autoscaler adds GPU nodes")


def run_tasks(tasks: list[Task], config, store: ResultStore, sink, progress, totals: dict[str, Any]) -> list[Task]:
    """Schedule the tasks on actors, model by model; returns the tasks that failed."""
    import ray
    from ray.exceptions import RayError

    from workers.actor import start_workers

    ex = config.execution
    failed: list[Task] = []
    by_model: dict[str, list[Task]] = {}
    for t in tasks:
        by_model.setdefault(t.model, []).append(t)
    settings = worker_settings(config)
    for model, mtasks in by_model.items():
        actors = start_workers(model, settings, min(ex.workers, len(mtasks)), num_cpus=ex.cpus_per_worker,
                               num_gpus=ex.gpus_per_worker, max_restarts=ex.max_restarts,
                               max_task_retries=ex.max_task_retries)
        alive = set(range(len(actors)))
        load = [0] * len(actors)
        queue = deque(mtasks)
        in_flight: dict[Any, tuple[int, Task]] = {}

        def fill() -> None:
            for i in sorted(alive, key=lambda i: load[i]):
                while queue and load[i] < ex.max_in_flight_per_worker:
                    task = queue.popleft()
                    in_flight[actors[i].run.remote(task.payload())] = (i, task)
                    load[i] += 1

        try:
            fill()
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                i, task = in_flight.pop(ref)
                load[i] -= 1
                try:
                    rows = result_rows(task, ray.get(ref))
                except RayError as exc:  # after Ray's own restarts and retries
                    failed.append(task)
                    msg = str(exc).strip().splitlines()
                    progress.write(f"task {task.task_id} ({len(task.cells)} cells of {model}) failed: "
                                   f"{type(exc).__name__}: {msg[-1] if msg else ''}")
                    if isinstance(exc, ray.exceptions.RayActorError):
                        alive.discard(i)  # restarts used up: this actor is gone
                    if not alive:
                        failed.extend(queue)
                        queue.clear()
                    fill()
                    continue
                new = store.write(task.task_id, rows)  # the record of truth first
                totals["computed"] += len(new)
                progress.update(len(new))
                elapsed = time.perf_counter() - totals["t0"]
                sink.log_task(new, progress.n, progress.total, totals["computed"] / max(elapsed, 1e-9))
                fill()
        finally:
            for a in actors:  # also ends any task still in flight (after an interrupt)
                ray.kill(a)
    return failed


def _dry_run(config, rows, plans, cells, stored_ids: set[str], context=None) -> int:
    ex = config.execution
    tasks = make_tasks(cells, ex.batch_size, context)
    todo = [c for c in cells if c.cell_id not in stored_ids]
    print(f"sweep {config.name} ({config.kind}): {len(cells)} cells in {len(tasks)} tasks (batch size {ex.batch_size})")
    for name, p in plans.items():
        if config.kind != "patchscope":
            n = sum(c.model == name for c in cells)
            t = sum(t.model == name for t in tasks)
            if config.kind == "intervention":
                iv = config.intervention
                variants = sorted({(c.kind, c.variant) for c in cells})
                axes = (f"site {iv.site} x heads {iv.heads or '-'} x neurons {iv.neurons or '-'} x "
                        f"{len(variants)} kind(s) and strength(s) ({', '.join(sorted({k for k, _ in variants}))}), "
                        f"positions {iv.positions}")
            else:
                tr = config.trace
                axes = (f"sites {tr.sites} x positions {tr.positions}; {tr.samples} noise samples of {tr.noise:g} "
                        f"x the embeddings' std, window {tr.window}")
            print(f"  {name}: {p.info.n_layers} layers; {len(rows)} prompt row(s) x layers {p.source_layers} x {axes} "
                  f"= {n} cells, {t} tasks")
            continue
        n = sum(c.model == name for c in cells)
        t = sum(t.model == name for t in tasks)
        tl = "same as source" if p.target_layers is None else p.target_layers
        print(f"  {name}: {p.info.n_layers} layers; {len(rows)} prompt row(s) x source layers {p.source_layers} "
              f"x source positions {config.source.positions} x target layers {tl} x target positions "
              f"{config.target.positions} = {n} cells, {t} tasks")
    print(f"workers: {ex.workers} per model, {ex.cpus_per_worker:g} CPU and {ex.gpus_per_worker:g} GPU each, "
          f"at most {ex.max_in_flight_per_worker} tasks in flight per worker")
    print(f"output: {config.out_dir}: {len(cells) - len(todo)} of these cells already stored, "
          f"{len(todo)} to run in {len(make_tasks(todo, ex.batch_size, context))} tasks")
    print("dry run: nothing computed")
    return 0


def main(args) -> int:
    config, rows, plans, cells, context = plan(args.config)
    store = ResultStore(config.out_dir)
    chash = config_hash(config, rows)
    ex = config.execution
    if args.dry_run:
        manifest = store.manifest() or {}
        same = manifest.get("config_hash") == chash and not args.restart
        return _dry_run(config, rows, plans, cells, store.stored_cell_ids() if same else set(), context)

    store.open(config.model_dump(mode="json"), chash, len(cells), restart=args.restart)
    stored_ids = store.stored_cell_ids()
    todo = [c for c in cells if c.cell_id not in stored_ids]
    tasks = make_tasks(todo, ex.batch_size, context)
    already = len(cells) - len(todo)
    print(f"sweep {config.name}: {len(cells)} cells; "
          + (f"{already} already stored in {store.results_dir}, skipping them; " if already else "")
          + f"{len(todo)} to run in {len(tasks)} tasks")

    from tqdm import tqdm

    from .report import write_report
    from .wandb_sink import WandbSink

    failed: list[Task] = []
    started = False
    totals = {"computed": 0, "t0": time.perf_counter()}
    interrupted = False
    sink = WandbSink(config.output.wandb.model_copy(update={"mode": "disabled"}), config.name, {}, config.out_dir)
    try:
        if tasks:
            started = connect(args.address, config)
            _check_resources(config, local=not (args.address or os.environ.get("RAY_ADDRESS")))
            sink = WandbSink(config.output.wandb, config.name, {**config.model_dump(mode="json"), "config_hash": chash},
                             config.out_dir)
            with tqdm(total=len(cells), initial=already, unit="cell", desc=config.name, dynamic_ncols=True,
                      smoothing=0.1, file=sys.stdout) as progress:
                failed = run_tasks(tasks, config, store, sink, progress, totals)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        sink.abort()
        raise
    finally:
        if started:
            import ray

            ray.shutdown()

    df = store.read()
    in_grid = {c.cell_id for c in cells}
    done = int(df["cell_id"].isin(in_grid).sum()) if not df.empty else 0
    elapsed = time.perf_counter() - totals["t0"]
    if interrupted:
        sink.abort()
        print(f"\ninterrupted: {done} of {len(cells)} cells are stored in {store.results_dir}; "
              "run the same command again to resume")
        return 130
    paths = write_report(config.out_dir, df[df["cell_id"].isin(in_grid)]) if done else {}
    images = {k: v for k, v in paths.items() if k != "table"}
    records = df[df["cell_id"].isin(in_grid)].to_dict("records") if done else []
    run_dir = sink.finish(records, images, {"cells_done": done, "cells_total": len(cells),
                                            "cells_computed": totals["computed"], "elapsed_s": elapsed})

    print(f"\n{done} of {len(cells)} cells stored ({totals['computed']} computed now, in {elapsed:.1f} s): "
          f"{store.results_dir}")
    if paths:
        print(f"table:    {paths['table']}")
        for path in images.values():
            print(f"{'picture' if path.suffix == '.png' else 'table'}:  {'' if path.suffix == '.png' else '  '}{path}")
    if run_dir:
        if sink.mode == "offline":
            print(f"W&B:      offline run in {run_dir}; upload it with: wandb sync {run_dir}")
        else:
            print(f"W&B:      {sink.url or 'run'} (files in {run_dir})")
    if failed:
        n = sum(len(t.cells) for t in failed)
        print(f"error: {n} cells in {len(failed)} tasks failed; run the same command again to retry them "
              "(stored cells are kept)", file=sys.stderr)
        return 1
    return 0
