"""The engine on tiny random models: cached patched generation against independent references."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from patchscope_core import Affine, Decoding, Identity, Patchscope, PatchscopeEngine, Source, Target, tokenize
from patchscope_core.models.info import info_of
from tests.reference import compare_tokens, source_vector, uncached_patched_generation

TINY = ["tiny-gpt2", "tiny-llama"]
N_NEW = 8


def cases():
    """Heterogeneous Patchscopes covering the corners the KV cache makes hard."""
    long_t = "Syria: Country in the Middle East, Samsung: South Korean corporation, x"
    return [
        Patchscope(
            Source("Leonardo DiCaprio is an actor", 2, -1), Target(long_t, 2, (-1,)), max_new_tokens=N_NEW
        ),  # last position
        Patchscope(
            Source("Paris is the capital of France", 1, 3),
            Target("The capital city of x is", 1, (0,)),
            max_new_tokens=N_NEW,
        ),  # position 0
        Patchscope(Source("Samsung", 3, -1), Target("x", 0, (-1,)), max_new_tokens=N_NEW),  # short target, l* != l
        Patchscope(
            Source("The quick brown fox", 0, 2), Target("Water is a liquid. x x", 3, (1, -1, -2)), max_new_tokens=N_NEW
        ),  # several positions
        Patchscope(
            Source("Python", 2, 0), Target("Tokyo is the largest city of Japan", 2, (4,)), max_new_tokens=N_NEW - 3
        ),  # shorter generation
    ]


def check_against_uncached(model, results, name):
    for k, r in enumerate(results):
        spec = r.patchscope
        h = source_vector(model, r.source_token_ids, spec.source.layer, r.source_position)
        want, logits = uncached_patched_generation(
            model, r.target_token_ids, spec.target.layer, r.target_positions, spec.mapping(h), spec.max_new_tokens
        )
        compare_tokens(r.generated_token_ids, want, logits, f"{name}[{k}]")


@pytest.mark.parametrize("name", TINY)
def test_cached_batch_equals_uncached_repatching(tiny_models, name):
    model = tiny_models[name]
    engine = PatchscopeEngine(model, name=name, decoding=Decoding(stop_at_eos=False))
    results = engine.run(cases(), batch_size=8)
    assert [len(r.generated_token_ids) for r in results] == [c.max_new_tokens for c in cases()]
    check_against_uncached(model, results, name)


@pytest.mark.parametrize("name", TINY)
def test_one_token_target_prompt_and_position_zero(tiny_models, name):
    """Without BOS the target `x` is a single token: the prefill chunk has length 1, like every
    later step, and the patch must still land at position 0 exactly once."""
    model = tiny_models[name]
    model.cfg.default_prepend_bos = False
    try:
        engine = PatchscopeEngine(model, name=name, decoding=Decoding(stop_at_eos=False))
        spec = Patchscope(Source("Paris is the capital", 2, -1), Target("x", 1, (0,)), max_new_tokens=N_NEW)
        (r,) = engine.run([spec])
        assert len(r.target_token_ids) == 1 and r.target_positions == [0]
        check_against_uncached(model, [r], f"{name}-one-token")
        # and the patch matters: the unpatched continuation of `x` is different
        plain, _ = uncached_patched_generation(model, r.target_token_ids, 1, [], None, N_NEW)
        assert plain != r.generated_token_ids
    finally:
        model.cfg.default_prepend_bos = True


@pytest.mark.parametrize("name", TINY)
def test_heterogeneous_batch_equals_each_row_alone(tiny_models, name):
    engine = PatchscopeEngine(tiny_models[name], name=name, decoding=Decoding(stop_at_eos=False))
    together = engine.run(cases(), batch_size=16)
    for k, spec in enumerate(cases()):
        (alone,) = engine.run([spec], batch_size=1)
        assert alone.generated_token_ids == together[k].generated_token_ids, k
        assert alone.target_positions == together[k].target_positions
        torch.testing.assert_close(
            torch.tensor(alone.top_logprobs), torch.tensor(together[k].top_logprobs), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("name", TINY)
def test_patching_own_vector_back_changes_nothing(tiny_models, name):
    model = tiny_models[name]
    engine = PatchscopeEngine(model, name=name, decoding=Decoding(stop_at_eos=False))
    prompts = ["The quick brown fox jumps", "Paris is the capital of France"]
    specs = [
        Patchscope(Source(p, layer, pos), Target(p, layer, (pos,)), max_new_tokens=N_NEW)
        for p in prompts
        for layer in (0, 3)
        for pos in (0, 2, -1)
    ]
    info = info_of(model, name)
    for r in engine.run(specs):
        ids = torch.tensor([list(tokenize(info, r.patchscope.target.prompt))])
        plain = model.original_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            pad_token_id=2,
        )
        assert r.generated_token_ids == plain[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("name", TINY)
def test_patch_changes_generation_and_first_token_logprobs(tiny_models, name):
    """Guards against a hook that never fires: a foreign vector changes what the target says."""
    engine = PatchscopeEngine(tiny_models[name], name=name, decoding=Decoding(stop_at_eos=False))
    p = "The capital city of x is"
    own, foreign = engine.run(
        [
            Patchscope(Source(p, 1, -2), Target(p, 1, (-2,)), max_new_tokens=N_NEW),
            Patchscope(Source("Samsung makes phones", 1, -1), Target(p, 1, (-2,)), max_new_tokens=N_NEW),
        ]
    )
    assert own.top_logprobs != foreign.top_logprobs
    lp = torch.tensor(foreign.top_logprobs)
    assert torch.all(lp[:-1] >= lp[1:]) and torch.all(lp <= 0)
    assert foreign.top_token_ids[0] == foreign.generated_token_ids[0]


def test_source_extraction_matches_run_with_cache(tiny_models):
    model = tiny_models["tiny-llama"]
    engine = PatchscopeEngine(model, name="tiny-llama")
    specs = [
        Patchscope(Source(p, layer, pos), Target("x", 0))
        for p in ("Samsung", "The quick brown fox jumps")
        for layer in (0, 2, 3)
        for pos in (0, -1)
    ]
    resolved = engine.resolve(specs)
    got = engine.extract_sources(resolved, batch_size=2)
    for r in resolved:
        want = source_vector(model, r.source_token_ids, r.spec.source.layer, r.source_position)
        torch.testing.assert_close(
            got[(r.source_token_ids, r.spec.source.layer, r.source_position)], want, atol=1e-5, rtol=1e-5
        )


def test_affine_mapping_across_models(tiny_models):
    """Cross-model Patchscope: h from tiny-gpt2, f(h) = W h + b written into tiny-llama."""
    src, tgt = tiny_models["tiny-gpt2"], tiny_models["tiny-llama"]
    g = torch.Generator().manual_seed(1)
    affine = Affine(W=torch.randn(64, 64, generator=g) * 0.2, b=torch.randn(64, generator=g))
    engine = PatchscopeEngine(
        tgt, src, name="tiny-llama", source_name="tiny-gpt2", decoding=Decoding(stop_at_eos=False)
    )
    spec = Patchscope(
        Source("Paris is the capital", 2, -1),
        Target("The capital city of x is", 1, (-2,)),
        mapping=affine,
        max_new_tokens=N_NEW,
    )
    (r,) = engine.run([spec])
    assert (r.patchscope.source.model, r.patchscope.target.model) == ("tiny-gpt2", "tiny-llama")
    h = source_vector(src, r.source_token_ids, 2, r.source_position)
    want, logits = uncached_patched_generation(
        tgt, r.target_token_ids, 1, r.target_positions, h @ affine.W.T + affine.b, N_NEW
    )
    compare_tokens(r.generated_token_ids, want, logits, "affine")
    # the identity as an affine map gives the identity's result
    eye = Affine(W=torch.eye(64), b=torch.zeros(64))
    same = PatchscopeEngine(tgt, name="tiny-llama", decoding=Decoding(stop_at_eos=False))
    a, b = same.run([dataclasses.replace(spec, mapping=eye), dataclasses.replace(spec, mapping=Identity())])
    assert a.generated_token_ids == b.generated_token_ids


def test_rows_stop_cleanly_at_eos(tiny_models):
    """A row that emits EOS stops there (EOS kept); the other rows of the batch run on unchanged."""
    model = tiny_models["tiny-llama"]
    tok = model.tokenizer
    specs = cases()[:3]
    full = PatchscopeEngine(model, name="tiny-llama", decoding=Decoding(stop_at_eos=False)).run(specs)
    eos = full[0].generated_token_ids[3]  # pretend this token is EOS: row 0 must stop after 4 tokens
    assert eos not in full[0].generated_token_ids[:3]
    old = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    try:
        stopped = PatchscopeEngine(model, name="tiny-llama", decoding=Decoding(stop_at_eos=True)).run(specs)
    finally:
        tok.eos_token = old
    for f, s in zip(full, stopped):
        want = f.generated_token_ids
        if eos in want:
            want = want[: want.index(eos) + 1]
        assert s.generated_token_ids == want
    assert len(stopped[0].generated_token_ids) == 4


def test_sampling_is_reproducible_with_a_seed(tiny_models):
    model = tiny_models["tiny-gpt2"]
    spec = cases()[0]

    def run(seed):
        return PatchscopeEngine(
            model, decoding=Decoding(do_sample=True, seed=seed, temperature=2.0, stop_at_eos=False)
        ).run([spec] * 3)

    a, b, c = run(7), run(7), run(8)
    assert [r.generated_token_ids for r in a] == [r.generated_token_ids for r in b]
    assert [r.generated_token_ids for r in a] != [r.generated_token_ids for r in c]


@pytest.mark.parametrize("name", TINY)
def test_tokenize_matches_the_bridge(tiny_models, name):
    model = tiny_models[name]
    info = info_of(model, name)
    for p in ["x", "The capital city of x is", "Leonardo DiCaprio: American actor, x"]:
        assert list(tokenize(info, p)) == model.to_tokens(p)[0].tolist()


def test_local_model_directory_loads_like_the_alias(tiny_models, tmp_path):
    from patchscope_core import load_model, model_info
    from patchscope_core.models.loading import _tiny_hf_model

    hf, tok = _tiny_hf_model("tiny-llama")
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    info = model_info(str(tmp_path))
    assert (info.n_layers, info.d_model) == (4, 64)
    local = load_model(str(tmp_path), device="cpu")
    spec = cases()[0]
    a = PatchscopeEngine(local, decoding=Decoding(stop_at_eos=False)).run([spec])[0]
    b = PatchscopeEngine(tiny_models["tiny-llama"], decoding=Decoding(stop_at_eos=False)).run([spec])[0]
    assert a.generated_token_ids == b.generated_token_ids
