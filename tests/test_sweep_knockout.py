"""Attention knockout in `kind: intervention` sweeps (Geva et al.'s recall study as a sweep).

An in-process sweep on the tiny Llama (the sweep's own path without Ray: config, rows, grid,
payloads, worker, records, store) must give, for every cell, the p(answer's first token) of a
plain Hugging Face copy on eager attention with the blocked (layer, query, key) scores set to the
dtype's minimum by hand (tests/test_core_knockout.py's reference), and `p_change_pct` against
the same copy's clean run; the store resumes with nothing recomputed and `patchscope report`
draws the curves. Bad knockout settings are refused before any weights load, field first.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest
import torch

from patchscope_core.models.sites import window_layers
from patchscope_core.models.tokens import subject_span
from sweeps.config import ConfigError
from tests.configs import write_yaml
from tests.golden.common import run_in_process
from tests.test_core_knockout import hf_copy, masked

FACTS = [
    ("Paris is the capital of France", "Paris", " and"),
    ("Water is a liquid and", "Water", " it"),
    ("The capital city of x is", "x", " the"),
]


def _config(tmp_path: Path, **intervention) -> Path:
    with open(tmp_path / "facts.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "subject", "answer"])
        w.writerows(FACTS)
    cfg = {
        "name": "ko",
        "kind": "intervention",
        "models": ["tiny-llama"],
        "prompts": {
            "file": "facts.csv",
            "prompt_column": "prompt",
            "subject_column": "subject",
            "answer_column": "answer",
        },
        "intervention": {
            "site": "blocks.{layer}.attn",
            "layers": [1, 2],
            "kind": "knockout",
            "from": "last",
            "to": ["subject", "last", [0, "last"]],
            "window": 3,
            **intervention,
        },
        "generation": {"max_new_tokens": 1},
        "execution": {"workers": 1, "batch_size": 4},
        "output": {"dir": str(tmp_path / "out")},
    }
    return write_yaml(cfg, tmp_path / "sweep.yaml")


@pytest.fixture(scope="module")
def engine(tiny_models):
    from patchscope_core import PatchscopeEngine

    return PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")


@torch.no_grad()
def _p_first(hf, ids: list[int], answer_first: int, blocked, n_heads: int) -> float:
    handles = masked(hf, len(ids), blocked, n_heads) if blocked else []
    try:
        logits = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits, -1)[answer_first])


def test_every_cell_equals_eager_attention_with_the_edges_masked_by_hand(tmp_path, engine):
    config = _config(tmp_path)
    assert run_in_process(config, engine, tmp_path / "out") == 3 * 2 * 3  # facts x layers x key sets
    from sweeps.sinks.store import ResultStore

    df = ResultStore(tmp_path / "out").read()
    assert set(df["knockout"]) == {"last -> subject, window 3", "last -> last, window 3", "last -> 0 last, window 3"}
    hf, info, n_heads = hf_copy("tiny-llama"), engine.info, engine.info.n_heads
    moved = 0.0
    for r in df.itertuples():
        ids, first = list(r.prompt_token_ids), int(r.answer_token_ids[0])
        n = len(ids)
        subject = dict((p, s) for p, s, _ in FACTS)[r.prompt]
        keys = {
            "last -> subject, window 3": set(range(*subject_span(info, r.prompt, subject))),
            "last -> last, window 3": {n - 1},
            "last -> 0 last, window 3": {0, n - 1},
        }[r.knockout]
        layers = set(window_layers("attn_out", int(r.layer), 3, info.n_layers))
        blocked = lambda l, h, q, k, n_, keys=keys, layers=layers: l in layers and q == n_ - 1 and k in keys  # noqa: E731
        want = _p_first(hf, ids, first, blocked, n_heads)
        clean = _p_first(hf, ids, first, None, n_heads)
        assert r.p_answer == pytest.approx(want, abs=1e-5), r
        assert r.baseline_p_answer == pytest.approx(clean, abs=1e-5), r
        assert r.p_change_pct == pytest.approx(100 * (want - clean) / clean, abs=1e-2), r
        moved = max(moved, abs(r.p_change_pct))
    assert moved > 1.0, "no knockout moved p(answer): the check could not fail"

    assert run_in_process(config, engine, tmp_path / "out") == 0  # resumed: nothing recomputed

    from sweeps.cli import main

    assert main(["report", str(tmp_path / "out")]) == 0
    curves = pd.read_csv(tmp_path / "out" / "knockout_curves.csv")
    assert len(curves) == 3 * 2 and (tmp_path / "out" / "knockout_tiny-llama.png").stat().st_size > 0
    sub = df[df["knockout"] == "last -> subject, window 3"]
    got = curves[curves["knockout"] == "last -> subject, window 3"].set_index("layer")["mean"]
    for layer, g in sub.groupby("layer"):
        assert got[layer] == pytest.approx(g["p_change_pct"].mean())


def test_the_example_is_geva_et_al_s_study(no_weights):
    from sweeps.run.driver import plan

    p = plan("sweeps/examples/attention_knockout.yaml")
    assert sorted(v["to"] for _, v in p.context.values()) == [["last"], ["non_subject"], ["subject"]]
    assert {v["window"] for _, v in p.context.values()} == {9} and p.n_cells == len(p.rows) * 30 * 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"to": None}, r"intervention.*to: a knockout needs the keys"),
        ({"window": 0}, r"window: expected an integer >= 1"),
        ({"to": ["nowhere"]}, r"\.to: expected prompt positions"),
        ({"to": [99]}, r"\.to: .*99"),
    ],
)
def test_bad_knockouts_are_refused_before_any_weights_load(tmp_path, no_weights, change, message):
    from sweeps.run.driver import plan

    config = _config(tmp_path, **change)
    with pytest.raises(ConfigError, match=message):
        plan(str(config))


def test_subject_keys_without_a_subject_column_are_refused(tmp_path, no_weights):
    import yaml

    from sweeps.run.driver import plan

    config = _config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["prompts"]["subject_column"]
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"subject"):
        plan(str(config))
