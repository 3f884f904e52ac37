"""Where a Patchscope reads and writes: the residual stream after block l.

TransformerLens names it `blocks.{l}.hook_resid_post`; it is the output of the Hugging Face
module that the bridge maps to `blocks.{l}` (`model.layers.{l}` in Llama, `transformer.h.{l}` in
GPT-2: the bridge's own component mapping, no per-architecture code here).

The engine runs its forward passes on `plain_modules(bridge)`: the bridged Hugging Face model
with the bridge's wrappers peeled off, every module the Hugging Face original and every
parameter and buffer shared with the bridge (nothing is copied). TransformerBridge wraps each
linear, norm, attention and MLP in a component with hook points; that costs about 3.5x as many
Python module calls per generated token (BENCHMARKS.md), which the plain modules avoid. The
tests prove the two agree: the engine is checked against references that read and write
`blocks.{l}.hook_resid_post` through the bridge itself.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


def resid_post(layer: int) -> str:
    """TransformerLens hook name of layer l: the residual stream after block l."""
    return f"blocks.{layer}.hook_resid_post"


def _peel(module: nn.Module) -> nn.Module:
    """A shallow copy of the Hugging Face module under any bridge wrappers, with its children
    peeled too; parameters and buffers are shared, hooks are not."""
    while isinstance(module._modules.get("_original_component"), nn.Module):
        module = module._modules["_original_component"]
    view = copy.copy(module)
    view.__dict__["_modules"] = {n: (_peel(c) if c is not None else None) for n, c in module._modules.items()}
    for key, value in module.__dict__.items():  # fresh hook registries: hooks on the view stay on the view
        if "hooks" in key and isinstance(value, dict):
            view.__dict__[key] = type(value)()
    return view


def plain_modules(bridge) -> nn.Module:
    """The bridge's Hugging Face model without the bridge's wrappers (shared weights).

    A model that accelerate dispatched over devices (device_map) keeps its forward wrappers
    bound to the original modules, so it is returned as it is, bridged: slower, equally right.
    """
    model = bridge.original_model
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return model
    return _peel(model)


def block(modules: nn.Module, bridge, layer: int) -> nn.Module:
    """The module whose output is `blocks.{layer}.hook_resid_post`, inside `modules`."""
    return modules.get_submodule(bridge.blocks[layer].name)


def on_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Call fn(hidden) on the module's output hidden states [batch, chunk, d_model]; a tensor
    it returns replaces them. Decoder layers return a tensor or a tuple led by it."""

    def hook(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        new = fn(hidden)
        if new is None:
            return None
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    return module.register_forward_hook(hook)
