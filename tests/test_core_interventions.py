"""Interventions on tiny random models, each checked against an independent computation: the
bridge's own hook points (`run_with_hooks`, `run_with_cache`), a separate plain Hugging Face copy,
or uncached generation that re-runs the whole sequence at every step (tests/reference.py)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch

from patchscope_core import (
    SITES,
    Add,
    Decoding,
    Intervention,
    InterventionRun,
    Mean,
    Noise,
    PatchscopeError,
    Replace,
    Resample,
    Scale,
    Site,
    Zero,
    model_info,
)
from patchscope_core.engine import Engine
from patchscope_core.interventions import ACTIVATION_KINDS, resolve_run
from patchscope_core.models.loading import _tiny_hf_model
from tests.reference import compare_tokens, hooked_logits, reference_hooks, uncached_generation

TINY = ["tiny-gpt2", "tiny-llama"]
N_NEW = 8

PROMPTS = [
    "The capital city of x is",
    "Paris is the capital of France",
    "Water is a liquid.",
    "Samsung",
]  # 7, 9, 11, 6 tokens
LONG = "Tokyo is the largest city of Japan"  # 17 tokens: a resample source longer than every prompt above
REFERENCE = (
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language.",
    "Amazon is a company.",
)
POSITIVE = ("Paris is the capital of France.", "The Eiffel Tower is in Paris.")
NEGATIVE = ("Tokyo is the largest city of Japan.", "Water is a liquid.")
# (positions, answer): explicit ints (negative too), 'prompt', 'all' and 'generated' with an answer
WHERE = [
    ((1, -1), None),
    ("prompt", None),
    ("all", " Paris"),
    ("generated", " France"),
    ((0, 2, -2), " Paris"),
    (-3, None),
    ("all", " is the capital"),
]
PROMPT_ONLY = [(1, -1), "prompt", (2, -2), -3]  # for resample, which takes prompt positions only


def site_of(form: str, layer: int, i: int) -> Site:
    hook = form.replace("{l}", str(layer))
    if hook.endswith("attn.hook_z"):
        return Site(hook, head=[(1,), (0, 3), (2,)][i % 3])
    if hook.endswith("mlp.hook_post"):
        return Site(hook, neuron=[(0, 5, 17, 63), tuple(range(0, 128, 3))][i % 2])
    return Site(hook)


def shape_of(model, site: Site) -> tuple[int, ...]:
    cfg = model.cfg
    if site.hook.endswith("attn.hook_z"):
        return (cfg.n_heads, cfg.d_head)
    if site.hook.endswith("mlp.hook_post"):
        return (cfg.d_mlp,)
    return (cfg.d_model,)


def kind_of(name: str, shape, i: int, g: torch.Generator, long_source: str = LONG):
    vec = lambda: torch.randn(*shape, generator=g)  # noqa: E731
    if name == "zero":
        return Zero()
    if name == "scale":
        return Scale(factor=[-1.5, 0.0, 2.5, 0.3][i % 4])
    if name == "add":
        if i % 2:
            return Add(alpha=[3.0, -2.0][i % 4 // 2], positive=POSITIVE, negative=NEGATIVE)
        return Add(alpha=0.7, vector=vec())
    if name == "mean":
        return Mean(reference=REFERENCE)
    if name == "resample":
        return Resample(source=long_source)
    if name == "replace":
        if i % 2:
            return Replace(source=long_source, source_position=[-1, 3, -4][i % 3])
        return Replace(vector=vec() * 2)
    if name == "noise":
        if i % 2:
            return Noise(scale=[3.0, 1.0][i % 4 // 2], reference=REFERENCE, seed=i)
        return Noise(scale=2.0, std=0.5, seed=100 + i)
    raise AssertionError(name)


def grid_runs(model, prompts=PROMPTS, long_source=LONG, heads=None, neurons=None, layer_of=None, seed=0):
    """Every site x every kind (7 x 7), a Latin square of positions over them, plus rows with
    several interventions (same site twice, two sites, one head's vector for every head)."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.cfg.n_layers
    layer_of = layer_of or (lambda i, j: (i + 2 * j) % n_layers)
    runs = []
    for i, form in enumerate(SITES):
        for j, kind_name in enumerate(ACTIVATION_KINDS):  # knockout: tests/test_core_knockout.py
            site = site_of(form, layer_of(i, j), i + j)
            if heads and site.head:
                site = Site(site.hook, head=heads[(i + j) % len(heads)])
            if neurons and site.neuron:
                site = Site(site.hook, neuron=neurons[(i + j) % len(neurons)])
            kind = kind_of(kind_name, shape_of(model, site), i + j, g, long_source)
            positions, answer = WHERE[(i + 2 * j) % len(WHERE)]
            if kind_name == "resample":
                positions, answer = PROMPT_ONLY[(i + j) % len(PROMPT_ONLY)], (" Paris" if i % 2 else None)
            runs.append(
                InterventionRun(
                    prompts[(i + j) % len(prompts)],
                    [Intervention(site, kind, positions)],
                    answer=answer,
                    max_new_tokens=0,
                )
            )
    d, h = model.cfg.d_model, model.cfg.d_head
    runs += [
        InterventionRun(
            prompts[0],
            [
                Intervention("blocks.1.hook_resid_post", Scale(factor=-2.0), "all"),
                Intervention("blocks.1.hook_resid_post", Add(vector=torch.randn(d, generator=g)), (1, 2)),
            ],
            answer=" Paris",
            max_new_tokens=0,
        ),
        InterventionRun(
            prompts[1],
            [
                Intervention("blocks.2.mlp.hook_post", Zero(), "generated"),
                Intervention("hook_embed", Noise(scale=3.0, reference=REFERENCE, seed=7), "prompt"),
                Intervention(Site("blocks.0.attn.hook_z", head=(1, 2)), Mean(reference=REFERENCE), -1),
            ],
            answer=" France",
            max_new_tokens=0,
        ),
        InterventionRun(
            prompts[2],
            [
                Intervention(
                    Site("blocks.3.attn.hook_z", head=(0, 2)), Replace(vector=3 * torch.randn(h, generator=g)), "all"
                )
            ],
            answer=" Paris",
            max_new_tokens=0,
        ),
    ]
    return runs


def form_of(hook: str) -> str:
    """The SITES form of a hook name: blocks.3.attn.hook_z -> blocks.{l}.attn.hook_z."""
    parts = hook.split(".")
    return ".".join(["blocks", "{l}", *parts[2:]]) if parts[0] == "blocks" else hook


def assert_logits_match_the_bridge(model, engine, runs, batch_atol=1e-4, alone=False):
    """Engine.logits of all runs in one heterogeneous, left-padded batch equal the bridge's own
    hook points, one row at a time, within batch_atol (a large model's padded batch rounds
    differently from a single row); with `alone`, each run by itself too, within 1e-4."""
    got = engine.logits(runs, batch_size=64)
    assert len(got) == len(runs)
    for k, (run, logits) in enumerate(zip(runs, got)):
        prompt, answer, hooks = reference_hooks(model, run)
        want = hooked_logits(model, prompt + answer, hooks)
        clean = hooked_logits(model, prompt + answer, [])
        label = (
            f"runs[{k}] {[str(iv.site) + ' ' + iv.kind.name + ' @' + str(iv.positions) for iv in run.interventions]}"
        )
        assert (want - clean).abs().max() > 1e-3, f"{label}: the reference intervention changes nothing"
        assert logits.shape == want.shape, label
        torch.testing.assert_close(logits, want, atol=batch_atol, rtol=0, msg=lambda m: f"{label}: {m}")
        if alone:
            (single,) = engine.logits([run], batch_size=1)
            torch.testing.assert_close(single, want, atol=1e-4, rtol=0, msg=lambda m: f"{label} alone: {m}")


# ---------------------------------------------------------------- 1. every site x every kind


@pytest.mark.parametrize("name", TINY)
def test_every_site_and_kind_equals_the_bridges_own_hook_point(tiny_models, name):
    model = tiny_models[name]
    runs = grid_runs(model)
    kinds = collections.Counter((form_of(iv.site.hook), iv.kind.name) for r in runs for iv in r.interventions)
    assert len(kinds) == len(SITES) * len(ACTIVATION_KINDS)
    assert_logits_match_the_bridge(model, Engine(model, name=name), runs)


# ---------------------------------------------------------------- 2. head ablation = zeroed output projection


def o_proj_weight(hf, name: str, layer: int) -> torch.Tensor:
    return (
        hf.transformer.h[layer].attn.c_proj.weight
        if name == "tiny-gpt2"
        else hf.model.layers[layer].self_attn.o_proj.weight
    )


@torch.no_grad()
def zero_head_columns(w: torch.Tensor, gpt2: bool, head: int, d_head: int) -> None:
    """Zero head `head`'s input columns of an output projection: GPT-2's Conv1D weight is
    [in, out], a Linear's [out, in]."""
    cols = slice(head * d_head, (head + 1) * d_head)
    if gpt2:
        w[cols, :] = 0
    else:
        w[:, cols] = 0


@torch.no_grad()
def hf_greedy(hf, ids, n_new, pad_id):
    t = torch.tensor([list(ids)])
    out = hf.generate(
        t,
        attention_mask=torch.ones_like(t),
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_id,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, t.shape[1] :].tolist(), [s[0].float() for s in out.scores]


@pytest.mark.parametrize("name", TINY)
def test_zero_ablating_a_head_equals_zeroing_its_output_projection_columns(tiny_models, name):
    model = tiny_models[name]
    cases = [(0, 1, PROMPTS[0]), (1, 3, "x"), (2, 0, PROMPTS[1]), (3, 2, PROMPTS[2]), (1, 0, PROMPTS[3])]
    engine = Engine(model, name=name, decoding=Decoding(stop_at_eos=False))
    runs = [
        InterventionRun(p, [Intervention(Site(f"blocks.{l}.attn.hook_z", head=h), Zero())], max_new_tokens=N_NEW + 2)
        for l, h, p in cases
    ]
    results = engine.run(runs, batch_size=8)
    hf, tok = _tiny_hf_model(name)  # a separate copy, no bridge
    for (layer, head, _), r in zip(cases, results):
        w = o_proj_weight(hf, name, layer)
        old = w.detach().clone()
        zero_head_columns(w, name == "tiny-gpt2", head, model.cfg.d_head)
        try:
            want, scores = hf_greedy(hf, r.prompt_token_ids, N_NEW + 2, tok.pad_token_id)
        finally:
            with torch.no_grad():
                w.copy_(old)
        compare_tokens(r.generated_token_ids, want, scores, f"{name} zero L{layer}H{head}")
    assert any(r.generated_token_ids != r.clean_generated_token_ids for r in results)


# ---------------------------------------------------------------- 3. every-step interventions under the cache


def every_step_runs(model, seed=1):
    """Rows of different prompt lengths, sites and kinds acting at every generated token
    ('generated', 'all'), some with prompt positions too, and a clean row."""
    g = torch.Generator().manual_seed(seed)
    d, d_mlp = model.cfg.d_model, model.cfg.d_mlp
    s = model.cfg.n_layers // 4  # layers 0, s, 2s, 3s
    return [
        InterventionRun(
            "x",
            [Intervention("hook_embed", Noise(scale=3.0, reference=REFERENCE, seed=3), "all")],
            max_new_tokens=N_NEW,
        ),
        InterventionRun(
            PROMPTS[1],
            [
                Intervention(
                    f"blocks.{s}.hook_resid_post", Add(alpha=4.0, positive=POSITIVE, negative=NEGATIVE), "generated"
                )
            ],
            max_new_tokens=N_NEW,
        ),
        InterventionRun(
            PROMPTS[0],
            [Intervention(f"blocks.{2 * s}.hook_resid_pre", Add(vector=2 * torch.randn(d, generator=g)), "all")],
            max_new_tokens=N_NEW - 3,
        ),
        InterventionRun(
            PROMPTS[2],
            [
                Intervention(Site("blocks.0.attn.hook_z", head=(0, 2)), Zero(), "all"),
                Intervention(f"blocks.{3 * s}.hook_mlp_out", Scale(factor=-1.0), "generated"),
            ],
            max_new_tokens=N_NEW,
        ),
        InterventionRun(
            "Paris",
            [
                Intervention(
                    Site(f"blocks.{s}.mlp.hook_post", neuron=tuple(range(0, d_mlp, 2))),
                    Mean(reference=REFERENCE),
                    "generated",
                )
            ],
            max_new_tokens=N_NEW + 2,
        ),
        InterventionRun(
            PROMPTS[3],
            [
                Intervention(f"blocks.{2 * s}.hook_attn_out", Noise(scale=2.0, std=0.7, seed=11), "generated"),
                Intervention("blocks.0.hook_resid_post", Replace(source=LONG, source_position=4), (1, -1)),
            ],
            max_new_tokens=N_NEW,
        ),
        InterventionRun(
            LONG,
            [
                Intervention(
                    f"blocks.{s}.hook_resid_post", Replace(vector=3 * torch.randn(d, generator=g)), "generated"
                ),
                Intervention("blocks.0.hook_mlp_out", Resample(source=REFERENCE[0]), "prompt"),
            ],
            max_new_tokens=N_NEW,
        ),
        InterventionRun(PROMPTS[0], [], max_new_tokens=N_NEW),  # a clean row in the same batch
    ]


@pytest.mark.parametrize("name", TINY)
def test_every_step_interventions_cached_equal_uncached_rerunning(tiny_models, name):
    model = tiny_models[name]
    runs = every_step_runs(model)
    results = Engine(model, name=name, decoding=Decoding(stop_at_eos=False)).run(runs, batch_size=16)
    assert len({len(r.prompt_token_ids) for r in results}) >= 5  # left-padded, heterogeneous
    for k, (run, r) in enumerate(zip(runs, results)):
        prompt, _, hooks = reference_hooks(model, run)
        assert r.prompt_token_ids == prompt
        want, logits = uncached_generation(model, prompt, hooks, run.max_new_tokens)
        compare_tokens(r.generated_token_ids, want, logits, f"{name} every-step[{k}]")
        if run.interventions:  # the interventions matter: some generated token differs from the clean run
            assert r.generated_token_ids != r.clean_generated_token_ids, k
        else:
            assert r.generated_token_ids == r.clean_generated_token_ids


# ---------------------------------------------------------------- 4. a batch equals its rows alone


@pytest.mark.parametrize("name", TINY)
def test_batch_equals_rows_run_one_at_a_time(tiny_models, name):
    model = tiny_models[name]
    runs = every_step_runs(model, seed=2)
    runs = [
        InterventionRun(r.prompt, r.interventions, answer=a, max_new_tokens=r.max_new_tokens)
        for r, a in zip(runs, [" Paris", None, " France", " Paris", None, " is the capital", " Paris", " France"])
    ]
    engine = Engine(model, name=name, decoding=Decoding(stop_at_eos=False))
    together = engine.run(runs, batch_size=16)
    for k, run in enumerate(runs):
        (alone,) = engine.run([run], batch_size=1)
        assert alone.generated_token_ids == together[k].generated_token_ids, k
        assert alone.top_token_ids == together[k].top_token_ids, k
        torch.testing.assert_close(
            torch.tensor(alone.top_logprobs), torch.tensor(together[k].top_logprobs), atol=1e-4, rtol=0
        )
        if run.answer:
            torch.testing.assert_close(
                torch.tensor(alone.answer_logprobs), torch.tensor(together[k].answer_logprobs), atol=1e-4, rtol=0
            )
            torch.testing.assert_close(
                torch.tensor(alone.clean_answer_logprobs),
                torch.tensor(together[k].clean_answer_logprobs),
                atol=1e-4,
                rtol=0,
            )


# ---------------------------------------------------------------- 5. statistics and clean baselines computed once


def test_statistics_are_computed_once_and_shared(tiny_models):
    model = tiny_models["tiny-llama"]
    engine = Engine(model, name="tiny-llama", decoding=Decoding(stop_at_eos=False))
    sites = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", Site("blocks.1.attn.hook_z", head=1), "hook_embed"]
    runs = [
        InterventionRun(
            p,
            [
                Intervention(s, Mean(reference=REFERENCE), "all"),
                Intervention("blocks.3.hook_resid_pre", Noise(scale=1.0, reference=REFERENCE, seed=k)),
            ],
            max_new_tokens=3,
        )
        for k, (p, s) in enumerate((p, s) for p in PROMPTS for s in sites)
    ]
    engine.run(runs[:9], batch_size=4)
    assert engine.reader.counts["statistics"] == 1  # five sites' means and std: one pass over REFERENCE
    engine.run(runs[9:], batch_size=4)
    engine.logits(runs[:5])
    assert engine.reader.counts["statistics"] == 1
    # a second prompt set is a second pass; the difference of means needs one per set, once
    steer = [
        InterventionRun(
            p, [Intervention("blocks.0.hook_resid_post", Add(positive=POSITIVE, negative=REFERENCE))], max_new_tokens=2
        )
        for p in PROMPTS
    ]
    engine.run(steer)
    engine.run(steer)
    assert engine.reader.counts["statistics"] == 2
    # and the cached statistic is the right one: mean over REFERENCE's non-BOS tokens (run_with_cache)
    assert_logits_match_the_bridge(model, engine, runs[:4] + steer[:1])


def test_clean_baselines_run_once_per_distinct_prompt(tiny_models, monkeypatch):
    model = tiny_models["tiny-gpt2"]
    engine = Engine(model, name="tiny-gpt2", decoding=Decoding(stop_at_eos=False))
    rows_seen: list[tuple[tuple[int, ...], bool]] = []
    real_batch = Engine._batch

    def counting(self, batch, actions):
        rows_seen.extend((r.prompt_ids, bool(r.interventions)) for r in batch)
        return real_batch(self, batch, actions)

    monkeypatch.setattr(Engine, "_batch", counting)
    kinds = [Zero(), Scale(factor=2.0), Mean(reference=REFERENCE), Noise(scale=1.0, std=1.0)]
    runs = [
        InterventionRun(p, [Intervention("blocks.1.hook_resid_post", k, "all")], answer=" Paris", max_new_tokens=4)
        for p in PROMPTS[:3]
        for k in kinds
    ]
    runs.append(
        InterventionRun(PROMPTS[3], [], answer=" Paris", max_new_tokens=4)
    )  # no interventions: its own baseline
    results = engine.run(runs, batch_size=5)
    clean_rows = collections.Counter(ids for ids, has in rows_seen if not has)
    assert sorted(clean_rows.values()) == [1, 1, 1, 1]  # three prompts' baselines, once each, and the plain row itself
    assert len([has for _, has in rows_seen if has]) == len(runs) - 1
    # the baselines are right: plain greedy generation and teacher-forced scores without hooks
    for r in results:
        ids = torch.tensor([r.prompt_token_ids])
        plain = model.original_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
        assert r.clean_generated_token_ids == plain[0, ids.shape[1] :].tolist()
        logp = torch.log_softmax(hooked_logits(model, r.prompt_token_ids + r.answer_token_ids, []), -1)
        n = len(r.prompt_token_ids)
        want = [float(logp[n - 1 + i, t]) for i, t in enumerate(r.answer_token_ids)]
        torch.testing.assert_close(torch.tensor(r.clean_answer_logprobs), torch.tensor(want), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- 6. your own hooks under the cache


@pytest.mark.parametrize("name", TINY)
def test_own_hook_sees_each_position_once(tiny_models, name):
    model = tiny_models[name]
    engine = Engine(model, name=name, decoding=Decoding(stop_at_eos=False))
    prompts = ["x", PROMPTS[0], LONG, "Samsung"]
    seen = []

    def record(x, ctx):
        assert x.shape[:2] == ctx.positions.shape == ctx.real.shape
        assert tuple(x.shape[2:]) == (model.cfg.n_heads, model.cfg.d_head)
        seen.append((ctx.step, ctx.positions.clone(), ctx.real.clone(), ctx.generated.clone()))

    generated = engine.generate_with_hooks(prompts, [("blocks.2.attn.hook_z", record)], max_new_tokens=N_NEW)
    assert [s[0] for s in seen] == list(range(N_NEW))  # the prefill, then one step per fed-back token
    lengths = [len(model.to_tokens(p)[0]) for p in prompts]
    for b, n in enumerate(lengths):
        positions = torch.cat([pos[b][real[b]] for _, pos, real, _ in seen]).tolist()
        assert positions == list(range(n + N_NEW - 1)), b  # each absolute position once, in order
        for _, pos, real, gen in seen:
            assert torch.equal(real[b], pos[b] >= 0)
            assert torch.equal(gen[b], pos[b] >= n)
    assert seen[0][1].shape[1] == max(lengths) and all(s[1].shape[1] == 1 for s in seen[1:])
    # a hook that returns nothing leaves generation as it was
    for p, g in zip(prompts, generated):
        ids = model.to_tokens(p)
        plain = model.original_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
        assert g == plain[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("name", TINY)
def test_own_hook_at_absolute_position_five_equals_uncached(tiny_models, name):
    """The classic TransformerLens hook: act at position 5, which is a generated token for a
    short prompt, the last prompt token for another and inside the prompt for a third."""
    model = tiny_models[name]
    v = 4 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    calls = collections.Counter()

    def engine_hook(x, ctx):
        hit = ctx.positions == 5
        calls[int(hit.sum())] += 1
        x = x.clone()
        x[hit] += v
        return x

    def reference_hook(x, hook=None):
        if x.shape[1] > 5:
            x = x.clone()
            x[0, 5] += v
        return x

    prompts = ["x", "Samsung", PROMPTS[1], "Paris"]
    engine = Engine(model, name=name, decoding=Decoding(stop_at_eos=False))
    got = engine.generate_with_hooks(prompts, [("blocks.1.hook_resid_pre", engine_hook)], max_new_tokens=N_NEW + 2)
    assert sum(k * c for k, c in calls.items()) == len(prompts)  # position 5 of each row, written once
    changed = []
    for p, g in zip(prompts, got):
        ids = model.to_tokens(p)[0].tolist()
        want, logits = uncached_generation(model, ids, [("blocks.1.hook_resid_pre", reference_hook)], N_NEW + 2)
        compare_tokens(g, want, logits, f"{name} position-5 {p!r}")
        plain, _ = uncached_generation(model, ids, [], N_NEW + 2)
        if len(ids) <= 5:
            assert g[: 5 - len(ids) + 1] == plain[: 5 - len(ids) + 1]  # nothing before position 5 exists yet
        changed.append(g != plain)
    assert changed[0], "the hook at generated position 5 changes what 'x' generates"


# ---------------------------------------------------------------- 7. answer scores


@pytest.mark.parametrize("name", TINY)
def test_answer_scores_equal_the_bridges_log_softmax(tiny_models, name):
    model = tiny_models[name]
    g = torch.Generator().manual_seed(3)
    d = model.cfg.d_model
    runs = [
        InterventionRun(
            PROMPTS[0],
            [Intervention("blocks.1.hook_resid_post", Add(vector=2 * torch.randn(d, generator=g)), "all")],
            answer=" Paris is",
            max_new_tokens=3,
        ),
        InterventionRun(
            PROMPTS[1],
            [Intervention(Site("blocks.2.attn.hook_z", head=(0, 1)), Zero(), "generated")],
            answer=" the capital of",
            max_new_tokens=0,
        ),
        InterventionRun(
            PROMPTS[2],
            [Intervention("hook_embed", Noise(scale=3.0, reference=REFERENCE, seed=2), (1, 2, 3))],
            answer=" France",
            max_new_tokens=5,
        ),
        InterventionRun(
            PROMPTS[3],
            [Intervention("blocks.3.hook_mlp_out", Mean(reference=REFERENCE), "prompt")],
            answer=" Paris",
            max_new_tokens=2,
        ),
        InterventionRun(PROMPTS[0], [], answer=" Paris is", max_new_tokens=3),
    ]
    engine = Engine(model, name=name, top_k=5)
    results = engine.run(runs, batch_size=8)
    for k, (run, r) in enumerate(zip(runs, results)):
        prompt, answer, hooks = reference_hooks(model, run)
        assert (r.prompt_token_ids, r.answer_token_ids) == (prompt, answer) and len(answer) >= 1
        n = len(prompt)
        for fields, hk in (
            (("answer_logprobs", "answer_logprob", "p_answer"), hooks),
            (("clean_answer_logprobs", "clean_answer_logprob", "p_answer_clean"), []),
        ):
            logp = torch.log_softmax(hooked_logits(model, prompt + answer, hk), dim=-1)
            want = torch.stack([logp[n - 1 + i, t] for i, t in enumerate(answer)])
            per_token = torch.tensor(getattr(r, fields[0]))
            torch.testing.assert_close(per_token, want, atol=1e-4, rtol=0, msg=lambda m: f"{k} {fields[0]}: {m}")
            assert getattr(r, fields[1]) == pytest.approx(sum(getattr(r, fields[0])), abs=1e-6)  # in float64, as stored
            assert getattr(r, fields[2]) == pytest.approx(float(per_token[0].exp()), abs=1e-6)
        if run.interventions:
            assert r.answer_logprobs != r.clean_answer_logprobs, k
        else:
            assert (r.answer_logprobs, r.generated_token_ids) == (r.clean_answer_logprobs, r.clean_generated_token_ids)
        # the first generated token's top-k under the interventions
        first = torch.log_softmax(hooked_logits(model, prompt, hooks)[-1], dim=-1).topk(5)
        assert r.top_token_ids == first.indices.tolist(), k
        torch.testing.assert_close(torch.tensor(r.top_logprobs), first.values, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- 8. bad input, before any weights


def bad(*interventions, prompt="The capital city of x is", answer=None, n=4):
    return InterventionRun(prompt, interventions, answer=answer, max_new_tokens=n)


R = "blocks.1.hook_resid_post"
IV = "run.interventions[0]"


@pytest.mark.parametrize(
    "run, field, fragment",
    [
        (
            bad(Intervention("blocks.1.hook_foo", Zero())),
            f"{IV}.site",
            "valid sites: hook_embed, blocks.{l}.hook_resid_pre",
        ),
        (bad(Intervention("blocks.4.hook_resid_post", Zero())), f"{IV}.site", "out of range 0 .. 3"),
        (
            bad(Intervention(Site("blocks.1.attn.hook_z", head=4), Zero())),
            f"{IV}.site.head",
            "4 is out of range 0 .. 3",
        ),
        (
            bad(Intervention(Site("blocks.1.mlp.hook_post", neuron=128), Zero())),
            f"{IV}.site.neuron",
            "out of range 0 .. 127",
        ),
        (bad(Intervention(Site(R, head=1), Zero())), f"{IV}.site.head", "has no heads"),
        (bad(Intervention(Site("blocks.1.attn.hook_z", neuron=1), Zero())), f"{IV}.site.neuron", "has no neurons"),
        (bad(Intervention(R, Add())), f"{IV}.add", "needs a vector"),
        (bad(Intervention(R, Add(vector=torch.zeros(63)))), f"{IV}.add.vector", "shape [63] does not fit"),
        (
            bad(Intervention(Site("blocks.1.attn.hook_z", head=1), Replace(vector=torch.zeros(64, 4)))),
            f"{IV}.replace.vector",
            "[4, 16] or [16] (one head)",
        ),
        (bad(Intervention(R, Add(positive=("Paris",)))), f"{IV}.add.negative", "at least one prompt"),
        (bad(Intervention(R, Noise(scale=-1.0, std=1.0))), f"{IV}.noise.scale", ">= 0"),
        (bad(Intervention(R, Noise(scale=1.0))), f"{IV}.noise.reference", "at least one prompt"),
        (bad(Intervention(R, Mean())), f"{IV}.mean.reference", "at least one prompt"),
        (bad(Intervention(R, Zero()), answer=""), "run.answer", "empty answer"),
        (bad(Intervention(R, Zero(), (0, 7))), f"{IV}.positions", "7 is out of range"),
        (bad(Intervention(R, Zero(), -8)), f"{IV}.positions", "allowed -7 .. 6"),
        (bad(Intervention(R, Resample(source=LONG), "generated")), f"{IV}.resample", "prompt positions only"),
        (bad(Intervention(R, Resample(source=LONG), "all")), f"{IV}.resample", "prompt positions only"),
        (bad(Intervention(R, Resample(source="Paris"), 3)), f"{IV}.resample.source", "past the source prompt"),
        (bad(Intervention(R, Resample(source="Paris"), "prompt")), f"{IV}.resample.source", "past the source prompt"),
        (bad(Intervention(R, Replace())), f"{IV}.replace", "exactly one of"),
        (
            bad(Intervention(R, Replace(source="Paris", source_position=2))),
            f"{IV}.replace.source_position",
            "out of range",
        ),
        (bad(Intervention("blocks.1.hook_resid_mid", Zero())), f"{IV}.site", "hook_attn_out"),
        (bad(Intervention(R, Zero()), n=506), "run.max_new_tokens", "context of 512 tokens"),
        (bad(Intervention(R, Zero()), prompt=""), "run.prompt", "empty prompt"),
    ],
)
def test_bad_input_names_the_field_before_any_weights(no_weights, run, field, fragment):
    info = model_info("tiny-llama")
    with pytest.raises(PatchscopeError) as err:
        resolve_run(run, info)
    msg = str(err.value)
    assert msg.startswith(field + ":") and fragment in msg, msg


def test_bad_input_limits_are_exact(no_weights):
    info = model_info("tiny-llama")
    resolve_run(bad(Intervention(R, Zero()), n=505), info)  # 7 prompt tokens + 505 = n_ctx
    resolve_run(bad(Intervention(Site("blocks.3.attn.hook_z", head=(0, 3)), Zero(), (0, -7, 6))), info)
    resolve_run(
        bad(Intervention(R, Resample(source="The capital city of x is"), "prompt")), info
    )  # as long as the prompt
    msg = str(
        pytest.raises(PatchscopeError, resolve_run, bad(Intervention("blocks.1.hook_resid_mid", Zero())), info).value
    )
    assert "blocks.1.hook_resid_post" in msg


def test_engine_refuses_bad_runs_before_any_forward_pass(tiny_models, monkeypatch):
    engine = Engine(tiny_models["tiny-llama"], name="tiny-llama")
    monkeypatch.setattr(engine, "prepare", lambda *a: pytest.fail("prepared before validating"))
    with pytest.raises(PatchscopeError, match=r"^runs\[1\]\.interventions\[0\]\.site: unknown site"):
        engine.run([bad(Intervention(R, Zero())), bad(Intervention("blocks.1.hook_q", Zero()))])


# ---------------------------------------------------------------- 9. exactly max_new_tokens, or stop at EOS


def eos_runs():
    where = ["all", "generated", "prompt", (1, -1)]
    kinds = [Zero(), Scale(factor=-1.0), Noise(scale=2.0, std=1.0, seed=4), Mean(reference=REFERENCE)]
    sites = ["blocks.0.hook_resid_post", Site("blocks.1.attn.hook_z", head=2), "blocks.2.hook_mlp_out", "hook_embed"]
    prompts = PROMPTS + ["x", LONG]
    return [
        InterventionRun(
            prompts[k % len(prompts)],
            [Intervention(sites[k % 4], kinds[k // 4], where[(k + k // 4) % 4])] if k % 5 else [],
            max_new_tokens=[1, 4, 12, 7, 9][k % 5],
        )
        for k in range(16)
    ]


def test_without_eos_every_row_generates_exactly_max_new_tokens(tiny_models):
    model = tiny_models["tiny-llama"]
    runs = eos_runs()
    engine = Engine(model, name="tiny-llama", decoding=Decoding(stop_at_eos=False))
    together = engine.run(runs, batch_size=16, clean=False)
    alone = [engine.run([r], batch_size=1, clean=False)[0] for r in runs]
    assert [len(r.generated_token_ids) for r in together] == [r.max_new_tokens for r in runs]
    assert [r.generated_token_ids for r in together] == [r.generated_token_ids for r in alone]
    # make a token the rows generate the EOS of the tokenizer and of the model: nothing stops
    eos = together[2].generated_token_ids[2]
    tok = model.tokenizer
    old_tok, old_config = tok.eos_token, engine.modules.generation_config
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    engine.modules.generation_config = copy.deepcopy(old_config)
    engine.modules.generation_config.eos_token_id = eos
    try:
        again = engine.run(runs, batch_size=16, clean=False)
    finally:
        tok.eos_token, engine.modules.generation_config = old_tok, old_config
    assert [r.generated_token_ids for r in again] == [r.generated_token_ids for r in together]


def test_with_eos_rows_stop_at_eos(tiny_models):
    model = tiny_models["tiny-llama"]
    runs = eos_runs()
    full = Engine(model, name="tiny-llama", decoding=Decoding(stop_at_eos=False)).run(runs, batch_size=16, clean=False)
    eos = full[2].generated_token_ids[3]  # pretend this token is EOS: row 2 stops after it
    tok = model.tokenizer
    old = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    try:
        stopped = Engine(model, name="tiny-llama", decoding=Decoding(stop_at_eos=True)).run(
            runs, batch_size=16, clean=False
        )
    finally:
        tok.eos_token = old
    n_stopped = 0
    for f, s in zip(full, stopped):
        want = f.generated_token_ids
        if eos in want:
            want = want[: want.index(eos) + 1]
            n_stopped += 1
        assert s.generated_token_ids == want
    assert len(stopped[2].generated_token_ids) == full[2].generated_token_ids.index(eos) + 1 <= 4
    assert n_stopped < len(runs)  # other rows of the batch ran on
