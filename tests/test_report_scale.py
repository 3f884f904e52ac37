"""Reports and W&B at scale: past the readable size (`pictures.READABLE_ROWS` source prompts) the
patchscope report draws per-layer means with 95% intervals, the top prompts and a sample of
generations instead of one square per prompt, and its pictures stay small; the report reads only
the columns it draws (and results.csv is what it was); W&B's per-cell tables hold at most
`output.wandb.max_table_rows` rows, a seeded sample, and the sweep says so once."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sweeps import cli, pictures
from sweeps.sinks.report import write_report
from sweeps.sinks.store import ResultStore
from tests.big_store import patchscope_rows, write_store

GOLDEN = Path(__file__).resolve().parent / "golden" / "stores"
Z = statistics.NormalDist().inv_cdf(0.975)


def match(rows: pd.DataFrame) -> np.ndarray:
    """match_answer, computed here: the generation contains the reference, ignoring case."""
    return np.array([a.strip().lower() in t.lower() for a, t in zip(rows["ref_answer"], rows["generated_text"])])


def expected_means(df: pd.DataFrame) -> dict[tuple[int, int], tuple[float, float, float, int]]:
    """Per (source layer, source position): the mean over prompts of each prompt's share of
    matching generations, and mean ± z · sd / sqrt(n), with numpy alone."""
    df = df.assign(m=match(df).astype(float))
    out = {}
    for (layer, pos), g in df.groupby(["source_layer", "source_position"]):
        per_prompt = np.array([g.loc[g["source_prompt"] == p, "m"].mean() for p in dict.fromkeys(g["source_prompt"])])
        mean, sd = per_prompt.mean(), per_prompt.std(ddof=1)
        half = Z * sd / np.sqrt(len(per_prompt))
        out[(int(layer), int(pos))] = (mean, mean - half, mean + half, len(per_prompt))
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """2,000 source prompts x 4 layers, stored out of grid order (as tasks finish), and the report of it."""
    out = tmp_path_factory.mktemp("big") / "out"
    rows = patchscope_rows(2000, layers=(0, 1, 2, 3))
    write_store(out, [rows[i] for i in np.random.default_rng(1).permutation(len(rows))])
    return out, write_report(out)


def test_past_the_readable_size_the_report_draws_means_and_top_prompts_in_small_pictures(big):
    out, made = big
    assert not (out / "heatmap_tiny-llama_prompt_x_layer.png").exists(), "one square per prompt past the readable size"
    pngs = [p for p in made.values() if Path(p).suffix == ".png"]
    assert {Path(p).name for p in pngs} == {"means_tiny-llama_by_layer.png", "heatmap_tiny-llama_top_prompts.png"}
    for p in pngs:
        assert 1000 < p.stat().st_size < 300_000, (p, p.stat().st_size)


def test_the_means_and_intervals_are_those_of_the_stored_rows(big):
    out, made = big
    got = pd.read_csv(made["tiny-llama_by_layer_table"])
    want = expected_means(ResultStore(out).read())
    assert len(got) == len(want) == 4
    for r in got.itertuples():
        mean, low, high, n = want[(r.source_layer, r.source_position)]
        assert (r.mean, r.low, r.high) == pytest.approx((mean, low, high), abs=1e-12) and r.prompts == n == 2000
    assert got["mean"].is_monotonic_increasing, "the rows were made to match more often at later layers"


def test_the_top_prompts_are_those_of_highest_mean(big):
    out, made = big
    df = ResultStore(out).read()
    per_prompt = df.assign(m=match(df)).groupby("source_prompt")["m"].mean()
    top = pd.read_csv(made["tiny-llama_top_prompts_table"])
    chosen = list(dict.fromkeys(top["source_prompt"]))
    assert len(chosen) == pictures.TOP_ROWS and len(top) == pictures.TOP_ROWS * 4
    assert per_prompt[chosen].min() >= per_prompt.drop(chosen).max()
    assert list(per_prompt[chosen]) == sorted(per_prompt[chosen], reverse=True), "highest first"


def test_the_sample_of_generations_is_seeded_in_grid_order_and_from_the_store(big, tmp_path):
    out, made = big
    sample = pd.read_csv(made["tiny-llama_generations_sample"])
    assert len(sample) == pictures.SAMPLE_ROWS
    stored = ResultStore(out).read().set_index(["source_prompt", "source_layer"])["generated_text"]
    assert all(stored[(r.source_prompt, r.source_layer)] == r.generated_text for r in sample.itertuples())
    assert list(sample[["row", "source_layer"]].itertuples(index=False)) == sorted(
        sample[["row", "source_layer"]].itertuples(index=False)
    )
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert pd.read_csv(write_report(again)["tiny-llama_generations_sample"]).equals(sample)


def test_up_to_the_readable_size_each_prompt_keeps_its_row(tmp_path):
    n = pictures.READABLE_ROWS
    for prompts, one_each in ((n, True), (n + 1, False)):
        out = tmp_path / str(prompts)
        write_store(out, patchscope_rows(prompts, layers=(0, 1)))
        made = write_report(out)
        assert ("tiny-llama_prompt_x_layer" in made) == one_each
        assert ("tiny-llama_by_layer" in made) == (not one_each)
        assert "tiny-llama_by_layer_table" in made, "the means table is always written (W&B logs it)"


def test_means_count_each_prompt_once_whatever_its_cells():
    """A prompt with three cells in a group weighs as much as one with a single cell."""
    df = pd.DataFrame(
        {
            "layer": [0, 0, 0, 0, 0, 1, 1],
            "prompt": ["a", "a", "a", "b", "c", "a", "b"],
            "v": [1.0, 1.0, 4.0, 0.0, 3.0, 5.0, np.nan],
        }
    )
    got = pictures.means_by(df, ["layer"], "prompt", "v").set_index("layer")
    units = np.array([2.0, 0.0, 3.0])  # a: mean of 1, 1, 4
    half = Z * units.std(ddof=1) / np.sqrt(3)
    assert tuple(got.loc[0, ["mean", "low", "high", "n"]]) == pytest.approx(
        (units.mean(), units.mean() - half, units.mean() + half, 3)
    )
    assert tuple(got.loc[1, ["mean", "low", "high", "n"]]) == pytest.approx((5.0, 5.0, 5.0, 1)), "NaN is no value"


def entity_rows(n: int, layers=(0, 1, 2)) -> pd.DataFrame:
    """An entity_description recipe's rows (l* = l), entity i scoring i / n at every layer."""
    return pd.DataFrame(
        [
            {
                "row": i,
                "subject": f"Entity {i}",
                "source_layer": layer,
                "target_layer": layer,
                "score": i / n,
                "control_score": 0.1,
                "generated_text": f"a description of entity {i} at layer {layer}",
            }
            for i in range(n)
            for layer in layers
        ]
    )


def test_past_the_readable_size_the_entity_description_draws_the_top_entities_and_a_sample(tmp_path):
    from sweeps.kinds.recipe import PARTS

    key = "recipe_m_entity_description"
    few = PARTS["entity_description"].draw(entity_rows(pictures.READABLE_ROWS), "m", tmp_path)
    assert f"{key}_sample" not in few
    big = tmp_path / "big"
    big.mkdir()
    df = entity_rows(2000)
    made = PARTS["entity_description"].draw(df, "m", big)
    assert made[key].stat().st_size < 300_000
    sample = pd.read_csv(made[f"{key}_sample"])
    assert len(sample) == pictures.SAMPLE_ROWS
    assert set(sample["generated_text"]) <= set(df["generated_text"])


# ---------------------------------------------------------------- only the columns drawn


def test_the_report_reads_only_the_columns_it_draws_and_results_csv_is_whole(tmp_path, monkeypatch, capsys):
    """A store with a large column no report draws: every read of a result file names its
    columns, never that one; results.csv is what the in-memory report (every column) writes."""
    rows = patchscope_rows(80, layers=(0, 1))
    for r in rows:
        r["debug_blob"] = "x" * 20_000  # 3.2 MB of text in all
    out = tmp_path / "out"
    write_store(out, rows, per_file=40)
    whole = tmp_path / "whole"
    shutil.copytree(out, whole)
    want = write_report(whole, ResultStore(whole).read())

    calls = []
    real = pq.read_table

    def spy(source, *args, **kwargs):
        calls.append((str(source), kwargs.get("columns")))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", spy)
    assert cli.main(["report", str(out)]) == 0
    assert "160 cells stored" in capsys.readouterr().out
    reads = [(s, c) for s, c in calls if Path(s).name.startswith("task-")]
    assert reads, "the report read the result files"
    assert all(c is not None and "debug_blob" not in c for _, c in reads), reads
    assert all("top_token_ids" not in c and "worker_pid" not in c for _, c in reads)
    assert (out / "results.csv").read_bytes() == (whole / "results.csv").read_bytes()
    assert sorted(Path(p).name for p in want.values()) == sorted(
        p.name for p in out.iterdir() if p.suffix in (".csv", ".png")
    )


@pytest.mark.parametrize("kind", ["patchscope", "intervention", "causal_trace", "recipe"])
def test_reading_columns_from_the_store_gives_the_report_of_every_row(kind, tmp_path):
    """Each kind's stored run (tests/golden/stores): the report from the store, column by column,
    writes the files the report of every row in memory writes, the tables byte for byte."""
    by_columns, in_memory = tmp_path / "columns", tmp_path / "memory"
    shutil.copytree(GOLDEN / kind / "out", by_columns)
    shutil.copytree(GOLDEN / kind / "out", in_memory)
    got = write_report(by_columns)
    want = write_report(in_memory, ResultStore(in_memory).read())
    assert sorted(got) == sorted(want) and "table" in got
    for key, path in want.items():
        if Path(path).suffix == ".csv":
            assert Path(got[key]).read_bytes() == Path(path).read_bytes(), key


def test_reading_columns_keeps_only_the_current_cells_of_this_runs_weights(tmp_path):
    from sweeps.sinks.columns import read_columns

    rows = patchscope_rows(6, layers=(0, 1))
    store = ResultStore(tmp_path, keys={"tiny-llama": "k1"})
    store.write("a", rows[:8])
    ResultStore(tmp_path, keys={"tiny-llama": "k2"}).write("b", rows[8:])  # other weights
    manifest = {"config": {"kind": "patchscope"}, "model_keys": {"tiny-llama": "k1"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    current = [r["cell_id"] for r in rows[2:]]
    pq.write_table(__import__("pyarrow").table({"cell_id": current}), tmp_path / "cells.parquet")
    want = ResultStore(tmp_path).read()
    got = read_columns(ResultStore(tmp_path), ["source_prompt", "source_layer"])
    assert list(got["cell_id"]) == list(want["cell_id"]) == [r["cell_id"] for r in rows[2:8]]
    assert list(got.columns) == ["cell_id", "source_prompt", "source_layer"]


# ---------------------------------------------------------------- W&B


def sample_key(cell_id: str) -> int:
    """The key docs/outputs.md states, in plain Python integers: the id's 64 bits plus
    0x9E3779B97F4A7C15 (seed 0), through splitmix64's mixing function, modulo 2^64."""
    m = (1 << 64) - 1
    z = (int(cell_id, 16) + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def offline_summary(run_dir: Path) -> dict:
    from tests.test_sweep_ray import read_wandb_records

    (log,) = run_dir.glob("run-*.wandb")
    summary = {}
    for r in read_wandb_records(log):
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def test_a_sweep_of_more_cells_than_max_table_rows_logs_a_stated_sample(tmp_path, capsys):
    from tests.test_sweep_ray import read_offline_run

    config = {
        "name": "tiny-sampled",
        "models": ["tiny-llama"],
        "source": {"prompts": ["Paris", "The quick brown fox", "Python"], "layers": [0, 1, 2, 3], "positions": [-1, 0]},
        "target": {"prompt": "x is a", "positions": [-1]},
        "generation": {"max_new_tokens": 2},
        "execution": {"workers": 1, "backend": "local", "batch_size": 4},
        "output": {
            "dir": str(tmp_path / "out"),
            "wandb": {"project": "patchscope-tests", "mode": "offline", "max_table_rows": 5},
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["sweep", str(path)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    df = ResultStore(out).read()
    assert len(df) == 24
    wb = read_offline_run(out)

    (final,) = [h for h in wb["history"] if "results" in h]
    logged = wb["table"](final["results"])
    assert len(logged) == 5
    want = sorted(df["cell_id"], key=sample_key)[:5]
    assert {r["cell_id"] for r in logged} == set(want)
    grid = [c for c in pd.read_csv(out / "results.csv")["cell_id"] if c in set(want)]
    assert [r["cell_id"] for r in logged] == grid, "in grid order"
    stored = df.set_index("cell_id")
    assert all(r["generated_text"] == stored.loc[r["cell_id"], "generated_text"] for r in logged)

    live = [row["cell_id"] for h in wb["history"] if "cells" in h for row in wb["table"](h["cells"])]
    assert len(live) == len(set(live)) <= 5
    assert all(sample_key(c) < (5 << 64) // 24 for c in live)

    assert offline_summary(wb["dir"])["results_table_sampled"] == "5 of 24 rows (seeded sample)"
    assert printed.count("5 of 24 rows (seeded sample)") == 1, printed
    assert "table/tiny-llama_by_layer_table" in final, "the aggregated table is logged whole"
    assert len(wb["table"](final["table/tiny-llama_by_layer_table"])) == 8


def test_a_sweep_within_max_table_rows_logs_every_row_and_says_nothing(tmp_path):
    from sweeps.config import WandbConfig
    from sweeps.sinks.wandb import WandbSink
    from tests.test_sweep_ray import read_offline_run

    sink = WandbSink(WandbConfig(project="patchscope-tests", mode="offline", max_table_rows=30), "few", {}, tmp_path)
    for i in range(30):
        sink.log_task([{"cell_id": f"c{i}", "model": "m", "generated_text": str(i)}], i + 1, 30, 1.0)
    sink.finish([], {}, {"cells_done": 30})
    wb = read_offline_run(tmp_path)
    live = [row["cell_id"] for h in wb["history"] if "cells" in h for row in wb["table"](h["cells"])]
    assert sorted(live) == sorted(f"c{i}" for i in range(30))
    assert "results_table_sampled" not in offline_summary(wb["dir"])


def test_max_table_rows_is_a_count_of_at_least_one():
    from pydantic import ValidationError

    from sweeps.config import WandbConfig

    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        WandbConfig(max_table_rows=0)


def test_a_store_w_and_b_cannot_read_at_the_end_warns_and_closes_the_run(tmp_path, monkeypatch, capsys):
    from sweeps.config import WandbConfig
    from sweeps.sinks.base import End
    from sweeps.sinks.wandb import WandbPeer
    from tests.test_sweep_ray import read_offline_run, read_wandb_records

    peer = WandbPeer(WandbConfig(project="patchscope-tests", mode="offline"), "unreadable", {}, tmp_path)
    peer.start()
    monkeypatch.setattr(WandbPeer, "read", lambda self, frame=None: 1 / 0)
    end = End(None, {"cells_done": 1})
    peer.finish(end)
    assert "warning: W&B finish failed (ZeroDivisionError" in capsys.readouterr().err
    assert not peer.run.active and not end.notes
    (log,) = read_offline_run(tmp_path)["dir"].glob("run-*.wandb")
    (done,) = [r.exit for r in read_wandb_records(log) if r.WhichOneof("record_type") == "exit"]
    assert done.exit_code == 1
