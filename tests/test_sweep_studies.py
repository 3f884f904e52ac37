"""Intervention and causal-trace sweeps: config errors before any load, and end to end on a local
Ray cluster with tiny models (cells equal the in-process engine's, exactly once, resumable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from patchscope_core import Engine, Intervention, InterventionRun, Mean, Site, Zero
from patchscope_core.methods.tracing import Fact, Tracer, TraceSettings
from sweeps import cli
from sweeps.sinks.store import ResultStore
from tests.configs import changed, write_yaml
from tests.test_sweep_ray import read_offline_run

FACTS = [
    {"prompt": "Paris is the capital of France.", "subject": "Paris", "answer": " The", "topic": "city"},
    {"prompt": "The Eiffel Tower is in Paris.", "subject": "Eiffel Tower", "answer": " It", "topic": "landmark"},
    {"prompt": "Water is a liquid.", "subject": "Water", "answer": " It", "topic": "substance"},
]
ABLATION = {
    "name": "tiny-ablation",
    "kind": "intervention",
    "models": ["tiny-llama"],
    "prompts": {
        "file": "facts.jsonl",
        "prompt_column": "prompt",
        "answer_column": "answer",
        "reference_columns": ["topic"],
    },
    "intervention": {
        "site": "blocks.{layer}.attn.hook_z",
        "layers": [1, 3],
        "heads": "all",
        "positions": "all",
        "kind": ["zero", "mean"],
    },
    "generation": {"max_new_tokens": 4, "stop_at_eos": False},
    "execution": {"workers": 2, "batch_size": 8},
    "output": {"wandb": {"project": "patchscope-tests", "mode": "offline"}},
}
TRACE = {
    "name": "tiny-trace",
    "kind": "causal_trace",
    "models": ["tiny-llama"],
    "prompts": {
        "file": "facts.jsonl",
        "prompt_column": "prompt",
        "subject_column": "subject",
        "answer_column": "answer",
    },
    "trace": {
        "sites": ["resid_post", "mlp_out"],
        "layers": "all",
        "positions": "all",
        "window": 2,
        "noise": 3.0,
        "samples": 3,
        "seed": 1,
    },
    "execution": {"workers": 2, "batch_size": 16},
    "output": {"wandb": {"project": "patchscope-tests", "mode": "disabled"}},
}


def write(tmp_path: Path, cfg: dict, **changes) -> Path:
    cfg = changed(cfg, **changes)
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    cfg["output"]["dir"] = str(tmp_path / "out")
    return write_yaml(cfg, tmp_path / f"{cfg['name']}.yaml")


# ---------------------------------------------------------------- config errors, before anything loads


@pytest.mark.parametrize(
    "base, changes, message",
    [
        (ABLATION, {"prompts": None}, "prompts: a intervention sweep needs a prompts section"),
        (ABLATION, {"source": {"prompts": ["x"]}}, "source: not used by a intervention sweep"),
        (ABLATION, {"intervention__kind": "erase"}, "intervention.kind: unknown kind 'erase' (allowed: replace, add"),
        (
            ABLATION,
            {"intervention__kind": "add"},
            "intervention.vector: add needs a vector file, or positive and negative",
        ),
        (
            ABLATION,
            {"intervention__site": "blocks.{layer}.hook_resid_post"},
            "intervention.site.head: blocks.1.hook_resid_post has no heads",
        ),
        (
            ABLATION,
            {"intervention__site": "blocks.{layer}.hook_resid_mid", "intervention__heads": None},
            "hook_resid_mid is TransformerBridge's second-norm input",
        ),
        (ABLATION, {"intervention__layers": [9]}, "intervention.layers: 9 is out of range 0 .. 3"),
        (ABLATION, {"intervention__heads": [7]}, "intervention.site.head: 7 is out of range 0 .. 3"),
        (ABLATION, {"intervention__positions": [40]}, "positions: 40 is out of range"),
        (ABLATION, {"prompts__answer_column": "nope"}, "prompts.answer_column: no column 'nope'"),
        (ABLATION, {"prompts__reference_columns": ["topic", "year"]}, "prompts.reference_columns: no column 'year'"),
        (ABLATION, {"prompts__clean_column": "clean"}, "prompts.clean_column: no column 'clean'"),
        (TRACE, {"prompts__wrong_answer_column": "wrong"}, "prompts.wrong_answer_column: no column 'wrong'"),
        (ABLATION, {"intervention__kind": "resample"}, "intervention.source: resample needs a source prompt"),
        (TRACE, {"prompts__subject_column": None}, "prompts.subject_column: a causal_trace sweep needs it"),
        (
            TRACE,
            {"prompts__subject_column": "topic"},
            "prompts.subject_column (prompts.file row 1): 'city' does not occur",
        ),
        (
            TRACE,
            {"trace__sites": ["resid_pre"]},
            "trace.sites[0]: Input should be 'resid_post', 'mlp_out' or 'attn_out'",
        ),
        (TRACE, {"trace__samples": 0}, "trace.samples: Input should be greater than or equal to 1"),
    ],
)
def test_config_errors_name_the_field_before_any_load(
    tmp_path, capsys, no_weights, monkeypatch, base, changes, message
):
    import sweeps.run.driver

    monkeypatch.setattr(
        sweeps.run.driver, "connect", lambda *a, **k: pytest.fail("Ray started before the config error")
    )
    assert cli.main(["sweep", str(write(tmp_path, base, **changes)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "base,changes,message",
    [
        (TRACE, {}, "error: prompts.subject_column (prompts.file row 1): 'cat' occurs in the prompt"),
        (
            ABLATION,
            {
                "prompts__subject_column": "subject",
                "intervention__kind": "knockout",
                "intervention__to": ["subject"],
                "intervention__site": "blocks.{layer}.attn",
                "intervention__heads": None,
            },
            "error: prompts.subject_column (prompts.file row 1): 'cat' occurs in the prompt",
        ),
    ],
)
def test_a_subject_only_inside_another_word_is_refused(tmp_path, capsys, no_weights, base, changes, message):
    path = write(tmp_path, base, **changes)
    fact = {"prompt": "The category is large.", "subject": "cat", "answer": " It", "topic": "x"}
    (tmp_path / "facts.jsonl").write_text(json.dumps(fact) + "\n")
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1, err
    assert "'cat' occurs in the prompt 'The category is large.' only inside another word ('category')" in err, err


def test_dry_run_shows_the_grid(tmp_path, capsys):
    assert cli.main(["sweep", str(write(tmp_path, ABLATION)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 3 prompts x 2 layers x 4 heads x 2 kinds = 48 cells; tasks of 2 batches of 8 across prompts,
    # so that 2 workers x 2 tasks in flight all start with work
    assert "tiny-ablation (intervention): 48 cells in 3 tasks (batch size 8, up to 16 cells a task)" in out
    assert "2 kind(s)" in out
    assert cli.main(["sweep", str(write(tmp_path, TRACE)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # one task per fact; cells: 2 sites x 4 layers x every prompt position of each fact
    assert "tiny-trace (causal_trace):" in out and "in 3 tasks" in out and "3 noise samples" in out


# ---------------------------------------------------------------- end to end on Ray


@pytest.fixture(scope="module")
def ablation(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablation")
    code = cli.main(["sweep", str(write(tmp, ABLATION))])
    return code, tmp / "out"


def test_ablation_sweep_stores_every_cell_once_equal_to_the_engine(ablation, tiny_models):
    code, out = ablation
    assert code == 0
    df = ResultStore(out).read()
    assert len(df) == 48 and df["cell_id"].is_unique
    assert set(df["kind"]) == {"zero", "mean"} and set(df["head"]) == {0, 1, 2, 3} and set(df["layer"]) == {1, 3}
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    from patchscope_core.engine import Decoding

    engine.decoding = Decoding(stop_at_eos=False)
    reference = tuple(f["prompt"] for f in FACTS)
    for r in df.to_dict("records"):
        kind = Zero() if r["kind"] == "zero" else Mean(reference=reference)
        run = InterventionRun(
            r["prompt"],
            (Intervention(Site(r["site"], head=int(r["head"])), kind, "all"),),
            answer=r["answer"],
            max_new_tokens=4,
        )
        (want,) = engine.run([run])
        assert list(r["generated_token_ids"]) == want.generated_token_ids
        assert list(r["baseline_generated_token_ids"]) == want.clean_generated_token_ids
        assert r["answer_logprob"] == pytest.approx(want.answer_logprob, abs=1e-4)
        assert r["delta_logprob"] == pytest.approx(want.answer_logprob - want.clean_answer_logprob, abs=1e-4)
        assert r["ref_topic"] == next(f["topic"] for f in FACTS if f["prompt"] == r["prompt"])
    assert df.groupby("prompt")["baseline_answer_logprob"].nunique().max() == 1  # one clean baseline per prompt


def test_ablation_report_and_wandb(ablation):
    _, out = ablation
    for name in (
        "heatmap_tiny-llama_layer_x_head_mean.png",
        "heatmap_tiny-llama_layer_x_head_zero.png",
        "top_heads.csv",
        "results.csv",
    ):
        assert (out / name).stat().st_size > 100, name
    top = __import__("pandas").read_csv(out / "top_heads.csv")
    assert list(top.columns[:4]) == ["model", "variant", "layer", "head"] and len(top) == 16
    assert top["mean_delta_logprob"].abs().is_monotonic_decreasing
    wb = read_offline_run(out)
    final = [h for h in wb["history"] if "results" in h]
    assert len(final) == 1 and any(k.startswith("heatmap/") for k in final[0]) and "table/top_heads" in final[0]
    rows = wb["table"](final[0]["results"])
    assert len(rows) == 48 and "delta_logprob" in rows[0] and "head" in rows[0]


def test_trace_sweep_equals_the_tracer_and_resumes_without_recomputing(ray_cluster, tmp_path, tiny_models, capsys):
    config = write(tmp_path, TRACE)
    assert cli.main(["sweep", str(config)]) == 0
    out = tmp_path / "out"
    df = ResultStore(out).read()
    assert df["cell_id"].is_unique
    tracer = Tracer(Engine(tiny_models["tiny-llama"], name="tiny-llama"), batch_size=16)
    settings = TraceSettings(sites=("resid_post", "mlp_out"), window=2, noise=3.0, samples=3, seed=1)
    total = 0
    for fact in FACTS:
        want = tracer.trace(
            Fact(fact["prompt"], fact["subject"], fact["answer"]), settings, [f["prompt"] for f in FACTS]
        )
        got = df[df["prompt"] == fact["prompt"]]
        assert len(got) == len(want.p_restored) == 2 * 4 * len(want.token_ids)
        total += len(got)
        for r in got.to_dict("records"):
            assert r["p_restored"] == pytest.approx(want.p_restored[(r["site"], r["layer"], r["position"])], abs=1e-6)
            assert r["indirect_effect"] == pytest.approx(r["p_restored"] - want.p_corrupt, abs=1e-6)
            assert r["is_subject"] == (want.subject[0] <= r["position"] < want.subject[1])
        assert np.allclose(got["p_clean"], want.p_clean) and np.allclose(got["p_corrupt"], want.p_corrupt)
    assert len(df) == total
    assert (out / "trace_tiny-llama_trace_average.png").stat().st_size > 1000
    assert len(list(out.glob("trace_tiny-llama_trace_row*.png"))) == 3
    capsys.readouterr()
    files = {f.name: f.stat().st_mtime_ns for f in ResultStore(out).files()}
    assert cli.main(["sweep", str(config)]) == 0
    assert f"{total} already stored" in capsys.readouterr().out
    assert {f.name: f.stat().st_mtime_ns for f in ResultStore(out).files()} == files
    assert cli.main(["report", str(out)]) == 0
    assert "causal traces: per fact" in capsys.readouterr().out
