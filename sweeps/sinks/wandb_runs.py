"""W&B's runs across invocations (the bookkeeping `sinks.wandb` reads and writes): which run a
sweep directory's model continues (output.dir/wandb_runs.json: each model's run id, its next
history step and the summary figures it shows, so a figure the current config no longer has is
removed; --restart starts new ones), what config it shows (the kind's own sections), and
the data it links to (the results store as an artifact by reference: paths and checksums, the
files staying where they are).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..kinds import KINDS
from .store import ResultStore

RUNS_FILE = "wandb_runs.json"  # {model: {"id", "step", "figures"}} in output.dir


def logged_config(config, config_hash: str) -> dict[str, Any]:
    """The config as W&B shows it: the shared sections and the kind's own, without the other
    kinds' (empty) sections, and without `generation` for a kind that generates no text, unless
    the config sets it."""
    kind = KINDS[config.kind]
    dump = config.model_dump(mode="json")
    shared = {"name", "kind", "models", "execution", "output", "report"}
    generates = any(c.startswith("generated") for c in kind.schema.results)
    if generates or "generation" in config.model_fields_set:
        shared.add("generation")
    keep = shared | set(kind.sections)
    return {**{k: v for k, v in dump.items() if k in keep and v is not None}, "config_hash": config_hash}


def read_runs(out_dir: Path) -> dict[str, dict[str, Any]]:
    """{model: {"id": run id, "step": the next history step, "figures": the summary figures it
    shows}} of output.dir/wandb_runs.json ({} when absent or damaged: new runs)."""
    import json

    path = Path(out_dir) / RUNS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(m): {"id": v["id"], "step": v.get("step", 0), "figures": [str(f) for f in v.get("figures", [])]}
        for m, v in data.items()
        if isinstance(v, dict)
        and isinstance(v.get("id"), str)
        and isinstance(v.get("step", 0), int)
        and isinstance(v.get("figures", []), list)
    }


def write_runs(out_dir: Path, runs: dict[str, dict[str, Any]]) -> None:
    """Write output.dir/wandb_runs.json whole (a temporary file renamed into place)."""
    import json

    path = Path(out_dir) / RUNS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_ids(out_dir: Path, models: Sequence[str], restart: bool) -> dict[str, dict[str, Any]]:
    """{model: {"id", "step", "figures"}}: the runs output.dir/wandb_runs.json holds (none with
    --restart), new ones for the models it lacks; written back (models no longer swept are kept)."""
    import secrets
    import string

    def new_id() -> str:  # as W&B's own run ids: 8 of [a-z0-9]
        return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))

    known = {} if restart else read_runs(out_dir)
    runs = {**known, **{m: known.get(m) or {"id": new_id(), "step": 0, "figures": []} for m in models}}
    write_runs(out_dir, runs)
    return {m: runs[m] for m in models}


def store_artifact(out_dir: Path, summary: dict[str, Any], sweep: str):
    """The results store (output.dir/results/*.parquet, manifest.json, cells.parquet) as a W&B
    artifact by reference: each file's path and checksum, the files staying where they are."""
    import wandb

    store = ResultStore(out_dir)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"results-{sweep}")
    artifact = wandb.Artifact(
        name,
        type="sweep-results",
        description="the sweep's Parquet store (sweeps.sinks.store.ResultStore), referenced in place",
        metadata={k: summary[k] for k in ("cells_done", "cells_total") if k in summary},
    )
    for path in [*store.files(), store.manifest_path, store.cells_path]:
        if path.is_file():
            artifact.add_reference(path.resolve().as_uri(), name=str(path.relative_to(store.dir)))
    return artifact
