"""The framework at scale: tasks sized for the device (the cells of many groups), few large store
files, and the local backend storing while it computes.

- A kind that packs (`SweepKind.packs`) gets tasks of up to batch_size x batches_per_task cells
  across source prompts; every cell is in exactly one task, in grid order; the counts the dry run
  shows are those of the tasks run; a small grid is still spread over the workers.
- A packed sweep stores, cell for cell, what the same sweep stores one source prompt a task.
- The store merges every COMPACT_EVERY task files into one part file; reading counts each cell
  once, also when a crash left a part file beside the task files it merged.
- The local backend's background store: every finished task is stored, in order, and a failure
  of storing is raised, not lost.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from patchscope_core import Patchscope
from sweeps import cli
from sweeps.grid import count_todo, iter_cells, iter_tasks, per_task
from sweeps.run.driver import plan
from sweeps.run.local import run_here
from sweeps.sinks import store as store_module
from sweeps.sinks.store import ResultStore
from tests.configs import write_yaml
from tests.golden import common

IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


def grid_config(tmp_path, n_prompts=30, batch_size=4, batches_per_task=3, workers=1, **output):
    cfg = {
        "name": "packed",
        "models": ["tiny-llama"],
        "source": {"prompts": [f"I saw a word{i}" for i in range(n_prompts)], "layers": "all", "positions": [-1]},
        "target": {"prompt": IDENTITY, "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": 2},
        "execution": {"workers": workers, "batch_size": batch_size, "batches_per_task": batches_per_task},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}, **output},
    }
    return write_yaml(cfg, tmp_path / "sweep.yaml")


def test_a_packing_kind_gets_tasks_of_many_source_prompts(tmp_path, no_weights):
    p = plan(str(grid_config(tmp_path)))
    cells = list(iter_cells(p.config, p.rows, p.models, context=p.context))
    todo = count_todo(p.config, p.rows, p.models, set(), p.context)
    size = per_task(p.config, len(cells))
    assert size == 12  # batch_size 4 x batches_per_task 3
    tasks = list(iter_tasks(iter(cells), p.config.execution.batch_rows, p.context, {"tiny-llama": size}))
    assert [c.cell_id for t in tasks for c in t.cells] == [c.cell_id for c in cells], "each cell once, in order"
    assert all(len(t.cells) <= 12 for t in tasks) and len(tasks) == todo["tiny-llama"][1] == 10
    assert max(len({c.group for c in t.cells}) for t in tasks) == 3, "a task spans source prompts"
    assert len({t.task_id for t in tasks}) == len(tasks)


def test_a_small_grid_still_gives_every_worker_a_task(tmp_path, no_weights):
    """120 cells, 2 workers with 2 tasks in flight each: tasks of 32 cells (whole batches), not one of 120."""
    p = plan(str(grid_config(tmp_path, batch_size=16, batches_per_task=100, workers=2)))
    p = p.at(None)
    assert per_task(p.config, p.n_cells) == 32
    assert count_todo(p.config, p.rows, p.models, set(), p.context)["tiny-llama"] == (120, 4)


def test_the_pair_and_trace_kinds_keep_one_group_a_task(tmp_path, no_weights):
    from sweeps.kinds import KINDS

    assert not KINDS["causal_trace"].packs and KINDS["causal_trace"].one_task
    assert not KINDS["activation_patching"].packs and not KINDS["attribution_patching"].packs
    assert KINDS["patchscope"].packs and KINDS["intervention"].packs and KINDS["recipe"].packs


def test_a_packed_sweep_stores_what_one_prompt_a_task_stores(tmp_path, capsys):
    """The same grid, tasks of 12 cells across prompts against tasks of one prompt's cells."""
    packed, single = tmp_path / "packed", tmp_path / "single"
    packed.mkdir(), single.mkdir()
    assert cli.main(["sweep", str(grid_config(packed, n_prompts=12))]) == 0
    assert "48 to run in 4 tasks" in capsys.readouterr().out
    assert cli.main(["sweep", str(grid_config(single, n_prompts=12, batches_per_task=1, batch_size=4))]) == 0
    a, b = ResultStore(packed / "out").read(), ResultStore(single / "out").read()
    assert len(a) == len(b) == 48
    assert a["task_id"].nunique() == 4 and b["task_id"].nunique() == 12
    assert common.same_rows(common.stable(a), common.stable(b), rel=1e-5, abs_=1e-6) == []


def _rows(task: int, n: int = 5) -> list[dict]:
    return [{"cell_id": f"c{task:03d}-{i}", "model": "m", "value": float(task * 10 + i)} for i in range(n)]


def test_the_store_merges_task_files_into_part_files(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "COMPACT_EVERY", 3)
    store = ResultStore(tmp_path)
    for t in range(7):
        store.write(f"t{t}", _rows(t))
    names = sorted(f.name for f in store.files())
    assert sum(n.startswith("part-") for n in names) == 2 and names[-1] == "task-t6.parquet"
    assert sum(pq.read_metadata(f).num_rows for f in store.files()) == 35
    df = store.read(current=False)
    assert sorted(df["cell_id"]) == sorted(r["cell_id"] for t in range(7) for r in _rows(t))
    assert dict(zip(df["cell_id"], df["value"])) == {r["cell_id"]: r["value"] for t in range(7) for r in _rows(t)}
    assert ResultStore(tmp_path).stored_cell_ids() == set(df["cell_id"])
    assert ResultStore(tmp_path).current_count() == len(df) == 35  # the end of a run counts ids, reads no rows


def test_a_crash_between_the_part_file_and_removing_its_task_files_counts_each_cell_once(tmp_path):
    store = ResultStore(tmp_path)
    store.write("t0", _rows(0))
    store.write("t1", _rows(1))
    kept = {f: f.read_bytes() for f in store.files()}
    store.compact()
    for f, data in kept.items():  # as if the driver died before removing them
        f.write_bytes(data)
    assert len(store.files()) == 3
    again = ResultStore(tmp_path)
    assert len(again.read(current=False)) == 10 and again.stored_count() == 10


def test_compaction_leaves_task_files_whose_columns_do_not_merge(tmp_path):
    store = ResultStore(tmp_path)
    store.write("t0", [{"cell_id": "a", "model": "m", "x": 1}])
    store.write("t1", [{"cell_id": "b", "model": "m", "x": "text"}])
    store.compact()
    assert sorted(f.name for f in store.files()) == ["task-t0.parquet", "task-t1.parquet"]
    assert pa.types.is_string(pq.read_table(store.files()[1]).schema.field("x").type)


class _Task:
    def __init__(self, i: int) -> None:
        self.task_id, self.model, self.cells = f"t{i}", "m", (i,)

    def payload(self) -> dict:
        return {"i": self.task_id}


def test_the_local_backend_stores_every_finished_task_in_order_while_the_next_runs():
    seen = []
    assert run_here([_Task(i) for i in range(5)], lambda p: p, lambda t, o: seen.append(o["i"]), print, True) == []
    assert seen == ["t0", "t1", "t2", "t3", "t4"]


def test_an_interrupted_local_run_still_stores_the_task_it_finished():
    seen = []

    def run(payload):
        if payload["i"] == "t2":
            raise KeyboardInterrupt
        return payload

    with pytest.raises(KeyboardInterrupt):
        run_here([_Task(i) for i in range(5)], run, lambda t, o: seen.append(o["i"]), print, True)
    assert seen == ["t0", "t1"]


def test_a_failure_to_store_is_raised_not_lost():
    def done(task, output):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_here([_Task(i) for i in range(3)], lambda p: p, done, print, True)


def test_the_config_says_what_a_task_carries():
    from sweeps.config.shared import ExecutionConfig

    field = ExecutionConfig.model_fields["batches_per_task"]
    assert field.default == 8 and "batch_size x batches_per_task" in field.description
    with pytest.raises(ValueError):
        ExecutionConfig(batches_per_task=0)
    assert json.dumps(ExecutionConfig().model_dump())  # plain data for the manifest


def test_tokenize_many_gives_what_tokenize_gives_one_prompt_at_a_time(no_weights):
    from patchscope_core import model_info, tokenize
    from patchscope_core.models import tokenize_many

    for name in ("tiny-llama", "tiny-gpt2", "smollm2-135m"):
        info = model_info(name)
        prompts = ["I saw a cat", " leading space", "x", "Über straße 12 ->", IDENTITY]
        assert tokenize_many(info, prompts) == [tokenize(info, p) for p in prompts], name
    with pytest.raises(ValueError, match=r"source.prompts\[1\]: empty prompt"):
        tokenize_many(info, ["a", " "], "source.prompts")


def test_auto_batch_size_fits_the_free_memory_by_the_models_config(no_weights):
    """Rows per forward pass on a GPU: the largest power of two whose rows (KV cache: 2 x layers x
    kv heads x d_head per token, activations, logits) fit 80% of the free memory, at most 512."""
    from patchscope_core import model_info
    from patchscope_core.models import batch_rows_for, bytes_per_row

    info = model_info("smollm2-135m")
    tokens, fp = 512, 2  # bfloat16
    kv = 2 * 30 * 3 * 64 * tokens  # SmolLM2: 30 layers, 3 kv heads of 64
    per_row = (kv + (4 * 576 + 2 * 1536) * tokens + 49152) * fp
    assert bytes_per_row(info, tokens, fp) == per_row
    for free in (10 * 2**30, 2**30, 3 * per_row, per_row // 2):
        rows = batch_rows_for(info, free, tokens, fp)
        fits = max(1, int(0.8 * free) // per_row)
        assert rows == min(512, 2 ** (fits.bit_length() - 1)), free
    assert batch_rows_for(info, 80 * 2**30, tokens, fp) == 512


def test_batch_size_auto_is_16_rows_on_a_cpu_and_256_for_a_gpu_sweeps_tasks():
    from sweeps.config.shared import ExecutionConfig

    assert ExecutionConfig().batch_size == "auto" and ExecutionConfig().batch_rows == 16
    assert ExecutionConfig(gpus_per_worker=1).batch_rows == 256
    assert ExecutionConfig(batch_size=7, gpus_per_worker=1).batch_rows == 7
    with pytest.raises(ValueError, match="expected 'auto' or an integer >= 1"):
        ExecutionConfig(batch_size=0)


def test_a_patchscope_tasks_payload_is_each_cells_patchscope_as_plain_data(tmp_path, no_weights):
    p = plan(str(grid_config(tmp_path, n_prompts=5)))
    cells = list(iter_cells(p.config, p.rows, p.models, context=p.context))
    (task,) = iter_tasks(iter(cells), 4, p.context, {"tiny-llama": len(cells)})
    specs = [c.patchscope(c.max_new_tokens) for c in cells]
    assert task.payload()["patchscope_columns"] == Patchscope.to_columns(specs)
    assert Patchscope.from_columns(Patchscope.to_columns(specs)) == specs


def test_a_patchscope_tasks_table_is_its_rows_a_column_at_a_time(tmp_path):
    """`to_table` (what the driver stores) against `to_rows`' one dict per cell through
    `pyarrow.Table.from_pylist`: the same columns, order, types and values, references included."""
    from patchscope_core import PatchscopeEngine, load_model
    from sweeps.kinds import KINDS
    from workers.actor import run_task

    src = tmp_path / "src.csv"
    src.write_text("prompt,answer,country\nParis,France,fr\nRome,Italy,it\nOslo,Norway,\n")
    data = yaml.safe_load(grid_config(tmp_path).read_text())
    data["source"] = {
        "file": str(src),
        "prompt_column": "prompt",
        "reference_columns": ["answer", "country"],
        "layers": [0, 2],
        "positions": [-1, 0],
    }
    cfg = write_yaml(data, tmp_path / "refs.yaml")
    p = plan(str(cfg))
    cells = list(iter_cells(p.config, p.rows, p.models, context=p.context))
    (task,) = iter_tasks(iter(cells), 64, p.context, {"tiny-llama": len(cells)})
    engine = PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")
    output = run_task(engine, task.payload(), 8, {"worker_node": "n1", "worker_pid": 7})
    kind = KINDS["patchscope"]
    want = pa.Table.from_pylist(kind.to_rows(task, output))
    got = kind.to_table(task, output)
    assert got.schema == want.schema
    assert got.to_pylist() == want.to_pylist()
    assert {"ref_answer", "ref_country", "worker_node", "time_task_s"} <= set(got.column_names)

    store = ResultStore(tmp_path / "store")
    first = store.write("t1", got.slice(0, 5))
    assert first.num_rows == 5
    again = store.write("t2", got)  # a task delivered again with more cells: only the new ones
    assert again.num_rows == len(cells) - 5
    assert sorted(store.read()["cell_id"]) == sorted(c.cell_id for c in cells)
