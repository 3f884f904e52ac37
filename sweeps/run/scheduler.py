"""Scheduling one model's tasks onto its Ray actors, through lost nodes and unplaceable actors.

The driver hands `run_model` the tasks of one model (an iterator, read lazily) and a callback
for each finished task. Between them:
- An actor gets work only once it has answered `ready()`: it is placed on a node and holds its
  model. Tasks go one at a time to the least loaded ready actor (`pick`), and while another actor
  may still start, a ready one holds a single task, so no actor waits on another's queue. One that has not answered within `execution.placement_timeout_s` is reported once
  ("waiting for resources: ...") and gets nothing until it answers; the others take its share.
- A task whose actor is lost goes back to the front of the queue and runs again on a live
  actor, at most `execution.max_task_retries` times (-1: always). An actor is lost when a task
  on it fails with a RayActorError (ActorDiedError, ActorUnavailableError: "may or may not have
  been executed"), when its result was lost with its node (ObjectLostError), or when its node
  is dead: for a dead node Ray may raise nothing at all and queue the task for a restart that
  can never be placed. The store writes each cell once, so a task that did run before its
  actor vanished costs time, never a duplicate.
- Ray still restarts a crashed actor (`max_restarts`) and re-runs its tasks on it
  (`max_task_retries`); a lost actor is asked `ready()` again and rejoins once Ray has it back.
- With no actor ready and every other one dead or past the timeout, the model's remaining
  tasks are given up (the driver says how many; stored cells stay) instead of waiting forever.
"""

from __future__ import annotations

import gc
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..grid import Task

TICK_S = 1.0  # how often the loop wakes without news, to look at timeouts and nodes
NODE_CHECK_S = 2.0  # how often the nodes of busy actors are looked up while tasks are in flight


@dataclass
class _Actor:
    number: int  # 1-based, for messages
    handle: Any
    since: float  # when the current wait for ready() began
    ping: Any = None  # the ready() call not answered yet
    ready: bool = False
    dead: bool = False  # Ray will not bring it back
    reported: bool = False  # "waiting for resources" said for the current wait
    node: str | None = None
    tasks: set = field(default_factory=set)  # refs of its tasks in flight


class _Work:
    """Tasks to run: the ones lost with their actor first, then the rest in grid order."""

    def __init__(self, tasks: Iterator[Task]) -> None:
        self.again: deque[Task] = deque()
        self.rest = iter(tasks)
        self.head = next(self.rest, None)

    def __bool__(self) -> bool:
        return bool(self.again) or self.head is not None

    def pop(self) -> Task:
        if self.again:
            return self.again.popleft()
        task, self.head = self.head, next(self.rest, None)
        return task

    def drain(self) -> Iterator[Task]:
        while self:
            yield self.pop()


def pick(actors: list[_Actor], max_in_flight: int) -> _Actor | None:
    """The actor the next task goes to: the least loaded ready one (round robin among equals).
    While another actor may still start (it is loading its model), a ready actor holds one task
    at most, so the late one is not left with nothing to do."""
    others_may_start = any(not a.ready and not a.dead and not a.reported for a in actors)
    cap = 1 if others_may_start else max_in_flight
    free = [a for a in actors if a.ready and len(a.tasks) < cap]
    return min(free, key=lambda a: (len(a.tasks), a.number)) if free else None


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _resources() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return (
        f"the cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU, "
        f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free"
    )


def run_model(
    model: str,
    tasks: Iterator[Task],
    n_workers: int,
    ex,
    settings: dict[str, Any],
    done: Callable[[Task, dict[str, Any]], None],
    say: Callable[[str], None],
) -> list[Task]:
    """Run `tasks` (all of `model`) on `n_workers` actors, calling done(task, output) for each
    finished task; returns the tasks given up (failed, or left when no actor could run them)."""
    from workers.actor import start_workers

    handles = start_workers(
        model,
        settings,
        n_workers,
        num_cpus=ex.cpus_per_worker,
        num_gpus=ex.gpus_per_worker,
        max_restarts=ex.max_restarts,
        max_task_retries=ex.max_task_retries,
    )
    run = _ModelRun(model, handles, tasks, ex, done, say)
    gc.freeze()  # the driver's heap so far (Ray, torch, W&B) outlives the loop: kept from the collector's full passes
    try:
        run.loop()
    finally:
        gc.unfreeze()
        run.kill()
    return run.given_up


class _ModelRun:
    """The state of one model's run: its actors, the work left, what is in flight."""

    def __init__(
        self,
        model: str,
        handles: list,
        tasks: Iterator[Task],
        ex,
        done: Callable[[Task, dict[str, Any]], None],
        say: Callable[[str], None],
    ) -> None:
        now = time.monotonic()
        self.model, self.ex, self.done, self.say = model, ex, done, say
        self.actors = [_Actor(i + 1, h, now) for i, h in enumerate(handles)]
        self.asks = f"{ex.cpus_per_worker:g} CPU, {ex.gpus_per_worker:g} GPU"
        self.work = _Work(tasks)
        self.in_flight: dict[Any, tuple[_Actor, Task]] = {}
        self.pings: dict[Any, _Actor] = {}
        self.moves: Counter[str] = Counter()
        self.given_up: list[Task] = []

    def ping(self, a: _Actor) -> None:
        # Ray retries the call until the actor is alive again or gone for good.
        a.ping = a.handle.ready.options(max_task_retries=-1).remote()
        self.pings[a.ping] = a

    def waiting(self, a: _Actor) -> str:
        return (
            f"waiting for resources: worker {a.number} of {len(self.actors)} for {self.model} (asks {self.asks}) "
            f"has not started within {self.ex.placement_timeout_s:g} s ({_resources()}); its share goes to the "
            "other workers"
        )

    def lose(self, a: _Actor, why: str) -> None:
        """The actor is gone or unreachable: its tasks go back to the queue; ask it ready() again."""
        import ray

        refs = list(a.tasks)
        a.tasks.clear()
        if a.ready:
            self.say(
                f"worker {a.number} of {self.model} lost ({why}); its {len(refs)} task(s) in flight go to other workers"
            )
        a.ready = False
        for ref in refs:
            _, task = self.in_flight.pop(ref)
            try:
                ray.cancel(ref)  # Ray might still run it on the actor once restarted: not needed any more
            except Exception:  # noqa: BLE001 - best effort; the result is ignored either way
                pass
            self.moves[task.task_id] += 1
            if 0 <= self.ex.max_task_retries < self.moves[task.task_id]:
                self.say(
                    f"task {task.task_id} ({len(task.cells)} cells of {self.model}) lost its worker "
                    f"{self.moves[task.task_id]} times: given up (execution.max_task_retries = "
                    f"{self.ex.max_task_retries})"
                )
                self.given_up.append(task)
            else:
                self.work.again.appendleft(task)
        if not a.dead and a.ping is None:
            a.since, a.reported = time.monotonic(), False
            self.ping(a)

    def answered(self, ref) -> None:
        import ray
        from ray.exceptions import RayError

        a = self.pings.pop(ref)
        a.ping = None
        try:
            info = ray.get(ref)
        except RayError as exc:  # retried by Ray until the actor is back, so: gone for good
            a.dead = True
            self.say(f"worker {a.number} of {self.model} is gone ({_why(exc)})")
            return
        if a.reported:
            self.say(f"worker {a.number} of {self.model} has started after all (node {str(info['worker_node'])[:8]})")
        a.ready, a.reported, a.node = True, False, info["worker_node"]

    def finished(self, ref) -> None:
        import ray
        from ray.exceptions import ObjectLostError, RayActorError, RayError

        a, task = self.in_flight[ref]
        try:
            output = ray.get(ref)
        except (RayActorError, ObjectLostError) as exc:  # the actor, or the node holding the result, is gone
            self.lose(a, _why(exc))  # moves this task and the actor's others
            return
        except RayError as exc:  # the task itself failed: running it elsewhere would fail again
            self.say(f"task {task.task_id} ({len(task.cells)} cells of {self.model}) failed: {_why(exc)}")
            self.given_up.append(task)
            output = None
        del self.in_flight[ref]
        a.tasks.discard(ref)
        if output is not None:
            self.done(task, output)

    def fill(self) -> None:
        while self.work and (a := pick(self.actors, self.ex.max_in_flight_per_worker)) is not None:
            task = self.work.pop()
            ref = a.handle.run.remote(task.payload())
            self.in_flight[ref] = (a, task)
            a.tasks.add(ref)

    def stuck(self) -> bool:
        """No task in flight, no actor ready, and every actor dead or past the timeout: say why,
        give the remaining work up."""
        actors = self.actors
        if self.in_flight or any(a.ready for a in actors) or not all(a.dead or a.reported for a in actors):
            return False
        if all(a.dead for a in actors):
            self.say(f"no worker of {self.model} is left: stopping")
        else:
            self.say(
                f"no worker of {self.model} could be placed within execution.placement_timeout_s = "
                f"{self.ex.placement_timeout_s:g} s (each asks {self.asks}; {_resources()}): stopping"
            )
        self.given_up.extend(self.work.drain())
        return True

    def loop(self) -> None:
        import ray

        for a in self.actors:
            self.ping(a)
        next_node_check = 0.0
        while self.in_flight or self.work:
            self.fill()
            if self.stuck():
                break
            waitables = list(self.in_flight) + list(self.pings)
            if not waitables:  # nothing to wait on (cannot happen while work is left; never spin)
                time.sleep(TICK_S)
            ready = ray.wait(waitables, num_returns=1, timeout=TICK_S)[0] if waitables else []
            for ref in ready:
                (self.answered if ref in self.pings else self.finished)(ref)
            now = time.monotonic()
            for a in self.actors:
                if a.ping is not None and not a.reported and now - a.since > self.ex.placement_timeout_s:
                    self.say(self.waiting(a))
                    a.reported = True
            if self.in_flight and now >= next_node_check:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                for a in self.actors:
                    if a.ready and a.node not in alive:
                        self.lose(a, f"its node {str(a.node)[:8]} is dead")
                next_node_check = now + NODE_CHECK_S

    def kill(self) -> None:
        """Also ends any task still in flight (after an interrupt)."""
        import ray

        for a in self.actors:
            ray.kill(a.handle)
