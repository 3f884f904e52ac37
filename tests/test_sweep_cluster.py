"""A two-node Ray cluster on this machine (tests/loopback_cluster.py: both nodes on 127.0.0.1, so
every Ray server listens on loopback only; token auth off), each node with one CPU, so the sweep's
two workers land on different nodes. Sweeps are submitted to it with `patchscope sweep --address`.

The cluster runs in its own process session; the fixture stops exactly that session (SIGTERM,
then SIGKILL to its process group): never `ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sweeps.sinks.store import ResultStore
from tests.configs import changed, write_yaml

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen) -> None:
    """Stop the cluster process and everything it started (its own process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this cluster only
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture
def two_node_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", WANDB_SILENT="true", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = tmp_path / "cluster.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.loopback_cluster", temp_dir, "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
        start_new_session=True,
    )
    try:
        if not select.select([proc.stdout], [], [], 120)[0]:
            pytest.fail(f"the cluster did not start in 120 s:\n{log.read_text()[-3000:]}")
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the cluster exited ({proc.wait()}):\n{log.read_text()[-3000:]}")
        info = json.loads(line)
        yield info, env, proc
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(root: subprocess.Popen) -> dict[str, set[str]]:
    """Every TCP address the cluster's processes listen on, by process name."""
    out: dict[str, set[str]] = {}
    for p in psutil.process_iter(["name"]):
        try:
            if os.getpgid(p.pid) != root.pid:
                continue
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.setdefault(p.info["name"], set()).add(c.laddr.ip)
        except (psutil.Error, ProcessLookupError):
            continue
    return out


def _config(tmp_path: Path, name: str, rows: str, **changes) -> Path:
    data = tmp_path / "rows.csv"
    data.write_text(rows)
    cfg = {
        "name": name,
        "models": ["tiny-llama"],
        "source": {"file": str(data), "layers": [0, 2], "positions": [-1, 0]},
        "target": {"prompt": "Paris is the capital of x", "layers": "all", "positions": [-1]},
        "generation": {"max_new_tokens": 3},
        "execution": {"workers": 2, "batch_size": 4, "cpus_per_worker": 1},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "offline"}},
    }
    return write_yaml(changed(cfg, **changes), tmp_path / f"{name}.yaml")


def test_sweep_on_a_two_node_cluster_finishes_with_all_cells(tmp_path, two_node_cluster):
    info, env, cluster = two_node_cluster
    config = _config(
        tmp_path, "tiny-two-node", "prompt,answer\nParis,France\nPython,language\nThe quick brown fox,fox\n"
    )
    proc = subprocess.run(
        [str(BIN / "patchscope"), "sweep", str(config), "--address", info["address"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ray: 2 node(s), 2 CPUs" in proc.stdout
    df = ResultStore(tmp_path / "out").read()
    # 3 rows x 2 source layers x 2 positions x 4 target layers
    assert len(df) == 48 and df["cell_id"].is_unique
    assert set(zip(df.source_prompt, df.source_layer, df.source_position, df.target_layer)) == {
        (p, l, sp, tl)
        for p in ("Paris", "Python", "The quick brown fox")
        for l in (0, 2)
        for sp in (-1, 0)
        for tl in range(4)
    }
    assert set(df.ref_answer) == {"France", "language", "fox"}
    assert "48 of 48 cells stored" in proc.stdout
    assert (tmp_path / "out" / "heatmap_tiny-llama_source_x_target_layer.png").is_file()
    # A test cluster with authentication off must be reachable from this machine only.
    listening = _listening(cluster)
    assert "gcs_server" in listening and "raylet" in listening, listening
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ips in listening.values() for ip in ips), listening


def test_a_node_lost_in_the_middle_of_a_sweep_costs_no_cell(tmp_path, two_node_cluster):
    """The second node's raylet is killed while its worker holds tasks. Ray declares the node
    dead and would queue those tasks for an actor that can never be placed again (the head's only
    CPU is taken): the sweep moves them to the live worker and finishes with every cell once."""
    info, env, _ = two_node_cluster
    head, second = info["nodes"]
    rows = "prompt,answer\n" + "".join(f"Entity number {i},{i}\n" for i in range(150))
    config = _config(
        tmp_path,
        "tiny-node-lost",
        rows,
        source__positions=[-1],
        target__layers="same",
        generation__max_new_tokens=60,
        execution__placement_timeout_s=120,
        execution__batches_per_task=1,  # 75 tasks of 4 cells: work left when the second node has stored its first
    )
    out = tmp_path / "out"
    log = tmp_path / "sweep.log"
    sweep = subprocess.Popen(
        [str(BIN / "patchscope"), "sweep", str(config), "--address", info["address"]],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:  # until the second node's worker has stored something
            assert sweep.poll() is None, f"the sweep ended before the second node worked:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            df = ResultStore(out).read()
            if not df.empty and second["node_id"] in set(df["worker_node"]):
                break
            time.sleep(0.2)
        os.kill(second["raylet_pid"], signal.SIGKILL)
        killed_at = len(df)
        sweep.wait(timeout=300)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait(timeout=30)
    text = log.read_text()
    assert sweep.returncode == 0, text[-3000:]
    assert "worker 2 of tiny-llama lost (" in text or "worker 1 of tiny-llama lost (" in text, text[-3000:]
    df = ResultStore(out).read()
    assert len(df) == 300 and df["cell_id"].is_unique  # 150 rows x 2 layers
    assert killed_at < 300, "the node was killed after the work was done"
    assert set(df["worker_node"]) == {head["node_id"], second["node_id"]}
    assert "300 of 300 cells stored" in text
