"""`patchscope patch`: one clean/corrupted pair, the grid as one JSON object."""

from __future__ import annotations

import json

import pytest
import torch

from sweeps.cli import main

CLEAN, CORRUPTED = "The fox jumps over the", "The fix jumps over the"


def args(**over) -> list[str]:
    a = {
        "--model": "tiny-llama",
        "--clean": CLEAN,
        "--corrupted": CORRUPTED,
        "--answer": " dog",
        "--wrong-answer": " cat",
        "--site": "blocks.{layer}.attn.hook_z",
        "--layer": "2",
        "--head": "1",
    }
    a.update(over)
    out = ["patch"]
    for k, v in a.items():
        if v is not None:
            out += [k, *v] if isinstance(v, list) else [k, v]
    return out


def test_json_grid_equals_the_bridge_patching_each_cell(tiny_models, capsys):
    assert main(args(**{"--direction": ["denoising", "noising"], "--json": []})) == 0
    out = json.loads(capsys.readouterr().out)
    model = tiny_models["tiny-llama"]
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    n = clean.shape[1]
    assert out["clean_tokens"] == [model.tokenizer.decode([t]) for t in clean[0].tolist()]
    assert [(c["position"], c["direction"]) for c in out["cells"]] == [
        (p, d) for p in range(n) for d in ("denoising", "noising")
    ]
    a = model.tokenizer(" dog", add_special_tokens=False)["input_ids"][0]
    w = model.tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        caches = {name: model.run_with_cache(t)[1] for name, t in (("clean", clean), ("corrupted", corrupted))}
        for c in out["cells"]:
            base, source = (corrupted, "clean") if c["direction"] == "denoising" else (clean, "corrupted")

            def write(x, hook, p=c["position"], src=source):
                x = x.clone()
                x[:, p, 1] = caches[src][hook.name][:, p, 1]
                return x

            logits = model.run_with_hooks(base, fwd_hooks=[("blocks.2.attn.hook_z", write)])[0, -1]
            assert c["patched"] == pytest.approx(float(logits[a] - logits[w]), abs=1e-4)
            assert c["site"] == "blocks.2.attn.hook_z" and c["head"] == 1 and c["metric"] == "logit_diff"
            den = c["clean_value"] - c["corrupted_value"]
            assert c["recovered"] == pytest.approx((c["patched"] - c["corrupted_value"]) / den, abs=1e-6)
    assert out["counts"]["patch_clean"] == 1 and out["counts"]["patch_corrupted"] == 1


def test_all_positions_and_text_output(tiny_models, capsys):
    assert main(args(**{"--site": "hook_resid_pre", "--layer": "0", "--head": None, "--position": "all"})) == 0
    text = capsys.readouterr().out
    assert "all positions" in text and "recovered 1.000" in text


@pytest.mark.parametrize(
    "over,field",
    [
        ({"--corrupted": "The dog jumps over the"}, "pair:"),
        ({"--wrong-answer": " dog"}, "pair.wrong_answer:"),
        ({"--wrong-answer": None}, "pair.wrong_answer:"),
        ({"--site": "attn.hook_zz"}, "patching.sites[0]:"),
        ({"--site": "attn.hook_v", "--head": "2"}, "patching.heads:"),
        ({"--position": "40"}, "patching.positions:"),
        ({"--layer": "x"}, "--layer:"),
    ],
)
def test_bad_input_exits_2_naming_the_field_before_weights_load(no_weights, capsys, over, field):
    assert main(args(**over)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}"), err
