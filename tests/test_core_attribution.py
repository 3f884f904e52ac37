"""Attribution patching (AtP, AtP*) equals TransformerLens's `attribution_patch` and autograd
written here, is the first-order term of exact patching (finite differences), and refuses bad
input before any weights load."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import Node, attribution_patch

from patchscope_core import Engine, InputError, model_info
from patchscope_core.attribution import Attributor, check_attribution
from patchscope_core.patching import Pair, check_pair

PAIRS = [Pair("The fox jumps over the", "The fix jumps over the", " dog", " cat"),
         Pair("The fox jumps over the", "The fax jumps over the", " dog", " cat")]


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {name: Engine(m, name=name) for name, m in tiny_models.items()}


def tl_scores(bridge, checked):
    def metric(logits):
        return logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]

    return attribution_patch(bridge, torch.tensor([checked.clean_ids]), torch.tensor([checked.corrupted_ids]),
                             metric).node_scores


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_head_and_mlp_estimates_equal_transformer_lens(engines, model):
    engine = engines[model]
    info = engine.info
    results = Attributor(engine).attribute(PAIRS, ["attn.hook_z", "hook_mlp_out"])
    for pair, res in zip(PAIRS, results):
        scores = tl_scores(engine.model, check_pair(pair, info))
        z, z_all = res.estimates[("atp", "attn.hook_z")]
        mlp, _ = res.estimates[("atp", "hook_mlp_out")]
        m = z.shape[1]
        want_z = torch.tensor([[[scores[Node("attn_head_out", p, l, h)] for h in range(info.n_heads)] for p in range(m)]
                               for l in range(info.n_layers)])
        want_mlp = torch.tensor([[[scores[Node("mlp_out", p, l)]] for p in range(m)] for l in range(info.n_layers)])
        assert torch.allclose(z, want_z, rtol=1e-4, atol=1e-6 * want_z.abs().max())
        assert torch.allclose(mlp, want_mlp, rtol=1e-4, atol=1e-6 * want_mlp.abs().max())
        assert torch.allclose(z_all, want_z.sum(1), rtol=1e-4, atol=1e-5)
