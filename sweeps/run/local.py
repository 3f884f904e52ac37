"""The local backend (`execution.backend: local`): one model's tasks run one after another in the
driver's own process, through the same worker code as a Ray actor (`workers.actor`:
`PatchscopeWorker` loads the model and builds the engine, `run_task` runs each payload), with no
Ray imported or started.

`run_model` has the scheduler's signature and contract (`sweeps.run.scheduler.run_model`): it
calls done(task, output) for each finished task, in grid order, and returns the tasks given up,
so the driver's store, resume, records, sinks and progress output are the same for both
backends. A task that raises is given up with one line, as a task failing on a Ray actor is; a
model that cannot be loaded gives up all its tasks, as a worker that never starts does.

`run_here` is the one loop that runs tasks in process; tests that bring their own engine
(`tests/golden/common.run_in_process`) go through it too. With `overlap`, what the driver does
with a finished task (rows, the store, the sinks: `done`) runs on one background thread while the
next task computes, as a Ray driver stores while its actors compute: tasks are handed to `done`
in order, at most one waits, and every finished task is handed over before `run_here` returns,
however it returns (an interrupted sweep keeps what it computed).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

from ..grid import Task

Done = Callable[[Task, dict[str, Any]], None]


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def run_here(
    tasks: Iterable[Task],
    run: Callable[[dict[str, Any]], dict[str, Any]],
    done: Done,
    say: Callable[[str], None],
    overlap: bool = False,
) -> list[Task]:
    """Run each task's payload with `run` (a worker's `run`, or `run_task` on an engine) in this
    process and hand its output to done(task, output) (with `overlap`, on a background thread
    while the next task runs); returns the tasks that failed."""
    given_up = []
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store") if overlap else nullcontext() as writer:
        try:
            for task in tasks:
                try:
                    output = run(task.payload())
                except Exception as exc:  # noqa: BLE001 - a failing task is given up, as on a Ray actor
                    say(f"task {task.task_id} ({len(task.cells)} cells of {task.model}) failed: {_why(exc)}")
                    given_up.append(task)
                    continue
                if writer is None:
                    done(task, output)
                    continue
                if pending is not None:
                    pending.result()  # one task waits at most; a failure of done is raised here
                pending = writer.submit(done, task, output)
        finally:
            if pending is not None:
                pending.result()  # every finished task stored before returning, even when interrupted
    return given_up


def run_model(
    model: str,
    tasks: Iterator[Task],
    n_workers: int,
    ex,
    settings: dict[str, Any],
    done: Done,
    say: Callable[[str], None],
) -> list[Task]:
    """Run `tasks` (all of `model`) in this process on one worker (`n_workers` is 1: the config
    refuses more for this backend); the scheduler's contract. Torch's thread count and the
    collector's reach (the worker freezes the heap once loaded) are this process's again afterwards."""
    import torch

    from workers.actor import PatchscopeWorker

    threads = torch.get_num_threads()
    try:
        try:
            worker = PatchscopeWorker(model, settings)
        except Exception as exc:  # noqa: BLE001 - as a Ray worker that never starts: its tasks are given up
            say(f"worker 1 of {model} could not start ({_why(exc)}): stopping")
            return list(tasks)
        return run_here(tasks, worker.run, done, say, overlap=True)
    finally:
        torch.set_num_threads(threads)
        gc.unfreeze()  # the worker froze the heap (`PatchscopeWorker`): collectable again, as before
