"""Explaining directions (`patchscope_core.methods.directions`, issue 27) against plain Hugging Face.

The reference is a tiny Llama built by Hugging Face alone with the same seeded weights: a forward
hook on the decoder layer writes the vector at the placeholder positions in the first forward pass
of `generate` (the prefill, KV cache on) and never again; the measures are computed directly from
single uncached forward passes (self-similarity from the last layer's output, entropy of the first
generated token, SelfIE's relevancy). SAEs are built and saved with sparsify's own classes and
loaded by path; `top` is checked against sparsify's own `encode`; a SAELens-format directory is
written with that format's keys and shapes.
"""

from __future__ import annotations

import json

import pytest
import torch

from patchscope_core import Decoding, PatchscopeEngine, PatchscopeError
from patchscope_core.methods import directions as D
from patchscope_core.models import model_info, tokenize

TEMPLATES = ['What is "X"? It means "', "cat -> cat\nX -> X ->"]
N_NEW = 6


@pytest.fixture(scope="module")
def engine(tiny_models):
    return PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama", decoding=Decoding())


@pytest.fixture(scope="module")
def hf():
    from patchscope_core.models.loading import _tiny_hf_model

    model, _ = _tiny_hf_model("tiny-llama")  # Hugging Face's own model, no bridge
    return model.float().eval()


def _out(out):
    return out[0] if isinstance(out, tuple) else out


def _with(out, hidden):
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


def _writer(vector, positions, mode, once):
    calls = []

    def write(mod, args, out):
        calls.append(1)
        if once and len(calls) > 1:
            return out
        h = _out(out).clone()
        h[0, list(positions)] = vector if mode == "replace" else h[0, list(positions)] + vector
        return _with(out, h)

    return write


@torch.no_grad()
def hf_explain(hf, tok, ids, positions, layer, vector, direction, mode="replace"):
    """(generated ids, self_similarity, entropy, relevancy) with plain Hugging Face."""
    x = torch.tensor([ids])
    handle = hf.model.layers[layer].register_forward_hook(_writer(vector, positions, mode, once=True))
    try:
        seq = hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id
        )
    finally:
        handle.remove()
    gen = seq[0, len(ids) :].tolist()
    if tok.eos_token_id in gen:
        gen = gen[: gen.index(tok.eos_token_id) + 1]
    full = torch.tensor([list(ids) + gen])
    late = {}

    def keep(mod, args, out) -> None:
        late["h"] = _out(out)[0].clone()

    handles = [
        hf.model.layers[layer].register_forward_hook(_writer(vector, positions, mode, once=False)),
        hf.model.layers[-1].register_forward_hook(keep),
    ]
    try:
        patched = torch.log_softmax(hf(full).logits[0].float(), -1)
    finally:
        for h in handles:
            h.remove()
    clean = torch.log_softmax(hf(full).logits[0].float(), -1)
    n = len(ids)
    at = torch.arange(n - 1, n - 1 + len(gen))
    p_lp, c_lp = patched[at, gen], clean[at, gen]
    first = patched[n - 1]
    sims = torch.nn.functional.cosine_similarity(late["h"][list(positions)], direction[None], dim=-1)
    return gen, float(sims.mean()), float(-(first.exp() * first).sum()), float((p_lp - c_lp).mean())


@torch.no_grad()
def hf_typical_norm(hf, ids, layer):
    h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0, 1:]
    return float(h.norm(dim=-1).median())


def check_cells(engine, hf, payload, directions, layer):
    """Every record of explain_cells equals the Hugging Face reference writing scale x typical
    norm x the unit direction at the placeholders."""
    records = D.explain_cells(engine, payload, batch_size=4)
    tok = engine.model.tokenizer
    for cell, rec in zip(payload["cells"], records, strict=True):
        ids, positions = D.placeholders(engine.info, payload["templates"][cell["template"]], "t")
        assert [tok.decode([ids[p]]).strip() for p in positions] == ["X"] * len(positions)
        d = directions[cell["feature"]] if cell.get("rank") is None else directions[rec["feature"]]
        unit = d.float() / d.float().norm()
        norm = hf_typical_norm(hf, ids, layer)
        vector = unit * cell["scale"] * norm
        gen, sim, ent, rel = hf_explain(hf, tok, ids, positions, layer, vector, unit, payload["write"])
        assert rec["generated_token_ids"] == gen, (cell, rec["generated_text"])
        assert rec["norm"] == pytest.approx(float(vector.norm()), rel=1e-5)
        assert rec["self_similarity"] == pytest.approx(sim, abs=1e-4)
        assert rec["entropy"] == pytest.approx(ent, abs=1e-4)
        assert rec["relevancy"] == pytest.approx(rel, abs=1e-4)
        lens = hf.lm_head(hf.model.norm(unit[None])).topk(payload["logit_lens_k"]).indices[0].tolist()
        assert rec["logit_lens_token_ids"] == lens
    return records


def payload(source, cells, write="replace"):
    return {
        "source": source,
        "templates": TEMPLATES,
        "write": write,
        "max_new_tokens": N_NEW,
        "logit_lens_k": 5,
        "cells": cells,
    }


def cells_for(features, site, scales=(0.5, 4.0), **extra):
    return [
        {"feature": f, "site": site, "template": t, "scale": s, "feature_site": site, **extra}
        for f in features
        for t in range(len(TEMPLATES))
        for s in scales
    ]


@pytest.fixture(scope="module")
def sparsify_sae(tmp_path_factory):
    from sparsify import SaeConfig, SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder(64, SaeConfig(num_latents=128, k=8))
    torch.nn.init.normal_(sae.encoder.weight)
    torch.nn.init.normal_(sae.encoder.bias, std=0.5)
    sae.W_dec.data = torch.randn_like(sae.W_dec)
    path = tmp_path_factory.mktemp("sae") / "layers.1"
    sae.save_to_disk(path)
    return path, SparseCoder.load_from_disk(path)


def test_sae_latents_from_sparsify_equal_plain_hugging_face(engine, hf, sparsify_sae):
    path, sae = sparsify_sae
    spec = {"path": str(path), "hookpoint": "layers.1"}
    header = D.sae_header(spec, engine.info)
    assert (header.d_in, header.n_latents, header.site) == (64, 128, "blocks.1.hook_resid_post")
    cells = cells_for([3, 77], header.site, source="sae")
    records = check_cells(engine, hf, payload({"source": "sae", "sae": spec}, cells), sae.W_dec.detach(), 1)
    assert [r["feature"] for r in records] == [c["feature"] for c in cells]
    for members in (records[:2], records[2:4]):  # one (feature, template): exactly one rung chosen
        assert sum(r["chosen"] for r in members) == 1


def test_written_vector_is_the_scaled_decoder_row(engine, sparsify_sae):
    """What the engine writes at the placeholder is scale x typical norm x W_dec[i] / |W_dec[i]|:
    the residual read back at that position (replace) is exactly it."""
    path, sae = sparsify_sae
    got = {}

    def read(x, ctx):
        got["x"] = x[0].clone()

    ids, positions = D.placeholders(engine.info, TEMPLATES[0], "t")
    site = D.resolve_site(D.Site("blocks.1.hook_resid_post"), engine.info)
    norm = D.typical_norm(engine, site, [ids])
    records = D.explain_cells(
        engine,
        payload(
            {"source": "sae", "sae": {"path": str(path), "hookpoint": "layers.1"}},
            cells_for([5], site.site.hook, (2.0,), source="sae")[:1],
        ),
    )
    d = sae.W_dec.detach()[5]
    want = d / d.norm() * 2.0 * norm
    kind_runs, actions = D._runs([D.Explanation(ids, positions, site, want, d, max_new_tokens=1)], engine, score=False)
    hooks = engine._dispatch_hooks(kind_runs, actions) + [(site, read)]
    engine._forward(kind_runs, hooks)
    for p in positions:
        torch.testing.assert_close(got["x"][p], want, rtol=0, atol=1e-5)
    assert records[0]["norm"] == pytest.approx(float(want.norm()), rel=1e-5)


def test_top_latents_equal_sparsify_encode(engine, hf, sparsify_sae):
    path, sae = sparsify_sae
    prompts = ["the cat sat on the mat", "Paris is the capital of France", "1 2 3 4"]
    best = torch.zeros(128)
    info = model_info("tiny-llama")
    for p in prompts:
        ids = tokenize(info, p)
        with torch.no_grad():
            h = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1 if info.prepend_bos else 0 :]
            enc = sae.encode(h)
        for acts, idx in zip(enc.top_acts, enc.top_indices):
            for a, i in zip(acts.tolist(), idx.tolist()):
                best[i] = max(best[i], a)
    want = sorted(range(128), key=lambda i: (-float(best[i]), i))[:6]
    source = {"source": "sae", "sae": {"path": str(path), "hookpoint": "layers.1"}, "top": {"k": 6, "prompts": prompts}}
    cells = [
        {
            "source": "sae",
            "feature": "",
            "rank": r,
            "feature_site": "blocks.1.hook_resid_post",
            "site": "blocks.1.hook_resid_post",
            "template": 0,
            "scale": 1.0,
        }
        for r in range(6)
    ]
    records = D.explain_cells(engine, payload(source, cells))
    assert [r["feature"] for r in records] == want
    check_cells(engine, hf, payload(source, cells[:2]), sae.W_dec.detach(), 1)


def test_saelens_directory_is_read(engine, hf, tmp_path):
    """A directory in SAELens's saved format: cfg.json (d_in, d_sae, hook_name) and
    sae_weights.safetensors (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    w = {
        "W_enc": torch.randn(64, 96, generator=g),
        "b_enc": torch.randn(96, generator=g),
        "W_dec": torch.randn(96, 64, generator=g),
        "b_dec": torch.randn(64, generator=g),
    }
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {
        "d_in": 64,
        "d_sae": 96,
        "hook_name": "blocks.2.hook_resid_post",
        "architecture": "standard",
        "dtype": "float32",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    spec = {"saelens": str(tmp_path)}
    header = D.sae_header(spec, engine.info)
    assert (header.n_latents, header.site, header.form) == (96, "blocks.2.hook_resid_post", "saelens")
    cells = cells_for([0, 95], header.site, (1.0,), source="sae")
    check_cells(engine, hf, payload({"source": "sae", "sae": spec}, cells, write="add"), w["W_dec"], 2)
    # its encoder: ReLU((x - b_dec) W_enc + b_enc), the latents' maxima over tokens
    x = torch.randn(5, 64, generator=g)
    want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).max(0).values
    torch.testing.assert_close(D.Sae(spec).max_activations(x), want)


def test_neurons_and_vectors_equal_plain_hugging_face(engine, hf, tmp_path):
    from safetensors.torch import save_file

    w_out = hf.model.layers[2].mlp.down_proj.weight.detach().T  # [d_mlp, d_model]
    torch.testing.assert_close(D.neuron_directions(engine, 2), w_out)
    cells = cells_for([0, 100], "blocks.2.hook_resid_post", (1.0, 8.0), source="neuron", feature_layer=2)
    check_cells(engine, hf, payload({"source": "neuron"}, cells), w_out, 2)

    g = torch.Generator().manual_seed(2)
    vectors = {"up": torch.randn(64, generator=g), "down": torch.randn(64, generator=g)}
    save_file(vectors, str(tmp_path / "dirs.safetensors"))
    source = {"source": "vector", "file": str(tmp_path / "dirs.safetensors")}
    cells = cells_for(["up", "down"], "blocks.0.hook_resid_post", (2.0,), source="vector")
    check_cells(engine, hf, payload(source, cells), vectors, 0)


def test_matches_logit_lens_is_judged_against_the_cells_own_template(engine, monkeypatch):
    calls = []
    real = D.mentions

    def spy(text, tokens, ignore=""):
        calls.append((text, list(tokens), ignore))
        return real(text, tokens, ignore)

    monkeypatch.setattr(D, "mentions", spy)
    cells = cells_for([0], "blocks.2.hook_resid_post", (1.0,), source="neuron", feature_layer=2)
    records = D.explain_cells(engine, payload({"source": "neuron"}, cells))
    assert [ignore for _, _, ignore in calls] == [TEMPLATES[c["template"]] for c in cells]
    assert [(t, w) for t, w, _ in calls] == [(r["generated_text"], r["logit_lens_tokens"]) for r in records]


def test_gpt2_neurons_are_conv1d_rows(tiny_models):
    e = PatchscopeEngine(tiny_models["tiny-gpt2"], name="tiny-gpt2")
    conv = tiny_models["tiny-gpt2"].original_model.transformer.h[1].mlp
    weight = getattr(conv, "c_proj", None) or conv._modules["_original_component"].c_proj
    torch.testing.assert_close(D.neuron_directions(e, 1), weight.weight.detach().float())


def test_hookpoints_translate_through_the_bridge():
    llama, gpt2 = model_info("tiny-llama"), model_info("tiny-gpt2")
    assert D.hookpoint_site(llama, "layers.1", "h") == "blocks.1.hook_resid_post"
    assert D.hookpoint_site(llama, "layers.3.mlp", "h") == "blocks.3.hook_mlp_out"
    assert D.hookpoint_site(llama, "layers.0.self_attn", "h") == "blocks.0.hook_attn_out"
    assert D.hookpoint_site(gpt2, "h.2", "h") == "blocks.2.hook_resid_post"
    with pytest.raises(PatchscopeError, match=r"^features.sae.hookpoint: tiny-llama has no module 'layers.9'"):
        D.hookpoint_site(llama, "layers.9", "features.sae.hookpoint")


def test_choose_scale_and_mentions():
    # rung 3 has the lowest entropy but lost the feature (self-similarity below half the best)
    assert D.choose_scale([0.2, 0.6, 0.8, 0.1], [3.0, 2.0, 2.5, 0.5]) == 1
    assert D.mentions('"Paris", the capital', [" Paris", "x"]) and not D.mentions("a cat", [" dog", "c"])
    # the template's own words are no evidence: an echo of SelfIE's template does not name " the" or " of"
    selfie = 'What is the meaning of the word "X"? The meaning of the word "X" is "'
    assert D.mentions('the meaning of the word "the"', [" the", " of"])
    assert not D.mentions('the meaning of the word "the"', [" the", " of"], ignore=selfie)
    assert D.mentions('"Paris", the capital', [" the", " Paris"], ignore=selfie)
