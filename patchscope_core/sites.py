"""Where an intervention reads or writes: a site is a TransformerLens hook name.

`Site("blocks.8.attn.hook_z", head=3)` names what TransformerLens calls `blocks.8.attn.hook_z`,
restricted to head 3. `resolve_site(site, info)` checks it against a model (before any weights
load) and finds the Hugging Face module boundary it sits on, through the bridge's *own*
component mapping and hook aliases (`docs/interventions.md`): `attn.hook_z` is an alias of
`attn.o.hook_in`, the input of the module the bridge maps to `attn.o` (`self_attn.o_proj` in
Llama, `attn.c_proj` in GPT-2). There is no per-architecture table here.

The engine runs its forward passes on `plain_modules(bridge)`: the bridged Hugging Face model
with the bridge's wrappers peeled off, every module the Hugging Face original and every
parameter and buffer shared with the bridge (nothing is copied). TransformerBridge wraps each
linear, norm, attention and MLP in a component with hook points; that costs about 3.5x as many
Python module calls per generated token (BENCHMARKS.md), which the plain modules avoid. Tests
prove that an intervention at the boundary equals the same intervention through the bridge's
own hook point (`run_with_hooks` with the same name).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import PatchscopeError
from .models import ModelInfo

# The sites an intervention may name ({l}: a layer), what they hold, and their index kind.
SITES = {
    "hook_embed": ("token embeddings", None),
    "blocks.{l}.hook_resid_pre": ("residual stream before block l", None),
    "blocks.{l}.hook_resid_post": ("residual stream after block l", None),
    "blocks.{l}.hook_attn_out": ("output of block l's attention", None),
    "blocks.{l}.hook_mlp_out": ("output of block l's MLP", None),
    "blocks.{l}.attn.hook_z": ("each query head's output before the output projection", "head"),
    "blocks.{l}.mlp.hook_post": ("MLP hidden activations (the down projection's input)", "neuron"),
}
ATTENTION = "blocks.{l}.attn"  # block l's attention itself: where a knockout blocks edges (knockout.py)
# Query, key and value heads: sites of activation patching (`resolve_site(..., qkv=True)`), on
# architectures with their own q/k/v projections; under grouped-query attention k and v have
# fewer (key/value) heads. GPT-2's are split by the bridge from one fused c_attn: refused.
QKV_SITES = {
    "blocks.{l}.attn.hook_q": ("each query head's query (before rotary)", "head"),
    "blocks.{l}.attn.hook_k": ("each key/value head's key (before rotary)", "kv_head"),
    "blocks.{l}.attn.hook_v": ("each key/value head's value", "kv_head"),
}
_FORM = re.compile(r"^blocks\.(\d+)\.(.+)$")


def resid_post(layer: int) -> str:
    """TransformerLens hook name of layer l: the residual stream after block l."""
    return f"blocks.{layer}.hook_resid_post"


def _indices(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


@dataclass(frozen=True)
class Site:
    """A TransformerLens hook name, optionally restricted to some heads (attn.hook_z) or
    neurons (mlp.hook_post); no indices means the whole activation."""

    hook: str
    head: tuple[int, ...] = ()
    neuron: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", _indices(self.head))
        object.__setattr__(self, "neuron", _indices(self.neuron))

    @property
    def layer(self) -> int | None:
        m = _FORM.match(self.hook)
        return int(m.group(1)) if m else None

    def __str__(self) -> str:
        units = f"[head {','.join(map(str, self.head))}]" if self.head else ""
        units += f"[neuron {','.join(map(str, self.neuron))}]" if self.neuron else ""
        return self.hook + units


@dataclass(frozen=True)
class ResolvedSite:
    """A site checked against one model: the module boundary it sits on and its shape."""

    site: Site
    module: str  # Hugging Face module path in the bridged model, e.g. model.layers.8.self_attn.o_proj
    side: Literal["input", "output", "attention"]  # attention: the attention function itself (knockout.py)
    shape: tuple[int, ...]  # one position's activation as TransformerLens shows it: (d_model,), (n_heads, d_head), (d_mlp,)

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    def feature_mask(self) -> torch.Tensor:
        """[width] bool: the features the site's heads or neurons select (all when none)."""
        units = self.site.head or self.site.neuron
        if not units:
            return torch.ones(self.width, dtype=torch.bool)
        mask = torch.zeros(self.shape[0], self.width // self.shape[0], dtype=torch.bool)
        mask[list(units)] = True
        return mask.flatten()


def valid_sites(info: ModelInfo) -> str:
    return ", ".join(SITES) + f", {ATTENTION} (knockout) (l = 0 .. {info.n_layers - 1})"


def resolve_site(site: Site, info: ModelInfo, field: str = "site", qkv: bool = False) -> ResolvedSite:
    """Check `site` against the model and find its module boundary; raises PatchscopeError
    naming `field` (an unknown name's message lists the valid ones). `qkv`: QKV_SITES too."""
    if not isinstance(site.hook, str):
        raise PatchscopeError(f"{field}: expected a TransformerLens hook name, got {site.hook!r}")
    m = _FORM.match(site.hook)
    form = f"blocks.{{l}}.{m.group(2)}" if m else site.hook
    if form == "blocks.{l}.hook_resid_mid":
        layer = m.group(1)
        raise PatchscopeError(
            f"{field}: {site.hook} is TransformerBridge's second-norm input: writing it changes only the MLP's "
            f"input, not the residual stream that flows on; use blocks.{layer}.hook_attn_out "
            f"(resid_mid = resid_pre + attn_out) or blocks.{layer}.hook_resid_post"
        )
    known = {**SITES, **QKV_SITES} if qkv else SITES
    if form not in known and form != ATTENTION:
        raise PatchscopeError(f"{field}: unknown site {site.hook!r}; valid sites: {valid_sites(info)}")
    if m:
        layer = int(m.group(1))
        if not 0 <= layer < info.n_layers:
            raise PatchscopeError(
                f"{field}: layer {layer} of {site.hook!r} is out of range 0 .. {info.n_layers - 1} for {info.name}"
            )
    unit = known[form][1] if form in known else None
    if form in QKV_SITES and "qkv" in (info.components["blocks"].submodules["attn"].submodules or {}):
        raise PatchscopeError(f"{field}: {site.hook} is split by the bridge from {info.name}'s fused q/k/v projection "
                              f"and sits on no Hugging Face module boundary")
    n_kv = info.n_kv_heads or info.n_heads
    shape = {"head": (info.n_heads, info.d_head), "kv_head": (n_kv, info.d_head),
             "neuron": (info.d_mlp,)}.get(unit, (info.d_model,))
    heads = n_kv if unit == "kv_head" else info.n_heads
    for name, values, count in (("head", site.head, heads), ("neuron", site.neuron, info.d_mlp)):
        if values and (unit or "").removeprefix("kv_") != name:
            owners = "attn.hook_z, hook_q, hook_k, hook_v" if name == "head" else "mlp.hook_post"
            raise PatchscopeError(f"{field}.{name}: {site.hook} has no {name}s (only {owners} do)")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < count:
                what = "key/value heads" if unit == "kv_head" else f"{name}s"
                raise PatchscopeError(f"{field}.{name}: {v!r} is out of range 0 .. {count - 1} for {info.name}'s "
                                      f"{count} {what} at {form}")
    if form == ATTENTION:  # the attention module: the boundary whose output is attn's hook_out
        shape, name = (info.n_heads,), f"{site.hook}.hook_out"
    else:
        name = site.hook
    try:
        module, side = module_boundary(info.components, name)
    except LookupError:
        raise PatchscopeError(
            f"{field}: {site.hook} sits on no Hugging Face module boundary of {info.name}'s architecture"
        ) from None
    return ResolvedSite(site, module, "attention" if form == ATTENTION else side, shape)


def module_boundary(components: dict, name: str) -> tuple[str, Literal["input", "output"]]:
    """(Hugging Face module path, 'input' or 'output') of a TransformerLens hook name, read from
    the bridge adapter's component mapping and the components' hook aliases."""
    from transformer_lens.model_bridge.bridge_core import BridgeCore

    return _walk(components, BridgeCore.hook_aliases, name.split("."), "", None)


def _walk(children: dict, aliases: dict, parts: list[str], path: str, component):
    head, rest = parts[0], parts[1:]
    if component is not None and head in ("hook_in", "hook_out") and not rest:
        return path, "input" if head == "hook_in" else "output"
    if head in aliases and not rest:  # an alias: a path relative to this component
        targets = aliases[head] if isinstance(aliases[head], list) else [aliases[head]]
        for target in targets:
            try:
                return _walk(children, aliases, target.split("."), path, component)
            except LookupError:
                continue
        raise LookupError(head)
    child = children[head]
    if child.name is None:
        raise LookupError(head)
    child_path = child.name if component is None else f"{path}.{child.name}"
    if getattr(child, "is_list_item", False):  # blocks: the next part is the layer index
        if not rest or not rest[0].isdigit():
            raise LookupError(head)
        child_path, rest = f"{child_path}.{rest[0]}", rest[1:]
    if not rest:
        raise LookupError(head)
    return _walk(child.submodules or {}, getattr(child, "hook_aliases", {}) or {}, rest, child_path, child)


# ---------------------------------------------------------------- the modules the engine runs on


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
    bound to the original modules, so it is returned as it is, bridged: slower, equally right
    (hooks then go on the bridge's own hook points, see `boundary_module`).
    """
    model = bridge.original_model
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return model
    return _peel(model)


def boundary_module(modules: nn.Module, bridge, site: ResolvedSite) -> tuple[nn.Module, str]:
    """The module to hook for `site` in `modules`, and which side of it.

    On the plain modules: the Hugging Face module itself. On a model that stayed bridged
    (`plain_modules` returned it as it is): the bridge's hook point of that name, an identity
    module whose output is the activation.
    """
    if modules is bridge.original_model:
        return bridge.hook_dict[site.site.hook], "output"
    try:
        return modules.get_submodule(site.module), site.side
    except AttributeError:
        raise PatchscopeError(f"site: {site.site.hook} maps to {site.module}, which this model does not have") from None


def block(modules: nn.Module, bridge, layer: int) -> nn.Module:
    """The module whose output is `blocks.{layer}.hook_resid_post`, inside `modules`."""
    return modules.get_submodule(bridge.blocks[layer].name)
