"""What the golden fixtures pin, computed the same way when they are written
(tests/golden/make_golden.py, at the code before a change) and when they are checked
(tests/test_golden.py, at the code after it): cell ids, config hashes, payloads, dry-run text,
and tiny run directories for each sweep kind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "sweeps" / "examples"
FIRST_IDS = 20
FIRST_TASKS = 3
# Run columns: where and when a cell ran, different at every run.
# Result columns added after the golden stores were written (issue 19's steering norms): a fresh
# run has them, the stored rows do not.
ADDED_COLUMNS = {"vector_norm", "site_norm", "relative_strength"}
VOLATILE = ("task_id", "worker_node", "worker_pid", "worker_device", "worker_peak_mb", "time_task_s")


def fix_cpu_count() -> None:
    """`cpus_per_worker: auto` shares this machine's cores: pin the count so texts agree."""
    os.cpu_count = lambda: 2


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _api():
    """The sweep functions the fixtures go through (their import paths may move; the values may not)."""
    from sweeps.grid import iter_cells, iter_tasks
    from sweeps.plan import config_hash
    from sweeps.records import records
    from sweeps.run.driver import plan as make_plan
    from sweeps.sinks.store import ResultStore

    def plan(path: str) -> tuple:
        """(config, rows, model plans, cells, context), as the fixtures read it (`Plan` since the
        driver hands one object; a tuple before)."""
        p = make_plan(path)
        return p if isinstance(p, tuple) else (p.config, p.rows, p.models, p.n_cells, p.context)

    return plan, config_hash, iter_cells, iter_tasks, records, ResultStore


def _batch_rows(config) -> int:
    """Rows per batch as the driver sizes tasks (`batch_size: auto` resolved since it exists)."""
    return getattr(config.execution, "batch_rows", config.execution.batch_size)


def pin_example(path: Path) -> dict:
    plan, config_hash, iter_cells, iter_tasks, _, _ = _api()
    from sweeps.cli import main

    config, rows, plans, n_cells, context = plan(str(path))
    ids = [c.cell_id for c in iter_cells(config, rows, plans, context=context)]
    tasks = itertools.islice(
        iter_tasks(iter_cells(config, rows, plans, context=context), _batch_rows(config), context), FIRST_TASKS
    )
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(_empty_dir())
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["sweep", str(path), "--dry-run"])
    finally:
        os.chdir(cwd)
    return {
        "config_hash": config_hash(config, rows, context),
        "n_cells": n_cells,
        "first_ids": ids[:FIRST_IDS],
        "ids_digest": digest(ids),
        "payload_digests": [digest(t.payload()) for t in tasks],
        "dry_run": {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()},
    }


def _empty_dir() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="golden-"))


# ---------------------------------------------------------------- one tiny run per sweep kind

FACTS = [
    {"prompt": "Paris is the capital of France.", "subject": "Paris", "answer": " The", "topic": "city"},
    {"prompt": "Water is a liquid.", "subject": "Water", "answer": " It", "topic": "substance"},
]
ENTITIES = "entity,description\nParis,capital of France\nWater,a liquid\n"
_OUT = {"wandb": {"mode": "disabled"}}
RUNS = {
    "patchscope": (
        {
            "name": "golden-patchscope",
            "models": ["tiny-llama"],
            "source": {"file": "rows.jsonl", "prompt_column": "entity", "layers": [1, 3], "positions": [-1, 0]},
            "target": {"prompt_column": "target", "layers": "same", "positions": [-1]},
            "generation": {"max_new_tokens": 3},
            "execution": {"workers": 1, "batch_size": 3},
            "output": _OUT,
        },
        {
            "rows.jsonl": "".join(
                json.dumps({"entity": e, "target": "x is", "answer": a}) + "\n"
                for e, a in (("Paris", "city"), ("Water", "liquid"))
            )
        },
    ),
    "intervention": (
        {
            "name": "golden-intervention",
            "kind": "intervention",
            "models": ["tiny-llama"],
            "prompts": {"file": "facts.jsonl", "answer_column": "answer", "reference_columns": ["topic"]},
            "intervention": {
                "site": "blocks.{layer}.attn.hook_z",
                "layers": [1],
                "heads": [0, 2],
                "kind": ["zero", "mean"],
            },
            "generation": {"max_new_tokens": 3, "stop_at_eos": False},
            "execution": {"workers": 1, "batch_size": 3},
            "output": _OUT,
        },
        {"facts.jsonl": "".join(json.dumps(f) + "\n" for f in FACTS)},
    ),
    "causal_trace": (
        {
            "name": "golden-trace",
            "kind": "causal_trace",
            "models": ["tiny-llama"],
            "prompts": {"file": "facts.jsonl", "subject_column": "subject", "answer_column": "answer"},
            "trace": {
                "sites": ["resid_post", "mlp_out"],
                "layers": [0, 2],
                "positions": [0, -1],
                "window": 2,
                "samples": 2,
                "seed": 1,
            },
            "execution": {"workers": 1, "batch_size": 8},
            "output": _OUT,
        },
        {"facts.jsonl": "".join(json.dumps(f) + "\n" for f in FACTS)},
    ),
    "recipe": (
        {
            "name": "golden-recipe",
            "kind": "recipe",
            "models": ["tiny-llama"],
            "recipe": {"name": "entity_description", "file": "entities.csv", "layers": [1, 3]},
            "generation": {"max_new_tokens": 3},
            "execution": {"workers": 1, "batch_size": 4},
            "output": _OUT,
        },
        {"entities.csv": ENTITIES},
    ),
}


def write_run_config(run_dir: Path, cfg: dict, files: dict[str, str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run_dir / name).write_text(text)
    path = run_dir / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def with_out_dir(config: Path, out_dir: Path) -> Path:
    """A copy of the run's config beside it whose output.dir is `out_dir` (not part of the hash)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["output"]["dir"] = str(out_dir)
    path = config.with_name("sweep-here.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_in_process(config: Path, engine, out_dir: Path, skip_stored: bool = True) -> int:
    """The sweep's own path without Ray into the store at out_dir, on an engine already built:
    the local backend's loop (`sweeps.run.local.run_here`) with `run_task` on `engine`; returns
    the cells computed. A task that fails fails the test."""
    plan, config_hash, iter_cells, iter_tasks, records, ResultStore = _api()
    from sweeps.run.local import run_here
    from workers.actor import run_task

    cfg, rows, plans, n_cells, context = plan(str(with_out_dir(config, out_dir)))
    store = ResultStore(out_dir)
    chash = config_hash(cfg, rows, context)
    store.check(chash)
    store.open(cfg.model_dump(mode="json"), chash, n_cells)
    stored = store.stored_cell_ids() if skip_stored else frozenset()
    computed = 0

    def done(task, output) -> None:
        nonlocal computed
        computed += len(store.write(task.task_id, records(task, output)))

    def fail(line: str) -> None:
        raise AssertionError(line)  # raised while the task's own exception is handled: both are shown

    tasks = iter_tasks(iter_cells(cfg, rows, plans, skip=stored, context=context), _batch_rows(cfg), context)
    run_here(tasks, lambda payload: run_task(engine, payload, _batch_rows(cfg)), done, fail)
    return computed


def stable(df):
    """Stored rows without the run columns, in cell order, as plain comparable data."""
    df = df.drop(columns=[c for c in df.columns if c in VOLATILE or c.startswith("time_")])
    df = df.sort_values("cell_id").reset_index(drop=True)
    return json.loads(df.to_json(orient="records", double_precision=10))


def same_rows(got, want, rel: float = 1e-4, abs_: float = 1e-7) -> list[str]:
    """Where two `stable` row lists differ: everything equal except floats, which may differ in
    the last digits (BLAS picks its kernels by CPU, so a fresh run on another machine moves the
    6th-7th significant digit). Returns the differences, empty when the rows agree."""
    import math

    out: list[str] = []

    def walk(a, b, where):
        if isinstance(a, float) or isinstance(b, float):
            if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                out.append(f"{where}: {a!r} != {b!r}")
            elif not math.isclose(a, b, rel_tol=rel, abs_tol=abs_):
                out.append(f"{where}: {a!r} != {b!r}")
        elif isinstance(a, dict) and isinstance(b, dict):
            if a.keys() != b.keys():
                out.append(f"{where}: columns {sorted(a.keys() ^ b.keys())} differ")
            for k in a.keys() & b.keys():
                walk(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                out.append(f"{where}: {len(a)} items != {len(b)}")
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif a != b:
            out.append(f"{where}: {a!r} != {b!r}")

    walk(got, want, "rows")
    return out
