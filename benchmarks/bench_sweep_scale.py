"""The framework's own cost at scale: cheap cells through the engine and through `patchscope sweep`,
planning and resuming grids of millions of cells. Side by side in one run on one machine.

(a) cheap cells: `tiny-llama`, one new token, a Patchscope grid of N source prompts x 4 layers
    (a word at the end of "I saw a {word}", read at each layer and patched into the token-identity
    prompt at the same layer). In-process: `PatchscopeEngine.run` in batches of `--batch-size`.
    Through the sweep: `patchscope sweep` with 1 worker (backend auto: local) and 2 Ray workers,
    W&B offline; cells/s is the marginal rate between an N-cell and a 2N-cell sweep, so start-up
    and model loads cancel out.
(b) planning and resume: `patchscope sweep --dry-run` on product grids of 10^6 and 10^7 cells
    (prompts x layers x source positions x target positions; no weights load: the count, the
    checks, the tasks), and again with every cell of the grid already stored (every id read from
    the store, every grid id computed and matched, nothing left to run): seconds and peak memory
    of the process.
(c) a simulated cluster: `ray.cluster_utils.Cluster` with a CPU-only head and 4 nodes declaring
    one GPU each (tiny models run on the CPU behind them, `execution.gpus_per_worker: 1`), a
    sweep joining it with `--address`: how busy the 4 workers were (the sum of their task times
    over 4 x the sweep's compute time) and the driver's own CPU time per cell.
(d) the framework's cost per cell, step by step, on one core (what an 8-GPU node at 30,000 cells/s
    per GPU would ask of each step): the driver expanding cells and cutting tasks, building a
    task's payload, the worker reading the payload back and resolving it (before the engine's
    forward passes), the driver turning a worker's output into rows, and storing them.

    .venv/bin/python benchmarks/bench_sweep_scale.py [--cells 100000] [--repeats 2] [--skip-sweep] [--skip-plan]
"""

from __future__ import annotations

import argparse
import os
import platform
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


MEASURE = (
    "import resource, subprocess, sys, time; t0 = time.perf_counter(); "
    "out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout; "
    "print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "print([ln for ln in out.splitlines() if ln.startswith('output:')][0])"
)


def measured(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak resident MiB, the dry run's `output:` line) of `cmd` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, env=env, capture_output=True, text=True)
    first, line = out.stdout.splitlines()[-2:]
    secs, kib = first.split()
    return float(secs), int(kib) / 1024, line


def plan_config(path: Path, n_cells: int, out: Path) -> Path:
    """A product grid of n_cells: n_cells / 200 source prompts x 4 layers x 5 source positions x
    10 target positions (a grid researchers run: every position of a source, many target slots)."""
    n_sources = n_cells // 200
    prompts = path.parent / f"plan-sources-{n_sources}.csv"
    if not prompts.exists():
        prompts.write_text("prompt\n" + "".join(f"The word that I saw on the page was {w}\n" for w in words(n_sources)))
    path.write_text(
        f"""name: plan-{n_cells}
models: [tiny-llama]
source: {{file: {prompts}, prompt_column: prompt, layers: all, positions: [-1, -2, -3, -4, -5]}}
target: {{prompt: {IDENTITY!r}, layers: same, positions: [-1, -2, -3, -4, -5, -6, -7, -8, -9, -10]}}
generation: {{max_new_tokens: 1}}
execution: {{workers: 2, batch_size: 256}}
output: {{dir: {out}, wandb: {{mode: disabled}}}}
"""
    )
    return path


def fill_store(cfg: Path) -> int:
    """Store every cell of the grid as computed (the id columns only, in part files of 10^6 rows), as a
    finished sweep of this config leaves them: what a resume reads and matches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from patchscope_core.models import model_fingerprint
    from sweeps.grid import cell_ids
    from sweeps.run.driver import plan
    from sweeps.sinks.store import ResultStore

    p = plan(str(cfg))
    store = ResultStore(p.config.out_dir, keys={"tiny-llama": model_fingerprint("tiny-llama")})
    store.open(p.config.model_dump(mode="json"), p.config_hash, p.n_cells, restart=True)
    key, n, chunk = model_fingerprint("tiny-llama"), 0, []

    def flush() -> None:
        table = pa.table({"cell_id": chunk, "model": ["tiny-llama"] * len(chunk), "model_key": [key] * len(chunk)})
        pq.write_table(table, store.results_dir / f"part-{n:012d}.parquet")

    for cid in cell_ids(p.config, p.rows, p.models, p.context):
        chunk.append(cid)
        n += 1
        if len(chunk) == 1_000_000:
            flush()
            chunk = []
    if chunk:
        flush()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000, help="cells of the smaller sweep (a); the larger has 2x")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each sweep in (a); the fastest counts")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--plan-cells", type=int, nargs="+", default=[10**6, 10**7])
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--cluster-cells", type=int, default=20_000)
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
            rows = []
            for workers, label in ((1, "1 worker (backend auto: local)"), (2, "2 Ray workers")):
                small = config(tmp / f"s{workers}.yaml", n_sources, workers, args.batch_size, tmp / f"o-s{workers}")
                large = config(tmp / f"l{workers}.yaml", 2 * n_sources, workers, args.batch_size, tmp / f"o-l{workers}")
                # the fastest of --repeats runs of each (--restart: stored nothing): the machine's
                # noise only ever adds time
                t_small = min(sweep_seconds(small, env) for _ in range(args.repeats))
                t_large = min(sweep_seconds(large, env) for _ in range(args.repeats))
                rows.append((label, t_small, t_large, args.cells / max(t_large - t_small, 1e-9)))
            # the machine drifts over minutes: the engine again after the sweeps, the ratios to the mean
            after = engine_rate(n_sources, args.batch_size)
            rate = (rate + after) / 2
            print(f"  engine in-process again, after the sweeps: {after:,.0f} cells/s (mean {rate:,.0f})")
            for label, t_small, t_large, marginal in rows:
                print(
                    f"  sweep, {label}: {args.cells:,} cells {t_small:.1f} s, {2 * args.cells:,} cells {t_large:.1f} s "
                    f"-> {marginal:,.0f} cells/s marginal = {marginal / rate:.2f}x the engine in-process (mean)"
                )
        if not args.skip_plan:
            print("\n(b) planning and resume: `patchscope sweep --dry-run` (no weights), seconds and peak memory")
            for n in args.plan_cells:
                cfg = plan_config(tmp / f"p{n}.yaml", n, tmp / f"o-p{n}")
                cmd = [str(BIN / "patchscope"), "sweep", str(cfg), "--dry-run"]
                secs, mib, line = measured(cmd, env)
                print(f"  {n:>12,} cells, nothing stored: {secs:6.1f} s, {mib:6.0f} MiB  | {line}")
                t0 = time.perf_counter()
                stored = fill_store(cfg)
                fill = time.perf_counter() - t0
                secs, mib, line = measured(cmd, env)
                print(
                    f"  {n:>12,} cells, all {stored:,} stored ({fill:.0f} s to write): {secs:6.1f} s, {mib:6.0f} MiB  | {line}"
                )

        if not args.skip_cluster:
            simulated_cluster(tmp, args.cluster_cells, args.batch_size, env)
        if not args.skip_steps:
            per_cell_steps(tmp, args.batch_size)


def per_cell_steps(tmp: Path, batch_size: int, n_sources: int = 5_000) -> None:
    """Microseconds per cell of each framework step (one process, one thread)."""
    import torch

    from patchscope_core import Patchscope, PatchscopeEngine, load_model
    from sweeps.grid import iter_cells, iter_tasks, per_task
    from sweeps.records import table
    from sweeps.run.driver import plan
    from sweeps.sinks.store import ResultStore
    from workers.actor import run_task

    torch.set_num_threads(1)
    cfg = config(tmp / "steps.yaml", n_sources, 1, batch_size, tmp / "o-steps")
    p = plan(str(cfg))
    size = per_task(p.config, p.n_cells)
    t0 = time.perf_counter()
    tasks = list(
        iter_tasks(
            iter_cells(p.config, p.rows, p.models, context=p.context), batch_size, p.context, {"tiny-llama": size}
        )
    )
    t_cells = time.perf_counter() - t0
    n = sum(len(t.cells) for t in tasks)
    t0 = time.perf_counter()
    payloads = [t.payload() for t in tasks]
    t_payload = time.perf_counter() - t0
    engine = PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")
    sample = payloads[:4]
    t0 = time.perf_counter()
    for pl in sample:
        engine.resolve(Patchscope.from_columns(pl["patchscope_columns"]))
    n_sample = sum(len(pl["patchscope_columns"]["source_prompt"]) for pl in sample)
    t_decode = (time.perf_counter() - t0) / n_sample
    t0 = time.perf_counter()
    outputs = [run_task(engine, pl, batch_size, {}) for pl in sample]
    t_engine = (time.perf_counter() - t0) / n_sample
    store = ResultStore(tmp / "o-steps-store")
    t_rows = t_store = 0.0
    for k in range(len(tasks)):
        task, out = tasks[k], outputs[k % len(outputs)]
        out = {**out, "records": out["records"][: len(task.cells)]}
        if len(out["records"]) < len(task.cells):
            continue
        t0 = time.perf_counter()
        rows = table(task, out)
        t_rows += time.perf_counter() - t0
        t0 = time.perf_counter()
        store.write(task.task_id, rows)
        t_store += time.perf_counter() - t0
    us = 1e6 / n
    print(f"\n(d) framework cost per cell (1 thread, {n:,} cells in {len(tasks)} tasks of up to {size})")
    for name, value in (
        ("driver: expand cells and cut tasks", t_cells * us),
        ("driver: build the task payloads", t_payload * us),
        ("worker: read the payload back and resolve", t_decode * 1e6),
        ("driver: a worker's output -> its table of rows", t_rows * us),
        ("driver: store the rows (Parquet, fsync, part files)", t_store * us),
        ("engine: tiny-llama's own forward passes (for scale)", t_engine * 1e6 - t_decode * 1e6),
    ):
        print(f"  {name:<55} {value:8.1f} us  -> {1e6 / max(value, 1e-9):>10,.0f} cells/s on one core")


CLUSTER_RUN = (
    "import resource, subprocess, sys, time; t0 = time.perf_counter(); "
    "out = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=True).stdout; "
    "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(time.perf_counter() - t0, r.ru_utime + r.ru_stime); "
    "print([ln for ln in out.splitlines() if 'cells stored' in ln][0])"
)


def simulated_cluster(tmp: Path, n_cells: int, batch_size: int, env: dict) -> None:
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    print(f"\n(c) simulated cluster: a head (0 GPU) and 4 nodes of 1 CPU + 1 GPU (declared), {n_cells:,} cells")
    env = {**env, "RAY_AUTH_MODE": "disabled"}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        for _ in range(4):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        cfg = config(tmp / "cluster.yaml", n_cells // LAYERS, 4, batch_size, tmp / "o-cluster")
        text = cfg.read_text().replace(
            "execution: {workers: 4", "execution: {workers: 4, gpus_per_worker: 1, cpus_per_worker: 1"
        )
        cfg.write_text(text)
        cmd = [str(BIN / "patchscope"), "sweep", str(cfg), "--restart", "--address", cluster.address]
        out = subprocess.run(
            [sys.executable, "-c", CLUSTER_RUN, *cmd], check=True, env=env, capture_output=True, text=True
        )
        first, line = out.stdout.splitlines()[-2:]
        wall, driver_cpu = map(float, first.split())
        df = pd.read_parquet(tmp / "o-cluster" / "results", columns=["task_id", "worker_pid", "time_task_s"])
        tasks = df.drop_duplicates("task_id")
        compute = float(line.split(" in ")[1].split(" s")[0])  # the sweep's own time from start to the last store
        busy = tasks["time_task_s"].sum() / (4 * compute)
        per_worker = tasks.groupby("worker_pid")["time_task_s"].sum().round(1).tolist()
        print(f"  {line.strip()}")
        print(
            f"  wall {wall:.1f} s; 4 workers busy {busy:.0%} of the sweep's {compute:.1f} s (task seconds per worker "
            f"{per_worker}, {len(tasks)} tasks); driver CPU {driver_cpu:.1f} s = {1e6 * driver_cpu / len(df):.0f} us per cell"
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
