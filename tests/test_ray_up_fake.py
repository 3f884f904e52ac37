"""The autoscaler of ray_cluster.yaml on one machine: benchmarks/ray_up_fake.py, run as a test.

The script starts a head with Ray's fake multi-node provider and ray_cluster.yaml's node types,
submits a sweep whose two workers each ask for a GPU (which only `worker.gpu` nodes have), and
checks that the autoscaler launched `worker.gpu` nodes for it and that every cell of the grid
was stored, computed on those nodes; it stops exactly the cluster it started. It runs in its own
process (its Ray settings stay out of this one); about a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_the_autoscaler_starts_gpu_nodes_for_a_sweep_and_the_sweep_finishes_on_them(tmp_path):
    summary_path, log = tmp_path / "summary.json", tmp_path / "run.log"
    with open(log, "w") as fh:  # a file, not a pipe: the script finishes its clean-up even if this process dies
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks" / "ray_up_fake.py"), "--json", str(summary_path)],
            cwd=ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        proc.wait(timeout=420)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its cluster on SIGTERM
        proc.wait(timeout=90)
        pytest.fail(f"no result in 420 s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert summary_path.is_file(), out[-4000:]
    summary = json.loads(summary_path.read_text())
    failed = [name for name, ok in summary.get("checks", {}).items() if not ok]
    assert proc.returncode == 0 and summary["ok"] and not failed, f"failed: {failed}\n{out[-4000:]}"

    # Before the sweep: the head alone, without GPU. After: worker.gpu nodes with a GPU each,
    # launched by the autoscaler for the sweep's workers, and every cell computed on them.
    assert [(n["type"], n["GPU"]) for n in summary["nodes_before"]] == [("ray.head.default", 0)]
    started = [n for n in summary["nodes_after"] if n["node_id"] not in {m["node_id"] for m in summary["nodes_before"]}]
    assert started and all(n["type"] == "worker.gpu" and n["GPU"] == 1 for n in started), summary["nodes_after"]
    assert any("Launching" in line and "type worker.gpu" in line for line in summary["autoscaler_lines"]), out[-4000:]
    assert any("'GPU': 1.0" in line for line in summary["autoscaler_lines"]), "the GPU demand the launch answered"
    assert summary["stored_cells"] == summary["n_cells"] == summary["rows"] > 0
    assert set(summary["cells_by_node"]) <= {n["node_id"] for n in started}
    assert summary["devices"] == ["cpu"]  # the GPU is a logical resource: the workers fall back to the CPU
    assert summary["left_running"] == [], "every process of the cluster is stopped"
