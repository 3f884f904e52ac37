"""Timing helpers shared by the benchmarks: configurations timed alternately, medians reported."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def side_by_side(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn `repeats` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}
