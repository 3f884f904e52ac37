"""The paper's recipes in the core (patchscope_core.recipes): every metric against hand-computed
values, every recipe's construction (which positions, layers, prompts and tokens), and the
probes' results against independent computations on the tiny models (TransformerLens'
run_with_cache and run_with_hooks, plain Hugging Face modules, numpy's least squares)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from patchscope_core import PatchscopeEngine, PatchscopeError
from patchscope_core.methods.patchscope import Source, Target
from patchscope_core.recipes import (
    ENTITY_PROMPT,
    IDENTITY_PROMPT,
    AttributeExtraction,
    CrossModel,
    EntityDescription,
    MultiHop,
    Probe,
    RecipeRunner,
    TokenIdentity,
    contains_answer,
    corpus_windows,
    description_of,
    final_logprobs,
    fit_affine,
    fit_affine_maps,
    load_chains,
    load_entities,
    load_lre,
    positions_in,
    precision_at_1,
    pydoc_text,
    rouge_l,
    run_recipe,
    shuffled_labels,
    surprisal,
)
from tests.reference import hooked_logits, site_values

LRE = Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "lre"
TEXTS = [
    "The quick brown fox jumps over the lazy dog and runs into the forest to hide.",
    "Paris is the capital of France. The Eiffel Tower is in Paris, and Tokyo is in Japan.",
    "Python is a programming language. Amazon is a company. Water is a liquid at room temperature.",
]


# ---------------------------------------------------------------- metrics, by hand


def test_precision_and_surprisal_by_hand():
    logprobs = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert precision_at_1(2, 2) == 1.0 and precision_at_1(1, 2) == 0.0
    assert surprisal(logprobs, 1) == pytest.approx(math.log(4))
    assert surprisal(logprobs, 0) == pytest.approx(math.log(2))


def test_answer_containment_ignores_whitespace_and_keeps_case():
    assert contains_answer(" the capital is Washington D. C. and", "Washington D.C.")
    assert contains_answer("NewYork City", "New York")
    assert not contains_answer("paris is nice", "Paris")
    assert not contains_answer("anything", None) and not contains_answer("anything", "  ")


def test_description_is_the_first_entry_after_its_last_colon():
    assert description_of(": American actor, Samsung: South Korean company") == "American actor"
    assert description_of(" Albert Einstein: German physicist, Samsung: ...") == "German physicist"
    assert description_of(" City in France\nParis: x") == "City in France"
    assert description_of("") == ""


def test_rouge_l_by_hand():
    # LCS("American actor", "American actor and film producer") = 2: precision 2/2, recall 2/5
    assert rouge_l("American actor", "American actor and film producer") == pytest.approx(2 * 1 * 0.4 / 1.4)
    # LCS of "a city in France" / "capital city of France" = "city France": P = 2/4, R = 2/4
    assert rouge_l("a city in France", "capital city of France") == pytest.approx(0.5)
    assert rouge_l("nothing shared", "American actor") == 0.0


def test_shuffled_labels_pair_each_key_with_another_key():
    keys = ["a", "a", "b", "c", "d"]
    labels = ["x", "x", "y", "z", "x"]
    control = shuffled_labels(keys, labels, seed=3)
    own = dict(zip(keys, labels))
    partner = {}
    for k, c in zip(keys, control):
        assert partner.setdefault(k, c) == c  # rows of one key share their control
    # a derangement of the keys: each key's control is the label of another key, each key used once
    assert sorted(partner.values()) == sorted(own.values())
    assert control[0] != "x" or own["d"] == "x"  # 'a' may only get 'x' back from 'd', which shares it
    assert shuffled_labels(["a", "a"], ["x", "x"]) == [None, None]


# ---------------------------------------------------------------- lenses and least squares


def test_fit_affine_recovers_a_known_map():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g)
    A = torch.tensor([[2.0, 0, 0, 0, 1], [0, -1, 0, 3, 0], [0.5, 0.5, 0.5, 0, 0]])
    c = torch.tensor([1.0, -2.0, 0.25])
    m = fit_affine(X, X @ A.T + c)
    assert torch.allclose(m.W, A, atol=1e-5) and torch.allclose(m.b, c, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_final_logprobs_are_the_models_own_and_the_logit_lens_is_the_hf_head(tiny_models, name):
    model = tiny_models[name]
    ids = model.to_tokens(TEXTS[1])[0].tolist()
    last = model.cfg.n_layers - 1
    own = torch.log_softmax(hooked_logits(model, ids, []), -1)
    assert torch.allclose(
        final_logprobs(model, site_values(model, ids, f"blocks.{last}.hook_resid_post")), own, atol=1e-5
    )
    # the logit lens at layer 1: the Hugging Face final norm and head applied to HF's hidden state
    hf = model.original_model
    with torch.no_grad():
        states = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2]
        norm = hf.transformer.ln_f if name == "tiny-gpt2" else hf.model.norm
        want = torch.log_softmax(hf.lm_head(norm(states))[0].float(), -1)
    assert torch.allclose(final_logprobs(model, site_values(model, ids, "blocks.1.hook_resid_post")), want, atol=1e-4)


def test_affine_maps_equal_numpy_least_squares_on_run_with_cache_states(tiny_models):
    src, tgt = tiny_models["tiny-gpt2"], tiny_models["tiny-llama"]
    _, fit = corpus_windows(pydoc_text(), words=16, n_eval=0, n_fit=12)
    e = PatchscopeEngine(tgt, source_model=src, name="tiny-llama", source_name="tiny-gpt2")
    maps = fit_affine_maps(e.source_reader, e.reader, fit, [(1, 2), (3, 0)], batch_size=5)
    for l, lt in [(1, 2), (3, 0)]:
        X = torch.cat([site_values(src, src.to_tokens(t)[0].tolist(), f"blocks.{l}.hook_resid_post")[1:] for t in fit])
        Y = torch.cat([site_values(tgt, tgt.to_tokens(t)[0].tolist(), f"blocks.{lt}.hook_resid_post")[1:] for t in fit])
        assert len(X) > 65  # more vectors than unknowns per output (d_model + 1)
        pad = lambda a: np.hstack([a.double().numpy(), np.ones((len(a), 1))])  # noqa: E731  (the paper's code)
        beta = np.linalg.lstsq(pad(X), Y.double().numpy(), rcond=None)[0]
        assert np.allclose(maps[(l, lt)].W.numpy(), beta[:-1].T, atol=2e-3), (l, lt)
        assert np.allclose(maps[(l, lt)].b.numpy(), beta[-1], atol=2e-3), (l, lt)


def test_a_map_from_a_layer_to_itself_is_the_identity(tiny_models):
    e = PatchscopeEngine(tiny_models["tiny-llama"], name="tiny-llama")
    _, fit = corpus_windows(pydoc_text(), words=16, n_eval=0, n_fit=12)
    (m,) = fit_affine_maps(e.reader, e.reader, fit, [(2, 2)]).values()
    assert torch.allclose(m.W, torch.eye(64), atol=1e-4) and m.b.abs().max() < 1e-3


# ---------------------------------------------------------------- construction


def test_positions_are_spread_from_min_context_to_the_last_token():
    # lo 8, hi 19: 8 + round(j * 11 / 4) for j = 0..4 -> 8, 11 (2.75), 14 (5.5 rounds to 6), 16 (8.25), 19
    assert positions_in(20, 5, 8) == [8, 11, 14, 16, 19]
    assert positions_in(20, 1, 8) == [19]
    with pytest.raises(PatchscopeError, match="positions: 5 positions from position 17 on do not fit a window of 20"):
        positions_in(20, 5, 17)


def test_corpus_windows_are_disjoint_and_seeded():
    text = "\n\n".join(f"para {i} " + " ".join(f"w{i}_{k}" for k in range(30)) for i in range(20))
    ev, fit = corpus_windows(text, words=10, n_eval=5, n_fit=40, seed=1)
    assert len(ev) == 5 and len(fit) == 40 and not set(ev) & set(fit)
    assert all(len(w.split()) == 10 for w in ev + fit)
    assert corpus_windows(text, words=10, n_eval=5, n_fit=40, seed=1) == (ev, fit)
    # 20 paragraphs of 32 words ("para", i and 30 words): 640 words, 64 windows of 10
    with pytest.raises(PatchscopeError, match="corpus: 64 windows of 10 words, fewer than the 5 evaluated \\+ 60 fit"):
        corpus_windows(text, words=10, n_eval=5, n_fit=60)


def test_token_identity_probes():
    tokens = {"w": 20}.__getitem__
    recipe = TokenIdentity(layers=(0, 3), positions=2, min_context=8)
    probes = recipe.probes(7, {"text": "w"}, tokens)
    assert len(probes) == recipe.count({"text": "w"}, tokens) == 2 * 2 * 3
    assert [(p.method, p.source.layer, p.source.position) for p in probes[:3]] == [
        ("patchscope", 0, 8),
        ("logit_lens", 0, 8),
        ("tuned_lens", 0, 8),
    ]
    ps = [p for p in probes if p.method == "patchscope"]
    assert {(p.source.position, p.source.layer, p.target.layer) for p in ps} == {
        (8, 0, 0),
        (8, 3, 3),
        (19, 0, 0),
        (19, 3, 3),
    }
    assert all(
        p.target == Target(IDENTITY_PROMPT, p.source.layer, (-1,)) and p.max_new_tokens == 1 and p.row == 7 for p in ps
    )
    assert recipe.pairs(4) == [(0, 3), (3, 3)] and TokenIdentity(layers=(1,), baselines=("logit_lens",)).pairs(4) == []


def test_cross_model_probes_patch_the_same_text_at_its_last_token():
    recipe = CrossModel(source_layers=(0, 1), target_layers=(2,))
    probes = recipe.probes(0, {"text": "w"}, None)
    assert [(p.method, p.source, p.target, p.max_new_tokens) for p in probes] == [
        ("affine", Source("w", 0, -1), Target("w", 2, (-1,)), 1),
        ("affine", Source("w", 1, -1), Target("w", 2, (-1,)), 1),
    ]
    assert recipe.pairs(4) == [(0, 2), (1, 2)] and recipe.count({"text": "w"}, None) == 2


def test_attribute_extraction_rows_and_probes_from_the_lre_data():
    rows = load_lre(LRE, ["country_capital_city"], subjects=3, contexts=2, seed=0)
    assert len(rows) == 6 and len({r["subject"] for r in rows}) == 3
    for r in rows:
        assert r["target"] == "The capital city of x" and r["question"] == f"The capital city of {r['subject']}"
        assert r["source"].rstrip().endswith(r["subject"].split()[-1])  # cut right after the subject
        assert r["control"] != r["object"]  # capitals differ between countries
    assert [r["ask"] for r in rows] == [True, False] * 3
    recipe = AttributeExtraction(source_layers=(1, 2), target_layers=(0, 3), max_new_tokens=20)
    first, second = recipe.probes(0, rows[0], None), recipe.probes(1, rows[1], None)
    assert len(first) == recipe.count(rows[0], None) == 5 and len(second) == recipe.count(rows[1], None) == 4
    assert {(p.source, p.target.layer) for p in first[:4]} == {
        (Source(rows[0]["source"], l, -1), lt) for l in (1, 2) for lt in (0, 3)
    }
    assert all(p.target.positions == (-1,) for p in first[:4])
    assert all(p.expected == rows[0]["object"] and p.control == rows[0]["control"] for p in first)
    assert (first[-1].method, first[-1].role, first[-1].prompt) == ("plain", "question", rows[0]["question"])
    everything = load_lre(LRE, ["country_capital_city"])
    objects = {r["subject"]: r["object"] for r in everything}
    assert len(everything) == 24 and objects["Colombia"] == "Bogotá"  # stored as 'Bogot\u00e1'
    with pytest.raises(PatchscopeError, match="relations: no relation 'capitals'"):
        load_lre(LRE, ["capitals"])


def test_entity_description_probes(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("entity,description\nParis,capital of France\nToyota,Japanese car maker\n")
    rows = load_entities(path, "Tell me about {entity}")
    assert [(r["source"], r["control"]) for r in rows] == [
        ("Tell me about Paris", "Japanese car maker"),
        ("Tell me about Toyota", "capital of France"),
    ]
    probes = EntityDescription(layers=(2, 5)).probes(1, rows[1], None)
    assert [(p.source, p.target, p.expected) for p in probes] == [
        (Source("Tell me about Toyota", l, -1), Target(ENTITY_PROMPT, l, (-1,)), "Japanese car maker") for l in (2, 5)
    ]
    assert len(EntityDescription(layers=(2, 5), target_layers=(0, 1, 3)).probes(0, rows[0], None)) == 6
    path.write_text("entity,description\nParis,\n")
    with pytest.raises(PatchscopeError, match="row 1 has an empty entity or description"):
        load_entities(path)


def test_multi_hop_probes(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text(
        "first_hop,bridge,second_hop,answer\n"
        "the company that created Xbox,Microsoft,Who is the CEO of,Satya Nadella\n"
        "the country of the Colosseum,Italy,The capital city of,Rome\n"
    )
    rows = load_chains(path)
    assert [r["control_source"] for r in rows] == ["The capital city of", "Who is the CEO of"]
    recipe = MultiHop(source_layers=(0, 1), target_layers=(2,), max_new_tokens=20)
    probes = recipe.probes(0, rows[0], None)
    assert len(probes) == recipe.count(rows[0], None) == 3 + 2 * 2
    plain = {p.role: (p.prompt, p.expected) for p in probes if p.method == "plain"}
    assert plain == {
        "hop1": ("the company that created Xbox", "Microsoft"),
        "hop2": ("Who is the CEO of Microsoft", "Satya Nadella"),
        "vanilla": ("Who is the CEO of the company that created Xbox", "Satya Nadella"),
    }
    patched = [(p.role, p.source, p.target) for p in probes if p.method == "patchscope"]
    assert patched == [
        (role, Source(src, l, -1), Target("the company that created Xbox", 2, (-1,)))
        for role, src in (("patchscope", "Who is the CEO of"), ("control", "The capital city of"))
        for l in (0, 1)
    ]
    assert all(p.expected == "Satya Nadella" for p in probes if p.role != "hop1")
    framed = MultiHop(
        (0,),
        (2,),
        20,
        "Q: {second_hop}",
        "{first_hop}?\nA:",
        "Q: What is {first_hop}?\nA:",
        "Q: {second_hop} {bridge}?\nA:",
    ).probes(1, rows[1], None)
    assert {p.role: p.prompt for p in framed if p.method == "plain"} == {
        "hop1": "Q: What is the country of the Colosseum?\nA:",
        "hop2": "Q: The capital city of Italy?\nA:",
        "vanilla": "Q: The capital city of the country of the Colosseum?\nA:",
    }
    assert [(p.role, p.source.prompt, p.target.prompt) for p in framed if p.method == "patchscope"] == [
        ("patchscope", "Q: The capital city of", "the country of the Colosseum?\nA:"),
        ("control", "Q: Who is the CEO of", "the country of the Colosseum?\nA:"),
    ]


def test_probes_travel_as_plain_data():
    p = Probe(
        "patchscope",
        3,
        role="control",
        source=Source("a b", 1, -1),
        target=Target("c x", 2, (-1, 4)),
        expected="e",
        control="f",
        max_new_tokens=7,
    )
    assert Probe.from_dict(p.to_dict()) == p
    assert Probe.from_dict(Probe("plain", prompt="q").to_dict()).role == "plain"
    with pytest.raises(PatchscopeError, match="method: unknown method 'lens'"):
        Probe("lens")


# ---------------------------------------------------------------- results against independent computations


def test_token_identity_results_equal_the_bridge_hooks(tiny_models):
    model = tiny_models["tiny-llama"]
    engine = PatchscopeEngine(model, name="tiny-llama")
    _, fit = corpus_windows(pydoc_text(), words=16, n_eval=0, n_fit=12)
    recipe = TokenIdentity(layers=(1, 3), positions=2, min_context=4)
    results = run_recipe(engine, recipe, [{"text": t} for t in TEXTS[:2]], fit)
    target_ids = model.to_tokens(IDENTITY_PROMPT)[0].tolist()
    maps = fit_affine_maps(engine.reader, engine.reader, fit, [(1, 3), (3, 3)])
    for probe, out in results:
        ids = model.to_tokens(probe.source.prompt)[0].tolist()
        own = torch.log_softmax(hooked_logits(model, ids, [])[probe.source.position], -1)
        h = site_values(model, ids, f"blocks.{probe.source.layer}.hook_resid_post")[probe.source.position]
        if probe.method == "patchscope":

            def write(x, hook=None, h=h):
                x = x.clone()
                x[0, -1] = h
                return x

            logits = hooked_logits(model, target_ids, [(f"blocks.{probe.source.layer}.hook_resid_post", write)])[-1]
        elif probe.method == "logit_lens":
            logits = final_logprobs(model, h[None])[0]
        else:
            logits = final_logprobs(model, maps[(probe.source.layer, 3)](h[None]))[0]
        predicted = int(logits.argmax())
        assert out["predicted_token_id"] == predicted and out["expected_token_id"] == int(own.argmax())
        assert out["score"] == float(predicted == int(own.argmax()))
        assert out["surprisal"] == pytest.approx(float(-own[predicted]), abs=1e-4)
    assert len(results) == 2 * 2 * 2 * 3


def test_cross_model_results_equal_a_hand_written_patch(tiny_models):
    src, tgt = tiny_models["tiny-gpt2"], tiny_models["tiny-llama"]
    engine = PatchscopeEngine(tgt, source_model=src, name="tiny-llama", source_name="tiny-gpt2")
    _, fit = corpus_windows(pydoc_text(), words=16, n_eval=0, n_fit=12)
    recipe = CrossModel(source_layers=(2,), target_layers=(0, 3))
    results = run_recipe(engine, recipe, [{"text": t} for t in TEXTS], fit)
    maps = fit_affine_maps(engine.source_reader, engine.reader, fit, recipe.pairs(4))
    assert len(results) == 3 * 2
    for probe, out in results:
        ids, lt = src.to_tokens(probe.source.prompt)[0].tolist(), probe.target.layer
        assert tgt.to_tokens(probe.target.prompt)[0].tolist() == ids  # one tokenizer, the same text
        own = torch.log_softmax(hooked_logits(src, ids, [])[-1], -1)
        h = maps[(2, lt)](site_values(src, ids, "blocks.2.hook_resid_post")[-1][None])[0]

        def write(x, hook=None, h=h):
            x = x.clone()
            x[0, -1] = h
            return x

        predicted = int(hooked_logits(tgt, ids, [(f"blocks.{lt}.hook_resid_post", write)])[-1].argmax())
        assert (out["predicted_token_id"], out["expected_token_id"]) == (predicted, int(own.argmax()))
        assert out["surprisal"] == pytest.approx(float(-own[predicted]), abs=1e-4)


def test_generations_are_scored_against_their_expected_and_control_text(tiny_models):
    """Plain answers and Patchscope generations are scored on the text the model generated: the
    generation (greedy, from Hugging Face directly) is known here, so a substring of it must
    score 1 and a text absent from it 0."""
    model = tiny_models["tiny-gpt2"]
    engine = PatchscopeEngine(model, name="tiny-gpt2")
    prompt = "Paris is the capital of"
    ids = model.to_tokens(prompt)
    with torch.no_grad():
        gen = model.original_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)[0, ids.shape[1] :]
    text = model.tokenizer.decode(gen, skip_special_tokens=True)
    inside, outside = text.strip()[1:6], "Quetzalcoatl"
    assert inside.strip()
    probes = [
        Probe("plain", prompt=prompt, expected=inside, control=outside, max_new_tokens=8),
        Probe("plain", prompt=prompt, expected=outside, control=inside, max_new_tokens=8),
    ]
    runner = RecipeRunner(engine)
    (a, b) = runner.run(probes, "contains")
    assert a["generated_text"] == text and (a["score"], a["control_score"]) == (1.0, 0.0)
    assert (b["score"], b["control_score"]) == (0.0, 1.0)
    (r,) = runner.run(
        [Probe("plain", prompt=prompt, expected=description_of(text) or "x", max_new_tokens=8)], "rouge_l"
    )
    assert r["score"] == pytest.approx(1.0 if description_of(text) else 0.0)
