"""Sweeps on a real local Ray cluster (2 CPUs, 2 workers) with tiny random models.

One Ray cluster serves every test here (the session fixture `ray_cluster` in conftest.py); each
sweep starts its own actors.
W&B runs offline and is read back from its files on disk: the binary run log (`run-*.wandb`,
a LevelDB-style log of protobuf records) and the table files it points to.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from patchscope_core import Patchscope, PatchscopeEngine, Source, Target, load_model, model_info, tokenize
from sweeps import cli
from sweeps.sinks.store import ResultStore
from tests.configs import changed, write_yaml

pytestmark = pytest.mark.ray

ROWS = [
    {"entity": "Paris", "target": "Paris is the capital of x", "answer": "France"},
    {"entity": "The quick brown fox", "target": "The Eiffel Tower is in x", "answer": "fox"},
    {"entity": "Python", "target": "Python is a programming language. x", "answer": "language"},
]
MODELS = ["tiny-gpt2", "tiny-llama"]
LAYERS = [1, 3]
POSITIONS = [-1, 0]
NEW_TOKENS = 5


def write_config(tmp_path: Path, name: str, **overrides) -> Path:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = {
        "name": name,
        "models": MODELS,
        "source": {
            "file": str(data),
            "prompt_column": "entity",
            "reference_columns": ["answer"],
            "layers": LAYERS,
            "positions": POSITIONS,
        },
        "target": {"prompt_column": "target", "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": NEW_TOKENS},
        "execution": {"workers": 2, "batch_size": 3},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"project": "patchscope-tests", "mode": "offline"}},
    }
    return write_yaml(changed(cfg, **overrides), tmp_path / f"{name}.yaml")  # "models" or "section__field"


def expected_cells(models=MODELS, layers=LAYERS):
    """The grid, written out independently of sweeps.grid."""
    return {
        (m, r["entity"], l, p, r["target"], l, -1, r["answer"])
        for m in models
        for r in ROWS
        for l in layers
        for p in POSITIONS
    }


def cell_key(row) -> tuple:
    return (
        row["model"],
        row["source_prompt"],
        row["source_layer"],
        row["source_position"],
        row["target_prompt"],
        row["target_layer"],
        row["target_position"],
        row["ref_answer"],
    )


# ---------------------------------------------------------------- reading an offline W&B run from disk


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` run log (LevelDB log format: 32 KiB blocks of chunks,
    each with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run log"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
        elif kind == 0 and length == 0:
            pos += block - pos % block if pos % block else 0
    records = []
    for raw in out:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def read_offline_run(out_dir: Path, wait_s: float = 30.0, run_id: str | None = None) -> dict:
    """The offline run in out_dir/wandb/ (of `run_id`: one model's of several), read once its log
    holds the run's `exit` record: W&B's service writes the log's last records after
    `run.finish()` returns, so a read at once may miss the last steps (seen: 2 of 30 steps
    missing in about 1 run of 7)."""
    runs = sorted((out_dir / "wandb").glob(f"offline-run-*-{run_id}" if run_id else "offline-run-*"))
    assert len(runs) == 1, runs
    run_dir = runs[0]
    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + wait_s
    records = read_wandb_records(log)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = read_wandb_records(log)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:
                path = [item.key] if item.key else list(item.nested_key)
                node = row
                for k in path[:-1]:
                    node = node.setdefault(k, {})
                node[path[-1]] = json.loads(item.value_json)
            history.append(row)

    def table(value) -> list[dict]:
        t = json.loads((run_dir / "files" / value["path"]).read_text())
        return [dict(zip(t["columns"], row)) for row in t["data"]]

    return {"dir": run_dir, "run": run, "history": history, "table": table}


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    code = cli.main(["sweep", str(write_config(tmp, "tiny-e2e"))])
    return code, tmp / "out"


def test_every_cell_is_stored_exactly_once_with_its_parameters(e2e):
    code, out = e2e
    assert code == 0
    df = ResultStore(out).read()
    assert len(df) == len(expected_cells()) == 24
    assert df["cell_id"].is_unique
    assert {cell_key(r) for r in df.to_dict("records")} == expected_cells()
    # one Parquet file per finished task: tasks of one batch (3 cells) across the 3 prompts, so that
    # 2 workers x 2 tasks in flight all get work: 2 models x 12 cells / 3 = 8
    files = ResultStore(out).files()
    assert len(files) == 8 and not list((out / "results").glob(".tmp-*"))
    assert df.groupby("task_id")["source_prompt"].nunique().max() == 2, "a task spans source prompts"
    for r in df.to_dict("records"):
        info = model_info(r["model"])
        assert list(r["source_token_ids"]) == list(tokenize(info, r["source_prompt"]))
        assert list(r["target_token_ids"]) == list(tokenize(info, r["target_prompt"]))
        assert r["source_position_abs"] == r["source_position"] % len(r["source_token_ids"])
        assert r["target_position_abs"] == len(r["target_token_ids"]) - 1
        assert 1 <= len(r["generated_token_ids"]) <= NEW_TOKENS
    # the workers of a model ran in their own processes (at most the 2 asked for: tasks go only to workers
    # that have started, so a fast sweep may end on the first one), and a model stayed in its actors
    assert set(df.groupby("model")["worker_pid"].nunique()) <= {1, 2}
    assert df.groupby("worker_pid")["model"].nunique().max() == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cells_total"] == 24 and manifest["config"]["name"] == "tiny-e2e"


def test_sweep_results_equal_the_engine_in_process(e2e):
    """The same Patchscopes, run here with the core engine in one batch, give the same tokens."""
    _, out = e2e
    df = ResultStore(out).read()
    for model in MODELS:
        specs, keys = [], []
        for r in ROWS:
            for layer in LAYERS:
                for pos in POSITIONS:
                    specs.append(
                        Patchscope(
                            Source(r["entity"], layer, pos),
                            Target(r["target"], layer, (-1,)),
                            max_new_tokens=NEW_TOKENS,
                        )
                    )
                    keys.append((r["entity"], layer, pos))
        results = PatchscopeEngine(load_model(model, device="cpu"), name=model).run(specs, batch_size=64)
        stored = df[df.model == model].set_index(["source_prompt", "source_layer", "source_position"])
        for key, res in zip(keys, results):
            row = stored.loc[key]
            assert list(row["generated_token_ids"]) == res.generated_token_ids, (model, key)
            assert row["generated_text"] == res.generated_text
            assert list(row["top_token_ids"]) == res.top_token_ids
            np.testing.assert_allclose(row["top_logprobs"], res.top_logprobs, atol=1e-4)
            assert row["source_position_abs"] == res.source_position


def test_wandb_offline_run_has_rows_logged_during_the_run_and_the_final_table(e2e):
    _, out = e2e
    everything = ResultStore(out).read()
    ids = {m: v["id"] for m, v in json.loads((out / "wandb_runs.json").read_text()).items()}
    assert sorted(ids) == sorted(MODELS) and len(set(ids.values())) == 2, "one run per model"
    for model in MODELS:  # each in the sweep's group, with its model's cells
        df = everything[everything["model"] == model]
        wb = read_offline_run(out, run_id=ids[model])
        assert wb["run"].run_group == "tiny-e2e" and wb["run"].project == "patchscope-tests"
        history = wb["history"]
        task_steps = [h for h in history if "cells" in h]
        final = [h for h in history if "results" in h]
        # one history row per finished task of this model, logged as it finished, before the final table
        assert len(task_steps) == 4 and len(final) == 1
        assert max(h["_step"] for h in task_steps) < final[0]["_step"]
        done = [h["cells_done"] for h in task_steps]  # the sweep's progress
        assert done == sorted(done) and len(set(done)) == 4
        # the live table is incremental: each step's file holds the rows of the task that just finished
        assert all(h["cells"]["log_mode"] == "INCREMENTAL" for h in task_steps)
        logged = [row["cell_id"] for h in task_steps for row in wb["table"](h["cells"])]
        assert sorted(logged) == sorted(df["cell_id"]), "each cell logged exactly once while the sweep ran"
        table = {row["cell_id"]: row for row in wb["table"](final[0]["results"])}
        assert set(table) == set(df["cell_id"])
        for r in df.to_dict("records"):
            assert table[r["cell_id"]]["generated_text"] == r["generated_text"]
            assert table[r["cell_id"]]["ref_answer"] == r["ref_answer"]
        assert [k for k in final[0] if k.startswith("heatmap/")] == [f"heatmap/{model}_prompt_x_layer"]
    # the pictures and the table are also on disk in output.dir
    for model in MODELS:
        assert (out / f"heatmap_{model}_prompt_x_layer.png").stat().st_size > 1000
    assert (out / "results.csv").is_file()


def test_a_sweep_of_many_tasks_sends_its_live_table_in_at_most_90_increments(tmp_path):
    """W&B's workspace shows only a table's last 100 increments: 250 tasks of one cell must
    arrive in at most 90, every cell once, and a sweep that ends short sends its last rows."""
    from sweeps.config import WandbConfig
    from sweeps.sinks.wandb import WandbSink

    sink = WandbSink(WandbConfig(project="patchscope-tests", mode="offline"), "many-tasks", {}, tmp_path)
    for i in range(250):  # 260 cells planned, 10 never done
        sink.log_task([{"cell_id": f"c{i}", "model": "m", "generated_text": str(i)}], i + 1, 260, 1.0)
    sink.finish([], {}, {"cells_done": 250})
    wb = read_offline_run(tmp_path)
    steps = [h for h in wb["history"] if "cells" in h]
    assert len([h for h in wb["history"] if "cells_per_s" in h]) == 250  # progress after every task
    assert len(steps) <= 90
    logged = [row["cell_id"] for h in steps for row in wb["table"](h["cells"])]
    assert sorted(logged) == sorted(f"c{i}" for i in range(250))


def test_report_command_prints_table_and_pictures(e2e, capsys):
    _, out = e2e
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "24 cells stored of 24" in text and "results.csv" in text and "heatmap_tiny-llama_prompt_x_layer.png" in text
    assert "== tiny-llama: generated text by source prompt" in text and "layer   3:" in text


# ---------------------------------------------------------------- resume


def test_resume_after_a_stop_recomputes_nothing_stored(ray_cluster, tmp_path, monkeypatch, capsys):
    import sweeps.grid
    import sweeps.sinks.store

    config = write_config(
        tmp_path, "tiny-resume", models=["tiny-llama"], execution__batch_size=2, execution__batches_per_task=1
    )
    # 1 model x 3 prompts x 2 layers x 2 positions = 12 cells in 6 tasks of one batch of 2
    real_write = sweeps.sinks.store.ResultStore.write
    writes = []

    def stop_after_two(self, task_id, records):
        new = real_write(self, task_id, records)
        writes.append(new)
        if len(writes) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after two tasks were stored
        return new

    monkeypatch.setattr(sweeps.sinks.store.ResultStore, "write", stop_after_two)
    assert cli.main(["sweep", str(config)]) == 130
    assert "interrupted: 4 of 12 cells are stored" in capsys.readouterr().out
    monkeypatch.setattr(sweeps.sinks.store.ResultStore, "write", real_write)
    out = tmp_path / "out"
    first = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in ResultStore(out).files()}
    stored_first = set(ResultStore(out).read()["cell_id"])
    assert len(first) == 2 and len(stored_first) == 4

    submitted = []
    real_payload = sweeps.grid.Task.payload
    monkeypatch.setattr(sweeps.grid.Task, "payload", lambda self: submitted.append(self) or real_payload(self))
    assert cli.main(["sweep", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "12 cells; 4 already stored" in printed and "8 to run in 4 tasks" in printed
    sent = [c.cell_id for t in submitted for c in t.cells]
    assert len(sent) == 8 and not set(sent) & stored_first, "stored cells were sent to a worker again"
    df = ResultStore(out).read()
    assert df["cell_id"].is_unique and len(df) == 12
    assert {cell_key(r) for r in df.to_dict("records")} == expected_cells(models=["tiny-llama"])
    for name, (mtime, content) in first.items():
        f = out / "results" / name
        assert f.stat().st_mtime_ns == mtime and f.read_bytes() == content, "a stored file was rewritten"

    # a third run has nothing to do; --restart computes everything again
    submitted.clear()
    assert cli.main(["sweep", str(config)]) == 0
    assert submitted == [] and "12 already stored" in capsys.readouterr().out
    assert cli.main(["sweep", str(config), "--restart"]) == 0
    assert len([c for t in submitted for c in t.cells]) == 12
    again = ResultStore(out).read()
    assert len(again) == 12 and again["cell_id"].is_unique


def test_a_wandb_failure_warns_and_loses_nothing(ray_cluster, tmp_path, monkeypatch, capsys):
    import wandb.sdk.wandb_run

    def broken(self, *args, **kwargs):
        raise ConnectionError("W&B is down")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken)
    config = write_config(
        tmp_path,
        "tiny-wandb-down",
        models=["tiny-gpt2"],
        source__layers=[2],
        execution__workers=1,
        execution__backend="ray",
    )
    assert cli.main(["sweep", str(config)]) == 0
    captured = capsys.readouterr()
    assert "warning: W&B log failed (ConnectionError: W&B is down)" in captured.err
    df = ResultStore(tmp_path / "out").read()
    assert len(df) == 6 and {cell_key(r) for r in df.to_dict("records")} == expected_cells(["tiny-gpt2"], [2])
    assert (tmp_path / "out" / "heatmap_tiny-gpt2_prompt_x_layer.png").is_file()


# ---------------------------------------------------------------- Ray's restarts and retries


def test_a_worker_crash_is_restarted_and_retried_by_ray_and_each_cell_stored_once(ray_cluster, tmp_path, monkeypatch):
    """The actor process dies in the middle of its first task; Ray restarts it (max_restarts,
    reloading the model) and re-runs the tasks it held (max_task_retries). No retry loop of ours."""
    import sys

    import ray.cloudpickle

    import workers.actor

    marker = tmp_path / "crashed-pid"

    class CrashOnce(workers.actor.PatchscopeWorker):
        def run(self, payload):
            if not marker.exists():
                import os

                marker.write_text(str(os.getpid()))
                os._exit(1)  # the worker process dies, as on an out-of-memory kill
            return super().run(payload)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    monkeypatch.setattr(workers.actor, "PatchscopeWorker", CrashOnce)
    config = write_config(
        tmp_path,
        "tiny-crash",
        models=["tiny-gpt2"],
        source__layers=[2],
        execution__workers=1,
        execution__batch_size=2,
        execution__backend="ray",
    )
    try:
        assert cli.main(["sweep", str(config)]) == 0
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert marker.exists(), "the worker never crashed: the test proved nothing"
    df = ResultStore(tmp_path / "out").read()
    assert len(df) == 6 and df["cell_id"].is_unique
    assert {cell_key(r) for r in df.to_dict("records")} == expected_cells(["tiny-gpt2"], [2])
    assert int(marker.read_text()) not in set(df["worker_pid"]), "results came from the restarted actor"


def test_gpus_asked_of_a_local_cluster_without_gpus_is_an_error_not_a_hang(ray_cluster, tmp_path, capsys):
    config = write_config(tmp_path, "tiny-gpu", models=["tiny-gpt2"], execution__gpus_per_worker=0.5)
    assert cli.main(["sweep", str(config)]) == 2
    err = capsys.readouterr().err
    assert "execution.gpus_per_worker: 0.5 GPU per worker, but this machine has 0" in err
    assert not (tmp_path / "out" / "wandb").exists() and ResultStore(tmp_path / "out").read().empty
