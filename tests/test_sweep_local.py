"""The local backend (`execution.backend: local`, the default for a local sweep of one worker):
the same tasks through the same worker code in the driver's process, without Ray.

Both backends store the same rows for the same config (every sweep kind, run columns aside);
a local sweep imports no Ray, resumes, reports and gives up a failing task as a Ray sweep does;
`backend: local` with more workers or --address is refused. And the local Ray cluster the tool
starts itself keeps token authentication on without Ray's warning about it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps import cli
from sweeps.sinks.store import ResultStore
from tests.golden import common

ROOT = Path(__file__).resolve().parents[1]


def write_run(tmp_path: Path, kind: str, name: str, **execution) -> Path:
    cfg, files = common.RUNS[kind]
    cfg = json.loads(json.dumps(cfg))
    cfg["execution"] = {**cfg["execution"], **execution}
    cfg["output"] = {**cfg["output"], "dir": str(tmp_path / name)}
    run_dir = tmp_path / f"{name}-config"
    return common.write_run_config(run_dir, cfg, files)


def made(out: Path) -> list[str]:
    """What a sweep wrote beside its results: the report's table and pictures."""
    return sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in (".csv", ".png"))


@pytest.mark.ray
@pytest.mark.parametrize("kind", sorted(common.RUNS))
def test_the_local_and_the_ray_backend_store_the_same_rows(kind, ray_cluster, tmp_path, capsys, monkeypatch):
    here = write_run(tmp_path, kind, "local", backend="local")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # any `import ray` on the local path fails the run
        assert cli.main(["sweep", str(here)]) == 0
    out = capsys.readouterr().out
    assert "backend: local: this process runs every task (no Ray)" in out and "ray:" not in out
    n = len(ResultStore(tmp_path / "local").read())
    assert f"{n} of {n} cells stored ({n} computed now" in out

    there = write_run(tmp_path, kind, "ray", backend="ray")
    assert cli.main(["sweep", str(there)]) == 0
    assert "ray: " in capsys.readouterr().out

    local, ray = ResultStore(tmp_path / "local").read(), ResultStore(tmp_path / "ray").read()
    assert n and len(ray) == n
    assert common.same_rows(common.stable(local), common.stable(ray), rel=1e-6, abs_=1e-9) == []
    assert set(local["worker_pid"]) == {os.getpid()}, "the local backend ran in this process"
    assert os.getpid() not in set(ray["worker_pid"]), "the ray backend ran on actors"
    assert made(tmp_path / "local") == made(tmp_path / "ray") and "results.csv" in made(tmp_path / "local")

    # resume: a second local run computes nothing
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)
        assert cli.main(["sweep", str(here)]) == 0
    assert f"{n} already stored" in capsys.readouterr().out
    assert len(ResultStore(tmp_path / "local").read()) == n


def test_a_local_sweep_of_one_worker_needs_no_ray(tmp_path):
    """The default for one worker and no --address; a fresh process never imports Ray."""
    config = write_run(tmp_path, "patchscope", "out")  # workers: 1, no backend named
    script = (
        "import sys\nfrom sweeps.cli import main\nrc = main(['sweep', sys.argv[1]])\n"
        "print('ray imported' if 'ray' in sys.modules else 'no ray')\nsys.exit(rc)\n"
    )
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend: local" in proc.stdout and proc.stdout.rstrip().endswith("no ray"), proc.stdout
    assert len(ResultStore(tmp_path / "out").read()) == 8


def test_auto_is_local_for_one_worker_without_an_address_and_ray_otherwise():
    from sweeps.config import ExecutionConfig

    assert ExecutionConfig(workers=1).resolved(local=True).backend == "local"
    assert ExecutionConfig(workers=2).resolved(local=True).backend == "ray"
    assert ExecutionConfig(workers=1).resolved(local=False).backend == "ray"  # --address
    assert ExecutionConfig(workers=1, backend="ray").resolved(local=True).backend == "ray"
    assert ExecutionConfig(workers=1, backend="local").resolved(local=True).backend == "local"


def test_the_dry_run_says_which_backend(tmp_path, capsys, no_weights):
    assert cli.main(["sweep", str(write_run(tmp_path, "patchscope", "one")), "--dry-run"]) == 0
    assert "backend: local (in this process, no Ray): 1 worker per model" in capsys.readouterr().out
    assert cli.main(["sweep", str(write_run(tmp_path, "patchscope", "two", workers=2)), "--dry-run"]) == 0
    assert "workers: 2 per model" in capsys.readouterr().out


@pytest.mark.parametrize(
    "execution,address,message",
    [
        (
            {"backend": "local", "workers": 2},
            None,
            "error: execution.backend: local runs one worker in this process, but execution.workers is 2",
        ),
        (
            {"backend": "local"},
            "127.0.0.1:1",
            "error: execution.backend: local runs in this process, but --address (or RAY_ADDRESS) joins a Ray cluster",
        ),
    ],
)
def test_a_local_backend_with_more_workers_or_an_address_is_refused(
    tmp_path, capsys, monkeypatch, no_weights, execution, address, message
):
    import sweeps.run.driver

    monkeypatch.setattr(sweeps.run.driver, "connect", lambda *a, **k: pytest.fail("Ray started"))
    config = write_run(tmp_path, "patchscope", "out", **execution)
    code = cli.main(["sweep", str(config)] + (["--address", address] if address else []))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_failing_task_is_given_up_and_the_others_stored(tmp_path, capsys, monkeypatch):
    """As on a Ray actor: the task's cells are not computed, the sweep goes on, exit 1, and the
    next run of the same command computes them."""
    import workers.actor

    real = workers.actor.OPERATIONS["patchscope"]
    calls = []

    def once_broken(engine, payload, batch_size):
        calls.append(payload["task_id"])
        if len(calls) == 1:
            raise RuntimeError("broken task")
        return real(engine, payload, batch_size)

    monkeypatch.setitem(workers.actor.OPERATIONS, "patchscope", once_broken)
    config = write_run(tmp_path, "patchscope", "out")  # 8 cells, batches of 3, two tasks of 2 batches
    assert cli.main(["sweep", str(config)]) == 1
    captured = capsys.readouterr()
    assert f"task {calls[0]} (6 cells of tiny-llama) failed: RuntimeError: broken task" in captured.out
    assert "error: 6 cells (1 task) were not computed; run the same command again" in captured.err
    assert len(ResultStore(tmp_path / "out").read()) == 2
    assert cli.main(["sweep", str(config)]) == 0
    assert len(ResultStore(tmp_path / "out").read()) == 8


@pytest.mark.ray
def test_the_local_ray_cluster_keeps_token_auth_on_without_the_warning(tmp_path):
    """A fresh process starts the tool's own local cluster (RAY_AUTH_MODE unset, as for a user):
    Ray's "Token authentication is enabled ..." warning is not printed, and the cluster, its
    workers included, runs with token authentication."""
    script = (
        "import sys\n"
        "from sweeps.config.sweep import load_config\n"
        "from sweeps.run.cluster import connect\n"
        "assert 'ray' not in sys.modules\n"
        "c = load_config(sys.argv[1])\n"
        "assert connect(None, c.model_copy(update={'execution': c.execution.resolved(local=True)}))\n"
        "import ray\n"
        "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
        "@ray.remote(num_cpus=0)\n"
        "def mode():\n"
        "    import os\n"
        "    return os.environ.get('RAY_AUTH_MODE')\n"
        "print('driver', get_authentication_mode() == AuthenticationMode.TOKEN, 'worker', ray.get(mode.remote()))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path)  # Ray keeps the token it generates in ~/.ray/auth_token
    config = write_run(tmp_path, "patchscope", "out", workers=1)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "driver True worker token" in proc.stdout, proc.stdout
    assert "Token authentication" not in proc.stdout + proc.stderr, proc.stderr
    assert (tmp_path / ".ray" / "auth_token").is_file()
