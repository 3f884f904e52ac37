"""`kind: activation_patching` (issue 16): the config (the shipped example included) and its
dry-run count, each bad input refused before any weights load naming the field, and an in-process
sweep on tiny-llama whose patched values equal TransformerLens's own patching functions on the
bridge, stored, resumed (0 recomputed) and reported."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
import yaml

from sweeps.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "ioi_patching.yaml"
PAIRS = [
    {
        "clean": "The fox jumps over the",
        "corrupted": "The fix jumps over the",
        "answer": " dog",
        "wrong_answer": " cat",
    },
    {"clean": "A fox sat on the", "corrupted": "A fix sat on the", "answer": " mat", "wrong_answer": " rug"},
]


PROMPTS = {
    "rows": PAIRS,
    "clean_column": "clean",
    "corrupted_column": "corrupted",
    "answer_column": "answer",
    "wrong_answer_column": "wrong_answer",
}


def write(tmp_path: Path, rows=None, prompts=None, model="tiny-llama", **patching) -> Path:
    cfg = {
        "name": "ap",
        "kind": "activation_patching",
        "models": [model],
        "prompts": prompts
        or {
            "rows": rows or PAIRS,
            "clean_column": "clean",
            "corrupted_column": "corrupted",
            "answer_column": "answer",
            "wrong_answer_column": "wrong_answer",
        },
        "patching": {
            "sites": ["blocks.{layer}.hook_resid_pre", "blocks.{layer}.attn.hook_z"],
            "layers": [0, 1],
            "positions": [-1, 2],
            "heads": [0, 1],
            **patching,
        },
        "execution": {"workers": 1, "batch_size": 8},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    }
    path = tmp_path / "ap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_shipped_example_parses_and_counts(capsys, no_weights):
    assert main(["sweep", str(EXAMPLE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 22 pairs x 30 layers x positions x (3 head-less sites + 9 query heads of attn.hook_z)
    assert "sweep ioi-patching (activation_patching): 122400 cells in 22 tasks" in out


def test_the_grid_axes_multiply(tmp_path, capsys, no_weights):
    config = write(tmp_path, direction=["denoising", "noising"], metric=["logit_diff", "prob"])
    assert main(["sweep", str(config), "--dry-run"]) == 0
    # per pair: (resid_pre 2 layers x 2 positions + hook_z 2 x 2 x 2 heads) x 2 directions x 2 metrics = 48
    assert "96 cells in 2 tasks" in capsys.readouterr().out


BAD = [
    (
        dict(rows=[{**PAIRS[0], "corrupted": "The fix jumps over the top"}]),
        "prompts.corrupted_column: prompts (prompts.rows row 1): clean and corrupted prompts must have the same number",
    ),
    (
        dict(rows=[{k: v for k, v in PAIRS[0].items() if k != "wrong_answer"}]),
        "prompts.wrong_answer_column: no column 'wrong_answer'",
    ),
    (
        dict(rows=[{**PAIRS[0], "wrong_answer": " dog"}]),
        "prompts.wrong_answer_column: prompts.rows row 1 has the wrong answer equal to the answer",
    ),
    (
        dict(
            prompts={"rows": PAIRS, "clean_column": "clean", "corrupted_column": "corrupted", "answer_column": "answer"}
        ),
        "prompts.wrong_answer_column: metric logit_diff needs a wrong answer",
    ),
    (
        dict(sites=["blocks.{layer}.hook_resid_mid"]),
        "patching.sites[0]: unknown site 'blocks.{layer}.hook_resid_mid'; valid sites: blocks.{layer}.hook_resid_pre",
    ),
    (
        dict(sites=["blocks.{layer}.attn.hook_v"], heads=[3]),
        "patching.heads: 3 is out of range 0 .. 1: attn.hook_v has 2 key/value heads",
    ),
    (dict(positions=[40]), "patching.positions: 40 is out of range"),
    # every column the prompts section names is checked, those a pair does not read too (issue 28 item 3)
    *[
        (
            dict(prompts={**PROMPTS, key: value}),
            f"prompts.{key}: no column {missing!r} in prompts.rows (columns: answer, clean, corrupted, wrong_answer)",
        )
        for key, value, missing in (
            ("prompt_column", "text", "text"),
            ("subject_column", "subject", "subject"),
            ("reference_columns", ["answer", "topic"], "topic"),
        )
    ],
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_is_refused_before_weights_load(tmp_path, capsys, no_weights, kwargs, message):
    assert main(["sweep", str(write(tmp_path, **kwargs)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err, err


def test_a_column_the_file_lacks_names_the_file_and_its_columns(tmp_path, capsys, no_weights):
    (tmp_path / "pairs.csv").write_text(
        "clean,corrupted,answer,wrong_answer\n" + "".join(",".join(p.values()) + "\n" for p in PAIRS)
    )
    prompts = {**{k: v for k, v in PROMPTS.items() if k != "rows"}, "file": str(tmp_path / "pairs.csv")}
    assert main(["sweep", str(write(tmp_path, prompts=prompts)), "--dry-run"]) == 0  # the file is good
    capsys.readouterr()
    config = write(tmp_path, prompts={**prompts, "subject_column": "subj"})
    assert main(["sweep", str(config), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: prompts.subject_column: no column 'subj' in {tmp_path / 'pairs.csv'} "
        "(columns: clean, corrupted, answer, wrong_answer)"
    )


def test_the_token_lists_are_named(tmp_path, capsys, no_weights):
    main(["sweep", str(write(tmp_path, rows=[{**PAIRS[0], "corrupted": "The fix jumps over the top"}])), "--dry-run"])
    err = capsys.readouterr().err
    assert "clean ['<|bos|>', 'The'" in err and "vs corrupted ['<|bos|>', 'The'" in err, err


def test_query_heads_range_over_every_head(tmp_path, capsys, no_weights):
    assert main(["sweep", str(write(tmp_path, heads=[3])), "--dry-run"]) == 0  # attn.hook_z: 4 query heads
    capsys.readouterr()


def test_the_sweep_equals_transformer_lens_resumes_and_reports(tmp_path, capsys, tiny_models):
    from patchscope_core import Engine
    from patchscope_core.methods.patching import Pair, check_pair
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    config = write(tmp_path, direction=["denoising", "noising"])
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    assert run_in_process(config, engine, tmp_path / "out") == 48
    assert engine.counts["patch_clean"] == 2 and engine.counts["patch_corrupted"] == 2  # once per pair
    assert run_in_process(config, engine, tmp_path / "out") == 0  # resume: nothing recomputed
    df = ResultStore(tmp_path / "out").read()
    assert len(df) == 48 and df["cell_id"].is_unique
    bridge = engine.model
    recovered = {}  # (row, site, layer, position, head) -> TransformerLens's recovered, denoising
    for row, p in enumerate(PAIRS):
        checked = check_pair(Pair(**p), engine.info)
        clean, corrupted = torch.tensor([checked.clean_ids]), torch.tensor([checked.corrupted_ids])
        n = len(checked.clean_ids)

        def metric(logits):
            return logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]

        with torch.no_grad():
            _, clean_cache = bridge.run_with_cache(clean)
            _, corrupted_cache = bridge.run_with_cache(corrupted)
            expected = {
                "denoising": (
                    tlp.get_act_patch_resid_pre(bridge, corrupted, clean_cache, metric),
                    tlp.get_act_patch_attn_head_out_by_pos(bridge, corrupted, clean_cache, metric),
                ),
                "noising": (
                    tlp.get_act_patch_resid_pre(bridge, clean, corrupted_cache, metric),
                    tlp.get_act_patch_attn_head_out_by_pos(bridge, clean, corrupted_cache, metric),
                ),
            }
            clean_value, corrupted_value = float(metric(bridge(clean))), float(metric(bridge(corrupted)))
        rdf = df[df["row"] == row]
        assert rdf["position"].max() == n - 1 and set(rdf["position"]) == {2, n - 1}
        for r in rdf.itertuples():
            resid, z = expected[r.direction]
            want = (
                float(resid[r.layer, r.position])
                if r.site == "hook_resid_pre"
                else float(z[r.layer, r.position, int(r.head)])
            )
            assert r.patched == pytest.approx(want, abs=1e-4)
            assert r.clean_value == pytest.approx(clean_value, abs=1e-4)
            assert r.corrupted_value == pytest.approx(corrupted_value, abs=1e-4)
            assert r.recovered == pytest.approx(
                (want - corrupted_value) / (clean_value - corrupted_value), rel=1e-3, abs=1e-3
            )
            if r.direction == "denoising":
                key = (row, r.site, r.layer, r.position, None if r.head != r.head else int(r.head))
                recovered[key] = (want - corrupted_value) / (clean_value - corrupted_value)
            assert r.token == engine.info.tokenizer.decode([checked.clean_ids[r.position]])
    assert df.loc[df["site"] == "hook_resid_pre", "head"].isna().all()
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "== activation patching" in capsys.readouterr().out
    out = tmp_path / "out"
    for name in (
        "hook_resid_pre_layer_position.png",
        "attn.hook_z_layer_position.png",
        "attn.hook_z_layer_head.png",
        "attn.hook_z_top_heads.csv",
        "summary.csv",
        "per_pair.csv",
    ):
        assert list(out.glob(f"patching_tiny-llama_denoising_logit_diff*{name}")), name
    # per_pair.csv: each pair's text and the named values, one line per cell and pair (issue 28 item 4)
    per_pair = pd.read_csv(next(out.glob("patching_tiny-llama_denoising_logit_diff_per_pair.csv")))
    assert list(per_pair.columns[:7]) == ["site", "layer", "position", "head", "row", "clean", "corrupted"]
    assert {"answer", "wrong_answer", "token", "recovered", "patched"} <= set(per_pair.columns)
    assert len(per_pair) == len(recovered)
    for r in per_pair.itertuples():
        assert (r.clean, r.corrupted, r.answer) == tuple(PAIRS[r.row][k] for k in ("clean", "corrupted", "answer"))
        key = (r.row, r.site, r.layer, r.position, None if r.head != r.head else int(r.head))
        assert r.recovered == pytest.approx(recovered[key], rel=1e-3, abs=1e-3)
    summary = next(out.glob("patching_tiny-llama_denoising_logit_diff_summary.csv")).read_text()
    assert "ci_low" in summary and "ci_high" in summary
