"""Speed of causal tracing on SmolLM2-135M, measured side by side in one run.

A full trace of one fact: 3 sites (resid_post, mlp_out and attn_out with a window of 10) x 30
layers x every prompt position x 10 noise samples, as sweeps/examples/causal_trace.yaml runs it.
- shortcuts: what the sweep runs (clean and corrupted runs once; positions before the subject
  computed, not run; each row from its first restored layer and position, with the corrupted
  run's stored input and KV cache);
- batched: every row (positions before the subject too) runs the whole prompt through every
  layer, rows batched with per-row hooks;
- one forward per row: the same, one row at a time (the naive computation).
The last two are timed on a seeded random sample of the cells (--sample rows for one per row,
--batched-share of the cells batched) and scaled to all rows; the clean and corrupted runs are
timed once and not scaled. The output says so.
Both full computations must agree with the shortcuts (largest difference printed).

    .venv/bin/python benchmarks/bench_tracing.py [--threads 2] [--sample 60]
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import torch

from patchscope_core import Engine, load_model
from patchscope_core.methods.tracing import Fact, Tracer, TraceSettings

FACTS = [  # (prompt, subject, answer): 7, 9 and 11 tokens with BOS, subject late, early and early
    Fact("The capital city of France is", "France", " Paris"),
    Fact("Toyota is a car company from the country of", "Toyota", " Japan"),
    Fact("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sample", type=int, default=60, help="rows timed one forward at a time")
    ap.add_argument("--batched-share", type=float, default=0.2, help="share of the cells timed batched, all layers")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(load_model("smollm2-135m", device="cpu"), name="smollm2-135m")
    tracer = Tracer(engine, batch_size=args.batch_size)
    settings = TraceSettings()
    reference = [f.prompt for f in FACTS]
    tracer.trace(FACTS[0], TraceSettings(samples=1), reference, cells=[("resid_post", 3, 5)])  # warm-up, self-check
    print(
        f"SmolLM2-135M on cpu ({platform.processor() or platform.machine()}), {args.threads} threads, "
        f"torch {torch.__version__}; 3 sites x 30 layers x every position x {settings.samples} samples, batch {args.batch_size}"
    )
    for fact in FACTS:
        t0 = time.perf_counter()
        fast = tracer.trace(fact, settings, reference)
        t_fast = time.perf_counter() - t0
        cells = sorted(fast.p_restored)
        t0 = time.perf_counter()
        tracer.trace(fact, settings, reference, cells=[], shortcuts=False)  # the clean and corrupted runs alone
        fixed = time.perf_counter() - t0
        share = random.Random(1).sample(cells, max(1, round(len(cells) * args.batched_share)))
        t0 = time.perf_counter()
        plain = tracer.trace(fact, settings, reference, cells=share, shortcuts=False)
        t_plain = fixed + (time.perf_counter() - t0 - fixed) * len(cells) / len(share)
        worst = max(abs(fast.p_restored[k] - plain.p_restored[k]) for k in share)
        n_rows = len(cells) * settings.samples
        # a seeded random sample: every k-th cell of the sorted list can hit one position only
        sample = random.Random(0).sample(cells, max(1, args.sample // settings.samples))
        tracer.batch_size, keep = 1, tracer.batch_size
        t0 = time.perf_counter()
        one = tracer.trace(fact, settings, reference, cells=sample, shortcuts=False)
        t_one = fixed + (time.perf_counter() - t0 - fixed) * len(cells) / len(sample)
        tracer.batch_size = keep
        worst_one = max(abs(one.p_restored[k] - fast.p_restored[k]) for k in sample)
        print(f"\n{fact.prompt!r} ({len(fast.token_ids)} tokens, subject at {fast.subject}): {n_rows} rows")
        print(
            f"  shortcuts {t_fast:6.1f} s | batched ~{t_plain:6.1f} s ({t_plain / t_fast:.1f}x, scaled from "
            f"{len(share) * settings.samples} rows) | one forward per row ~{t_one:6.0f} s ({t_one / t_fast:.0f}x, "
            f"scaled from {len(sample) * settings.samples} rows)"
        )
        print(
            f"  largest difference from the shortcuts: batched {worst:.1e}, one per row {worst_one:.1e}; "
            f"p clean {fast.p_clean:.3f}, corrupted {fast.p_corrupt:.3f}"
        )


if __name__ == "__main__":
    main()
