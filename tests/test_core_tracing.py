"""Causal tracing on tiny models, against the bridge's own hook points and exact identities."""

from __future__ import annotations

import re

import pytest
import torch

from patchscope_core import Engine, Intervention, InterventionRun, Noise, PatchscopeError, Resample, Site, model_info
from patchscope_core.interventions import noise_at
from patchscope_core.methods.tracing import Fact, Tracer, TraceSettings
from patchscope_core.models.sites import window_layers
from patchscope_core.models.tokens import subject_span

TINY = ["tiny-gpt2", "tiny-llama"]
REFERENCE = ("Paris is the capital of France.", "Tokyo is the largest city of Japan.", "Water is a liquid.")
SETTINGS = TraceSettings(sites=("resid_post", "mlp_out", "attn_out"), window=2, noise=3.0, samples=3, seed=5)


def greedy_fact(model, prompt: str, subject: str) -> Fact:
    """A fact whose answer is the model's own next token (a random model knows no facts)."""
    with torch.no_grad():
        logits = model.original_model(model.to_tokens(prompt)).logits[0, -1]
    return Fact(prompt, subject, model.tokenizer.decode([int(logits.argmax())]))


def bridge_p(model, ids, answer_id, hooks) -> float:
    """p(answer) at the last position, through the bridge's own hook points."""
    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0, -1].float()
    return float(torch.softmax(logits, -1)[answer_id])


def embedding_std(model) -> float:
    """Std of the token embeddings (hook_embed) over the reference prompts, BOS left out."""
    values = []
    for p in REFERENCE:
        with torch.no_grad():
            _, cache = model.run_with_cache(model.to_tokens(p), names_filter=["hook_embed"])
        values.append(cache["hook_embed"][0, 1:])
    return float(torch.cat(values).double().std())


def reference_trace(model, fact: Fact, site: str, layer: int, position: int, settings: TraceSettings) -> dict:
    """ROME's procedure written on the bridge: noise the subject's embeddings (per sample), write
    the clean values back at the site for the window of layers at the position."""
    ids = model.to_tokens(fact.prompt)[0].tolist()
    answer = model.tokenizer(fact.answer, add_special_tokens=False)["input_ids"][0]
    start, end = _span(model, fact)
    names = {
        "resid_post": "blocks.{}.hook_resid_post",
        "mlp_out": "blocks.{}.hook_mlp_out",
        "attn_out": "blocks.{}.hook_attn_out",
    }
    layers = window_layers(site, layer, settings.window, model.cfg.n_layers)
    hooks_names = [names[site].format(l) for l in layers]
    with torch.no_grad():
        _, clean = model.run_with_cache(torch.tensor([ids]), names_filter=hooks_names)
    sigma = settings.noise * embedding_std(model)
    p_clean = bridge_p(model, ids, answer, [])
    corrupt, restored = [], []
    for k in range(settings.samples):

        def noise(x, hook, seed=settings.seed + k):
            x = x.clone()
            for p in range(start, end):
                x[0, p] += sigma * noise_at(seed, p, x.shape[-1]).to(x.dtype)
            return x

        def restore(x, hook):
            x = x.clone()
            x[0, position] = clean[hook.name][0, position]
            return x

        corrupt.append(bridge_p(model, ids, answer, [("hook_embed", noise)]))
        restored.append(bridge_p(model, ids, answer, [("hook_embed", noise)] + [(n, restore) for n in hooks_names]))
    return {"p_clean": p_clean, "p_corrupt": sum(corrupt) / len(corrupt), "p_restored": sum(restored) / len(restored)}


def _span(model, fact):
    name = "tiny-gpt2" if model.cfg.architecture.startswith("GPT2") else "tiny-llama"
    return subject_span(model_info(name), fact.prompt, fact.subject)


@pytest.fixture(scope="module")
def traced(tiny_models):
    """Every cell of one fact per tiny model, with and without the shortcuts."""
    out = {}
    for name in TINY:
        model = tiny_models[name]
        engine = Engine(model, name=name)
        fact = greedy_fact(model, "The Eiffel Tower is in Paris. The tower", "Eiffel Tower")
        tracer = Tracer(engine, batch_size=16)
        fast = tracer.trace(fact, SETTINGS, REFERENCE)
        counts = dict(engine.counts)
        plain = tracer.trace(fact, SETTINGS, REFERENCE, shortcuts=False)
        out[name] = (model, engine, tracer, fact, fast, plain, counts)
    return out


@pytest.mark.parametrize("name", TINY)
def test_cells_equal_rome_written_on_the_bridges_hook_points(traced, name):
    model, _, _, fact, fast, _, _ = traced[name]
    start, end = fast.subject
    m = len(fast.token_ids)
    checked = 0
    for site, layer, position in [
        ("resid_post", 0, start),
        ("resid_post", 2, end - 1),
        ("mlp_out", 1, end - 1),
        ("attn_out", 3, m - 1),
        ("mlp_out", 0, end),
        ("resid_post", 3, m - 2),
    ]:
        want = reference_trace(model, fact, site, layer, position, SETTINGS)
        assert fast.p_clean == pytest.approx(want["p_clean"], abs=1e-6)
        assert fast.p_corrupt == pytest.approx(want["p_corrupt"], abs=1e-6)
        assert fast.p_restored[(site, layer, position)] == pytest.approx(want["p_restored"], abs=1e-6), (
            site,
            layer,
            position,
        )
        checked += 1
    assert fast.p_corrupt != pytest.approx(fast.p_clean, abs=1e-6), "the noise changed nothing: the test proves nothing"
    assert checked == 6


@pytest.mark.parametrize("name", TINY)
def test_shortcuts_equal_the_plain_path_for_every_cell(traced, name):
    _, _, tracer, _, fast, plain, _ = traced[name]
    assert tracer._shortcut_ok is True
    assert fast.p_restored.keys() == plain.p_restored.keys()
    assert len(fast.p_restored) == 3 * 4 * len(fast.token_ids)
    worst = max(abs(fast.p_restored[k] - plain.p_restored[k]) for k in fast.p_restored)
    assert worst < 1e-6


@pytest.mark.parametrize("name", TINY)
def test_exact_identities(traced, name):
    """Before the subject nothing is corrupted: restoring there is p_corrupt, exactly. Restoring
    the last layer's residual at the last position gives the clean logits: p_clean."""
    _, engine, _, _, fast, plain, counts = traced[name]
    start, _ = fast.subject
    n_layers, m = 4, len(fast.token_ids)
    # the shortcuts run no row before the subject; the plain path runs every row, those too
    assert counts["trace_rows"] == 3 * n_layers * (m - start) * SETTINGS.samples
    assert engine.counts["trace_rows"] - counts["trace_rows"] == 3 * n_layers * m * SETTINGS.samples
    for site in ("resid_post", "mlp_out", "attn_out"):
        for layer in range(n_layers):
            for p in range(start):
                assert fast.p_restored[(site, layer, p)] == fast.p_corrupt
                assert plain.p_restored[(site, layer, p)] == pytest.approx(plain.p_corrupt, abs=1e-7)
    assert fast.p_restored[("resid_post", n_layers - 1, m - 1)] == pytest.approx(fast.p_clean, abs=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_restoring_every_position_at_layer_0_gives_the_clean_probability(tiny_models, name):
    """Through the general engine: noise the subject, write layer 0's clean residual back at every
    prompt position: the clean probability, exactly; write nothing back: the corrupted one."""
    model = tiny_models[name]
    engine = Engine(model, name=name)
    fact = greedy_fact(model, "Paris is the capital of France. Paris", "capital of France")
    tracer = Tracer(engine)
    result = tracer.trace(fact, TraceSettings(sites=("resid_post",), samples=2, seed=1), REFERENCE, cells=[])
    start, end = result.subject
    embed = Site("hook_embed")
    sigma = 3.0 * engine.reader.std(engine_site(engine, embed), REFERENCE)
    noise = [
        Intervention(embed, Noise(std=sigma / 3.0, scale=3.0, seed=1 + k), tuple(range(start, end))) for k in range(2)
    ]
    restore = Intervention(Site("blocks.0.hook_resid_post"), Resample(source=fact.prompt), "prompt")
    runs = [InterventionRun(fact.prompt, (n, restore), answer=fact.answer, max_new_tokens=0) for n in noise]
    runs += [InterventionRun(fact.prompt, (n,), answer=fact.answer, max_new_tokens=0) for n in noise]
    out = engine.run(runs, clean=False)
    assert [r.p_answer for r in out[:2]] == pytest.approx([result.p_clean] * 2, abs=1e-6)
    assert sum(r.p_answer for r in out[2:]) / 2 == pytest.approx(result.p_corrupt, abs=1e-7)


def engine_site(engine, site):
    from patchscope_core.models.sites import resolve_site

    return resolve_site(site, engine.info)


def test_clean_and_corrupted_runs_happen_once_per_fact(traced):
    for name in TINY:
        counts = traced[name][6]
        assert counts["trace_clean"] == 1 and counts["trace_corrupt"] == 1, counts


def test_subject_span_and_bad_facts():
    info = model_info("tiny-llama")
    ids = info.tokenizer("The Eiffel Tower is in Paris.", add_special_tokens=False)["input_ids"]
    start, end = subject_span(info, "The Eiffel Tower is in Paris.", "Eiffel Tower")
    text = info.tokenizer.decode(ids[start - 1 : end - 1])  # BOS shifts positions by one
    assert "Eiffel Tower" in text and start == 2
    assert subject_span(info, "Paris is the capital", "Paris") == (1, 2)
    with pytest.raises(PatchscopeError, match="^subject: 'Rome' does not occur"):
        subject_span(info, "Paris is the capital", "Rome")
    # a subject is whole words: the first whole-word occurrence, never part of another word (issue 28 item 8)
    prompt = "The category of the cat is"
    start, end = subject_span(info, prompt, "cat")
    enc = info.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    word = re.search(r"\bcat\b", prompt).span()
    want = [i + 1 for i, (a, b) in enumerate(enc["offset_mapping"]) if a < word[1] and b > word[0] and b > a]
    assert (start, end) == (want[0], want[-1] + 1) and start > 2  # not the "cat" of "category"
    for prompt, word in (("The category is", "category"), ("A bobcat ran", "bobcat")):
        with pytest.raises(
            PatchscopeError, match=f"^subject: 'cat' occurs in the prompt .* only inside another word \\('{word}'\\)"
        ):
            subject_span(info, prompt, "cat")
    assert subject_span(info, "A cat, a dog", "cat") == subject_span(info, "A cat", "cat")  # punctuation ends a word
    with pytest.raises(PatchscopeError, match="^trace.samples"):
        TraceSettings(samples=0).check()
    with pytest.raises(PatchscopeError, match="^trace.sites"):
        TraceSettings(sites=("resid_pre",)).check()
    assert window_layers("mlp_out", 0, 10, 30) == list(range(0, 5))
    assert window_layers("attn_out", 15, 10, 30) == list(range(10, 20))
    assert window_layers("mlp_out", 29, 10, 30) == list(range(24, 30))
    assert window_layers("resid_post", 7, 10, 30) == [7]
