"""Faults at scale, every kind: each fault of tests/fault_kinds.py (an actor killed, the driver
killed, Ctrl-C, a result file cut short) on each sweep kind, injected once some but not all
cells are stored, then the same command run again; one table line per (kind, fault).

    PYTHONPATH=. python benchmarks/fault_matrix.py [--kinds k1,k2] [--faults f1,f2] [--groups 16]

Starts a local Ray cluster of 2 CPUs (as the tests' `ray_cluster`); the sweeps are real driver
processes joining it. Exit status 1 when a line is not right (a cell missing or read twice, rows
not equal to the clean run's, a resume that failed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["WANDB_SILENT"] = "true"


def main(argv: list[str] | None = None) -> int:
    from sweeps.kinds import KINDS
    from tests import fault_kinds

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--faults", default=",".join(fault_kinds.FAULTS))
    ap.add_argument("--groups", type=int, default=fault_kinds.N_GROUPS)
    args = ap.parse_args(argv)

    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    head = (
        f"{'kind':<22} {'fault':<10} {'stored/expected':>15} {'at fault':>8} {'tasks':>5} {'groups/task':>11} "
        f"{'dups':>4} {'read once':>9} {'= clean':>7} {'rc':>8} {'s':>6}"
    )
    print(head, flush=True)
    print("-" * len(head), flush=True)
    bad = 0
    try:
        with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
            for kind in args.kinds.split(","):
                t0 = time.perf_counter()
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its progress bar
                    clean = fault_kinds.clean_run(kind, Path(tmp) / kind / "clean", args.groups)
                print(f"# {kind}: clean run, {len(clean)} cells, {time.perf_counter() - t0:.1f} s", flush=True)
                for fault in args.faults.split(","):
                    where = Path(tmp) / kind / fault
                    try:
                        r = fault_kinds.run_fault(kind, fault, where, address, clean, args.groups)
                    except Exception as exc:  # noqa: BLE001 - a line of the table, not the end of it
                        bad += 1
                        print(f"{kind:<22} {fault:<10} failed: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    ok = r.stored == r.expected and r.read_unique and r.equal_to_clean and r.resume_rc == 0
                    mid = 0 < r.stored_at_fault < r.expected
                    bad += not (ok and mid)
                    print(
                        f"{kind:<22} {fault:<10} {f'{r.stored}/{r.expected}':>15} {r.stored_at_fault:>8} {r.tasks:>5} "
                        f"{r.max_groups_per_task:>11} {r.duplicates:>4} {'yes' if r.read_unique else 'NO':>9} "
                        f"{'yes' if r.equal_to_clean else 'NO':>7} {f'{r.fault_rc},{r.resume_rc}':>8} {r.seconds:>6.1f}",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    print(
        "\nstored/expected: distinct cell ids in the files after the resume; at fault: cells stored when the fault "
        "was injected; groups/task: most groups (prompts, facts, pairs) among one stored task's cells; dups: rows "
        "of a cell stored twice across files (read counts each once); rc: the faulted run's exit status, the resume's"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
