"""The engine on the real SmolLM2-135M, against plain Hugging Face and uncached references."""

from __future__ import annotations

import pytest
import torch

from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target, tokenize
from patchscope_core.models.info import info_of
from tests.reference import compare_tokens, source_vector, uncached_patched_generation

pytestmark = pytest.mark.smollm2

ENTITY = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
N_NEW = 12


def cases():
    return [
        Patchscope(Source("Leonardo DiCaprio", 4, -1), Target(ENTITY, 4, (-1,)), max_new_tokens=N_NEW),
        Patchscope(Source("Paris", 3, -1), Target(ENTITY, 8, (-1,)), max_new_tokens=N_NEW),  # l* != l
        Patchscope(
            Source("Samsung", 12, -1), Target("The capital city of x is", 2, (0,)), max_new_tokens=N_NEW
        ),  # position 0
        Patchscope(
            Source("The Eiffel Tower", 4, 2), Target("x x x", 4, (1, 2, 3)), max_new_tokens=N_NEW
        ),  # several positions
        Patchscope(
            Source("Python", 29, -1), Target("x", 0, (-1,)), max_new_tokens=N_NEW - 4
        ),  # last layer, short target
    ]


@pytest.fixture(scope="module")
def results(smollm2):
    engine = PatchscopeEngine(smollm2, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    return engine.run(cases(), batch_size=8)


def test_cached_batch_equals_uncached_repatching(smollm2, results):
    for k, r in enumerate(results):
        spec = r.patchscope
        h = source_vector(smollm2, r.source_token_ids, spec.source.layer, r.source_position)
        want, logits = uncached_patched_generation(
            smollm2, r.target_token_ids, spec.target.layer, r.target_positions, h, spec.max_new_tokens
        )
        compare_tokens(r.generated_token_ids, want, logits, f"smollm2[{k}]")


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def _with_output(out, hidden):
    return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden


@torch.no_grad()
def hf_patchscope(hf, src_ids, layer, position, tgt_ids, target_layer, positions, n_new):
    """The Patchscope with plain Hugging Face only: forward hooks on the decoder layers, HF generate,
    the patch written in the first forward pass of generate (the prefill) and never again."""
    captured = {}

    def capture(mod, args, out):
        captured["h"] = _layer_output(out)[0, position].clone()

    h = hf.model.layers[layer].register_forward_hook(capture)
    hf(input_ids=torch.tensor([src_ids]))
    h.remove()
    calls = []

    def patch(mod, args, out):
        calls.append(1)
        if len(calls) > 1:
            return out
        hidden = _layer_output(out).clone()
        hidden[0, list(positions)] = captured["h"]
        return _with_output(out, hidden)

    h = hf.model.layers[target_layer].register_forward_hook(patch)
    try:
        ids = torch.tensor([tgt_ids])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
            output_scores=True,
            return_dict_in_generate=True,
        )
    finally:
        h.remove()
    return out.sequences[0, ids.shape[1] :].tolist(), [s[0].float() for s in out.scores]


def test_agrees_with_plain_hugging_face(results):
    from transformers import AutoModelForCausalLM

    from patchscope_core.models import smollm2_dir

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()  # its own copy, no bridge
    for k, r in enumerate(results):
        s, t = r.patchscope.source, r.patchscope.target
        want, scores = hf_patchscope(
            hf,
            r.source_token_ids,
            s.layer,
            r.source_position,
            r.target_token_ids,
            t.layer,
            r.target_positions,
            r.patchscope.max_new_tokens,
        )
        compare_tokens(r.generated_token_ids, want, scores, f"smollm2-vs-hf[{k}]")


def test_entity_description_reads_the_source(results):
    """The patch reaches the output: DiCaprio's layer-4 vector is described as an actor, and
    different sources give different descriptions of the same `x`."""
    assert "actor" in results[0].generated_text
    assert results[0].generated_text != results[1].generated_text


def test_unpatched_cached_equals_uncached_through_the_bridge(smollm2):
    """The test that fails when transformers breaks the bridge's KV cache (5.24 did, silently)."""
    info = info_of(smollm2, "smollm2-135m")
    for prompt in ["The capital of France is", ENTITY]:
        ids = list(tokenize(info, prompt))
        want, logits = uncached_patched_generation(smollm2, ids, 0, [], None, N_NEW)
        t = torch.tensor([ids])
        hf_path = smollm2.original_model.generate(
            t,
            attention_mask=torch.ones_like(t),
            max_new_tokens=N_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
            use_cache=True,
        )
        compare_tokens(hf_path[0, len(ids) :].tolist(), want, logits, "bridge-hf-generate-cached")
        tl_path = smollm2.generate(
            t, max_new_tokens=N_NEW, do_sample=False, stop_at_eos=False, use_past_kv_cache=True, verbose=False
        )
        compare_tokens(tl_path[0, len(ids) :].tolist(), want, logits, "bridge-generate-cached")
    assert smollm2.generate(
        "The capital of France is", max_new_tokens=2, do_sample=False, verbose=False, return_type="str"
    ).endswith(" Paris.")


def test_tokenize_matches_the_bridge(smollm2):
    info = info_of(smollm2, "smollm2-135m")
    for p in ["x", ENTITY, "Leonardo DiCaprio", "The capital city of x is"]:
        ids = list(tokenize(info, p))
        assert ids == smollm2.to_tokens(p)[0].tolist()
        assert ids[0] == 1  # BOS, as the model sees the prompt
