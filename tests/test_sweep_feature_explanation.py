"""`kind: feature_explanation` end to end on a tiny model (issue 27): a sweep of an SAE saved with
sparsify's own `save_to_disk` (its latents, a top list, the random control), stored and read back
from W&B's own offline run files; a grown sweep (more latents, another template) computes only the
new cells; and every bad input of the issue refused in one line naming the field, before any
weights load and before anything is written."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from sweeps import cli
from sweeps.sinks.store import ResultStore
from tests.configs import changed, write_yaml

TEMPLATES = ['What is "X"? It means "', "cat -> cat\nX ->"]


def base(tmp: Path, sae: Path, **changes) -> dict:
    cfg = {
        "name": "tiny-features",
        "kind": "feature_explanation",
        "models": ["tiny-llama"],
        "features": {"sae": {"path": str(sae), "hookpoint": "layers.1"}, "ids": "0:3"},
        "explanation": {"templates": TEMPLATES[:1], "scales": [1, 4], "max_new_tokens": 4},
        "execution": {"workers": 1, "batch_size": 8},
        "output": {"dir": str(tmp / "out"), "wandb": {"project": "patchscope-sweeps", "mode": "offline"}},
    }
    return changed(cfg, **changes)


def save_sae(folder: Path) -> Path:
    """A 32-latent TopK SAE for tiny-llama's layer 1, built and saved by sparsify itself."""
    from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(0)
    coder = SparseCoder(64, SaeConfig(num_latents=32, k=4))
    coder.W_dec.data = torch.randn_like(coder.W_dec)
    path = folder / "layers.1"
    coder.save_to_disk(path)
    return path


@pytest.fixture(scope="module")
def sae(tmp_path_factory) -> Path:
    return save_sae(tmp_path_factory.mktemp("sae"))


def run(tmp: Path, cfg: dict, capsys) -> tuple[int, str]:
    code = cli.main(["sweep", str(write_yaml(cfg, tmp / "sweep.yaml"))])
    return code, capsys.readouterr().out


def test_a_sweep_stores_every_cell_with_its_measures_and_grows_without_recompute(tmp_path, sae, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, out = run(tmp_path, base(tmp_path, sae), capsys)
    assert code == 0, out
    df = ResultStore(tmp_path / "out").read()
    # 3 latents + 1 control, 1 template, 1 site, 2 scales
    assert len(df) == 8 and "8 computed now" in out
    assert sorted(set(df["source"])) == ["control", "sae"]
    assert sorted(set(df[df.source == "sae"]["feature"])) == ["0", "1", "2"]
    assert set(df["site"]) == {"blocks.1.hook_resid_post"} and set(df["layer"]) == {1}
    for _, g in df.groupby(["source", "feature", "template", "site"]):
        assert g["chosen"].sum() == 1 and sorted(g["scale"]) == [1.0, 4.0]
    for c in ("generated_text", "generated_token_ids", "self_similarity", "entropy", "relevancy", "norm"):
        assert df[c].notna().all(), c
    assert ((df["norm"] / df["site_norm"]) - df["scale"]).abs().max() < 1e-4  # scale x the typical norm
    assert all(isinstance(json.loads(t), list) for t in df["logit_lens_tokens"])
    out_dir = tmp_path / "out"
    assert (out_dir / "features.csv").is_file() and (out_dir / "histogram_measures.png").is_file()

    # the rows equal the core's explain_cells on the same cells (the core is checked against HF)
    from patchscope_core import PatchscopeEngine, load_model
    from patchscope_core.methods.directions import explain_cells

    engine = PatchscopeEngine(load_model("tiny-llama", device="cpu"), name="tiny-llama")
    row = df[(df.source == "sae") & (df.feature == "2") & (df.scale == 4.0)].iloc[0]
    (rec,) = explain_cells(
        engine,
        {
            "source": {"source": "sae", "sae": {"path": str(sae), "hookpoint": "layers.1"}},
            "templates": TEMPLATES[:1],
            "write": "replace",
            "max_new_tokens": 4,
            "cells": [{"source": "sae", "feature": 2, "site": row["site"], "template": 0, "scale": 4.0}],
        },
    )
    assert list(row["generated_token_ids"]) == rec["generated_token_ids"]
    assert row["relevancy"] == pytest.approx(rec["relevancy"], abs=1e-5)

    # W&B's own offline files hold the results table and the report's table
    from tests.test_sweep_ray import read_offline_run

    wb = read_offline_run(out_dir)
    logged = {k for step in wb["history"] for k in step}
    assert "results" in logged and "table/features_table" in logged and "heatmap/measures_histogram" in logged
    table = wb["table"](next(s["results"] for s in wb["history"] if "results" in s))
    assert len(table) == 8 and {r["cell_id"] for r in table} == set(df["cell_id"])

    # grow: two more latents and a second template; the stored cells are kept, not recomputed
    before = df.set_index("cell_id")["generated_text"].to_dict()
    grown = base(tmp_path, sae, features__ids="0:5", explanation__templates=TEMPLATES)
    code, out = run(tmp_path, grown, capsys)
    assert code == 0, out
    df2 = ResultStore(tmp_path / "out").read()
    # old template: 2 new latents x 2 scales; new template: (5 latents + control) x 2 scales
    assert len(df2) == 8 + 4 + 12 and "16 computed now" in out, out
    kept = df2[df2.cell_id.isin(before)]
    assert kept.set_index("cell_id")["generated_text"].to_dict() == before
    assert (kept["task_id"].isin(df["task_id"])).all()


def test_top_latents_and_auto_scales_in_a_dry_run(tmp_path, sae, capsys, no_weights):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat\nParis is\n")
    cfg = base(tmp_path, sae, features__ids=None, features__top={"k": 4, "prompts": str(prompts)})
    cfg["explanation"]["scales"] = "auto"
    cfg["explanation"]["layers"] = [0, 2]
    code = cli.main(["sweep", str(write_yaml(cfg, tmp_path / "sweep.yaml")), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    # (4 ranks x 2 layers + 2 controls) x 6 rungs
    assert "60 cells" in out and "features (sae 4, control 2)" in out


def _nan_vectors(tmp):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(64), "b": torch.full((64,), math.nan)}, str(tmp / "v.safetensors"))
    return {"vectors": {"file": str(tmp / "v.safetensors"), "layers": [1]}}


def _wide_vectors(tmp):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(65)}, str(tmp / "v.safetensors"))
    return {"vectors": {"file": str(tmp / "v.safetensors"), "layers": [1]}}


def _other_width(tmp):
    from sparsify import SaeConfig, SparseCoder

    SparseCoder(96, SaeConfig(num_latents=8)).save_to_disk(tmp / "wide")
    return {"sae": {"path": str(tmp / "wide"), "hookpoint": "layers.1"}, "ids": [0]}


BAD = [
    (
        "no-placeholder",
        {"explanation__templates": ["What is it?"]},
        "explanation.templates: [0] 'What is it?' has no placeholder X",
    ),
    ("latent-out-of-range", {"features__ids": [3, 32]}, "features.ids: latent 32 is out of range 0 .. 31"),
    ("empty-ids", {"features__ids": []}, "features.ids: empty id list"),
    (
        "hookpoint",
        {"features__sae__hookpoint": "layers.7"},
        "features.sae.hookpoint: tiny-llama has no module 'layers.7'",
    ),
    ("scale-zero", {"explanation__scales": [1, 0]}, "explanation.scales: every scale must be a finite number > 0"),
    ("scale-negative", {"explanation__scales": [-2]}, "explanation.scales: every scale must be a finite number > 0"),
    ("other-width", _other_width, "features.sae: the SAE reads vectors of width 96"),
    ("nan-vector", _nan_vectors, "features.vectors.file: vector 'b' holds NaN"),
    ("wide-vector", _wide_vectors, "features.vectors.file: vector 'a' has shape [65]"),
    (
        "top-too-many",
        {"features__ids": None, "features__top": {"k": 33, "prompts": ["a"]}},
        "features.top.k: 33 is more than",
    ),
]


@pytest.mark.parametrize("name, change, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_the_field_before_weights_load(
    name, change, expected, tmp_path, sae, capsys, no_weights
):
    if callable(change):
        cfg = base(tmp_path, sae)
        cfg["features"] = change(tmp_path)
    else:
        cfg = base(tmp_path, sae, **change)
    path = write_yaml(cfg, tmp_path / "sweep.yaml")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    t0 = time.perf_counter()
    code = cli.main(["sweep", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {expected}"), err
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "refusing bad input wrote something"
    assert time.perf_counter() - t0 < 30
