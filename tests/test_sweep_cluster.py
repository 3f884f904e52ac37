"""A two-node Ray cluster simulated on this machine: `ray start --head`, then a second
`ray start --address`, each with one CPU, so the sweep's two workers must land on different
nodes. The sweep is submitted to it with `patchscope sweep --address`.

The test starts both nodes with `--block` in their own process session and stops exactly
those (SIGTERM, then SIGKILL to their own process group): never `ray stop`, which would end
every Ray on the machine. Token auth is off for every process of the test cluster
(RAY_AUTH_MODE=disabled, see DESIGN.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sweeps.store import ResultStore

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray head exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.5)
    pytest.fail(f"ray head did not open port {port} in {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray node exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if text in log.read_text():
            return
        time.sleep(0.5)
    pytest.fail(f"ray node did not start in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop one `ray start --block` and everything it started (its own process group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this node only
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture
def two_node_cluster(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", WANDB_SILENT="true")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    # Every node on its own loopback address. Ray rewrites 127.0.0.1 and localhost to the
    # machine's network address; other 127.x addresses it leaves alone, so nothing leaves lo.
    head_ip, node_ip = "127.0.0.2", "127.0.0.3"
    common = ["--block", "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    procs = []
    try:
        head_log = tmp_path / "head.log"
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--node-ip-address={head_ip}",
             "--include-dashboard=false", *common],
            env=env, stdout=open(head_log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(head)
        _wait_for_port(head_ip, port, head, head_log)
        node = subprocess.Popen(
            [str(BIN / "ray"), "start", f"--address={head_ip}:{port}", f"--node-ip-address={node_ip}",
             "--resources", json.dumps({"second_node": 1}), *common],
            env=env, stdout=open(tmp_path / "node.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(node)
        _wait_for_log(tmp_path / "node.log", "Ray runtime started", node)
        # the driver runs on neither node's address: keep its own address on loopback too
        yield f"{head_ip}:{port}", {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_on_a_two_node_cluster_finishes_with_all_cells(tmp_path, two_node_cluster):
    address, env = two_node_cluster
    rows = tmp_path / "rows.csv"
    rows.write_text("prompt,answer\nParis,France\nPython,language\nThe quick brown fox,fox\n")
    config = tmp_path / "two-node.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny-two-node",
        "models": ["tiny-llama"],
        "source": {"file": str(rows), "layers": [0, 2], "positions": [-1, 0]},
        "target": {"prompt": "Paris is the capital of x", "layers": "all", "positions": [-1]},
        "generation": {"max_new_tokens": 3},
        "execution": {"workers": 2, "batch_size": 4, "cpus_per_worker": 1},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "offline"}},
    }))
    proc = subprocess.run([str(BIN / "patchscope"), "sweep", str(config), "--address", address],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ray: 2 node(s), 2 CPUs" in proc.stdout
    df = ResultStore(tmp_path / "out").read()
    # 3 rows x 2 source layers x 2 positions x 4 target layers
    assert len(df) == 48 and df["cell_id"].is_unique
    assert set(zip(df.source_prompt, df.source_layer, df.source_position, df.target_layer)) == {
        (p, l, sp, tl) for p in ("Paris", "Python", "The quick brown fox") for l in (0, 2) for sp in (-1, 0)
        for tl in range(4)
    }
    assert set(df.ref_answer) == {"France", "language", "fox"}
    # each node had one CPU, so each of the two workers ran on its own node
    assert df["worker_node"].nunique() == 2
    assert "48 of 48 cells stored" in proc.stdout
    assert (tmp_path / "out" / "heatmap_tiny-llama_source_x_target_layer.png").is_file()
