"""Summaries that answer the question asked (issue 19): the terminal summary of an intervention
sweep groups by every axis it varied (a steering sweep's alphas are never averaged together),
and `max_new_tokens: 0` (score only) runs in an intervention sweep while the kinds that generate
refuse it by name."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweeps.cli import main


def test_the_intervention_summary_keeps_each_strength_apart():
    from sweeps.kinds import KINDS

    rows = [
        {
            "model": "m",
            "site": "blocks.1.hook_resid_post",
            "head": None,
            "neuron": None,
            "kind": "add",
            "alpha": alpha,
            "factor": None,
            "noise_scale": None,
            "seed": None,
            "delta_logprob": value,
        }
        for alpha, values in ((1.0, (-2.0, -2.5)), (4.0, (-5.0, -6.0)), (8.0, (-11.0, -11.5)))
        for value in values
    ]
    text = KINDS["intervention"].summary(pd.DataFrame(rows))
    for alpha, mean in ((1, -2.25), (4, -5.5), (8, -11.25)):
        assert f"add alpha={alpha}: {mean:+.3f} (2 prompts)" in text, text
    assert f"{(-2.25 - 5.5 - 11.25) / 3:+.3f}" not in text  # the mean of the per-alpha means


def write(tmp_path: Path, **cfg) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_max_new_tokens_0_scores_without_generating_in_an_intervention_sweep(tmp_path, tiny_models):
    from patchscope_core import Engine
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    config = write(
        tmp_path,
        name="score",
        kind="intervention",
        models=["tiny-llama"],
        prompts={
            "rows": [{"prompt": "Paris is the capital of", "answer": " France"}],
            "prompt_column": "prompt",
            "answer_column": "answer",
        },
        intervention={"site": "blocks.{layer}.hook_resid_post", "layers": [1], "kind": "zero"},
        generation={"max_new_tokens": 0},
        execution={"workers": 1},
        output={"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    )
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    assert run_in_process(config, engine, tmp_path / "out") == 1
    (row,) = ResultStore(tmp_path / "out").read().to_dict("records")
    assert list(row["generated_token_ids"]) == [] and row["generated_text"] == ""
    # the answer is still scored: equal to the engine's own run with no generation
    from patchscope_core import Intervention, InterventionRun, Zero

    (want,) = engine.run_interventions(
        [InterventionRun("Paris is the capital of", (Intervention("blocks.1.hook_resid_post", Zero()),), " France", 0)]
    )
    assert row["delta_logprob"] == pytest.approx(want.answer_logprob - want.clean_answer_logprob, abs=1e-5)


def test_max_new_tokens_0_is_refused_by_a_patchscope_sweep(tmp_path, capsys, no_weights):
    config = write(
        tmp_path,
        name="ps",
        models=["tiny-llama"],
        source={"prompts": ["Paris"], "layers": [1], "positions": [-1]},
        target={"prompt": "Tell me about x", "layers": "same", "positions": [-1]},
        generation={"max_new_tokens": 0},
        output={"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    )
    assert main(["sweep", str(config), "--dry-run"]) == 2
    assert "error: generation.max_new_tokens: a patchscope sweep generates text" in capsys.readouterr().err


def test_a_steering_row_records_its_strength_against_the_sites_norm(tmp_path, tiny_models):
    import torch

    from patchscope_core import Engine
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    torch.manual_seed(0)
    vector = torch.randn(64)
    torch.save(vector, tmp_path / "v.pt")
    prompts = ["Paris is the capital of", "The fox jumps over the"]
    config = write(
        tmp_path,
        name="steer",
        kind="intervention",
        models=["tiny-llama"],
        prompts={"rows": [{"prompt": p} for p in prompts], "prompt_column": "prompt"},
        intervention={
            "site": "blocks.{layer}.hook_resid_post",
            "layers": [1, 2],
            "kind": ["add", "zero"],
            "alpha": [2.0, 8.0],
            "vector": "v.pt",
        },
        generation={"max_new_tokens": 1},
        execution={"workers": 1},
        output={"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    )
    bridge = tiny_models["tiny-llama"]
    run_in_process(config, Engine(bridge, name="tiny-llama"), tmp_path / "out")
    df = ResultStore(tmp_path / "out").read()
    add, zero = df[df["kind"] == "add"], df[df["kind"] == "zero"]
    assert len(add) == 2 * 2 * 2 and zero["relative_strength"].isna().all()
    for r in add.itertuples():
        with torch.no_grad():
            _, cache = bridge.run_with_cache(bridge.to_tokens(r.prompt))
        h = cache[f"blocks.{r.layer}.hook_resid_post"][0, 1:]  # every token but BOS
        site_norm = float(h.norm(dim=-1).mean())
        assert r.vector_norm == pytest.approx(float(vector.norm()), rel=1e-5)
        assert r.site_norm == pytest.approx(site_norm, rel=1e-4)
        assert r.relative_strength == pytest.approx(r.alpha * float(vector.norm()) / site_norm, rel=1e-4)


def _contrast_config(tmp_path: Path, **report) -> Path:
    rows = [
        {"prompt": p, "answer": a, "polarity": pol}
        for p in ("I think this movie is", "My day at the office was")
        for a, pol in ((" great", "positive"), (" terrible", "negative"))
    ]
    return write(
        tmp_path,
        name="contrast",
        kind="intervention",
        models=["tiny-llama"],
        prompts={"rows": rows, "prompt_column": "prompt", "answer_column": "answer", "reference_columns": ["polarity"]},
        intervention={"site": "blocks.{layer}.attn.hook_z", "layers": [0, 1], "heads": [0, 1], "kind": "zero"},
        generation={"max_new_tokens": 1},
        execution={"workers": 1},
        output={"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
        report=report,
    )


def test_report_contrast_is_the_difference_of_the_two_groups_means(tmp_path, tiny_models):
    from patchscope_core import Engine
    from sweeps.sinks.report import write_report
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    config = _contrast_config(tmp_path, contrast={"column": "polarity", "plus": "positive", "minus": "negative"})
    run_in_process(config, Engine(tiny_models["tiny-llama"], name="tiny-llama"), tmp_path / "out")
    df = ResultStore(tmp_path / "out").read()
    made = write_report(tmp_path / "out", df)
    top = pd.read_csv(made["top_heads"])
    assert len(top) == 4 and "contrast" in top.columns
    for r in top.itertuples():
        cell = df[(df["layer"] == r.layer) & (df["head"] == r.head)]
        want = (
            cell.loc[cell["ref_polarity"] == "positive", "delta_logprob"].mean()
            - cell.loc[cell["ref_polarity"] == "negative", "delta_logprob"].mean()
        )
        assert r.contrast == pytest.approx(want, abs=1e-6) and r.prompts == 4


@pytest.mark.parametrize(
    "report,message",
    [
        (
            {"contrast": {"column": "mood", "plus": "a", "minus": "b"}},
            "report.contrast.column: 'mood' is not a reference column",
        ),
        (
            {"contrast": {"column": "polarity", "plus": "positive", "minus": "neutral"}},
            "report.contrast.minus: no prompt has polarity = 'neutral'",
        ),
        ({"metric": "generated_text"}, "report.metric: 'generated_text' is not a measure of intervention sweeps"),
    ],
)
def test_bad_report_settings_are_refused_before_weights_load(tmp_path, capsys, no_weights, report, message):
    assert main(["sweep", str(_contrast_config(tmp_path, **report)), "--dry-run"]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_a_patchscope_sweep_takes_no_report_metric(tmp_path, capsys, no_weights):
    config = write(
        tmp_path,
        name="ps",
        models=["tiny-llama"],
        source={"prompts": ["Paris"], "layers": [1], "positions": [-1]},
        target={"prompt": "Tell me about x", "layers": "same", "positions": [-1]},
        report={"metric": "delta_logprob"},
        output={"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    )
    assert main(["sweep", str(config), "--dry-run"]) == 2
    assert (
        "error: report.metric: 'delta_logprob' is not a measure of patchscope sweeps (it takes no report section)"
        in capsys.readouterr().err
    )


def test_baseline_columns_are_named_for_what_they_are_and_old_stores_read_with_the_new_names(tmp_path):
    from sweeps.sinks.store import ResultStore

    store = ResultStore(tmp_path / "out")
    old = {
        "cell_id": "c1",
        "model": "m",
        "delta_logprob": -1.0,
        "clean_answer_logprob": -2.0,
        "p_answer_clean": 0.1,
        "clean_generated_text": " x",
        "clean_generated_token_ids": [3],
    }
    store.write("t1", [old])  # as a version before the rename stored it
    (row,) = ResultStore(tmp_path / "out").read().to_dict("records")
    assert (row["baseline_answer_logprob"], row["baseline_p_answer"], row["baseline_generated_text"]) == (
        -2.0,
        0.1,
        " x",
    )
    assert "clean_answer_logprob" not in row
