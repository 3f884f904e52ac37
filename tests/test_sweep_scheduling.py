"""How tasks are shared among workers, and how many cores each worker gets."""

from __future__ import annotations

import os

from sweeps.config import ExecutionConfig
from sweeps.run.scheduler import _Actor, pick


def actors(*states: str) -> list[_Actor]:
    """'r': ready, 'l': loading its model, 'x': dead, 'w': reported as not placeable."""
    out = []
    for i, s in enumerate(states):
        out.append(_Actor(i + 1, handle=None, since=0.0, ready=s == "r", dead=s == "x", reported=s == "w"))
    return out


def assign(group: list[_Actor], n: int, max_in_flight: int = 2) -> list[int]:
    """Hand out n tasks the way the scheduler's fill() does; returns the actor of each."""
    out = []
    for k in range(n):
        a = pick(group, max_in_flight)
        if a is None:
            break
        a.tasks.add(k)
        out.append(a.number)
    return out


def test_tasks_go_round_robin_to_the_least_loaded_ready_worker():
    assert assign(actors("r", "r"), 2) == [1, 2]  # two tasks on two workers run on both
    assert assign(actors("r", "r"), 5) == [1, 2, 1, 2]  # then each holds max_in_flight
    group = actors("r", "r", "r")
    group[0].tasks.update({"a", "b"})
    assert assign(group, 2) == [2, 3]


def test_a_worker_still_loading_its_model_is_not_starved():
    group = actors("r", "l")
    assert assign(group, 3) == [1]  # one task at a time until the other can take its share
    group[1].ready = True
    assert assign(group, 3) == [2, 1, 2]
    # a worker reported as not placeable, or dead, is not waited for
    assert assign(actors("r", "w"), 3) == [1, 1]
    assert assign(actors("r", "x"), 3) == [1, 1]


def test_cpus_per_worker_auto_shares_the_machine_among_local_workers():
    cpus = os.cpu_count() or 1
    assert ExecutionConfig(workers=1).resolved(local=True).cpus_per_worker == cpus
    assert ExecutionConfig(workers=2).resolved(local=True).cpus_per_worker == max(1, cpus // 2)
    assert ExecutionConfig(workers=4 * cpus).resolved(local=True).cpus_per_worker == 1
    assert ExecutionConfig(workers=1).resolved(local=False).cpus_per_worker == 1
    assert ExecutionConfig(workers=1, cpus_per_worker=3).resolved(local=True).cpus_per_worker == 3
