"""Scoring rows that start at their first touched layer (patchscope_core/forward/clean_start.py): the
same tokens and scores as the plain path (every row through every layer) and as the bridge's own
hook points (`run_with_hooks`, tests/reference.py), a batch equal to its rows one at a time, and
the layers below a batch's first touched layer not run again."""

from __future__ import annotations

import pytest
import torch

from patchscope_core import Add, Decoding, Intervention, InterventionRun, Mean, Noise, Scale, Site, Zero
from patchscope_core.engine import Engine
from patchscope_core.interventions import Knockout
from tests.reference import hooked_logits, reference_hooks

TINY = ["tiny-gpt2", "tiny-llama"]
PROMPTS = ["The capital city of x is", "Paris is the capital of France", "Water is a liquid."]
REFERENCE = ("The quick brown fox jumps over the lazy dog.", "Python is a programming language.")


def mixed_runs(model, with_knockout: bool = True) -> list[InterventionRun]:
    """Rows with different first layers (0 .. the last, and none), prompts of different lengths,
    several rows with generation, a row touching two layers, a hook_embed row (starts at 0)."""
    g = torch.Generator().manual_seed(5)
    n, d = model.cfg.n_layers, model.cfg.d_model
    runs = [
        InterventionRun(
            PROMPTS[(l + h) % 3],
            [Intervention(Site(f"blocks.{l}.attn.hook_z", head=h), Zero(), "all")],
            answer=" Paris is",
            max_new_tokens=0,
        )
        for l in range(n)
        for h in (0, 1)
    ]
    runs += [
        InterventionRun(
            PROMPTS[0],
            [Intervention(f"blocks.{n - 1}.hook_resid_pre", Add(vector=3 * torch.randn(d, generator=g)), "all")],
            answer=" France",
            max_new_tokens=0,
        ),
        InterventionRun(
            PROMPTS[1],
            [
                Intervention(f"blocks.{n - 2}.hook_mlp_out", Mean(reference=REFERENCE), "prompt"),
                Intervention(f"blocks.{n - 1}.hook_attn_out", Scale(factor=-2.0), "generated"),
            ],
            answer=" is the capital",
            max_new_tokens=0,
        ),
        InterventionRun(
            PROMPTS[2],
            [Intervention("hook_embed", Noise(scale=2.0, std=0.5, seed=3), (1, 2))],
            answer=" Paris",
            max_new_tokens=0,
        ),
        InterventionRun(PROMPTS[1], [], answer=" Paris", max_new_tokens=0),
        # generation: tokens through the plain KV-cached path, the answer scored from the stored state
        InterventionRun(
            PROMPTS[0],
            [Intervention(Site(f"blocks.{n - 1}.attn.hook_z", head=1), Zero(), "all")],
            answer=" Paris is",
            max_new_tokens=4,
        ),
        InterventionRun(
            PROMPTS[2],
            [Intervention(f"blocks.{n // 2}.hook_resid_post", Add(vector=2 * torch.randn(d, generator=g)), "prompt")],
            answer=" France",
            max_new_tokens=3,
        ),
        InterventionRun(
            PROMPTS[1],
            [Intervention(Site(f"blocks.{n - 2}.attn.hook_z", head=0), Zero(), "all")],
            answer=None,
            max_new_tokens=3,
        ),
    ]
    if with_knockout:
        runs.append(
            InterventionRun(
                PROMPTS[0],
                [Intervention(f"blocks.{n - 1}.attn", Knockout(from_="last", to=(1, 3)))],
                answer=" Paris",
                max_new_tokens=0,
            )
        )
    return runs


def results_of(model, name, runs, batch_size: int, shortcut: bool):
    engine = Engine(model, name=name, top_k=5, decoding=Decoding(stop_at_eos=False))
    engine.start_at_first_layer = shortcut
    return engine, engine.run(runs, batch_size=batch_size, clean=False)


def assert_same(got, want, label):
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.generated_token_ids == b.generated_token_ids, f"{label} row {k}"
        assert a.top_token_ids == b.top_token_ids, f"{label} row {k}"
        torch.testing.assert_close(torch.tensor(a.top_logprobs), torch.tensor(b.top_logprobs), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.tensor(a.answer_logprobs),
            torch.tensor(b.answer_logprobs),
            atol=1e-4,
            rtol=0,
            msg=lambda m: f"{label} row {k}: {m}",
        )


@pytest.mark.parametrize("name", TINY)
def test_shortcut_equals_the_plain_path_the_bridge_and_rows_one_at_a_time(tiny_models, name):
    model = tiny_models[name]
    runs = mixed_runs(model)
    fast_engine, fast = results_of(model, name, runs, 64, True)
    _, plain = results_of(model, name, runs, 64, False)
    _, alone = results_of(model, name, runs, 1, True)
    distinct = {tuple(r.prompt_token_ids + r.answer_token_ids) for r in fast}
    assert fast_engine.states.ok is True and 0 < fast_engine.counts["clean_states"] <= len(distinct)
    assert_same(fast, plain, "shortcut vs plain")
    assert_same(fast, alone, "batch vs one at a time")
    for k, (run, r) in enumerate(zip(runs, fast)):
        if any(iv.kind.name == "knockout" for iv in run.interventions):
            continue  # no bridge hook point for it: equal to the plain path above (tests/test_core_knockout.py)
        prompt, answer, hooks = reference_hooks(model, run)
        if answer:
            logp = torch.log_softmax(hooked_logits(model, prompt + answer, hooks), -1)
            want = torch.stack([logp[len(prompt) - 1 + i, t] for i, t in enumerate(answer)])
            torch.testing.assert_close(
                torch.tensor(r.answer_logprobs),
                want,
                atol=1e-4,
                rtol=0,
                msg=lambda m: f"row {k} against the bridge: {m}",
            )
        if not run.max_new_tokens:
            first = torch.log_softmax(hooked_logits(model, prompt, hooks)[-1], -1).topk(5)
            assert r.top_token_ids == first.indices.tolist(), k
            torch.testing.assert_close(torch.tensor(r.top_logprobs), first.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_layers_below_the_first_touched_one_run_once_per_prompt(tiny_models, name):
    """Rows ablating heads of layers >= 2 never run blocks 0 and 1 again: only the stored clean
    run of each prompt does (blocks 0 and 1 run once per distinct prompt + answer)."""
    model = tiny_models[name]
    n = model.cfg.n_layers
    runs = [
        InterventionRun(
            PROMPTS[l % 2],
            [Intervention(Site(f"blocks.{l}.attn.hook_z", head=h), Zero(), "all")],
            answer=" Paris",
            max_new_tokens=0,
        )
        for l in range(2, n)
        for h in (0, 1)
    ]
    calls = {0: 0, 1: 0, n - 1: 0}
    engine = Engine(model, name=name)
    blocks = engine.modules.get_submodule(engine.info.components["blocks"].name)
    handles = [blocks[l].register_forward_hook(lambda *a, l=l: calls.__setitem__(l, calls[l] + 1)) for l in calls]
    try:
        engine.run(runs, batch_size=64, clean=False)
    finally:
        for h in handles:
            h.remove()
    assert calls[0] == calls[1] == 2 == engine.counts["clean_states"], calls
    assert calls[n - 1] > 2  # the batches did run


def test_off_switch_runs_every_layer(tiny_models):
    model = tiny_models["tiny-llama"]
    runs = mixed_runs(model, with_knockout=False)
    engine, _ = results_of(model, "tiny-llama", runs, 64, False)
    assert engine.counts["clean_states"] == 0 and engine.states.ok is None
