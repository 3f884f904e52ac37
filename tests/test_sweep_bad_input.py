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
from sweeps.sinks.store import ResultStore
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


IV = {  # an intervention sweep
    "name": "tiny-bad-intervention",
    "kind": "intervention",
    "models": ["tiny-llama"],
    "prompts": {
        "rows": [
            {"prompt": "Paris is the capital of", "answer": " France", "subject": "Paris"},
            {"prompt": "The Eiffel Tower is in", "answer": " Paris", "subject": "The Eiffel Tower"},
        ],
        "answer_column": "answer",
    },
    "intervention": {"site": "blocks.{layer}.attn.hook_z", "layers": [1, 2], "heads": [0, 1], "kind": "zero"},
    "generation": {"max_new_tokens": 4},
    "output": {"wandb": {"mode": "disabled"}},
}
TRACE = {  # a causal-trace sweep
    "name": "tiny-bad-trace",
    "kind": "causal_trace",
    "models": ["tiny-llama"],
    "prompts": {"rows": IV["prompts"]["rows"], "answer_column": "answer", "subject_column": "subject"},
    "trace": {"sites": ["resid_post"], "layers": [1, 2], "positions": [-1], "samples": 2},
    "output": {"wandb": {"mode": "disabled"}},
}
CHAINS = (
    "first_hop,bridge,second_hop,answer\n"
    "the company that created Xbox,Microsoft,Who is the CEO of,Satya Nadella\n"
    "the country of the Colosseum,Italy,The capital city of,Rome\n"
)
ENTITIES = "entity,description\nParis,capital of France\nToyota,Japanese car maker\n"
LRE_HEADER = "prompt_target\tsubject\tobject\tsource_cropped_toks\n"
LRE_ROW = "The capital city of x\tFrance\tParis\t[' the', ' country', ' of', ' France']\n"
RECIPE = {  # a recipe sweep; the section is one of RECIPES
    "name": "tiny-bad-recipe",
    "kind": "recipe",
    "models": ["tiny-llama"],
    "generation": {"max_new_tokens": 4},
    "output": {"wandb": {"mode": "disabled"}},
}
RECIPES = {
    "multi_hop": {"name": "multi_hop", "file": "chains.csv", "source_layers": [0, 2], "target_layers": [1, 3]},
    "entity_description": {"name": "entity_description", "file": "entities.csv", "layers": [1, 2]},
    "attribute_extraction": {
        "name": "attribute_extraction",
        "data": "lre",
        "relations": ["capitals"],
        "source_layers": [1],
        "target_layers": [1],
    },
    "token_identity": {
        "name": "token_identity",
        "layers": "all",
        "words": 16,
        "windows": 3,
        "positions": 2,
        "min_context": 4,
        "fit_windows": 12,
    },
}


def sweep(
    tmp_path: Path, *extra: str, out: str | Path | None = None, text: str | None = None, base: dict = BASE, **changes
) -> list[str]:
    """`patchscope sweep` of `base` (BASE) with changes ('section__key': value), written to tmp_path."""
    cfg = changed(base, output__dir=str(out if out is not None else tmp_path / "out"), **changes)
    path = tmp_path / "sweep.yaml"
    if text is not None:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    else:
        path.write_text(yaml.safe_dump(cfg))
    return ["sweep", str(path), *extra]


def inspect(*extra: str) -> list[str]:
    return [
        "inspect",
        "--model",
        "tiny-llama",
        "--source-prompt",
        "Paris",
        "--source-layer",
        "1",
        "--target-prompt",
        "Paris is the capital of x",
        "--target-layer",
        "1",
        *extra,
    ]


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
    return sweep(
        tmp,
        source__prompts=None,
        source__file=str(data),
        source__layers="all",
        source__positions="all",
        target__layers="all",
        target__prompt="x " * 500,
        target__positions=list(range(-500, 0)),
        generation__max_new_tokens=1,
    )


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


def iv(tmp, *extra, **changes):
    return sweep(tmp, *extra, base=IV, **changes)


def trace(tmp, *extra, **changes):
    return sweep(tmp, *extra, base=TRACE, **changes)


def recipe(name, lre: str = LRE_HEADER + LRE_ROW, chains: str = CHAINS, entities: str = ENTITIES, **changes):
    """A recipe sweep with its data files (chains.csv, entities.csv, lre/factual/capitals.tsv) written."""

    def build(tmp, *extra):
        (tmp / "chains.csv").write_text(chains)
        (tmp / "entities.csv").write_text(entities)
        (tmp / "lre" / "factual").mkdir(parents=True)
        (tmp / "lre" / "factual" / "capitals.tsv").write_bytes(lre.encode("utf-8", "surrogateescape"))
        return sweep(tmp, *extra, base={**RECIPE, "recipe": RECIPES[name]}, **changes)

    return build


def data_file(name: str, content: bytes | str, then):
    """Write `content` to tmp/name, then build the command line with `then(tmp, path)`."""

    def build(tmp):
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return then(tmp, str(path))

    return build


BINARY = b"PK\x03\x04\x14\x00\x00\x00\x08\x00"  # a zip file's first bytes: valid UTF-8, but binary
LATIN1 = "Caf\xe9 au lait\n".encode("latin-1")


def vector_file(value, name: str = "v.pt"):
    def build(tmp):
        path = tmp / name
        if isinstance(value, bytes):
            path.write_bytes(value)
        elif name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({"vector": value}, str(path))
        else:
            torch.save(value, path)
        return iv(
            tmp,
            intervention__kind="add",
            intervention__vector=str(path),
            intervention__site="blocks.{layer}.hook_resid_post",
            intervention__heads=None,
        )

    return build


def _with(tmp, **changes) -> str:
    """Rewrite tmp/sweep.yaml with changes; returns its path."""
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(changed(yaml.safe_load(path.read_text()), **changes)))
    return str(path)


def nan_at(n: int, index: int, value=float("nan")):
    v = torch.zeros(n)
    v[index] = value
    return v


def mapping_tensors(W, b=None):
    def build(tmp):
        path = tmp / "map.pt"
        torch.save({"W": W, **({"b": b} if b is not None else {})}, path)
        return inspect("--mapping", str(path))

    return build


def alias_bomb(tmp):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    text = yaml.safe_dump(changed(IV, output__dir=str(tmp / "out"))) + "\n".join(lines) + "\n"
    return sweep(tmp, text=text)


def busy_dir(tmp):
    """Another sweep holds output.dir's lock (a child process, so the lock is really someone else's)."""
    out = tmp / "out"
    out.mkdir()
    (out / ".lock").write_text("")
    lock_path = ResultStore(out).lock_path
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import fcntl, json, sys, time\n"
                f"fh = open({str(lock_path)!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX)\n"
                "fh.write(json.dumps({'pid': 1, 'host': 'h', 'started': 's', 'command': 'patchscope sweep other.yaml'})); fh.flush()\n"
                "print('locked', flush=True); time.sleep(60)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    _STOP.append(proc.kill)
    # a grid that takes long to plan: the lock must be checked before it
    return iv(
        tmp,
        intervention__kind="noise",
        intervention__noise_scale=[float(i) for i in range(300)],
        intervention__seed=list(range(300)),
    )


def report_dir(kind: str):
    """`patchscope report DIR` of a directory whose result file or manifest is wrong."""

    def build(tmp):
        out = tmp / "out"
        store = ResultStore(out)
        store.open({"name": "x", "kind": "intervention"}, "h", 1)
        row = {
            "cell_id": "c1",
            "model": "tiny-llama",
            "delta_logprob": 0.5,
            "site": "blocks.1.attn.hook_z",
            "head": 0,
            "kind": "zero",
        }
        if kind == "lacks columns":
            store.write("t1", [row])
        elif kind == "text numbers":
            full = {
                c: None
                for c in (
                    "prompt",
                    "answer",
                    "neuron",
                    "alpha",
                    "factor",
                    "noise_scale",
                    "seed",
                    "positions",
                    "answer_logprob",
                    "baseline_answer_logprob",
                )
            }
            store.write("t1", [{**full, **row, "row": 0, "layer": 1, "delta_logprob": "0.5"}])
        elif kind == "manifest list":
            store.write("t1", [row])
            store.manifest_path.write_text("[1, 2]")
        return ["report", str(out)]

    return build


NO_CUDA = not torch.cuda.is_available()

BAD_INPUT = [
    # (id, builds the input and returns the command line, start of the error line)
    ("target prompt longer than the context", lambda t: sweep(t, target__prompt=LONG), "target.prompt: 60"),
    (
        "target prompt + max_new_tokens past the context",
        lambda t: sweep(t, target__prompt="x " * 480, generation__max_new_tokens=100),
        "target.prompt: 48",
    ),
    (
        "source prompt in a file longer than the context",
        long_source_in_file,
        "source.prompt_column: source.file row 2: 60",
    ),
    (
        "max_new_tokens of a billion",
        lambda t: sweep(t, generation__max_new_tokens=1_000_000_000),
        "generation.max_new_tokens: 1000000000 does not fit tiny-llama's context of 512 tokens",
    ),
    (
        "grid larger than execution.max_cells",
        lambda t: sweep(t, execution={"max_cells": 3}),
        "execution.max_cells: the grid has 4 cells, more than the limit of 3",
    ),
    (
        "grid of a billion cells",
        huge_grid,
        "execution.max_cells: the grid has 1,000,000,000 cells, more than the limit of 10,000,000",
    ),
    (
        "grid of a billion cells, dry run",
        lambda t: huge_grid(t) + ["--dry-run"],
        "execution.max_cells: the grid has 1,000,000,000 cells",
    ),
    (
        "output.dir is a file",
        output_dir_is_a_file,
        "output.dir: {tmp}/taken is a file, not a directory (the nearest existing part of {tmp}/taken/out)",
    ),
    (
        "output.dir under /proc",
        lambda t: sweep(t, out="/proc/patchscope-out"),
        "output.dir: cannot write in /proc (the nearest existing part of /proc/patchscope-out): a kernel file system",
    ),
    ("non-UTF-8 config", non_utf8_config, "config: {tmp}/sweep.yaml is not UTF-8 text (byte 0xe9 on line "),
    ("non-UTF-8 data file", non_utf8_data_file, "source.file: {tmp}/rows.csv is not UTF-8 text (byte 0xe9 on line 3)"),
    ("a key given twice in the YAML", duplicate_key, "target.layers: given twice (lines "),
    ("--address where nothing listens", nothing_listening, "--address: no Ray cluster answers at 127.0.0.1:"),
    ("--address where a web server listens", listening("web"), "--address: 127.0.0.1:"),
    ("--address where a server never answers", listening("silent"), "--address: no Ray cluster answers at 127.0.0.1:"),
    ("mapping file of text", mapping_file("text"), "mapping.path: cannot read "),
    ("mapping .safetensors of text", mapping_file("text.safetensors"), "mapping.path: cannot read "),
    (
        "mapping file of a bare tensor",
        mapping_file("bare tensor"),
        "mapping.path: {tmp}/map.pt holds a Tensor, not a dict",
    ),
    ("mapping W as a string", mapping_file("W as a string"), "mapping.W: {tmp}/map.pt holds a str as 'W'"),
    ("mapping file that is a malicious pickle", mapping_file("pickle"), "mapping.path: cannot read "),
    ("--device tpu9", lambda t: inspect("--device", "tpu9"), "--device: 'tpu9' is not a device"),
    # ---- intervention, causal-trace and recipe sweeps (issue 20): crashes that were tracebacks
    ("intervention.site: []", lambda t: iv(t, intervention__site=[]), "intervention.site: empty list"),
    (
        "intervention.site with a field other than {layer}",
        lambda t: iv(t, intervention__site="blocks.{layer}.{x}"),
        "intervention.site: 'blocks.{layer}.{x}': a template may use {layer} only, not {x}",
    ),
    (
        "reference prompts file not UTF-8",
        data_file("ref.txt", LATIN1, lambda t, p: iv(t, intervention__kind="mean", intervention__reference=p)),
        "intervention.reference: {tmp}/ref.txt is not UTF-8 text (byte 0xe9 on line 1)",
    ),
    (
        "positive prompts file binary",
        data_file(
            "pos.txt",
            BINARY,
            lambda t, p: iv(t, intervention__kind="add", intervention__positive=p, intervention__negative=["x"]),
        ),
        "intervention.positive: {tmp}/pos.txt is a binary file, not text (a NUL byte on line 1)",
    ),
    (
        "negative prompts file not UTF-8",
        data_file(
            "neg.txt",
            LATIN1,
            lambda t, p: iv(t, intervention__kind="add", intervention__positive=["x"], intervention__negative=p),
        ),
        "intervention.negative: {tmp}/neg.txt is not UTF-8 text",
    ),
    (
        "entities file not UTF-8",
        data_file(
            "ents.csv",
            b"entity,description\n" + LATIN1.replace(b"\n", b",x\n"),
            lambda t, p: recipe("entity_description", recipe__file=p)(t),
        ),
        "recipe.file: {tmp}/ents.csv is not UTF-8 text (byte 0xe9 on line 2)",
    ),
    (
        "chains file binary",
        data_file("ch.csv", BINARY, lambda t, p: recipe("multi_hop", recipe__file=p)(t)),
        "recipe.file: {tmp}/ch.csv is a binary file",
    ),
    (
        "LRE file not UTF-8",
        recipe("attribute_extraction", lre=LRE_HEADER + "The capital city of x\tCaf\udce9\tx\t['a']\n"),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv is not UTF-8 text (byte 0xe9 on line 2)",
    ),
    (
        "LRE file without a subject column",
        recipe(
            "attribute_extraction",
            lre="prompt_target\tobject\tsource_cropped_toks\nThe capital city of x\tParis\t[' France']\n",
        ),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv has no column subject",
    ),
    (
        "LRE ragged row (short)",
        recipe("attribute_extraction", lre=LRE_HEADER + LRE_ROW + "The capital city of x\tSpain\n"),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv row 2 has an empty or missing object, source_cropped_toks",
    ),
    (
        "LRE ragged row (long)",
        recipe("attribute_extraction", lre=LRE_HEADER + LRE_ROW.replace("\n", "\textra\n")),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv line 2 has 5 fields, more than the header's 4",
    ),
    (
        "LRE malformed source_cropped_toks",
        recipe("attribute_extraction", lre=LRE_HEADER + LRE_ROW.replace("']", "'")),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv row 1: source_cropped_toks must be a non-empty list of strings",
    ),
    (
        "LRE code in source_cropped_toks",
        recipe(
            "attribute_extraction",
            lre=LRE_HEADER
            + LRE_ROW.replace("[' the', ' country', ' of', ' France']", "__import__('os').system('touch pwned')"),
        ),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv row 1: source_cropped_toks must be a non-empty list",
    ),
    (
        "LRE empty file",
        recipe("attribute_extraction", lre=""),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv has no rows",
    ),
    (
        "LRE header-only file",
        recipe("attribute_extraction", lre=LRE_HEADER),
        "recipe.relations: {tmp}/lre/factual/capitals.tsv has no rows",
    ),
    (
        "entities file header only",
        recipe("entity_description", entities="entity,description\n"),
        "recipe.file: {tmp}/entities.csv has no rows",
    ),
    ("chains file empty", recipe("multi_hop", chains=""), "recipe.file: {tmp}/chains.csv has no rows"),
    (
        "chains row with more fields than the header",
        recipe("multi_hop", chains=CHAINS + "a,b,c,d,e\n"),
        "recipe.file: {tmp}/chains.csv line 4 has 5 fields, more than the header's 4",
    ),
    (
        "entity source_template with another field",
        recipe("entity_description", recipe__source_template="{other} {entity}"),
        "recipe.source_template: a template may use {entity} only, not {other}",
    ),
    (
        "entity source_template with a positional field",
        recipe("entity_description", recipe__source_template="{} {entity}"),
        "recipe.source_template: a template may use {entity} only, not a positional field {}",
    ),
    (
        "entity source_template with a bad conversion",
        recipe("entity_description", recipe__source_template="x {entity!z}"),
        "recipe.source_template: the conversion !z on {entity} is not one of !r, !s, !a",
    ),
    (
        "entity source_template without {entity}",
        recipe("entity_description", recipe__source_template="Tell me about it"),
        "recipe.source_template: the template must use {entity}",
    ),
    (
        "multi-hop target_template with an attribute",
        recipe("multi_hop", recipe__target_template="{first_hop.nope}?"),
        "recipe.target_template: a template may use {first_hop}, {bridge}, {second_hop}, {answer} only, not {first_hop.nope}",
    ),
    (
        "inspect --temperature nan",
        lambda t: inspect("--seed", "0", "--temperature", "nan"),
        "--temperature: expected a finite number, got nan",
    ),
    (
        "inspect --temperature inf",
        lambda t: inspect("--seed", "0", "--temperature", "inf"),
        "--temperature: expected a finite number, got inf",
    ),
    (
        "inspect --seed 2**70",
        lambda t: inspect("--seed", str(2**70)),
        f"--seed: {2**70} is out of range 0 .. 4294967295",
    ),
    (
        "intervene noise --seed 2**70",
        lambda t: [
            "intervene",
            "--model",
            "tiny-llama",
            "--prompt",
            "Paris is",
            "--site",
            "blocks.1.hook_resid_post",
            "--kind",
            "noise",
            "--seed",
            str(2**70),
        ],
        f"--seed: {2**70} is out of range 0 .. 4294967295",
    ),
    (
        "report: a result file that lacks columns",
        report_dir("lacks columns"),
        "dir: {tmp}/out/results/task-t1.parquet lacks the column(s) row, layer, neuron, alpha, factor, noise_scale, seed, "
        "answer_logprob, baseline_answer_logprob, prompt of a intervention sweep's results",
    ),
    (
        "report: numbers stored as text",
        report_dir("text numbers"),
        "dir: {tmp}/out/results/task-t1.parquet: column delta_logprob holds str values such as '0.5', not numbers",
    ),
    (
        "report: manifest.json that is a JSON list",
        report_dir("manifest list"),
        "dir: {tmp}/out/manifest.json is damaged (a JSON list, not an object)",
    ),
    # ---- accepted before, giving empty or NaN results
    *[
        (
            f"intervention.{key}: []",
            (lambda key, kind: lambda t: iv(t, **{"intervention__kind": kind, f"intervention__{key}": []}))(key, kind),
            f"intervention.{key}: empty list",
        )
        for key, kind in (
            ("kind", []),
            ("alpha", "add"),
            ("factor", "scale"),
            ("noise_scale", "noise"),
            ("seed", "noise"),
        )
    ],
    (
        "intervention.to: []",
        lambda t: iv(
            t,
            intervention__kind="knockout",
            intervention__to=[],
            intervention__site="blocks.{layer}.attn",
            intervention__heads=None,
        ),
        "intervention.to: empty list",
    ),
    ("trace.sites: []", lambda t: trace(t, trace__sites=[]), "trace.sites: List should have at least 1 item"),
    (
        "vector file with a NaN (add)",
        vector_file(nan_at(64, 5)),
        "intervention.vector: {tmp}/v.pt holds nan at index [5]",
    ),
    (
        "vector file with inf (replace)",
        lambda t: (
            vector_file(nan_at(64, 63, float("inf")), "v.safetensors")(t)[:1] + [_with(t, intervention__kind="replace")]
        ),
        "intervention.vector: {tmp}/v.safetensors holds inf at index [63]",
    ),
    (
        "mapping W with a NaN",
        mapping_tensors(nan_at(64 * 64, 70).reshape(64, 64)),
        "mapping.W: {tmp}/map.pt holds nan at index [1, 6]",
    ),
    (
        "mapping b with inf",
        mapping_tensors(torch.eye(64), nan_at(64, 0, float("-inf"))),
        "mapping.b: {tmp}/map.pt holds -inf at index [0]",
    ),
    (
        "trace.noise: .inf",
        lambda t: trace(t, trace__noise=float("inf")),
        "trace.noise: Input should be a finite number",
    ),
    (
        "trace.noise: .nan",
        lambda t: trace(t, trace__noise=float("nan")),
        "trace.noise: Input should be a finite number",
    ),
    (
        "intervention.seed past 2**32",
        lambda t: iv(t, intervention__kind="noise", intervention__seed=[0, 2 * 10**13]),
        "intervention.seed: 20000000000000 is out of range 0 .. 4294967295",
    ),
    (
        "trace.seed past 2**32",
        lambda t: trace(t, trace__seed=2 * 10**13),
        "trace.seed: Input should be less than or equal to 4294967295",
    ),
    (
        "generation.seed past 2**32",
        lambda t: iv(t, generation__seed=2 * 10**13),
        "generation.seed: Input should be less than or equal to 4294967295",
    ),
    (
        "recipe.seed past 2**32",
        recipe("multi_hop", recipe__seed=2**40),
        "recipe.seed: Input should be less than or equal to 4294967295",
    ),
    (
        "causal-trace prompt longer than the context",
        lambda t: trace(t, prompts__rows=[{"prompt": LONG + " Paris is in", "subject": "Paris", "answer": " France"}]),
        "prompts.prompt_column: prompts.rows row 1: 60",
    ),
    (
        "intervention prompt longer than the context",
        lambda t: iv(t, prompts__rows=[{"prompt": LONG, "answer": " x"}]),
        "prompts.prompt_column: prompts.rows row 1: 60",
    ),
    (
        "intervention prompt + max_new_tokens past the context",
        lambda t: iv(t, prompts__rows=[{"prompt": "x " * 480, "answer": " x"}], generation__max_new_tokens=100),
        "generation.max_new_tokens: 48",
    ),
    (
        "CSV row with more fields than the header",
        data_file(
            "rows.csv",
            "prompt,answer\nParis, the capital,  France\n",
            lambda t, p: iv(t, prompts__rows=None, prompts__file=p),
        ),
        "prompts.file: {tmp}/rows.csv line 2 has 3 fields, more than the header's 2 (a ',' inside a value must be quoted)",
    ),
    (
        "TSV row with more fields than the header",
        data_file(
            "rows.tsv", "prompt\tanswer\nParis\tis\t France\n", lambda t, p: iv(t, prompts__rows=None, prompts__file=p)
        ),
        "prompts.file: {tmp}/rows.tsv line 2 has 3 fields, more than the header's 2 (a tab inside",
    ),
    (
        "source.file CSV row with more fields",
        data_file(
            "src.csv", "prompt\nParis\nLondon, UK\n", lambda t, p: sweep(t, source__prompts=None, source__file=p)
        ),
        "source.file: {tmp}/src.csv line 3 has 2 fields",
    ),
    # ---- hangs
    (
        "a YAML alias bomb",
        alias_bomb,
        "config: {tmp}/sweep.yaml expands to more than 1,000,000 values through its aliases",
    ),
    (
        "a YAML alias inside its own anchor",
        lambda t: sweep(t, text=yaml.safe_dump(changed(IV, output__dir=str(t / "out"))) + "loop: &loop [1, *loop]\n"),
        "config: the alias on line ",
    ),
    (
        "YAML nested 3000 deep",
        lambda t: sweep(t, text="name: x\nmodels: [tiny-llama]\nsource: " + "[" * 3000 + "]" * 3000 + "\n"),
        "config: {tmp}/sweep.yaml is nested too deeply to read",
    ),
    (
        "prompts.file JSONL nested 100000 deep",
        data_file(
            "rows.jsonl",
            '{"prompt": ' + "[" * 100000 + "]" * 100000 + "}\n",
            lambda t, p: iv(t, prompts__rows=None, prompts__file=p),
        ),
        "prompts.file: {tmp}/rows.jsonl line 1 is not JSON",
    ),
    (
        "10^6 noise_scale x seed cells past max_cells",
        lambda t: iv(
            t,
            intervention__kind="noise",
            intervention__noise_scale=[float(i) for i in range(1000)],
            intervention__seed=list(range(1000)),
            execution={"max_cells": 10**6},
        ),
        "execution.max_cells: the grid has 8,000,000 cells, more than the limit of 1,000,000",
    ),
    (
        "10^6 noise cells past max_cells, dry run",
        lambda t: iv(
            t,
            "--dry-run",
            intervention__kind="noise",
            intervention__noise_scale=[float(i) for i in range(1000)],
            intervention__seed=list(range(1000)),
            execution={"max_cells": 10**6},
        ),
        "execution.max_cells: the grid has 8,000,000 cells",
    ),
    (
        "causal trace past max_cells",
        lambda t: trace(
            t,
            prompts__rows=[
                {"prompt": f"Fact {i}: Paris is in", "subject": "Paris", "answer": " France"} for i in range(2000)
            ],
            trace__sites=["resid_post", "mlp_out", "attn_out"],
            trace__layers="all",
            trace__positions=list(range(-5, 0)),
            execution={"max_cells": 100_000},
        ),
        "execution.max_cells: the grid has 120,000 cells, more than the limit of 100,000",
    ),
    (
        "causal trace over all positions past max_cells",
        data_file(
            "facts.jsonl",
            "".join(
                json.dumps({"prompt": "x " * 400 + f"fact {i}: Paris is in", "subject": "Paris", "answer": " France"})
                + "\n"
                for i in range(3000)
            ),
            lambda t, p: trace(
                t,
                prompts__rows=None,
                prompts__file=p,
                trace__positions="all",
                trace__sites=["resid_post", "mlp_out", "attn_out"],
                trace__layers="all",
            ),
        ),
        "execution.max_cells: the grid has 10,0",
    ),
    (
        "token-identity recipe past max_cells",
        recipe("token_identity", recipe__windows=400, recipe__positions=4, execution={"max_cells": 1000}),
        "execution.max_cells: the grid has 19,200 cells, more than the limit of 1,000",
    ),
    ("another sweep is running into output.dir", busy_dir, "output.dir: another sweep is running into {tmp}/out"),
    # ---- unclear messages
    (
        "prompts.file JSONL bad line",
        data_file(
            "rows.jsonl",
            '{"prompt": "Paris", "answer": " x"}\n{"prompt": \n',
            lambda t, p: iv(t, prompts__rows=None, prompts__file=p),
        ),
        "prompts.file: {tmp}/rows.jsonl line 2 is not JSON",
    ),
    (
        "prompts.file JSONL array",
        data_file(
            "rows.jsonl",
            '[{"prompt": "Paris", "answer": " x"}]\n',
            lambda t, p: iv(t, prompts__rows=None, prompts__file=p),
        ),
        "prompts.file: {tmp}/rows.jsonl line 1 is not a JSON object",
    ),
    (
        "prompts.file not UTF-8",
        data_file(
            "rows.csv",
            b"prompt,answer\n" + LATIN1.replace(b"\n", b", x\n"),
            lambda t, p: iv(t, prompts__rows=None, prompts__file=p),
        ),
        "prompts.file: {tmp}/rows.csv is not UTF-8 text (byte 0xe9 on line 2)",
    ),
    (
        "prompts.file binary",
        data_file("rows.jsonl", BINARY, lambda t, p: iv(t, prompts__rows=None, prompts__file=p)),
        "prompts.file: {tmp}/rows.jsonl is a binary file",
    ),
    (
        "prompts.file .txt",
        data_file("rows.txt", "Paris\n", lambda t, p: iv(t, prompts__rows=None, prompts__file=p)),
        "prompts.file: {tmp}/rows.txt must end in .csv, .tsv or .jsonl",
    ),
    (
        "unknown model (the hub's message has newlines)",
        lambda t: iv(t, models=["no-such-org/no-such-model"]),
        "models[0]: cannot load 'no-such-org/no-such-model' (",
    ),
    (
        "inspect with an unknown model",
        lambda t: inspect()[:1] + ["--model", "no-such-org/no-such-model"] + inspect()[3:],
        "model: cannot load 'no-such-org/no-such-model' (",
    ),
    (
        "YAML syntax error",
        lambda t: sweep(t, text="name: x\nmodels: [tiny-llama\nsource: {prompts: [a]}\n"),
        "config: {tmp}/sweep.yaml is not valid YAML (expected ',' or ']', but got ':' on line 3, column 7",
    ),
    (
        "multi-hop empty hop2_template",
        recipe("multi_hop", recipe__hop2_template=""),
        "recipe.hop2_template: empty template",
    ),
    (
        "multi-hop blank source_template",
        recipe("multi_hop", recipe__source_template="  "),
        "recipe.source_template: empty template",
    ),
    pytest.param(
        "--device cuda without CUDA",
        lambda t: inspect("--device", "cuda"),
        "--device: 'cuda', but this machine has no CUDA GPU",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
    pytest.param(
        "gpus_per_worker: 1 on a machine without GPUs",
        lambda t: sweep(t, execution={"gpus_per_worker": 1}),
        "execution.gpus_per_worker: 1 GPU per worker, but this machine has 0",
        marks=pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA"),
    ),
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


@pytest.mark.parametrize("build, expected", [_case(r)[1:] for r in BAD_INPUT], ids=[_case(r)[0] for r in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_naming_the_field(tmp_path, capsys, nothing_may_start, build, expected):
    argv = build(tmp_path)
    expected = expected.replace("{tmp}", str(tmp_path))
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
    assert proc.stderr.startswith(f"error: output.dir: cannot write in {locked} (the nearest existing part of "), (
        proc.stderr
    )
    assert proc.stderr.count("\n") == 1 and not list(locked.iterdir())


def test_planning_a_million_cells_takes_seconds(tmp_path, capsys):
    """10^6 cells: counted, not expanded, for --dry-run (and then planned lazily by a run)."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Entity number {i} is"}) + "\n" for i in range(500)))
    argv = sweep(
        tmp_path,
        "--dry-run",
        source__prompts=None,
        source__file=str(data),
        source__layers="all",
        source__positions=[-1, -2, -3, -4, 0],
        target__layers="all",
        target__prompt="Paris is the capital of France. The capital city of x is where x lives, and x",
        target__positions=list(range(-25, 0)),
    )
    cli.main(argv)  # warm: imports and the tokenizer
    capsys.readouterr()
    t0 = time.perf_counter()
    assert cli.main(argv) == 0
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert (
        "1000000 cells in 7813 tasks (batch size 16, up to 128 cells a task)" in out
        and "0 of these cells already stored, 1000000 to run in 7813 tasks" in out
    )
    assert elapsed < 10, f"planning 10^6 cells took {elapsed:.1f} s"
    print(f"dry run of 10^6 cells: {elapsed:.2f} s")


def test_a_plain_pickle_as_vector_or_mapping_prints_one_line_and_no_torch_warning(tmp_path):
    """torch warns (on stderr, outside any capture) before refusing a plain pickle: the line must be the only one."""
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"W": [[1.0]]}))
    patchscope = str(Path(sys.executable).with_name("patchscope"))
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    for argv, field in (
        (
            [
                "intervene",
                "--model",
                "tiny-llama",
                "--prompt",
                "Paris is",
                "--site",
                "blocks.1.hook_resid_post",
                "--kind",
                "add",
                "--alpha",
                "1",
                "--vector",
                str(path),
            ],
            "--vector",
        ),
        (inspect("--mapping", str(path)), "mapping.path"),
    ):
        proc = subprocess.run([patchscope, *argv], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: {field}: cannot read {path} as "), proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr


def test_heads_apply_where_a_site_has_them(tmp_path, capsys, nothing_may_start):
    """heads with sites [hook_resid_post, attn.hook_z]: the heads on hook_z, the whole resid_post once."""
    argv = iv(
        tmp_path, "--dry-run", intervention__site=["blocks.{layer}.hook_resid_post", "blocks.{layer}.attn.hook_z"]
    )
    assert cli.main(argv) == 0, capsys.readouterr().err
    # 2 prompts x 2 layers x (1 resid_post + 2 heads of hook_z) x 1 kind
    assert "12 cells" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["intervention", "causal_trace", "recipe"])
def test_report_accepts_what_each_kind_stores(tmp_path, tiny_models, capsys, name):
    """The columns `patchscope report` requires (Schema.numbers, Schema.needs) are the ones each kind writes."""
    from patchscope_core import PatchscopeEngine
    from tests.golden.common import run_in_process

    argv = {
        "intervention": lambda: iv(tmp_path, intervention__heads=[0]),
        "causal_trace": lambda: trace(tmp_path),
        "recipe": lambda: recipe("multi_hop", recipe__source_layers=[1], recipe__target_layers=[2])(tmp_path),
    }[name]()
    engine = PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")
    assert run_in_process(Path(argv[1]), engine, tmp_path / "out") > 0
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "out")]) == 0, capsys.readouterr().err
