"""Bad input, as a table: every row is refused with exit status 2 and one line that starts with
the field, before any weights load, before Ray starts and before anything is written.

Each row builds its input for real in a temporary directory (a config, a data file, a mapping
file, a directory of another config's results, a server that is not Ray) and returns the
command line; `expected` is the start of the error line after "error: ".
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import sweeps.run.driver
from sweeps import cli
from tests.configs import changed

BASE = {
    "name": "tiny-bad-input",
    "models": ["tiny-llama"],
    "source": {"prompts": ["Paris", "The quick brown fox"], "layers": [1, 2], "positions": [-1]},
    "target": {"prompt": "Paris is the capital of x", "layers": "same", "positions": [-1]},
    "generation": {"max_new_tokens": 4},
    "output": {"wandb": {"mode": "disabled"}},
}
LONG = "x " * 600  # about 600 tokens: more than the tiny models' context of 512


def sweep(tmp_path: Path, *extra: str, out: str | Path | None = None, text: str | None = None, **changes) -> list[str]:
    """`patchscope sweep` of BASE with changes ('section__key': value), written to tmp_path."""
    cfg = changed(BASE, output__dir=str(out if out is not None else tmp_path / "out"), **changes)
    path = tmp_path / "sweep.yaml"
    if text is not None:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    else:
        path.write_text(yaml.safe_dump(cfg))
    return ["sweep", str(path), *extra]


def inspect(*extra: str) -> list[str]:
    return ["inspect", "--model", "tiny-llama", "--source-prompt", "Paris", "--source-layer", "1",
            "--target-prompt", "Paris is the capital of x", "--target-layer", "1", *extra]


# ---------------------------------------------------------------- building each bad input


def long_source_in_file(tmp):
    data = tmp / "rows.csv"
    data.write_text(f"prompt\nParis\n{LONG}\n")
    return sweep(tmp, source__prompts=None, source__file=str(data))


def non_utf8_config(tmp):
    text = yaml.safe_dump(BASE).replace("Paris is the capital", "Paris est la capitale \udce9")  # a Latin-1 é
    return sweep(tmp, text=text)


def non_utf8_data_file(tmp):
    data = tmp / "rows.csv"
    data.write_bytes("prompt\nParis\nCaf\xe9 au lait\n".encode("latin-1"))
    return sweep(tmp, source__prompts=None, source__file=str(data))


def duplicate_key(tmp):
    text = yaml.safe_dump(BASE).replace("  layers: same\n", "  layers: same\n  layers: [0]\n", 1)
    return sweep(tmp, text=text)


def huge_grid(tmp):
    # 250 rows (one 500-token prompt, told apart by a reference column) x 4 layers x 500 source positions
    # x 4 target layers x 500 target positions = 10^9 cells
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": "x " * 498, "id": str(i)}) + "\n" for i in range(250)))
    return sweep(tmp, source__prompts=None, source__file=str(data), source__layers="all", source__positions="all",
                 target__layers="all", target__prompt="x " * 500, target__positions=list(range(-500, 0)),
                 generation__max_new_tokens=1)


def output_dir_is_a_file(tmp):
    (tmp / "taken").write_text("not a directory")
    return sweep(tmp, out=tmp / "taken" / "out")


def mapping_file(kind):
    def build(tmp):
        path = tmp / ("map.safetensors" if kind == "text.safetensors" else "map.pt")
        if kind in ("text", "text.safetensors"):
            path.write_text("W = [[1, 0], [0, 1]]\n")
        elif kind == "bare tensor":
            torch.save(torch.eye(64), path)
        elif kind == "W as a string":
            torch.save({"W": "eye(64)"}, path)
        elif kind == "pickle":
            path.write_bytes(pickle.dumps(_Exploit(tmp / "pwned")))
        return inspect("--mapping", str(path))
    return build


class _Exploit:
    """A pickle that would run code when loaded without weights_only."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def listening(kind):
    """A server on a free loopback port that is not Ray; returns the sweep's command line."""
    def build(tmp):
        if kind == "web":
            server = http.server.HTTPServer(("127.0.0.1", 0), _QuietHandler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            _STOP.append(server.shutdown)
            port = server.server_address[1]
        else:  # accepts connections and never says a word
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(4)
            _STOP.append(server.close)
            port = server.getsockname()[1]
        return sweep(tmp, "--address", f"127.0.0.1:{port}")
    return build


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


_STOP: list = []  # how to stop the servers rows started


@pytest.fixture(autouse=True)
def _stop_servers():
    yield
    while _STOP:
        _STOP.pop()()


def nothing_listening(tmp):
    with socket.socket() as s:  # free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return sweep(tmp, "--address", f"127.0.0.1:{port}")


NO_CUDA = not torch.cuda.is_available()

BAD_INPUT = [
    # (id, builds the input and returns the command line, start of the error line)
    ("target prompt longer than the context", lambda t: sweep(t, target__prompt=LONG),
     "target.prompt: 60"),
    ("target prompt + max_new_tokens past the context", lambda t: sweep(t, target__prompt="x " * 480,
                                                                         generation__max_new_tokens=100),
     "target.prompt: 48"),
    ("source prompt in a file longer than the context", long_source_in_file,
     "source.prompt_column: source.file row 2: 60"),
    ("max_new_tokens of a billion", lambda t: sweep(t, generation__max_new_tokens=1_000_000_000),
     "generation.max_new_tokens: 1000000000 does not fit tiny-llama's context of 512 tokens"),
    ("grid larger than execution.max_cells", lambda t: sweep(t, execution={"max_cells": 3}),
     "execution.max_cells: the grid has 4 cells, more than the limit of 3"),
    ("grid of a billion cells", huge_grid,
     "execution.max_cells: the grid has 1,000,000,000 cells, more than the limit of 10,000,000"),
    ("grid of a billion cells, dry run", lambda t: huge_grid(t) + ["--dry-run"],
     "execution.max_cells: the grid has 1,000,000,000 cells"),
    ("output.dir is a file", output_dir_is_a_file,
     "output.dir: {tmp}/taken is a file, not a directory (the nearest existing part of {tmp}/taken/out)"),
    ("output.dir under /proc", lambda t: sweep(t, out="/proc/patchscope-out"),
     "output.dir: cannot write in /proc (the nearest existing part of /proc/patchscope-out): a kernel file system"),
    ("non-UTF-8 config", non_utf8_config, "config: {tmp}/sweep.yaml is not UTF-8 text (byte 0xe9 on line "),
    ("non-UTF-8 data file", non_utf8_data_file, "source.file: {tmp}/rows.csv is not UTF-8 text (byte 0xe9 on line 3)"),
    ("a key given twice in the YAML", duplicate_key, "target.layers: given twice (lines "),
    ("--address where nothing listens", nothing_listening, "--address: no Ray cluster answers at 127.0.0.1:"),
    ("--address where a web server listens", listening("web"), "--address: 127.0.0.1:"),
    ("--address where a server never answers", listening("silent"),
     "--address: no Ray cluster answers at 127.0.0.1:"),
    ("mapping file of text", mapping_file("text"), "mapping.path: cannot read "),
    ("mapping .safetensors of text", mapping_file("text.safetensors"), "mapping.path: cannot read "),
    ("mapping file of a bare tensor", mapping_file("bare tensor"), "mapping.path: {tmp}/map.pt holds a Tensor, not a dict"),
    ("mapping W as a string", mapping_file("W as a string"), "mapping.W: {tmp}/map.pt holds a str as 'W'"),
    ("mapping file that is a malicious pickle", mapping_file("pickle"), "mapping.path: cannot read "),
    ("--device tpu9", lambda t: inspect("--device", "tpu9"), "--device: 'tpu9' is not a device"),
    pytest.param("--device cuda without CUDA", lambda t: inspect("--device", "cuda"),
                 "--device: 'cuda', but this machine has no CUDA GPU",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
    pytest.param("gpus_per_worker: 1 on a machine without GPUs", lambda t: sweep(t, execution={"gpus_per_worker": 1}),
                 "execution.gpus_per_worker: 1 GPU per worker, but this machine has 0",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")),
]


def _case(row):
    return row.values if hasattr(row, "values") else row


@pytest.fixture
def nothing_may_start(no_weights, monkeypatch):
    """Loading weights (no_weights), starting or joining Ray fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was refused")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(sweeps.run.driver, "connect", refuse)


@pytest.mark.parametrize("build, expected", [_case(r)[1:] for r in BAD_INPUT],
                         ids=[_case(r)[0] for r in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_naming_the_field(tmp_path, capsys, nothing_may_start, build, expected):
    argv = build(tmp_path)
    expected = expected.format(tmp=tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    code = cli.main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {expected}"), err
    assert err.count("\n") == 1, f"more than one line:\n{err}"
    assert "weights_only=False" not in err, "never advise unpickling code"
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before, "refusing bad input wrote something"
    assert not (tmp_path / "pwned").exists(), "the pickle ran code"
    assert elapsed < 30, f"took {elapsed:.0f} s to refuse"


def test_output_dir_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    """As root every directory is writable: drop the capabilities that let root ignore permissions."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    argv = sweep(tmp_path, out=locked / "out")
    command = [str(Path(sys.executable).with_name("patchscope")), *argv]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: no directory is unwritable")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: output.dir: cannot write in {locked} (the nearest existing part of "), proc.stderr
    assert proc.stderr.count("\n") == 1 and not list(locked.iterdir())


def test_planning_a_million_cells_takes_seconds(tmp_path, capsys):
    """10^6 cells: counted, not expanded, for --dry-run (and then planned lazily by a run)."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Entity number {i} is"}) + "\n" for i in range(500)))
    argv = sweep(tmp_path, "--dry-run", source__prompts=None, source__file=str(data), source__layers="all",
                 source__positions=[-1, -2, -3, -4, 0], target__layers="all",
                 target__prompt="Paris is the capital of France. The capital city of x is where x lives, and x",
                 target__positions=list(range(-25, 0)))
    cli.main(argv)  # warm: imports and the tokenizer
    capsys.readouterr()
    t0 = time.perf_counter()
    assert cli.main(argv) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "1000000 cells in 62500 tasks" in out and "0 of these cells already stored, 1000000 to run in 62500 tasks" in out
    assert elapsed < 10, f"planning 10^6 cells took {elapsed:.1f} s"
    print(f"dry run of 10^6 cells: {elapsed:.2f} s")
