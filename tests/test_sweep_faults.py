"""Faults injected for real into sweeps on the local Ray cluster (the session fixture `ray_cluster`,
2 CPUs): a worker that can never be placed, a second sweep into the same directory and a killed
driver, two drivers storing the same cells, damaged result files, a "$" in the text of the
pictures, a secret in the environment; and results that must not depend on the batch.
(A node lost in the middle of a sweep: tests/test_sweep_cluster.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from sweeps import cli
from sweeps.sinks.store import ResultStore

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def write_config(tmp_path: Path, name: str, rows: list[dict] | None = None, **sections) -> Path:
    """A tiny-llama sweep over `rows` (source, target, reference) into tmp_path/out; `sections`
    update the config's sections."""
    rows = rows or [
        {"prompt": "Paris", "target": "Paris is the capital of x", "answer": "France"},
        {"prompt": "Python", "target": "Python is a programming language. x", "answer": "language"},
        {"prompt": "The quick brown fox", "target": "The Eiffel Tower is in x", "answer": "fox"},
    ]
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "name": name,
        "models": ["tiny-llama"],
        "source": {"file": str(data), "layers": [1, 3], "positions": [-1]},
        "target": {"prompt_column": "target", "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": 4},
        "execution": {"workers": 2, "batch_size": 2},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging: the faults here used to make sweeps wait forever."""

    def expired(*_):
        raise TimeoutError(f"the sweep did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in ResultStore(out).files()}


# ---------------------------------------------------------------- workers that cannot be placed


def test_more_workers_than_the_cluster_holds_run_on_those_placed(ray_cluster, tmp_path, capsys):
    """3 workers x 1 CPU on 2 CPUs: the third is never placed. No task may wait on it."""
    config = write_config(tmp_path, "tiny-too-many", execution={"workers": 3, "placement_timeout_s": 120})
    with deadline(150):
        assert cli.main(["sweep", str(config)]) == 0
    df = ResultStore(tmp_path / "out").read()
    assert len(df) == 6 and df["cell_id"].is_unique
    assert df["worker_pid"].nunique() <= 2, "a task ran on a worker that had no CPU"
    assert "6 of 6 cells stored" in capsys.readouterr().out


def test_no_worker_placeable_stops_cleanly_keeping_stored_cells(ray_cluster, tmp_path, capsys):
    """A worker asking 4 CPUs of a 2-CPU cluster: reported once, then the sweep stops (exit 1);
    the cells stored by an earlier run stay as they were."""
    config = write_config(tmp_path, "tiny-unplaceable")
    with deadline(150):
        assert cli.main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    kept = files(out)
    lost = sorted(kept)[0]
    (out / "results" / lost).unlink()  # its cells are to run again
    del kept[lost]
    config = write_config(tmp_path, "tiny-unplaceable", execution={"cpus_per_worker": 4, "placement_timeout_s": 3})
    capsys.readouterr()
    t0 = time.perf_counter()
    with deadline(120):
        assert cli.main(["sweep", str(config)]) == 1
    elapsed = time.perf_counter() - t0
    captured = capsys.readouterr()
    waiting = "waiting for resources: worker 1 of 1 for tiny-llama (asks 4 CPU, 0 GPU) has not started within 3 s"
    assert captured.out.count(waiting) == 1, captured.out
    assert "no worker of tiny-llama could be placed within execution.placement_timeout_s = 3 s" in captured.out
    assert "error: 2 cells (1 task) were not computed; run the same command again" in captured.err
    assert files(out) == kept, "stored cells were touched"
    assert elapsed < 60


# ---------------------------------------------------------------- one sweep per output.dir


def test_a_second_sweep_into_the_same_dir_is_refused_and_a_killed_driver_leaves_no_lock(
    ray_cluster, tmp_path, capsys, monkeypatch
):
    import sweeps.run.driver

    rows = [{"prompt": f"Entity {i}", "target": "Paris is the capital of x", "answer": str(i)} for i in range(12)]
    config = write_config(
        tmp_path, "tiny-locked", rows, generation={"max_new_tokens": 40}, execution={"workers": 1, "batch_size": 1}
    )
    out = tmp_path / "out"
    # The first sweep: a real driver process, joining this session's cluster.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first = subprocess.Popen(
        [str(BIN / "patchscope"), "sweep", str(config), "--address", ray_cluster.get_runtime_context().gcs_address],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        lock = out / "sweep.lock"
        for _ in range(600):
            if lock.is_file() and str(first.pid) in lock.read_text():
                break
            assert first.poll() is None, first.stdout.read().decode()
            time.sleep(0.1)
        else:
            pytest.fail("the first sweep never took the lock")
        # The second sweep, started while the first runs: refused before it starts anything.
        monkeypatch.setattr(sweeps.run.driver, "connect", lambda *a: pytest.fail("the second sweep started Ray"))
        assert cli.main(["sweep", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"error: output.dir: another sweep is running into {out} (pid {first.pid} on {socket.gethostname()}, since "
        ), err
        assert f"patchscope sweep {config}" in err and err.count("\n") == 1
        # --dry-run says what the run would do
        assert cli.main(["sweep", str(config), "--dry-run"]) == 2
        assert f"another sweep is running into {out} (pid {first.pid}" in capsys.readouterr().err
        # The first driver crashes (SIGKILL: no clean-up of its own).
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    # Its lock died with it: the same command runs, resumes and stores every cell once.
    monkeypatch.undo()
    with deadline(240):
        assert cli.main(["sweep", str(config)]) == 0
    df = ResultStore(out).read()
    assert len(df) == 24 and df["cell_id"].is_unique  # 12 rows x 2 layers
    assert "24 of 24 cells stored" in capsys.readouterr().out


def test_two_drivers_storing_the_same_cells_are_read_once(tmp_path, capsys):
    """What two unlocked sweeps did: each driver saw no cell stored and wrote them all. Reading
    counts each cell once (the store, the report, a resumed run)."""
    first, second = ResultStore(tmp_path / "out"), ResultStore(tmp_path / "out")
    first.open({"name": "x"}, "h", 3)
    second.open({"name": "x"}, "h", 3)
    assert first.stored_cell_ids() == second.stored_cell_ids() == set()
    records = [
        {
            "cell_id": f"c{i}",
            "model": "m",
            "source_prompt": "p",
            "source_layer": 0,
            "source_position": -1,
            "target_layer": 0,
            "target_position": -1,
            "target_prompt": "t",
            "generated_text": f"text {i}",
            "generated_token_ids": [1, 2],
            "source_token_ids": [1],
            "target_token_ids": [1],
            "top_logprobs": [-0.5],
        }
        for i in range(3)
    ]
    assert len(first.write("t1", records)) == 3 and len(second.write("t1", records)) == 3
    assert len(ResultStore(tmp_path / "out").files()) == 2, "both drivers wrote every cell"
    df = ResultStore(tmp_path / "out").read()
    assert sorted(df["cell_id"]) == ["c0", "c1", "c2"]
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    assert "3 cells stored of 3 (2 files in" in capsys.readouterr().out


# ---------------------------------------------------------------- damaged files, "$" in text, secrets


@pytest.fixture(scope="module")
def dollar_sweep(ray_cluster, tmp_path_factory):
    """A sweep whose prompts hold "$" math, run with a (fake) W&B key in the environment."""
    tmp = tmp_path_factory.mktemp("dollar")
    secret = "fake-wandb-key-" + os.urandom(12).hex()
    rows = [
        {"prompt": "Price $\\frac{1}{$ dollars", "target": "Paris is the capital of x", "answer": "$"},
        {"prompt": "Python", "target": "It costs $5 and $$ x", "answer": "language"},
        {"prompt": "Paris", "target": "Paris is the capital of x", "answer": "France"},
    ]
    config = write_config(tmp, "tiny-dollar", rows, output={"wandb": {"mode": "offline", "project": "tests"}})
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_API_KEY", secret)
    mp.setenv("WANDB_SILENT", "true")
    try:
        with deadline(240):
            code = cli.main(["sweep", str(config)])
    finally:
        mp.undo()
    return code, tmp, config, secret


def test_a_dollar_in_prompts_and_generations_is_drawn_as_text(dollar_sweep, capsys):
    code, tmp, _, _ = dollar_sweep
    out = tmp / "out"
    assert code == 0
    assert (out / "heatmap_tiny-llama_prompt_x_layer.png").stat().st_size > 1000
    # the generations too: put matplotlib math into a stored one, and make the pictures again
    (f, *_) = ResultStore(out).files()
    table = pq.read_table(f).to_pylist()
    table[0]["generated_text"] = "$\\frac{1}{$ dollars $"
    pq.write_table(pa.Table.from_pylist(table), f)
    picture = out / "heatmap_tiny-llama_prompt_x_layer.png"
    before = picture.stat().st_mtime_ns
    assert cli.main(["report", str(out)]) == 0
    assert "$\\frac{1}{$ dollars $" in (out / "results.csv").read_text()
    assert picture.stat().st_mtime_ns > before, "the picture was not drawn again"


def test_no_secret_in_anything_the_sweep_wrote(dollar_sweep, capsys):
    code, tmp, _, secret = dollar_sweep
    assert code == 0
    written = [p for p in tmp.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in written), "the W&B run is part of what was checked"
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    assert not leaks, f"the W&B key was written to {leaks}"


def test_damaged_result_files_are_set_aside_and_their_cells_computed_again(dollar_sweep, tmp_path, capsys):
    _, tmp, config, _ = dollar_sweep
    # a copy of the finished sweep, two of its files damaged: one empty, one cut short
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tmp / "out", out, ignore=shutil.ignore_patterns("wandb"))
    empty, cut, *intact = ResultStore(out).files()
    empty.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[:100])
    total = len(ResultStore(tmp / "out").read())
    lost = sum(len(pq.read_table(f)) for f in ResultStore(tmp / "out").files()[:2])
    assert cli.main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    for f in (empty, cut):
        assert f"warning: {f} is damaged (" in captured.err and not f.exists()
        assert (out / "results" / "damaged" / f.name).is_file()
    assert f"{total - lost} cells stored of {total}" in captured.out
    # the same command (here into the copy) computes exactly the missing cells
    data = yaml.safe_load(config.read_text())
    data["output"] = {"dir": str(out), "wandb": {"mode": "disabled"}}
    copy = tmp_path / "copy.yaml"
    copy.write_text(yaml.safe_dump(data))
    with deadline(240):
        assert cli.main(["sweep", str(copy)]) == 0
    assert f"{total - lost} already stored" in capsys.readouterr().out
    df = ResultStore(out).read()
    assert len(df) == total and df["cell_id"].is_unique
    assert sorted(df["cell_id"]) == sorted(ResultStore(tmp / "out").read()["cell_id"])


# ---------------------------------------------------------------- results that must not depend on the batch


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_batch_1_and_batch_16_give_identical_cells(ray_cluster, tmp_path, stop_at_eos):
    """One source prompt, 4 target prompts x 4 layers: 16 cells in one generate batch, or one at a
    time. Some of them reach EOS within 48 tokens; with stop_at_eos false every cell must run on
    to exactly 48 tokens whatever its batch (Hugging Face falls back to the model's EOS)."""
    targets = [
        "Paris is the capital of x",
        "The capital city of x is",
        "Python is a programming language. x",
        "The Eiffel Tower is in x",
    ]
    rows = [{"prompt": "The Eiffel Tower", "target": t, "answer": "Paris"} for t in targets]
    generated = {}
    for batch in (1, 16):
        run = tmp_path / f"batch{batch}"
        run.mkdir()
        config = write_config(
            run,
            f"tiny-batch{batch}",
            rows,
            source={"layers": "all"},
            generation={"max_new_tokens": 48, "stop_at_eos": stop_at_eos},
            execution={"batch_size": batch, "workers": 2},
        )
        with deadline(240):
            assert cli.main(["sweep", str(config)]) == 0
        df = ResultStore(run / "out").read()
        assert len(df) == 16
        generated[batch] = {r["cell_id"]: list(r["generated_token_ids"]) for r in df.to_dict("records")}
    assert generated[1] == generated[16]
    eos = 1  # tiny-llama's
    reached = [ids for ids in generated[1].values() if eos in ids]
    assert reached, "no cell reached EOS: the test would prove nothing"
    if stop_at_eos:
        assert all(ids[-1] == eos and ids.count(eos) == 1 for ids in reached)
    else:
        assert all(len(ids) == 48 for ids in generated[1].values())
        assert any(ids.index(eos) < 47 for ids in reached), "no cell went on past an EOS"
