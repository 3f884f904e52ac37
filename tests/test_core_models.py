"""ModelInfo is built in one place: validation (no weights) and the loaded engine agree."""

from __future__ import annotations

import pytest
import torch

from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target, load_model, model_info, tokenize
from patchscope_core.models import info_of
from patchscope_core.models.loading import _load_tokenizer, _tiny_tokenizer_dir
from tests.reference import compare_tokens, source_vector, uncached_patched_generation


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A random Qwen2 model in a local directory: TransformerLens turns BOS off for Qwen2."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = _load_tokenizer(str(_tiny_tokenizer_dir()))
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_validation_and_the_loaded_model_agree_on_bos_and_shapes(tiny_qwen2):
    info = model_info(tiny_qwen2)  # from the config and tokenizer alone
    bridge = load_model(tiny_qwen2, device="cpu")
    loaded = info_of(bridge, tiny_qwen2)
    assert info.prepend_bos is False and bridge.cfg.default_prepend_bos is False
    for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_ctx", "prepend_bos"):
        assert getattr(info, field) == getattr(loaded, field), field
    assert (info.n_ctx, info.d_mlp) == (256, 128)
    for prompt in ("x", "The capital city of x is"):
        ids = list(tokenize(info, prompt))
        assert ids == bridge.to_tokens(prompt)[0].tolist()
        assert ids[0] != bridge.tokenizer.bos_token_id


def test_positions_mean_the_same_to_validation_and_engine(tiny_qwen2):
    """Position 0 is the first word, not a BOS, on both sides; the patch lands there."""
    bridge = load_model(tiny_qwen2, device="cpu")
    spec = Patchscope(
        Source("Paris is the capital", 2, -1), Target("The capital city of x is", 1, (0, -2)), max_new_tokens=6
    )
    (r,) = PatchscopeEngine(bridge, name=tiny_qwen2, decoding=Decoding(stop_at_eos=False)).run([spec])
    target_ids = tokenize(model_info(tiny_qwen2), spec.target.prompt)
    assert r.target_token_ids == list(target_ids) and r.target_positions == [0, len(target_ids) - 2]
    h = source_vector(bridge, r.source_token_ids, 2, r.source_position)
    want, logits = uncached_patched_generation(bridge, r.target_token_ids, 1, r.target_positions, h, 6)
    compare_tokens(r.generated_token_ids, want, logits, "qwen2")


def test_model_info_reads_the_context_and_widths_of_every_alias():
    gpt2, llama = model_info("tiny-gpt2"), model_info("tiny-llama")
    assert (gpt2.n_heads, gpt2.d_head, gpt2.d_mlp, gpt2.n_ctx) == (4, 16, 256, 512)
    assert (llama.n_heads, llama.d_head, llama.d_mlp, llama.n_ctx) == (4, 16, 128, 512)
    assert gpt2.prepend_bos and llama.prepend_bos
