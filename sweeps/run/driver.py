"""The sweep driver (`patchscope sweep CONFIG`): config -> grid -> tasks -> workers -> store, W&B.

1. Load and validate the config against every model's config and tokenizer (no weights);
   count the grid arithmetically and refuse one larger than execution.max_cells: one frozen
   `sweeps.plan.Plan`, which every later step reads.
2. Check what the run would refuse before starting anything or writing anything: an
   output.dir that cannot be written or holds another config's results, GPUs this machine
   lacks, an --address where no Ray cluster answers. `--dry-run` stops here, saying what the
   run would do.
3. Lock output.dir (one sweep at a time), skip the cells the store already holds for these
   models' weights (resume; a grown or changed config reuses its cells that any earlier config
   computed) unless --restart, and expand the rest lazily into tasks.
4. Per model: `scheduler.run_model` runs the tasks on `execution.workers` Ray actors that each
   load the model once, or with `execution.backend: local` (the default for a local sweep of one
   worker) `local.run_model` runs them in this process through the same worker code, without
   Ray; each finished task's records go to the store first, then to W&B.
5. At the end: results.csv and heatmaps in output.dir; W&B's runs (one per model, resumed by
   the ids in output.dir/wandb_runs.json) get the final tables, images, summary and artifact.
Actor restarts and task retries on the same actor are Ray's (`max_restarts`,
`max_task_retries`); the scheduler moves the tasks of a lost actor to live ones and gives up
on what no actor can run; those cells are left for the next run of the same command.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..config.sweep import load_config
from ..grid import cell_id_array, count_cells, count_todo, iter_cells, iter_tasks, per_task, worker_settings
from ..plan import Plan, check_against_models, config_hash, load_rows, model_keys, study_context
from ..records import table as result_table
from ..sinks.base import End, Peers
from ..sinks.report import made_lines
from ..sinks.store import ResultStore
from . import local, scheduler
from .cluster import check_local_gpus, check_reachable, check_resources, connect


def plan(config_path: str) -> Plan:
    """The sweep's plan (config, rows, per-model plans, what every task shares, the number of
    cells, the config hash), to be run on this machine; raises ConfigError before any weights
    load, and before expanding a grid past execution.max_cells."""
    config = load_config(config_path)
    holder = ResultStore(config.out_dir).holder()  # a busy output.dir is refused first, in a moment
    if holder is not None:
        raise ConfigError(ResultStore(config.out_dir).busy_message(holder))
    base = Path(config_path).parent
    rows = load_rows(config, base=base)
    plans = check_against_models(config, rows, base)
    context = study_context(config, rows, base)
    n_cells = count_cells(config, rows, plans, context)
    if n_cells == 0:
        raise ConfigError(
            f"kind: this {config.kind} grid has no cells (an empty list or file?); every axis needs at least one value"
        )
    config.execution.check_cells(n_cells)  # the kinds' checks count their grids first too, before building anything
    return Plan(config, rows, plans, context, n_cells, config_hash(config, rows, context))


def _todo(p: Plan, stored: set[str] | frozenset, ids=None) -> dict[str, tuple[int, int]]:
    """{model: (cells, tasks)} of the plan's grid not in `stored` (`ids`: its `cell_id_array`)."""
    return count_todo(p.config, p.rows, p.models, stored, p.context, ids)


def run_tasks(
    tasks, todo: dict[str, tuple[int, int]], config, store: ResultStore, sinks: Peers, progress, totals: dict[str, Any]
) -> list:
    """Run the tasks (grouped by model, read lazily) model by model; returns the tasks given up."""
    ex = config.execution
    settings = worker_settings(config)

    def done(task, output) -> None:
        new = store.write(task.task_id, result_table(task, output))  # the record of truth first
        totals["computed"] += len(new)
        progress.update(len(new))
        elapsed = time.perf_counter() - totals["t0"]
        sinks.write(new, progress.n, progress.total, totals["computed"] / max(elapsed, 1e-9))

    run_model = local.run_model if ex.backend == "local" else scheduler.run_model
    given_up = []
    for model, mtasks in itertools.groupby(tasks, key=lambda t: t.model):
        n_workers = min(ex.workers, todo[model][1])
        given_up += run_model(model, mtasks, n_workers, ex, settings, done, progress.write)
    return given_up


def _sizes(config, todo: dict[str, tuple[int, int]]) -> dict[str, int] | None:
    """{model: cells a task} where the kind packs groups into tasks (None: one group a task)."""
    sizes = {m: per_task(config, n) for m, (n, _) in todo.items()}
    return None if any(s is None for s in sizes.values()) else sizes


def _packed(config, todo: dict[str, tuple[int, int]]) -> str:
    sizes = sorted(set((_sizes(config, todo) or {}).values()))
    return f", up to {'/'.join(map(str, sizes))} cells a task" if sizes else ""


def _describe(p: Plan) -> None:
    config, ex = p.config, p.config.execution
    grid = _todo(p, set())  # {model: (cells, tasks)} of the whole grid
    print(
        f"sweep {config.name} ({config.kind}): {p.n_cells} cells in {sum(t for _, t in grid.values())} tasks "
        f"(batch size {ex.batch_rows}{' (auto)' if ex.batch_size == 'auto' and ex.gpus_per_worker else ''}"
        f"{_packed(config, grid)})"
    )
    for name, mp in p.models.items():
        n, t = grid.get(name, (0, 0))
        print(
            f"  {name}: {mp.info.n_layers} layers; {len(p.rows)} prompt row(s) x {p.kind.describe(config, mp, p.context)} "
            f"= {n} cells, {t} tasks"
        )
    if ex.backend == "local":
        print(
            f"backend: local (in this process, no Ray): 1 worker per model, {ex.cpus_per_worker:g} CPU and "
            f"{ex.gpus_per_worker:g} GPU"
        )
    else:
        print(
            f"workers: {ex.workers} per model, {ex.cpus_per_worker:g} CPU and {ex.gpus_per_worker:g} GPU each, "
            f"at most {ex.max_in_flight_per_worker} tasks in flight per worker"
        )


def _dry_run(p: Plan, store: ResultStore, restart: bool) -> int:
    n_cells = p.n_cells
    holder = store.holder()
    if holder is not None:
        raise ConfigError(store.busy_message(holder))  # what the real run would say
    reader = ResultStore(store.dir, read_only=True, keys=store.keys, config_hash=store.config_hash)
    stored, n_stored = reader.stored_cell_ids(), reader.stored_count()
    if restart and n_stored:
        print(f"--restart: the {n_stored} cells stored in {store.results_dir} would be deleted first")
    todo = _todo(p, set() if restart else stored)
    cells, tasks = sum(c for c, _ in todo.values()), sum(t for _, t in todo.values())
    print(
        f"output: {p.config.out_dir}: {n_cells - cells} of these cells already stored, {cells} to run in {tasks} tasks"
    )
    if n_stored and not restart:
        print(
            f"stored: {n_stored} cells in {store.results_dir}: {n_cells - cells} reused by this config, "
            f"{n_stored - (n_cells - cells)} of other configs or weights kept aside, {cells} to run"
        )
    print("dry run: nothing computed")
    return 0


def main(args) -> int:
    p = plan(args.config).at(args.address or os.environ.get("RAY_ADDRESS"))  # set by `ray job submit`
    if args.dry_run:
        _describe(p)
    store = ResultStore(p.config.out_dir, keys=model_keys(p.config), config_hash=p.config_hash)
    # Everything the run would refuse (a dry run too: it says what the run would do), before
    # anything starts or is written.
    store.check(p.config_hash, restart=args.restart)
    if p.address:
        check_reachable(p.address)
    else:
        check_local_gpus(p.config)
    if args.dry_run:
        return _dry_run(p, store, args.restart)
    with store.lock():
        return _run(p, store, args.restart)


def _sinks(p: Plan, restart: bool = False) -> Peers:
    """The peers of the store: the report, then W&B (which gets the report's pictures): one run
    per model, resumed across invocations, new ones with --restart."""
    from ..sinks.report import ReportSink
    from ..sinks.wandb import WandbPeer
    from ..sinks.wandb_runs import logged_config

    config = p.config
    wandb = WandbPeer(
        config.output.wandb,
        config.name,
        logged_config(config, p.config_hash),
        config.out_dir,
        models=config.models,
        restart=restart,
    )
    return Peers([ReportSink(config.out_dir), wandb])


def _compute(p: Plan, store: ResultStore, restart: bool, sinks: Peers, totals: dict[str, Any]) -> tuple[list, bool]:
    """Start Ray if there is work for it, open the store, run what it lacks; (tasks given up, interrupted)."""
    from tqdm import tqdm

    config, n_cells = p.config, p.n_cells
    ids = cell_id_array(config, p.rows, p.models, p.context)  # one pass over the grid's ids per run
    todo = _todo(p, set() if restart else store.stored_cell_ids(), ids)
    n_todo, n_tasks = sum(c for c, _ in todo.values()), sum(t for _, t in todo.values())
    started = False
    try:
        if n_todo and config.execution.backend == "local":
            ex = config.execution
            print(
                f"backend: local: this process runs every task (no Ray), {ex.cpus_per_worker:g} CPU threads"
                + (f", {ex.gpus_per_worker:g} GPU" if ex.gpus_per_worker else "")
            )
        elif n_todo:
            started = connect(p.address, config)
            check_resources(config, local=not p.address)
        store.open(
            config.model_dump(mode="json"),
            p.config_hash,
            n_cells,
            restart=restart,
            cells=ids,
        )
        del ids  # the store wrote them; the run matches against its set of stored ids
        already = n_cells - n_todo
        print(
            f"sweep {config.name}: {n_cells} cells; "
            + (f"{already} already stored in {store.results_dir}, skipping them; " if already else "")
            + f"{n_todo} to run in {n_tasks} tasks"
        )
        sinks.start()  # with nothing to compute too: W&B's runs then show the current cells
        if not n_todo:
            return [], False
        tasks = iter_tasks(
            iter_cells(config, p.rows, p.models, skip=store.stored_cell_ids(), context=p.context),
            config.execution.batch_rows,
            p.context,
            _sizes(config, todo),
        )
        with tqdm(
            total=n_cells,
            initial=already,
            unit="cell",
            desc=config.name,
            dynamic_ncols=True,
            smoothing=0.1,
            file=sys.stdout,
        ) as progress:
            return run_tasks(tasks, todo, config, store, sinks, progress, totals), False
    except KeyboardInterrupt:
        return [], True
    except BaseException:
        sinks.fail()
        raise
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(p: Plan, store: ResultStore, restart: bool) -> int:
    n_cells = p.n_cells
    totals = {"computed": 0, "t0": time.perf_counter()}
    sinks = _sinks(p, restart)
    given_up, interrupted = _compute(p, store, restart, sinks, totals)
    done = store.current_count()  # a count of ids: no sink needs the rows here (each reads its columns)
    elapsed = time.perf_counter() - totals["t0"]
    if interrupted:
        sinks.fail()
        print(
            f"\ninterrupted: {done} of {n_cells} cells are stored in {store.results_dir}; "
            "run the same command again to resume"
        )
        return 130
    end = sinks.finish(
        End(
            None,
            {"cells_done": done, "cells_total": n_cells, "cells_computed": totals["computed"], "elapsed_s": elapsed},
        )
    )
    print(
        f"\n{done} of {n_cells} cells stored ({totals['computed']} computed now, in {elapsed:.1f} s): "
        f"{store.results_dir}"
    )
    for line in made_lines(end.made):
        print(line)
    for line in end.notes:
        print(line)
    if given_up or done < n_cells:
        n = sum(len(t.cells) for t in given_up)
        tasks = f"{len(given_up)} task" + ("s" if len(given_up) > 1 else "")
        what = f"{n} cells ({tasks}) were not computed" if given_up else f"{n_cells - done} cells are missing"
        print(f"error: {what}; run the same command again to compute them (stored cells are kept)", file=sys.stderr)
        return 1
    return 0
