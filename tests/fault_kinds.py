"""Faults injected mid-run into a sweep of every kind (`sweeps.kinds.KINDS`), shared by
tests/test_sweep_faults_kinds.py (one fault per kind) and benchmarks/fault_matrix.py (every fault
x every kind).

Each kind's sweep is the golden tiny run of its kind (`tests/golden/common.RUNS`; the two pair
kinds: the pairs of their own tests) with more groups, so that it has more tasks than
workers x max_in_flight_per_worker and, where the kind packs groups, tasks that hold cells of
several groups. The sweep runs as a real driver process joining a running Ray cluster; a fault
is injected once some but not all of its cells are stored (the store's files polled), then the
same config is run again; the store must then hold every cell once, equal to a clean run's.

Faults:
- `actor`: SIGKILL to a worker process that has stored cells (its `worker_pid`); Ray restarts it.
- `driver`: SIGKILL to the driver (no clean-up of its own); the resume runs the rest.
- `interrupt`: SIGINT to the driver (Ctrl-C): exit 130, stored cells kept.
- `truncate`: a stored result file cut short while the driver runs; the resume sets it aside and
  computes its cells again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.golden import common

FAULTS = ("actor", "driver", "interrupt", "truncate")
N_GROUPS = 16  # source prompts, prompts, facts, entities, pairs


def _words(n: int) -> list[str]:
    names = [
        "Paris",
        "Water",
        "Berlin",
        "Python",
        "Tokyo",
        "Iron",
        "Rome",
        "Oxygen",
        "Madrid",
        "Gold",
        "Cairo",
        "Salt",
        "Lima",
        "Copper",
        "Oslo",
        "Carbon",
        "Delhi",
        "Silver",
        "Quito",
        "Helium",
    ]
    return [names[i % len(names)] + ("" if i < len(names) else f" {i}") for i in range(n)]


def _pairs(n: int) -> list[dict]:
    """Pairs whose clean and corrupted prompts differ in one word of one token (fox / fix), after
    a prefix of their own: the same token count in both."""
    base = [
        ("The fox jumps over the", "The fix jumps over the", " dog", " cat"),
        ("A fox sat on the", "A fix sat on the", " mat", " rug"),
    ]
    out = []
    for i, w in enumerate(_words(n)):
        clean, corrupted, answer, wrong = base[i % 2]
        out.append(
            {
                "clean": f"{w} said: {clean}",
                "corrupted": f"{w} said: {corrupted}",
                "answer": answer,
                "wrong_answer": wrong,
            }
        )
    return out


def kind_run(kind: str, n: int = N_GROUPS) -> tuple[dict, dict[str, str]]:
    """(config, data files) of a sweep of `kind` over n groups, on 2 Ray workers."""
    execution = {"workers": 2, "backend": "ray", "max_in_flight_per_worker": 2, "placement_timeout_s": 120}
    words = _words(n)
    if kind == "patchscope":
        cfg, _ = common.RUNS[kind]
        cfg = {**cfg, "source": {**cfg["source"], "positions": [-1]}, "generation": {"max_new_tokens": 8}}
        # 2 cells a source prompt, tasks of 3: every task spans two source prompts
        cfg["execution"] = {**execution, "batch_size": 1, "batches_per_task": 3}
        files = {
            "rows.jsonl": "".join(json.dumps({"entity": w, "target": "x is", "answer": "a"}) + "\n" for w in words)
        }
    elif kind == "intervention":
        cfg, _ = common.RUNS[kind]
        cfg = {**cfg, "generation": {"max_new_tokens": 6, "stop_at_eos": False}}
        cfg["execution"] = {**execution, "batch_size": 2, "batches_per_task": 3}
        facts = [{"prompt": f"{w} is a word.", "subject": w, "answer": " It", "topic": "word"} for w in words]
        files = {"facts.jsonl": "".join(json.dumps(f) + "\n" for f in facts)}
    elif kind == "causal_trace":
        cfg, _ = common.RUNS[kind]
        cfg = {**cfg, "execution": {**execution, "batch_size": 8}}
        facts = [{"prompt": f"{w} is a word.", "subject": w, "answer": " It"} for w in words]
        files = {"facts.jsonl": "".join(json.dumps(f) + "\n" for f in facts)}
    elif kind == "recipe":
        cfg, _ = common.RUNS[kind]
        cfg = {**cfg, "generation": {"max_new_tokens": 8}}
        cfg["execution"] = {**execution, "batch_size": 1, "batches_per_task": 3}
        files = {"entities.csv": "entity,description\n" + "".join(f"{w},a word\n" for w in words)}
    elif kind in ("activation_patching", "attribution_patching"):
        prompts = {
            "file": "pairs.jsonl",
            "clean_column": "clean",
            "corrupted_column": "corrupted",
            "answer_column": "answer",
            "wrong_answer_column": "wrong_answer",
        }
        cfg = {"name": f"faults-{kind}", "kind": kind, "models": ["tiny-llama"], "prompts": prompts}
        if kind == "activation_patching":  # one task a pair
            cfg["patching"] = {
                "sites": ["blocks.{layer}.hook_resid_pre", "blocks.{layer}.attn.hook_z"],
                "layers": [0, 1],
                "positions": [-1, 2],
                "heads": [0, 1],
            }
            cfg["execution"] = {**execution, "batch_size": 8}
        else:  # tasks of two pairs
            cfg["attribution"] = {
                "sites": ["blocks.{layer}.attn.hook_z", "blocks.{layer}.hook_mlp_out"],
                "layers": "all",
                "method": ["atp", "atp_star"],
                "batch_pairs": 2,
            }
            cfg["execution"] = {**execution, "batch_size": 16}
        cfg["output"] = {"wandb": {"mode": "disabled"}}
        files = {"pairs.jsonl": "".join(json.dumps(p) + "\n" for p in _pairs(n))}
    elif kind == "feature_explanation":  # n neurons and the control: a task a feature
        cfg = {
            "name": f"faults-{kind}",
            "kind": kind,
            "models": ["tiny-llama"],
            "features": {"neurons": {"layers": [1], "ids": f"0:{n}"}},
            "explanation": {"templates": ['What is "X"? It means "'], "scales": [1, 4], "max_new_tokens": 6},
            "execution": {**execution, "batch_size": 2, "batches_per_task": 1},
            "output": {"wandb": {"mode": "disabled"}},
        }
        files = {}
    else:
        raise KeyError(f"no fault run for sweep kind {kind!r}: add one to tests/fault_kinds.py")
    cfg = {**cfg, "name": f"faults-{kind}"}
    return cfg, files


def write(kind: str, run_dir: Path, out_dir: Path, n: int = N_GROUPS, **execution) -> Path:
    cfg, files = kind_run(kind, n)
    cfg = {**cfg, "execution": {**cfg["execution"], **execution}, "output": {**cfg["output"], "dir": str(out_dir)}}
    return common.write_run_config(run_dir, cfg, files)


def group_of(config: Path) -> dict[str, str]:
    """{cell_id: its group} of the config's whole grid."""
    from sweeps.grid import iter_cells

    plan = common._api()[0]
    cfg, rows, plans, _, context = plan(str(config))
    return {c.cell_id: f"{c.model}/{c.group}" for c in iter_cells(cfg, rows, plans, context=context)}


def stored_now(out: Path) -> int:
    """Rows in the store's files right now (a file may vanish or be damaged while we look)."""
    n = 0
    for f in [*(out / "results").glob("task-*.parquet"), *(out / "results").glob("part-*.parquet")]:
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - removed by compaction, or cut short by the test itself
            pass
    return n


def clean_run(kind: str, tmp: Path, n: int = N_GROUPS) -> list:
    """The rows of a sweep of the same grid without faults, in process (the local backend, one worker)."""
    from sweeps import cli
    from sweeps.sinks.store import ResultStore

    out = tmp / "clean-out"
    config = write(kind, tmp / "clean", out, n, workers=1, backend="local")
    assert cli.main(["sweep", str(config)]) == 0
    return common.stable(ResultStore(out).read())


@dataclass
class Outcome:
    kind: str
    fault: str
    expected: int = 0
    stored: int = 0  # distinct cell ids in the files, read with pyarrow
    rows_in_files: int = 0
    part_files: int = 0  # merged files (sweeps.sinks.store.COMPACT_EVERY)
    duplicates: int = 0  # rows of a cell id stored more than once across files
    read_unique: bool = False
    equal_to_clean: bool | None = None
    differences: list[str] = field(default_factory=list)
    stored_at_fault: int = 0
    tasks: int = 0
    max_groups_per_task: int = 0
    fault_rc: int | None = None
    resume_rc: int | None = None
    seconds: float = 0.0
    log: str = ""


def _driver(config: Path, address: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "WANDB_SILENT": "true"}
    # Ctrl-C must raise KeyboardInterrupt in the driver even when the tests run where SIGINT is
    # ignored (a shell's background job: its children inherit SIG_IGN, and Python keeps it)
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from sweeps.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, "sweep", str(config), "--address", address],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _truncate_one(out: Path) -> None:
    for f in sorted((out / "results").glob("task-*.parquet")):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        f.write_bytes(data[: max(1, len(data) // 3)])
        return
    raise AssertionError("no task file to cut short")


def _kill_an_actor(out: Path) -> None:
    for f in sorted((out / "results").glob("task-*.parquet")):
        try:
            pids = set(pq.read_table(f, columns=["worker_pid"]).column("worker_pid").to_pylist())
        except Exception:  # noqa: BLE001
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
                return
            except ProcessLookupError:
                continue
    raise AssertionError("no live worker process found in the stored rows")


def run_fault(
    kind: str,
    fault: str,
    tmp: Path,
    address: str,
    clean: list | None = None,
    n: int = N_GROUPS,
    timeout: float = 240.0,
    resume=None,
) -> Outcome:
    """A sweep of `kind` into tmp/out, `fault` injected once some but not all cells are stored,
    then the same config run again (`resume(config) -> rc`; default: a driver process like the
    first); what the store holds afterwards, against `clean` (rows of `common.stable`)."""
    from sweeps.sinks.store import ResultStore

    t0 = time.perf_counter()
    out = tmp / "out"
    config = write(kind, tmp / "run", out, n)
    groups = group_of(config)
    res = Outcome(kind, fault, expected=len(groups))
    log = tmp / "driver.log"
    proc = _driver(config, address, log)
    try:
        deadline = time.monotonic() + timeout
        while (stored := stored_now(out)) < 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the sweep stored nothing before it ended:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        res.stored_at_fault = stored
        if fault == "actor":
            _kill_an_actor(out)
        elif fault == "driver":
            os.killpg(proc.pid, signal.SIGKILL)
        elif fault == "interrupt":
            os.kill(proc.pid, signal.SIGINT)
        elif fault == "truncate":
            _truncate_one(out)
        else:
            raise KeyError(fault)
        res.fault_rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _stop(proc)
    res.log = log.read_text(errors="replace")
    if resume is None:
        log2 = tmp / "resume.log"
        again = _driver(config, address, log2)
        try:
            res.resume_rc = again.wait(timeout=timeout)
        finally:
            _stop(again)
        res.log += log2.read_text(errors="replace")
    else:
        res.resume_rc = resume(config)
    # what the files hold, read with pyarrow directly
    ids, by_task = [], {}
    for f in ResultStore(out).files():
        res.part_files += f.name.startswith("part-")
        t = pq.read_table(f, columns=["cell_id", "task_id"]).to_pydict()
        ids += t["cell_id"]
        for cid, tid in zip(t["cell_id"], t["task_id"]):
            by_task.setdefault(tid, set()).add(groups.get(cid))
    counts = Counter(ids)
    res.rows_in_files = len(ids)
    res.stored = len(set(ids) & set(groups))
    res.duplicates = sum(c - 1 for c in counts.values() if c > 1)
    res.tasks = len(by_task)
    res.max_groups_per_task = max((len(g) for g in by_task.values()), default=0)
    df = ResultStore(out).read()
    res.read_unique = bool(len(df) == len(groups) and df["cell_id"].is_unique)
    if clean is not None:
        # abs 1e-5: the clean run computes in process on this machine's threads, the sweep on
        # 1-CPU actors; a metric near 0 (a logit difference of a random tiny model) moves by ~1e-6
        res.differences = common.same_rows(common.stable(df), clean, abs_=1e-5)
        res.equal_to_clean = not res.differences
    res.seconds = time.perf_counter() - t0
    return res


def cluster_tasks(config: Path) -> int:
    """The tasks the driver plans for the whole grid."""
    from sweeps.grid import count_tasks

    plan = common._api()[0]
    cfg, rows, plans, _, context = plan(str(config))
    return count_tasks(cfg, rows, plans, context)


def dump(cfg_path: Path) -> dict:
    return yaml.safe_load(cfg_path.read_text())
