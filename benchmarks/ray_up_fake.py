"""The autoscaler of ray_cluster.yaml exercised on one machine, with Ray's fake multi-node provider.

What it shows: a sweep whose workers ask for a GPU (`execution.gpus_per_worker: 1`) is submitted
to a cluster that has only its CPU head node; Ray's autoscaler, reading a cluster config with the
node types of ray_cluster.yaml (a head without GPU, `worker.gpu` nodes declaring `GPU: 1`,
`min_workers: 0`), starts `worker.gpu` nodes because the sweep's actors wait for them, and the
sweep finishes on those nodes with every cell of its grid stored.

How: Ray's `fake_multinode` provider (ray/autoscaler/_private/fake_multi_node/node_provider.py)
"launches" a node by starting another raylet on this machine with the node type's resources
(the GPU is a logical resource: the workers find no CUDA and run on the CPU, workers/actor.py
`choose_device`). It is started the way Ray documents for it, `RAY_FAKE_CLUSTER=1 ray start
--head --autoscaling-config=CONFIG` (not `ray up`: that path is for the Docker variant, which
needs Ray's images); the autoscaler (Ray's monitor process on the head) then runs exactly as
`ray up` would start it on AWS. The derived config keeps ray_cluster.yaml's node types,
resources, worker counts and scaling settings; only the provider and what is cloud-specific
(instance types, setup and start commands, file mounts) change, and the head type takes the
name the fake provider gives its head (`ray.head.default`). Each node's object store is capped
(100 MB) so several nodes fit this machine's /dev/shm.

The cluster stays on this machine: every node on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
token auth off (RAY_AUTH_MODE=disabled for every process), ports picked free, its own temp dir.
It runs in its own process session; at the end, on failure or on SIGTERM/SIGINT, exactly that
cluster is stopped (SIGTERM to `ray start --block`, then SIGKILL to its process group and to
every process it had started): never `ray stop`, which would stop every Ray on the machine.
Every step has a time limit.

    .venv/bin/python benchmarks/ray_up_fake.py [--json SUMMARY.json] [--keep DIR]

Prints the grid size from `patchscope sweep --dry-run`, the nodes before and after, the
autoscaler's log lines that launch nodes, the sweep's output, the cells read back from
results/*.parquet and on which nodes they were computed; exits 0 only if the autoscaler started
`worker.gpu` nodes, the sweep exited 0, every cell of the grid is stored once and every cell was
computed on a node the autoscaler started. tests/test_ray_up_fake.py runs it.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Set before Ray is imported: this process reads the cluster's node table with Ray's GCS client.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",  # the same for every process of this test cluster
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node on 127.0.0.1: nothing listens beyond loopback
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update(CLUSTER_ENV)
os.environ.pop("RAY_ADDRESS", None)

import psutil  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"  # the node type the fake provider gives the head (FAKE_HEAD_NODE_TYPE)
OBJECT_STORE_BYTES = 100 * 1024**2
HEAD_START_S = 90  # limits of each step
SWEEP_S = 300
STOP_S = 30
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def fake_cluster_config(cluster: dict, gcs_address: str) -> dict:
    """ray_cluster.yaml's node types, resources and scaling, on the fake multi-node provider."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    node_types = {HEAD_TYPE: {"resources": dict(head["resources"]), "node_config": {}, "max_workers": 0}}
    for name, t in types.items():
        if name != cluster["head_node_type"]:
            node_types[name] = {
                "resources": {**t["resources"], "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {},
                "min_workers": t.get("min_workers", 0),
                "max_workers": t["max_workers"],
            }
    return {
        "cluster_name": f"{cluster['cluster_name']}-fake",
        "max_workers": cluster["max_workers"],
        "upscaling_speed": cluster.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": cluster.get("idle_timeout_minutes", 5),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,  # "Launching 2 nodes" starts two, as a cloud provider would (default: one)
            "gcs_address": gcs_address,  # the fake provider's default is this machine's address:6379
        },
        "auth": {},
        "docker": {},
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        # What `ray up` fills in from the provider's defaults; the autoscaler reads the file as is.
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def sweep_config(out_dir: Path) -> dict:
    """A small sweep whose two workers each ask for one GPU, which only worker.gpu nodes have."""
    return {
        "name": "fake-autoscaler",
        "models": ["tiny-llama"],
        "source": {
            "prompts": ["Paris", "The quick brown fox", "Python", "Leonardo DiCaprio", "Samsung", "Syria"],
            "layers": [0, 1, 2],
        },
        "target": {"prompt": "Paris is the capital of x", "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": 24},
        "execution": {
            "workers": 2,
            "gpus_per_worker": 1,
            "cpus_per_worker": 1,
            "batch_size": 2,
            "placement_timeout_s": 180,
        },
        "output": {"dir": str(out_dir), "wandb": {"mode": "disabled"}},
    }


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class FakeCluster:
    """A head started with `RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config`, in its
    own process session; `stop` ends exactly what it started."""

    def __init__(self, config: dict, work: Path, port: int, extra_ports: list[int], head_cpus: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rf", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.config_path = work / "fake_cluster.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = work / "head.log"
        # The actors on every node import this checkout (PYTHONPATH reaches them through the
        # monitor process that starts the nodes).
        self.env = {**_env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        client, agent, metrics = extra_ports
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={self.config_path}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--include-dashboard=false",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
        ]
        self.seen: set[int] = set()  # every process of this cluster ever seen, to stop the orphans too
        with open(self.log_path, "w") as fh:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def note_processes(self) -> None:
        try:
            self.seen.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            pass

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the head exited ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            if "Ray runtime started" in self.log_path.read_text() and self.alive_nodes():
                return
            time.sleep(0.5)
        raise TimeoutError(f"the head did not start in {timeout:g} s:\n{self.log_path.read_text()[-3000:]}")

    def alive_nodes(self) -> list[dict]:
        """The cluster's alive nodes from its GCS: node id, node type, CPU and GPU."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        try:
            infos = GcsClient(address=self.address).get_all_node_info(timeout=5).values()
        except Exception:
            return []
        nodes = []
        for info in infos:
            if info.state != GcsNodeInfo.GcsNodeState.ALIVE:
                continue
            res = dict(info.resources_total)
            node_id = info.node_id.hex()
            nodes.append(
                {
                    "node_id": node_id,
                    "type": HEAD_TYPE if info.is_head_node else (info.node_type_name or "?"),
                    "CPU": res.get("CPU", 0),
                    "GPU": res.get("GPU", 0),
                }
            )
        return sorted(nodes, key=lambda n: n["node_id"])

    def autoscaler_log(self) -> list[str]:
        """From the autoscaler's log (monitor.log): its status when the GPU demand first shows,
        the lines that launch nodes, and its status once worker.gpu nodes are active."""
        paths = {
            os.path.realpath(p) for p in glob.glob(os.path.join(self.temp_dir, "session_*", "logs", "monitor.log"))
        }
        text = "".join(Path(p).read_text(errors="replace") for p in sorted(paths))
        entries = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s)", text)
        out, demand_shown, active_shown = [], False, False
        for entry in entries:
            head = entry.splitlines()[0] if entry.strip() else ""
            if re.search(r"new nodes for launch|Launching \d+ nodes|Adding \d+ node|Removing \d+ node", head):
                out.append(head)
            elif "Autoscaler status" in entry:
                demand = "'GPU'" in entry.split("Pending Demands:")[-1]
                active = "worker.gpu" in entry.split("Active:")[-1].split("Pending:")[0]
                if (demand and not demand_shown) or (active and not active_shown):
                    demand_shown |= demand
                    active_shown |= active
                    out += _status_digest(entry)
        return out

    def listening(self) -> set[str]:
        """Every address a process of this cluster listens on (TCP)."""
        self.note_processes()
        ips = set()
        for pid in self.seen:
            try:
                ips.update(
                    c.laddr.ip
                    for c in psutil.Process(pid).net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN
                )
            except psutil.Error:
                continue
        return ips

    def keep_logs(self, dest: Path) -> None:
        for path in glob.glob(os.path.join(self.temp_dir, "session_2*", "logs")):
            shutil.copytree(path, dest / "ray_logs", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))

    def stop(self) -> list[int]:
        """SIGTERM to `ray start --block` (it stops its node), then SIGKILL to whatever of this
        cluster is left: its process group and every process it was seen to start. Returns the
        pids still alive afterwards (none expected)."""
        self.note_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs([_proc(pid) for pid in self.seen if _proc(pid)], timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [p.pid for p in alive]


def _status_digest(entry: str) -> list[str]:
    """The node and demand lines of one 'Autoscaler status' block."""
    title = next((line for line in entry.splitlines() if "Autoscaler status" in line), "")
    keep, lines = False, [title.strip("= ")]
    for line in entry.splitlines()[1:]:
        if line.startswith(("Active:", "Pending:", "Pending Demands:")):
            keep = True
        elif line.startswith(("Recent failures:", "Resources", "Total Usage:", "From request_resources:", "---")):
            keep = False
        elif keep and line.strip():
            pass
        else:
            continue
        if keep:
            lines.append("    " + line)
    return lines


def _env() -> dict:
    """The environment of every process of the run: the cluster's settings, this checkout first
    on the path, no network for the model and W&B off."""
    env = {**os.environ, **CLUSTER_ENV, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore::UserWarning"  # matplotlib on the random model's odd tokens
    return env


def _proc(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except OSError:  # stdout gone (its reader died): carry on, the clean-up must still run
        pass


def _run_sweep(args: list[str], env: dict, timeout: float, log: Path) -> tuple[int, str]:
    """`patchscope ARGS` in its own session, killed with its process group past the timeout."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "patchscope"), *args], env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = 124
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return rc, log.read_text()


def read_cells(out_dir: Path):
    import pandas as pd

    files = sorted((out_dir / "results").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files]) if files else pd.DataFrame({"cell_id": [], "worker_node": []})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write a summary of the run here")
    ap.add_argument("--keep", type=Path, help="keep the configs, logs and results in this directory")
    args = ap.parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ray-up-fake-"))
    summary: dict = {"ok": False}
    cluster = None
    try:
        ray_cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
        port, *extra = free_ports(4)
        config = fake_cluster_config(ray_cluster, f"127.0.0.1:{port}")
        from ray.autoscaler._private.util import validate_config

        validate_config(copy.deepcopy(config))  # the derived config passes Ray's own check too
        sweep_path = work / "sweep.yaml"
        out_dir = work / "out"
        sweep_path.write_text(yaml.safe_dump(sweep_config(out_dir), sort_keys=False))
        env = _env()

        wtypes = {k: v for k, v in config["available_node_types"].items() if k != HEAD_TYPE}
        _say(
            "fake cluster: head "
            + json.dumps(config["available_node_types"][HEAD_TYPE]["resources"])
            + "; "
            + "; ".join(
                f"{k} {json.dumps(v['resources'])} x {v['min_workers']}..{v['max_workers']}" for k, v in wtypes.items()
            )
        )

        t = time.monotonic()
        head_cpus = int(config["available_node_types"][HEAD_TYPE]["resources"].get("CPU", 1))
        cluster = FakeCluster(config, work, port, extra, head_cpus)
        cluster.wait_ready(HEAD_START_S)
        before = cluster.alive_nodes()
        summary["head_start_s"] = round(time.monotonic() - t, 1)
        _say(f"head up in {summary['head_start_s']} s at {cluster.address}; nodes before the sweep: {len(before)}")
        for n in before:
            _say(f"  {n['node_id'][-8:]} {n['type']:<18} CPU {n['CPU']:g} GPU {n['GPU']:g}")

        rc, text = _run_sweep(
            ["sweep", str(sweep_path), "--address", cluster.address, "--dry-run"], env, 120, work / "dry_run.log"
        )
        m = re.search(r"(\d+) cells in (\d+) tasks", text)
        if rc != 0 or not m:
            raise RuntimeError(f"dry run failed ({rc}):\n{text[-3000:]}")
        n_cells = int(m.group(1))
        _say(f"grid (patchscope sweep --dry-run): {m.group(0)}")

        timeline: list[tuple[float, int, float]] = []  # (s since the sweep started, alive nodes, GPUs)
        stop_watch = threading.Event()
        t_sweep = time.monotonic()

        def watch() -> None:
            while not stop_watch.is_set():
                nodes = cluster.alive_nodes()
                cluster.note_processes()
                if not timeline or timeline[-1][1:] != (len(nodes), sum(n["GPU"] for n in nodes)):
                    timeline.append((round(time.monotonic() - t_sweep, 1), len(nodes), sum(n["GPU"] for n in nodes)))
                stop_watch.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            rc, text = _run_sweep(
                ["sweep", str(sweep_path), "--address", cluster.address], env, SWEEP_S, work / "sweep.log"
            )
        finally:
            stop_watch.set()
            watcher.join(timeout=10)
        summary["sweep_s"] = round(time.monotonic() - t_sweep, 1)
        after = cluster.alive_nodes()
        _say(f"\n$ patchscope sweep sweep.yaml --address {cluster.address}   (exit {rc}, {summary['sweep_s']} s)")
        lines = [line.split("\r")[-1] for line in text.splitlines() if line.strip()]
        progress = [line for line in lines if re.match(r"fake-autoscaler:\s+\d+%", line)]
        for line in lines:
            if line not in progress[:-1]:
                _say("  " + line)
        _say("\nnodes while the sweep ran (s since it started: alive nodes, GPUs):")
        _say("  " + ", ".join(f"{s:g} s: {n} nodes, {g:g} GPU" for s, n, g in timeline))
        launches = cluster.autoscaler_log()
        _say("autoscaler (monitor.log):")
        for line in launches:
            _say("  " + line)
        _say(f"nodes after the sweep: {len(after)}")
        for n in after:
            _say(f"  {n['node_id'][-8:]} {n['type']:<18} CPU {n['CPU']:g} GPU {n['GPU']:g}")

        listening = cluster.listening()
        _say(f"the cluster's processes listen on: {', '.join(sorted(listening))}")
        df = read_cells(out_dir)
        head_ids = {n["node_id"] for n in before}
        started = {n["node_id"] for n in after} - head_ids
        by_node = df.groupby("worker_node")["cell_id"].nunique().to_dict() if len(df) else {}
        stored = df["cell_id"].nunique()
        _say(
            f"\nresults/*.parquet: {len(df)} rows, {stored} distinct cell_id of {n_cells} in the grid; "
            "cells by node: " + ", ".join(f"{k[-8:]}: {v}" for k, v in sorted(by_node.items()))
        )
        if "worker_device" in df:
            _say(f"worker_device: {', '.join(sorted(set(df['worker_device'])))} (a logical GPU: no CUDA here)")
        summary.update(
            n_cells=n_cells,
            stored_cells=int(stored),
            rows=len(df),
            sweep_rc=rc,
            nodes_before=before,
            nodes_after=after,
            timeline=timeline,
            autoscaler_lines=launches,
            cells_by_node=by_node,
            devices=sorted(set(df["worker_device"])) if "worker_device" in df else [],
            listening=sorted(listening),
        )
        checks = {
            "the sweep exited 0": rc == 0,
            "only the head before the sweep": [n["type"] for n in before] == [HEAD_TYPE],
            "the autoscaler launched worker.gpu nodes": any("worker.gpu" in line for line in launches),
            "worker.gpu nodes joined": any(n["type"] == "worker.gpu" and n["GPU"] >= 1 for n in after),
            "no more nodes than max_workers": len(after) - 1 <= config["max_workers"],
            "every cell stored once": stored == n_cells == len(df),
            "every cell computed on a started node": bool(by_node) and set(by_node) <= started,
            "listening on loopback only": bool(listening) and listening <= LOOPBACK,
        }
        summary["checks"] = checks
        summary["ok"] = all(checks.values())
        _say("\n" + "\n".join(f"{'ok  ' if v else 'FAIL'} {k}" for k, v in checks.items()))
        return 0 if summary["ok"] else 1
    except KeyboardInterrupt as exc:
        summary["error"] = f"interrupted ({exc})"
        _say(summary["error"])
        return 130
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if cluster is not None:
            if args.keep:
                cluster.keep_logs(work)
            t = time.monotonic()
            left = cluster.stop()
            summary["stop_s"] = round(time.monotonic() - t, 1)
            summary["left_running"] = left
            _say(f"cluster stopped in {summary['stop_s']} s; its processes still running: {left or 'none'}")
        summary["total_s"] = round(time.monotonic() - t0, 1)
        _say(f"total {summary['total_s']} s")
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str))
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
