"""Timing helpers shared by the benchmarks: configurations timed alternately, medians reported."""

from __future__ import annotations

import argparse
import platform
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


def smollm2_and_plain_hf(doc: str, add_args=None):
    """The command line (--repeats, --new-tokens, --device, and what `add_args(parser)` adds),
    SmolLM2 as a bridge, and a separate plain Hugging Face copy with no TransformerLens and no
    hooks; prints the set-up line."""
    from transformers import AutoModelForCausalLM

    from patchscope_core import load_model
    from patchscope_core.forward.readings import input_device
    from patchscope_core.models import smollm2_dir

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--device", default=None)
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args()
    bridge = load_model("smollm2-135m", device=args.device)
    device = input_device(bridge)
    plain = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).to(device).eval()
    print(
        f"SmolLM2-135M on {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    return args, bridge, plain, device
