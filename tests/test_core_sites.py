"""The plain-module view the engine runs on: shared weights, no bridge wrappers, same results."""

from __future__ import annotations

import torch

from patchscope_core import Decoding, PatchscopeEngine
from patchscope_core.models.sites import block, plain_modules
from tests.test_core_engine import cases, check_against_uncached


def test_plain_modules_share_every_weight_and_drop_the_wrappers(tiny_models):
    bridge = tiny_models["tiny-gpt2"]
    view = plain_modules(bridge)
    assert view is not bridge.original_model
    assert not any("_original_component" in m._modules for m in view.modules())
    bridged = {id(p) for p in bridge.original_model.parameters()}
    assert all(id(p) in bridged for p in view.parameters())  # shared, not copied
    # hooks on the view stay on the view
    handle = block(view, bridge, 1).register_forward_hook(lambda *a: None)
    assert not bridge.original_model.transformer.h[1]._forward_hooks
    handle.remove()


def test_block_output_is_the_bridges_resid_post(tiny_models):
    bridge = tiny_models["tiny-llama"]
    view = plain_modules(bridge)
    ids = bridge.to_tokens("The quick brown fox jumps")
    seen = {}

    def capture(module, args, out):
        seen["h"] = out[0] if isinstance(out, tuple) else out

    handle = block(view, bridge, 2).register_forward_hook(capture)
    with torch.no_grad():
        view(input_ids=ids)
        _, cache = bridge.run_with_cache(ids, names_filter=["blocks.2.hook_resid_post"])
    handle.remove()
    torch.testing.assert_close(seen["h"], cache["blocks.2.hook_resid_post"])


def test_accelerate_dispatched_model_runs_bridged_and_stays_right():
    """A model with accelerate's forward wrappers (device_map) is not peeled; the engine is
    then slower but must give the same, right tokens."""
    from accelerate.hooks import ModelHook, add_hook_to_module
    from transformer_lens.model_bridge import TransformerBridge

    from patchscope_core.models.loading import _tiny_hf_model

    hf, tokenizer = _tiny_hf_model("tiny-llama")
    add_hook_to_module(hf.model.layers[0], ModelHook())  # as from_pretrained(device_map=...) does
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer, device="cpu")
    assert plain_modules(bridge) is bridge.original_model
    results = PatchscopeEngine(bridge, name="tiny-llama", decoding=Decoding(stop_at_eos=False)).run(cases())
    check_against_uncached(bridge, results, "dispatched")


def test_an_instance_forward_the_view_cannot_rebind_runs_bridged_with_one_warning():
    """A decoder layer whose forward an adapter replaced by a closure over the original layer
    would run the bridged children from the peeled copy (hooks on the copy never fire): the
    engine must run through the bridge's own hook points instead, say so once, and stay right."""
    import functools

    import pytest
    from transformer_lens.model_bridge import TransformerBridge

    from patchscope_core.models import sites
    from patchscope_core.models.loading import _tiny_hf_model

    hf, tokenizer = _tiny_hf_model("tiny-llama")
    layer = hf.model.layers[1]
    layer.forward = functools.partial(type(layer).forward, layer)  # not a method: cannot be re-bound
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tokenizer, device="cpu")
    sites._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="cannot peel") as caught:
        assert plain_modules(bridge) is bridge.original_model
        assert plain_modules(bridge) is bridge.original_model
    assert len([w for w in caught if "cannot peel" in str(w.message)]) == 1
    results = PatchscopeEngine(bridge, name="tiny-llama", decoding=Decoding(stop_at_eos=False)).run(cases())
    check_against_uncached(bridge, results, "unpeelable")


def test_an_instance_forward_that_is_a_method_is_rebound_to_the_view(tiny_models):
    """Falcon's adapter binds a patched forward to each decoder layer; the peeled copy must run
    it on itself, so hooks on the copy's children fire."""
    import types

    bridge = tiny_models["tiny-llama"]
    original = bridge.blocks[2].original_component
    original.forward = types.MethodType(type(original).forward, original)
    try:
        view = plain_modules(bridge)
        fired = []
        handle = block(view, bridge, 2).mlp.register_forward_hook(lambda *a: fired.append(1))
        with torch.no_grad():
            view(input_ids=bridge.to_tokens("The quick brown fox"))
        handle.remove()
        assert fired, "the peeled layer ran the original's forward: hooks on its children never fired"
    finally:
        del original.forward
