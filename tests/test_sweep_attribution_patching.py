"""`kind: attribution_patching` (issue 17): the shipped example parses and counts, bad input is
refused before any weights load naming the field, and an in-process sweep on tiny-llama stores
estimates equal to TransformerLens's `attribution_patch`, exact values equal to the bridge's own
patching (run_with_hooks), resumes with nothing recomputed and reports its statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformer_lens.tools.analysis.attribution_patching import Node, attribution_patch

from sweeps.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "ioi_attribution.yaml"
PAIRS = [
    {
        "clean": "The fox jumps over the",
        "corrupted": "The fix jumps over the",
        "answer": " dog",
        "wrong_answer": " cat",
    },
    {"clean": "A fox sat on the", "corrupted": "A fix sat on the", "answer": " mat", "wrong_answer": " rug"},
    {
        "clean": "The fox jumps over the",
        "corrupted": "The fax jumps over the",
        "answer": " dog",
        "wrong_answer": " cat",
    },
]
SITES = [
    "blocks.{layer}.attn.hook_z",
    "blocks.{layer}.attn.hook_q",
    "blocks.{layer}.attn.hook_k",
    "blocks.{layer}.hook_mlp_out",
]


def write(tmp_path: Path, rows=None, prompts=None, **attribution) -> Path:
    cfg = {
        "name": "atp",
        "kind": "attribution_patching",
        "models": ["tiny-llama"],
        "prompts": prompts
        or {
            "rows": rows or PAIRS,
            "clean_column": "clean",
            "corrupted_column": "corrupted",
            "answer_column": "answer",
            "wrong_answer_column": "wrong_answer",
        },
        "attribution": {"sites": SITES, "layers": "all", "method": ["atp", "atp_star"], **attribution},
        "execution": {"workers": 1, "batch_size": 16},
        "output": {"dir": str(tmp_path / "out"), "wandb": {"mode": "disabled"}},
    }
    path = tmp_path / "atp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_shipped_example_parses_and_counts(capsys, no_weights):
    assert main(["sweep", str(EXAMPLE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 2 methods x 30 layers x (9 + 9 + 3 + 1 units) x (positions + their sum): 12 pairs of 15
    # tokens, 10 of 16 (2 x 30 x 22 x (12 x 16 + 10 x 17)), in batches of 8: 4 tasks
    assert "sweep ioi-attribution (attribution_patching): 477840 cells in 4 tasks" in out


BAD = [
    (dict(method="eap"), "attribution.method: "),
    (dict(metric="accuracy"), "attribution.metric: "),
    (
        dict(sites=["blocks.{layer}.hook_resid_post"]),
        "attribution.sites[0]: hook_resid_post is hook_resid_pre of the next",
    ),
    (dict(sites=["blocks.{layer}.hook_nope"]), "attribution.sites[0]: unknown site"),
    (dict(layers=[7]), "attribution.layers: "),
    (dict(verify={"positions": "some"}), "attribution.verify.positions: "),
    (dict(verify={"top_k": -1}), "attribution.verify.top_k: "),
    (
        dict(
            prompts={"rows": PAIRS, "clean_column": "clean", "corrupted_column": "corrupted", "answer_column": "answer"}
        ),
        "prompts.wrong_answer_column: metric logit_diff needs a wrong answer",
    ),
    (
        dict(rows=[{**PAIRS[0], "corrupted": "The fix jumps over the top"}]),
        "prompts.corrupted_column: prompts (prompts.rows row 1): clean and corrupted prompts must have the same number",
    ),
    (
        dict(prompts={"rows": PAIRS, "corrupted_column": "corrupted", "answer_column": "answer"}),
        "prompts.clean_column: an attribution_patching sweep needs it",
    ),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_input_is_refused_before_weights_load(tmp_path, capsys, no_weights, kwargs, message):
    assert main(["sweep", str(write(tmp_path, **kwargs)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err, err
    assert not (tmp_path / "out").exists()


def _tl_scores(bridge, checked):
    def metric(logits):
        return logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]

    return attribution_patch(
        bridge, torch.tensor([checked.clean_ids]), torch.tensor([checked.corrupted_ids]), metric
    ).node_scores, metric


def test_the_sweep_equals_transformer_lens_and_exact_patching_resumes_and_reports(tmp_path, capsys, tiny_models):
    from patchscope_core import Engine
    from patchscope_core.methods.patching import Pair, check_pair
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    config = write(tmp_path, verify={"top_k": 3, "random": 40, "positions": "all"})
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    info = engine.info
    lengths = [len(check_pair(Pair(**p), info).clean_ids) for p in PAIRS]
    assert lengths[0] == lengths[2] != lengths[1]
    n = run_in_process(config, engine, tmp_path / "out")
    assert engine.counts["attribution_backward"] == 2  # pairs 1 and 3 (same length) in one batch
    assert run_in_process(config, engine, tmp_path / "out") == 0  # resume: nothing recomputed
    df = ResultStore(tmp_path / "out").read()
    assert len(df) == n and df["cell_id"].is_unique
    # per pair: 2 methods x 4 layers x (positions + their sum) x (4 + 4 + 2 + 1) units
    assert n == sum(2 * 4 * (m + 1) * 11 for m in lengths)
    bridge = engine.model
    for row, p in enumerate(PAIRS):
        checked = check_pair(Pair(**p), info)
        scores, metric = _tl_scores(bridge, checked)
        rdf = df[(df["row"] == row) & (df["method"] == "atp")]
        each = rdf[rdf["position"].notna()]
        for r in each[each["site"].isin(["attn.hook_z", "hook_mlp_out"])].itertuples():
            node = (
                Node("attn_head_out", int(r.position), r.layer, int(r.head))
                if r.site == "attn.hook_z"
                else Node("mlp_out", int(r.position), r.layer)
            )
            assert r.estimate == pytest.approx(float(scores[node]), rel=1e-4, abs=1e-6)
            assert r.token == info.tokenizer.decode([checked.clean_ids[int(r.position)]])
            assert pd_isnull(r.exact)  # verify.positions: all
        # the sum rows are the sums over positions
        sums = rdf[rdf["position"].isna()].set_index(["site", "layer", "head"])["estimate"]
        by_pos = each.groupby(["site", "layer", "head"])["estimate"].sum()
        assert torch.allclose(
            torch.tensor(sums.loc[by_pos.index].to_numpy()), torch.tensor(by_pos.to_numpy()), atol=1e-5
        )
        # AtP* changes only the q/k estimates (the QK fix); z and MLP are plain AtP
        star = df[(df["row"] == row) & (df["method"] == "atp_star")].set_index(["site", "layer", "position", "head"])
        plain = rdf.set_index(["site", "layer", "position", "head"])
        z = [k for k in plain.index if k[0] in ("attn.hook_z", "hook_mlp_out")]
        assert torch.allclose(
            torch.tensor(star.loc[z, "estimate"].to_numpy()), torch.tensor(plain.loc[z, "estimate"].to_numpy())
        )
        # exact: every summed node was patched (top 3 + 40 random covers 16 heads); it is the
        # bridge's own patch of that head at every position, minus the corrupted metric
        with torch.no_grad():
            _, clean_cache = bridge.run_with_cache(torch.tensor([checked.clean_ids]))
            base = float(metric(bridge(torch.tensor([checked.corrupted_ids]))))
        summed = rdf[rdf["position"].isna()]
        assert summed["exact"].notna().all() and set(summed["verified"]) == {"all"}
        for r in summed[summed["site"] == "attn.hook_z"].itertuples():
            head = int(r.head)

            def write_head(x, hook, head=head):
                x = x.clone()
                x[:, :, head] = clean_cache[hook.name][:, :, head]
                return x

            with torch.no_grad():
                patched = float(
                    metric(
                        bridge.run_with_hooks(
                            torch.tensor([checked.corrupted_ids]),
                            fwd_hooks=[(f"blocks.{r.layer}.attn.hook_z", write_head)],
                        )
                    )
                )
            assert r.exact == pytest.approx(patched - base, abs=1e-4)
            assert r.corrupted_value == pytest.approx(base, abs=1e-4)
    assert main(["report", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "== attribution patching" in out and "attn.hook_z atp: 48 nodes" in out
    summary = (tmp_path / "out" / "attribution_tiny-llama_summary.csv").read_text()
    assert "recall@10" in summary and "spearman" in summary
    # the largest |estimate| listed per site (issue 28 item 5), its first node the site's own largest
    summed = df[df["position"].isna()]
    for (method, site), g in summed.groupby(["method", "site"]):
        line = next(
            x for x in out.splitlines() if x.startswith(f"  tiny-llama {method} {site}: largest mean |estimate|")
        )
        means = g.groupby(["layer", "head", "neuron"], dropna=False)["estimate"].mean()
        layer, head, neuron = means.abs().idxmax()
        first = (
            f"L{int(layer)}"
            + ("" if head != head else f"H{int(head)}")
            + ("" if neuron != neuron else f"N{int(neuron)}")
        )
        assert line.split(": ", 2)[2].startswith(f"{first} "), (line, first)
    for name in (
        "attn.hook_z_layer_head.png",
        "attn.hook_z_scatter.png",
        "attn.hook_k_layer_head.png",
        "hook_mlp_out_scatter.png",
    ):
        assert (tmp_path / "out" / f"attribution_tiny-llama_{name}").is_file(), name


@pytest.mark.parametrize("workers,tasks", [(1, 2), (2, 3), (4, 3)])
def test_a_few_pairs_are_cut_into_tasks_so_progress_moves(tmp_path, capsys, no_weights, workers, tasks):
    """Pairs 1 and 3 have one token length: one batch while that makes two tasks per worker,
    else a task per pair (issue 28 item 5: a sweep of a few pairs was one task, its progress at 0%)."""
    cfg = yaml.safe_load(write(tmp_path).read_text())
    cfg["execution"] = {"workers": workers, "batch_size": 16}
    (tmp_path / "atp.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(tmp_path / "atp.yaml"), "--dry-run"]) == 0
    assert f"cells in {tasks} tasks" in capsys.readouterr().out


def test_a_sample_is_verified_by_position_and_bounds_the_false_negatives(tmp_path, capsys, tiny_models):
    from patchscope_core import Engine
    from sweeps.kinds.attribution_patching import attribution_summary
    from sweeps.sinks.store import ResultStore
    from tests.golden.common import run_in_process

    config = write(
        tmp_path,
        sites=["blocks.{layer}.attn.hook_z"],
        method="atp",
        verify={"top_k": 2, "random": 3, "positions": "each"},
    )
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    run_in_process(config, engine, tmp_path / "out")
    df = ResultStore(tmp_path / "out").read()
    checked = df[df["exact"].notna()]
    assert checked["position"].notna().all()
    for _, g in checked.groupby("row"):
        assert (g["verified"] == "top").sum() == 2 and (g["verified"] == "random").sum() == 3
        top = g[g["verified"] == "top"]["estimate"].abs().min()
        pair = df[(df["row"] == g["row"].iloc[0]) & df["position"].notna()]
        assert (pair["estimate"].abs() > top).sum() < 2  # the top nodes are the largest |estimate|
    table = attribution_summary(df)
    (row,) = table.to_dict("records")
    assert row["nodes"] == 3 * 5 and row["sampled"] <= 3 * 3 and row["false_negative_bound"] is not None
    assert row["recall@10"] is None or row["recall@10"] != row["recall@10"]  # not the whole grid: no recall


def pd_isnull(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_a_pairs_file_that_is_not_utf8_names_prompts_file(tmp_path, capsys, no_weights):
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("clean,corrupted,answer,wrong_answer\nCaf\xe9 is,Cafe is, x, y\n".encode("latin-1"))
    config = write(
        tmp_path,
        prompts={
            "file": str(pairs),
            "clean_column": "clean",
            "corrupted_column": "corrupted",
            "answer_column": "answer",
            "wrong_answer_column": "wrong_answer",
        },
    )
    assert main(["sweep", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompts.file: ") and "not UTF-8" in err, err
