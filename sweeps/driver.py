"""The sweep driver (`patchscope sweep CONFIG`): config -> grid -> tasks -> Ray actors -> store, W&B.

1. Load and validate the config against every model's config and tokenizer (no weights);
   count the grid arithmetically and refuse one larger than execution.max_cells.
2. Check what the run would refuse before starting anything or writing anything: an
   output.dir that cannot be written or holds another config's results, GPUs this machine
   lacks, an --address where no Ray cluster answers. `--dry-run` stops here, saying what the
   run would do.
3. Lock output.dir (one sweep at a time), skip the cells the store already holds (resume)
   unless --restart, and expand the rest lazily into tasks.
4. Per model: `scheduler.run_model` runs the tasks on `execution.workers` actors that each load
   the model once; each finished task's records go to the store first, then to W&B.
5. At the end: results.csv and heatmaps in output.dir, the final W&B table and images.
Actor restarts and task retries on the same actor are Ray's (`max_restarts`,
`max_task_retries`); the scheduler moves the tasks of a lost actor to live ones and gives up
on what no actor can run; those cells are left for the next run of the same command.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config
from .plan import check_against_models, check_studies, config_hash
from .rows import load_rows
from .grid import count_cells, count_todo, iter_cells, iter_tasks, study_context, worker_settings
from .records import records as result_rows
from .scheduler import run_model
from .store import ResultStore

_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def plan(config_path: str):
    """Config, rows, per-model plans, the number of cells and what every task shares (a study's
    kinds or trace settings; None for Patchscopes); raises ConfigError before any weights load,
    and before expanding a grid past execution.max_cells."""
    config = load_config(config_path)
    base = Path(config_path).parent
    rows = load_rows(config, base=base)
    if config.kind == "patchscope":
        plans, context = check_against_models(config, rows), None
    else:
        plans = check_studies(config, rows, base)
        context = study_context(config, rows, base)
    n_cells = count_cells(config, rows, plans, context)
    limit = config.execution.max_cells
    if n_cells > limit:
        raise ConfigError(f"execution.max_cells: the grid has {n_cells:,} cells, more than the limit of {limit:,}; "
                          "make the grid smaller (or split it into several sweeps), or raise execution.max_cells")
    return config, rows, plans, n_cells, context


def _check_reachable(address: str, timeout: float = 5) -> None:
    """Fail in seconds where no Ray cluster answers at HOST:PORT: Ray itself retries for many
    minutes, even against a server of another kind. Ray's GCS speaks gRPC, so sent the HTTP/2
    connection preface it answers with a SETTINGS frame; anything else is not Ray."""
    m = re.fullmatch(r"([\w.\-]+):(\d+)", address.strip())
    if not m:
        return  # auto, ray://...: Ray reports those itself
    try:
        with socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS handshake comes first: leave the rest to Ray
            sock.sendall(_HTTP2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError as exc:
        raise ConfigError(f"--address: no Ray cluster answers at {address} ({exc.strerror or exc})") from None
    if len(head) < 9 or head[3] != 0x04:
        raise ConfigError(f"--address: {address} answers, but not as a Ray cluster (it replied {head[:16]!r} to a "
                          "gRPC greeting); give the head node's address (`ray start --head` prints it, port 6379 by default)")


def _check_local_gpus(config) -> None:
    """A local cluster has this machine's GPUs only: asking workers for more is an error,
    found before Ray starts."""
    ex = config.execution
    if ex.gpus_per_worker > 0:
        import torch

        have = torch.cuda.device_count()
        if ex.gpus_per_worker > have:
            raise ConfigError(
                f"execution.gpus_per_worker: {ex.gpus_per_worker:g} GPU per worker, but this machine has "
                f"{have:g}; use 0 to run on the CPU, or join a GPU cluster with --address"
            )


def connect(address: str | None, config) -> bool:
    """Join `address`, or start a local Ray big enough for every worker; True if we started it."""
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
        print("ray: not enough GPUs in the cluster yet: the workers wait until the autoscaler adds GPU nodes "
              f"(up to execution.placement_timeout_s = {ex.placement_timeout_s:g} s)")


def run_tasks(tasks, todo: dict[str, tuple[int, int]], config, store: ResultStore, sink, progress,
              totals: dict[str, Any]) -> list:
    """Run the tasks (grouped by model, read lazily) model by model; returns the tasks given up."""
    ex = config.execution
    settings = worker_settings(config)

    def done(task, output) -> None:
        new = store.write(task.task_id, result_rows(task, output))  # the record of truth first
        totals["computed"] += len(new)
        progress.update(len(new))
        elapsed = time.perf_counter() - totals["t0"]
        sink.log_task(new, progress.n, progress.total, totals["computed"] / max(elapsed, 1e-9))

    given_up = []
    for model, mtasks in itertools.groupby(tasks, key=lambda t: t.model):
        n_workers = min(ex.workers, todo[model][1])
        given_up += run_model(model, mtasks, n_workers, ex, settings, done, progress.write)
    return given_up


def _axes(config, plan, context) -> str:
    """The grid's axes of one model, in words."""
    if config.kind == "intervention":
        iv = config.intervention
        kinds = sorted({k for k, _ in context.values()})
        return (f"layers {plan.source_layers} x site {iv.site} x heads {iv.heads or '-'} x neurons {iv.neurons or '-'} x "
                f"{len(context)} kind(s) and strength(s) ({', '.join(kinds)}), positions {iv.positions}")
    if config.kind == "recipe":
        rs, settings = config.recipe, context["settings"][plan.info.name]
        layers = {k: v for k, v in settings.items() if "layers" in k and v is not None}
        return f"{rs.name}: " + " x ".join(f"{k} {v}" for k, v in layers.items()) + f" ({len(context['fit_texts'])} fit windows)"
    if config.kind == "causal_trace":
        tr = config.trace
        return (f"layers {plan.source_layers} x sites {tr.sites} x positions {tr.positions}; {tr.samples} noise samples "
                f"of {tr.noise:g} x the embeddings' std, window {tr.window}")
    tl = "same as source" if plan.target_layers is None else plan.target_layers
    return (f"source layers {plan.source_layers} x source positions {config.source.positions} x target layers {tl} "
            f"x target positions {config.target.positions}")


def _describe(config, rows, plans, n_cells: int, context=None) -> None:
    ex = config.execution
    grid = count_todo(config, rows, plans, set(), context)  # {model: (cells, tasks)} of the whole grid
    print(f"sweep {config.name} ({config.kind}): {n_cells} cells in {sum(t for _, t in grid.values())} tasks "
          f"(batch size {ex.batch_size})")
    for name, p in plans.items():
        n, t = grid[name]
        print(f"  {name}: {p.info.n_layers} layers; {len(rows)} prompt row(s) x {_axes(config, p, context)} "
              f"= {n} cells, {t} tasks")
    print(f"workers: {ex.workers} per model, {ex.cpus_per_worker:g} CPU and {ex.gpus_per_worker:g} GPU each, "
          f"at most {ex.max_in_flight_per_worker} tasks in flight per worker")


def _dry_run(config, rows, plans, n_cells: int, store: ResultStore, restart: bool, context=None) -> int:
    holder = store.holder()
    if holder is not None:
        raise ConfigError(store.busy_message(holder))  # what the real run would say
    stored = ResultStore(store.dir, read_only=True).stored_cell_ids()
    if restart and stored:
        print(f"--restart: the {len(stored)} cells stored in {store.results_dir} would be deleted first")
    todo = count_todo(config, rows, plans, set() if restart else stored, context)
    cells, tasks = sum(c for c, _ in todo.values()), sum(t for _, t in todo.values())
    print(f"output: {config.out_dir}: {n_cells - cells} of these cells already stored, {cells} to run in {tasks} tasks")
    print("dry run: nothing computed")
    return 0


def main(args) -> int:
    config, rows, plans, n_cells, context = plan(args.config)
    address = args.address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    config = config.model_copy(update={"execution": config.execution.resolved(local=not address)})
    if args.dry_run:
        _describe(config, rows, plans, n_cells, context)
    chash = config_hash(config, rows, context)
    store = ResultStore(config.out_dir)
    # Everything the run would refuse (a dry run too: it says what the run would do), before
    # anything starts or is written.
    store.check(chash, restart=args.restart)
    if address:
        _check_reachable(address)
    else:
        _check_local_gpus(config)
    if args.dry_run:
        return _dry_run(config, rows, plans, n_cells, store, args.restart, context)
    with store.lock():
        return _run(args, config, rows, plans, n_cells, chash, store, address, context)


def _run(args, config, rows, plans, n_cells: int, chash: str, store: ResultStore, address: str | None,
         context=None) -> int:
    from tqdm import tqdm

    from .report import write_report
    from .wandb_sink import WandbSink

    ex = config.execution
    todo = count_todo(config, rows, plans, set() if args.restart else store.stored_cell_ids(), context)
    n_todo, n_tasks = sum(c for c, _ in todo.values()), sum(t for _, t in todo.values())
    started = False
    totals = {"computed": 0, "t0": time.perf_counter()}
    given_up: list = []
    interrupted = False
    sink = WandbSink(config.output.wandb.model_copy(update={"mode": "disabled"}), config.name, {}, config.out_dir)
    try:
        if n_todo:
            started = connect(address, config)
            _check_resources(config, local=not address)
        store.open(config.model_dump(mode="json"), chash, n_cells, restart=args.restart)
        already = n_cells - n_todo
        print(f"sweep {config.name}: {n_cells} cells; "
              + (f"{already} already stored in {store.results_dir}, skipping them; " if already else "")
              + f"{n_todo} to run in {n_tasks} tasks")
        if n_todo:
            sink = WandbSink(config.output.wandb, config.name, {**config.model_dump(mode="json"), "config_hash": chash},
                             config.out_dir)
            tasks = iter_tasks(iter_cells(config, rows, plans, skip=store.stored_cell_ids(), context=context),
                               ex.batch_size, context)
            with tqdm(total=n_cells, initial=already, unit="cell", desc=config.name, dynamic_ncols=True,
                      smoothing=0.1, file=sys.stdout) as progress:
                given_up = run_tasks(tasks, todo, config, store, sink, progress, totals)
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
    done = len(df)
    elapsed = time.perf_counter() - totals["t0"]
    if interrupted:
        sink.abort()
        print(f"\ninterrupted: {done} of {n_cells} cells are stored in {store.results_dir}; "
              "run the same command again to resume")
        return 130
    paths = write_report(config.out_dir, df) if done else {}
    images = {k: v for k, v in paths.items() if k != "table"}
    records = df.to_dict("records") if done else []
    run_dir = sink.finish(records, images, {"cells_done": done, "cells_total": n_cells,
                                            "cells_computed": totals["computed"], "elapsed_s": elapsed})

    print(f"\n{done} of {n_cells} cells stored ({totals['computed']} computed now, in {elapsed:.1f} s): "
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
    if given_up or done < n_cells:
        n = sum(len(t.cells) for t in given_up)
        tasks = f"{len(given_up)} task" + ("s" if len(given_up) > 1 else "")
        what = f"{n} cells ({tasks}) were not computed" if given_up else f"{n_cells - done} cells are missing"
        print(f"error: {what}; run the same command again to compute them (stored cells are kept)", file=sys.stderr)
        return 1
    return 0
