"""Doing less work than a plain loop: shared target prefixes give the same tokens as computing
every row's prompt in full, and as the uncached reference."""

from __future__ import annotations

import pytest
import torch

from patchscope_core import (
    Add,
    Decoding,
    Engine,
    Intervention,
    InterventionRun,
    Patchscope,
    PatchscopeEngine,
    Positions,
    Site,
    Source,
    Target,
    Zero,
)
from tests.test_core_engine import check_against_uncached

TINY = ["tiny-gpt2", "tiny-llama"]
TARGET = "Syria: Country in the Middle East, Samsung: South Korean corporation, x"
SOURCES = ["Leonardo DiCaprio is an actor", "Paris is the capital of France", "The quick brown fox", "Python"]


def grid(n_new: int = 8) -> list[Patchscope]:
    """One target prompt, patched at its last position (or the last two), many sources and layers."""
    return [
        Patchscope(Source(s, layer, -1), Target(TARGET, layer, (-1,) if k % 3 else (-2, -1)), max_new_tokens=n_new)
        for k, (s, layer) in enumerate((s, layer) for s in SOURCES for layer in range(4))
    ]


def first_chunks(engine):
    """Record the chunk length of the first forward pass inside each generate call."""
    seen: list[int] = []
    state = {"first": False}

    def pre(module, args, kwargs):
        if state["first"]:
            seen.append(kwargs["input_ids"].shape[1])
            state["first"] = False

    real = engine.modules.generate

    def generate(*a, **k):
        state["first"] = True
        return real(*a, **k)

    handle = engine.modules.register_forward_pre_hook(pre, with_kwargs=True)
    engine.modules.generate = generate
    return seen, lambda: (handle.remove(), engine.modules.__dict__.pop("generate"))


@pytest.mark.parametrize("name", TINY)
def test_shared_target_prefix_equals_full_prompts_and_the_uncached_reference(tiny_models, name):
    model = tiny_models[name]
    shared = PatchscopeEngine(model, name=name, decoding=Decoding(stop_at_eos=False))
    full = PatchscopeEngine(model, name=name, decoding=Decoding(stop_at_eos=False))
    full.share_prefixes = False
    seen, undo = first_chunks(shared)
    try:
        a = shared.run(grid(), batch_size=16)
    finally:
        undo()
    b = full.run(grid(), batch_size=16)
    m = len(a[0].target_token_ids)
    # 16 rows in one batch: the prefix up to the first patched position (m - 2) is computed once
    assert shared.counts["shared_prefix_tokens"] == (m - 2) * 15
    assert seen == [2], "the batch's prefill saw more than the positions after the shared prefix"
    assert full.counts["shared_prefix_tokens"] == 0
    for x, y in zip(a, b):
        assert x.generated_token_ids == y.generated_token_ids
        torch.testing.assert_close(torch.tensor(x.top_logprobs), torch.tensor(y.top_logprobs), atol=1e-5, rtol=0)
    check_against_uncached(model, a, f"{name}-shared-prefix")


def test_interventions_share_only_what_no_intervention_touches(tiny_models):
    model = tiny_models["tiny-llama"]
    prompt = "Paris is the capital of France. The Eiffel Tower is in"
    late = [
        InterventionRun(
            prompt,
            [Intervention(Site("blocks.1.attn.hook_z", head=h), Zero(), Positions((-2,), generated=True))],
            answer=" Paris",
            max_new_tokens=6,
        )
        for h in range(4)
    ]
    steer = [
        InterventionRun(
            prompt,
            [Intervention(Site("blocks.2.hook_resid_post"), Add(alpha=a, vector=torch.ones(64)), "generated")],
            max_new_tokens=6,
        )
        for a in (1.0, 4.0)
    ]
    everywhere = [
        InterventionRun(prompt, [Intervention(Site("blocks.1.attn.hook_z", head=h), Zero(), "all")], max_new_tokens=6)
        for h in range(2)
    ]
    for runs, shares in ((late, True), (steer, True), (everywhere, False)):
        on, off = (
            Engine(model, decoding=Decoding(stop_at_eos=False)),
            Engine(model, decoding=Decoding(stop_at_eos=False)),
        )
        off.share_prefixes = False
        a, b = on.run_interventions(runs, clean=False), off.run_interventions(runs, clean=False)
        assert (on.counts["shared_prefix_tokens"] > 0) == shares
        for x, y in zip(a, b):
            assert x.generated_token_ids == y.generated_token_ids
            if x.answer_logprob is not None:
                assert x.answer_logprob == pytest.approx(y.answer_logprob, abs=1e-5)


def test_own_hooks_never_skip_a_prefix(tiny_models):
    """A user's hook may act anywhere: generate_with_hooks always computes whole prompts."""
    engine = Engine(tiny_models["tiny-llama"], decoding=Decoding(stop_at_eos=False))
    seen = []
    engine.generate_with_hooks(
        ["The quick brown fox jumps"] * 3,
        [("blocks.0.hook_resid_post", lambda x, ctx: seen.append(ctx.positions[0].tolist()))],
        max_new_tokens=2,
    )
    assert seen[0][0] == 0 and engine.counts["shared_prefix_tokens"] == 0


def test_a_batch_that_runs_out_of_memory_is_halved_with_the_same_results(tiny_models):
    """Out of memory is injected in the model's own forward pass for batches of more than 3 rows."""
    model = tiny_models["tiny-llama"]
    runs = [
        InterventionRun(
            p, [Intervention(Site("blocks.1.attn.hook_z", head=h), Zero(), "all")], answer=" Paris", max_new_tokens=5
        )
        for p in SOURCES
        for h in range(3)
    ]
    want = Engine(model, decoding=Decoding(stop_at_eos=False)).run_interventions(runs, batch_size=16, clean=False)
    engine = Engine(model, decoding=Decoding(stop_at_eos=False))

    def limited_memory(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    handle = engine.modules.register_forward_pre_hook(limited_memory, with_kwargs=True)
    try:
        got = engine.run_interventions(runs, batch_size=16, clean=False)
        assert engine.counts["oom_halved"] >= 3  # 12 rows -> 6 + 6 -> 3 + 3 + 3 + 3
        for x, y in zip(got, want):
            assert x.generated_token_ids == y.generated_token_ids
            assert x.answer_logprob == pytest.approx(y.answer_logprob, abs=1e-5)
        handle.remove()
        handle = engine.modules.register_forward_pre_hook(
            lambda m, a, k: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory (injected)")), with_kwargs=True
        )
        with pytest.raises(torch.OutOfMemoryError):  # a single row that does not fit is an error, not a loop
            engine.run_interventions(runs[:1], clean=False)
    finally:
        handle.remove()


def test_a_token_budget_cuts_batches_by_their_size_not_their_rows(tiny_models, monkeypatch):
    model = tiny_models["tiny-gpt2"]
    engine = PatchscopeEngine(model, decoding=Decoding(stop_at_eos=False))
    sizes = []
    real = Engine._batch
    monkeypatch.setattr(Engine, "_batch", lambda self, b, a: sizes.append(len(b)) or real(self, b, a))
    want = engine.run(grid(), batch_size=16)
    assert sizes == [16]
    sizes.clear()
    engine.batch_tokens = 4 * (len(want[0].target_token_ids) + 8)  # four rows of the longest sequence
    got = engine.run(grid(), batch_size=16)
    assert sizes == [4, 4, 4, 4]
    assert [r.generated_token_ids for r in got] == [r.generated_token_ids for r in want]


def test_bfloat16_runs_the_same_paths_close_to_float32():
    """No GPU here: the dtype paths a GPU run takes (bfloat16 weights, float32 source vectors and
    statistics written into bfloat16 activations) run on the CPU and stay close to float32."""
    from patchscope_core import Mean, load_model

    half = load_model("tiny-llama", device="cpu", dtype=torch.bfloat16)
    full = load_model("tiny-llama", device="cpu")
    assert next(half.original_model.parameters()).dtype == torch.bfloat16
    specs = grid(n_new=4)[:6]
    a = PatchscopeEngine(half, decoding=Decoding(stop_at_eos=False)).run(specs)
    b = PatchscopeEngine(full, decoding=Decoding(stop_at_eos=False)).run(specs)
    for x, y in zip(a, b):  # bfloat16 keeps 8 bits of mantissa: near-ties may swap, nothing more
        assert x.top_token_ids[0] in y.top_token_ids
        assert y.top_logprobs[y.top_token_ids.index(x.top_token_ids[0])] >= y.top_logprobs[0] - 0.25
        assert x.top_logprobs[0] == pytest.approx(y.top_logprobs[0], abs=0.25)
    runs = [
        InterventionRun(
            "Paris is the capital of France.",
            [Intervention(Site("blocks.1.hook_mlp_out"), Mean(reference=tuple(SOURCES)), "all")],
            answer=" Paris",
            max_new_tokens=3,
        )
    ]
    (h,) = Engine(half).run_interventions(runs)
    (f,) = Engine(full).run_interventions(runs)
    assert h.answer_logprob == pytest.approx(f.answer_logprob, abs=0.5)
    assert h.answer_logprob != pytest.approx(h.clean_answer_logprob, abs=1e-3)  # the intervention acted
