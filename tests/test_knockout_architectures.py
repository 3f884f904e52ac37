"""Attention knockout on every architecture the installed TransformerBridge boots: it moves the
output, or it is refused; never a silent no-op.

The architectures and their tiny random models come from tests/test_architectures.py (TransformerLens'
adapter registry, 3 layers, width 64). Whether an architecture's attention can carry a knockout
is decided here independently of the engine, by a probe on a separate plain Hugging Face copy:
an attention function registered with transformers' AttentionInterface under another name, set
on every attention module's config, records which modules call it in a forward pass. Then:

- every attention module calls it: the knockout that must matter (the last token's query blocked
  from every earlier key, at every layer that has attention) moves the last position's logits,
  leaves every earlier position's bit for bit, and its cached generation equals uncached;
- some do not: the engine refuses the knockout when the run is resolved (before any forward),
  with a message that starts with the field and names the architecture.

With PATCHSCOPE_KNOCKOUT_RESULTS=path each architecture's outcome goes to that JSON file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import warnings

import pytest
import torch

from patchscope_core import Decoding, Intervention, InterventionRun, PatchscopeError, Site
from patchscope_core.engine import Engine
from patchscope_core.interventions import Knockout
from patchscope_core.models.sites import resolve_site
from tests.test_architectures import _SKIPS, ARCHITECTURES, PROMPT, tiny_model

N_NEW = 4
PROBE = "patchscope_test_probe"


@pytest.fixture(scope="module")
def outcomes():
    table: dict[str, str] = {}
    yield table
    path = os.environ.get("PATCHSCOPE_KNOCKOUT_RESULTS")
    if path:
        with open(path, "w") as fh:
            json.dump(table, fh, indent=1, sort_keys=True)


def boot(architecture: str, outcomes):
    from transformer_lens.model_bridge import TransformerBridge

    from tests.reference import hooked_logits

    try:
        model, tokenizer = tiny_model(architecture)
    except pytest.skip.Exception:
        outcomes[architecture] = f"skipped: {_SKIPS['last']}"
        raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                architecture, hf_model=model, tokenizer=tokenizer, device="cpu"
            )
            hooked_logits(bridge, bridge.to_tokens(PROMPT)[0].tolist(), [])
            engine = Engine(bridge, name=architecture, decoding=Decoding(stop_at_eos=False))
    except Exception as exc:  # noqa: BLE001 - the bridge's reason is the skip reason
        outcomes[architecture] = f"skipped: the bridge cannot boot it ({type(exc).__name__})"
        pytest.skip(f"the bridge cannot boot or run a tiny {architecture}: {str(exc)[:300]}")
    return engine


def attention_paths(architecture: str, engine) -> dict[int, str]:
    """Layer -> module path of blocks.{l}.attn, for the layers whose plain copy has that module."""
    plain, _ = tiny_model(architecture)
    paths = {}
    for layer in range(engine.info.n_layers):
        try:
            path = resolve_site(Site(f"blocks.{layer}.attn"), engine.info).module
            plain.get_submodule(path)
            paths[layer] = path
        except (PatchscopeError, AttributeError):
            continue  # no attention (a recurrent model, or a recurrent layer of a hybrid)
    return paths


@torch.no_grad()
def probe(architecture: str, paths: dict[int, str]) -> dict[int, bool]:
    """Layer -> whether a plain copy's attention module there calls the function the
    AttentionInterface names (the probe records its caller and returns sdpa's result)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    plain, tokenizer = tiny_model(architecture)
    callers: set[int] = set()

    def fn(module, *args, **kwargs):
        callers.add(id(module))  # then the module's own eager function (softcapping, sinks...), else sdpa
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        try:
            return (eager or ALL_ATTENTION_FUNCTIONS["sdpa"])(module, *args, **kwargs)
        except TypeError:  # an eager function that wants a mask the model left to sdpa (ModernBERT decoder)
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *args, **kwargs)

    AttentionInterface.register(PROBE, fn)
    for path in paths.values():
        module = plain.get_submodule(path)
        if hasattr(module, "config"):
            module.__dict__["config"] = copy.copy(module.config)
            module.config.__dict__["_attn_implementation_internal"] = PROBE
    try:
        plain(input_ids=torch.tensor([tokenizer(PROMPT)["input_ids"]]), use_cache=False)
    except Exception:  # noqa: BLE001 - a module that rejects an unknown implementation does not call it
        pass
    return {layer: id(plain.get_submodule(path)) in callers for layer, path in paths.items()}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_knockout_that_must_matter_moves_the_output_or_is_refused(architecture, outcomes):
    engine = boot(architecture, outcomes)
    paths = attention_paths(architecture, engine)
    if not paths:  # the engine refuses the site itself
        with pytest.raises(PatchscopeError, match=r"^runs\[0\]\.interventions\[0\]\.site: "):
            engine.resolve([InterventionRun(PROMPT, [Intervention("blocks.0.attn", Knockout(to="all_previous"))])])
        outcomes[architecture] = "refused: no attention layer"
        return
    calls = probe(architecture, paths)
    kind = Knockout(from_=("last", "generated"), to="all_previous")
    ivs = [Intervention(f"blocks.{layer}.attn", kind) for layer in paths]
    run = InterventionRun(PROMPT, ivs, max_new_tokens=N_NEW)
    if not all(calls.values()):
        with pytest.raises(PatchscopeError) as refused:
            engine.resolve([run])
        message = str(refused.value)
        assert message.startswith("runs[0].interventions[") and architecture in message, message
        outcomes[architecture] = f"refused: {message}"
        return
    clean = engine.logits([InterventionRun(PROMPT, [])])[0]
    (got,) = engine.logits([InterventionRun(PROMPT, ivs)])
    moved = float((got[-1] - clean[-1]).abs().max())
    assert moved > 1e-2, f"{architecture}: the knockout moves the last logits by {moved:.2e} only (a silent no-op)"
    # earlier queries are untouched (to float noise: a mixture of experts batches tokens per expert)
    torch.testing.assert_close(
        got[:-1], clean[:-1], atol=1e-5, rtol=0, msg=f"{architecture}: earlier queries were touched"
    )
    (cached,) = engine.run([run], clean=False)
    uncached = dataclasses.replace(engine.decoding, use_cache=False)
    (again,) = Engine(engine.model, name=architecture, decoding=uncached).run([run], clean=False)
    assert cached.generated_token_ids == again.generated_token_ids, f"{architecture}: cached != uncached"
    torch.testing.assert_close(torch.tensor(cached.top_logprobs), torch.tensor(again.top_logprobs), atol=1e-4, rtol=0)
    outcomes[architecture] = f"ok: moves the last logits by {moved:.3g}"
