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
import types
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..base.errors import PatchscopeError
from .components import module_boundary
from .info import ModelInfo

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


ATTENTION = "blocks.{l}.attn"  # block l's attention itself: where a knockout blocks edges (forward/knockout.py)


# Query, key and value heads: sites of activation patching (`resolve_site(..., qkv=True)`), on
# architectures with their own q/k/v projections; under grouped-query attention k and v have
# fewer (key/value) heads. GPT-2's are split by the bridge from one fused c_attn: refused.
QKV_SITES = {
    "blocks.{l}.attn.hook_q": ("each query head's query (before rotary)", "head"),
    "blocks.{l}.attn.hook_k": ("each key/value head's key (before rotary)", "kv_head"),
    "blocks.{l}.attn.hook_v": ("each key/value head's value", "kv_head"),
}


_FORM = re.compile(r"^blocks\.(\d+)\.(.+)$")


def site_template(name: str, field: str = "site", layer: str = "layer") -> str:
    """A TransformerLens short name (`resid_pre`, `attn_out`, `z`, `q`, `post`, ... as its
    `get_act_name` takes them: `transformer_lens.utilities` in 4.x, `utils` before) as the hook
    template it names, `blocks.{layer}.<hook>` (the layer from the sweep's layers), by
    `get_act_name` itself;
    `embed` is `hook_embed`. A full hook name or template is returned as it is; a short name with
    a layer in it (`k6`) is refused: the layers are the sweep's (`field`: what the message
    starts with; empty: nothing, for a config validator whose field pydantic names)."""
    if not isinstance(name, str) or "." in name or "{" in name or name.startswith("hook_") or not name.strip():
        return name
    if re.search(r"\d", name):
        raise PatchscopeError(
            f"{field + ': ' if field else ''}{name!r} names a layer; give the short name alone ({re.sub(r'[0-9].*', '', name)!r}), "
            "the layers come from the sweep's layers"
        )
    from transformer_lens.utilities import get_act_name

    whole = get_act_name(name)  # a site outside the blocks (embed) has no layer
    return whole if whole in SITES else get_act_name(name, f"{{{layer}}}")


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
    side: Literal["input", "output", "attention"]  # attention: the attention function itself (forward/knockout.py)
    shape: tuple[
        int, ...
    ]  # one position's activation as TransformerLens shows it: (d_model,), (n_heads, d_head), (d_mlp,)
    scale: float = 1.0  # TransformerLens' activation is the module's value x scale (Granite's scaled residual adds)

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
        raise PatchscopeError(
            f"{field}: {site.hook} is split by the bridge from {info.name}'s fused q/k/v projection "
            f"and sits on no Hugging Face module boundary"
        )
    n_kv = info.n_kv_heads or info.n_heads
    shape = {"head": (info.n_heads, info.d_head), "kv_head": (n_kv, info.d_head), "neuron": (info.d_mlp,)}.get(
        unit, (info.d_model,)
    )
    heads = n_kv if unit == "kv_head" else info.n_heads
    for name, values, count in (("head", site.head, heads), ("neuron", site.neuron, info.d_mlp)):
        if values and (unit or "").removeprefix("kv_") != name:
            owners = "attn.hook_z, hook_q, hook_k, hook_v" if name == "head" else "mlp.hook_post"
            raise PatchscopeError(f"{field}.{name}: {site.hook} has no {name}s (only {owners} do)")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < count:
                what = "key/value heads" if unit == "kv_head" else f"{name}s"
                raise PatchscopeError(
                    f"{field}.{name}: {v!r} is out of range 0 .. {count - 1} for {info.name}'s {count} {what} at {form}"
                )
    if form == ATTENTION:  # the attention module: the boundary whose output is attn's hook_out
        shape, name = (info.n_heads,), f"{site.hook}.hook_out"
    else:
        name = site.hook
    try:
        module, side, scale = module_boundary(info.components, name)
    except LookupError:
        raise PatchscopeError(
            f"{field}: {site.hook} sits on no Hugging Face module boundary of {info.name}'s architecture"
        ) from None
    if unit == "neuron":
        _refuse_whole_mlp_output(info, site, module, side, field)
    return ResolvedSite(site, module, "attention" if form == ATTENTION else side, shape, scale)


def _refuse_whole_mlp_output(info: ModelInfo, site: Site, module: str, side: str, field: str) -> None:
    """mlp.hook_post names hidden neurons only where the bridge puts it inside the MLP; on a
    mixture-of-experts block the bridge aliases it to the whole block's output (d_model wide)."""
    layer = site.layer
    try:
        mlp_out = module_boundary(info.components, f"blocks.{layer}.mlp.hook_out")
    except LookupError:
        return
    if (module, side) != mlp_out[:2]:
        return
    mlp = info.components["blocks"].submodules["mlp"]
    what = "mixture-of-experts block" if "moe" in type(mlp).__name__.lower() else "MLP block"
    raise PatchscopeError(
        f"{field}: on {info.name} TransformerBridge's {site.hook} is the whole {what}'s output "
        f"({info.d_model} wide, the same activation as blocks.{layer}.hook_mlp_out), not the hidden neurons "
        f"(the experts' hidden activations have no single hook); use blocks.{layer}.hook_mlp_out"
    )


class _Unpeelable(Exception):
    """A module whose forward is tied to the bridged original in a way a view cannot follow."""


def _peel(module: nn.Module) -> nn.Module:
    """A shallow copy of the Hugging Face module under any bridge wrappers, with its children
    peeled too; parameters and buffers are shared, hooks are not. A `forward` set on the
    instance (adapters patch some, e.g. Falcon's decoder layers) is re-bound to the copy when it
    is a method of the original; any other instance forward of a module with children would run
    the bridged children, so it raises _Unpeelable."""
    while isinstance(module._modules.get("_original_component"), nn.Module):
        module = module._modules["_original_component"]
    view = copy.copy(module)
    view.__dict__["_modules"] = {n: (_peel(c) if c is not None else None) for n, c in module._modules.items()}
    for key, value in module.__dict__.items():  # fresh hook registries: hooks on the view stay on the view
        if "hooks" in key and isinstance(value, dict):
            view.__dict__[key] = type(value)()
    forward = module.__dict__.get("forward")
    if forward is not None:
        if isinstance(forward, types.MethodType) and forward.__self__ is module:
            view.__dict__["forward"] = types.MethodType(forward.__func__, view)
        elif module._modules:
            raise _Unpeelable(f"{type(module).__name__}.forward is replaced on the instance by {forward!r}")
    return view


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"patchscope: {reason}; the engine runs this model through TransformerBridge's own hook "
            "points instead of the plain modules (slower, same results)",
            RuntimeWarning,
            stacklevel=3,
        )


def plain_modules(bridge) -> nn.Module:
    """The bridge's Hugging Face model without the bridge's wrappers (shared weights).

    Where that view would run wrong, the model is returned as it is, bridged, with a warning
    (once per reason): a model that accelerate dispatched over devices (device_map) keeps its
    forward wrappers bound to the original modules, and an adapter may replace a module's
    forward on the instance with something a copy cannot re-bind. Hooks then go on the bridge's
    own hook points (see `boundary_module`): slower, equally right.
    """
    model = bridge.original_model
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        _warn_once(
            "accelerate dispatched this model (device_map): its forward wrappers stay bound to the bridged modules"
        )
        return model
    try:
        return _peel(model)
    except _Unpeelable as exc:
        _warn_once(f"cannot peel the bridge's wrappers off: {exc}")
        return model


def boundary_module(modules: nn.Module, bridge, site: ResolvedSite) -> tuple[nn.Module, str, float]:
    """The module to hook for `site` in `modules`, which side of it, and the factor from the
    module's value to TransformerLens' activation (`ResolvedSite.scale`).

    On the plain modules: the Hugging Face module itself. On a model that stayed bridged
    (`plain_modules` returned it as it is): the bridge's hook point of that name, an identity
    module whose output is the activation (already scaled).
    """
    if modules is bridge.original_model:
        return bridge.hook_dict[site.site.hook], "output", 1.0
    try:
        return modules.get_submodule(site.module), site.side, site.scale
    except AttributeError:
        raise PatchscopeError(f"site: {site.site.hook} maps to {site.module}, which this model does not have") from None


def block(modules: nn.Module, bridge, layer: int) -> nn.Module:
    """The module whose output is `blocks.{layer}.hook_resid_post`, inside `modules`."""
    return modules.get_submodule(bridge.blocks[layer].name)


def check_layer(layer: int, info: ModelInfo, field_name: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise PatchscopeError(f"{field_name}: expected an integer, got {layer!r}")
    if not 0 <= layer < info.n_layers:
        raise PatchscopeError(
            f"{field_name}: {layer} is out of range 0 .. {info.n_layers - 1} for {info.name} "
            f"({info.n_layers} layers; layer l is the residual stream after block l)"
        )
    return layer


def window_layers(site: str, layer: int, window: int, n_layers: int) -> list[int]:
    """The layers a cell restores: l for resid_post, else ROME's window around l."""
    if site == "resid_post":
        return [layer]
    return list(range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))))
