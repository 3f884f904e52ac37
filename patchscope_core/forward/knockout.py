"""Attention knockout on Hugging Face's own attention: where the `knockout` kind acts.

Place in the flow: `resolve_run` turns a `Knockout` (interventions/knockout.py) into each row's
`Edges` (`resolve_edges`); `Engine` groups a batch's edges by layer (`knockout_hooks`) into one
edge function per layer, a hook on the site `blocks.{l}.attn`; `hooks.hooked` lets each install
itself (`_LayerEdges.attach`, so the hooks layer never names this module): `attach` gives that layer's attention module a copy of its config (the config object is
shared with the TransformerBridge and every other layer) naming the attention function
registered here with transformers' `AttentionInterface`. That function wraps the module's own
implementation (eager or sdpa): it adds the dtype's minimum to the chosen (row, head, query,
key) scores through the additive mask before the softmax, and calls the module's own
implementation unchanged when no row blocks anything in this call (then bit-identical).

Only an attention module whose forward calls the function `AttentionInterface` names can carry a
knockout (`refusal`): Falcon, Bloom, GPT-J, GPT-Neo and others compute their scores themselves,
and a knockout there would change nothing. `check_attention` refuses those before any weights
load (from the module classes of a model built on the meta device from the Hugging Face
config), `attach` again on the loaded module, and a guard on each forward refuses a module that
ran without calling the function (a branch that bypasses it) before the model's output exists.

Queries and keys are absolute positions (`HookContext`: the running cache length, each row's
left padding), never chunk offsets: under the KV cache a prompt query is blocked in the prefill
and a generated query when it is decoded; the keys it reads are the cache's columns.
"""

from __future__ import annotations

import copy
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..base.errors import PatchscopeError
from ..interventions.knockout import Edges, code_names, refusal
from ..models.info import ModelInfo
from ..models.sites import ResolvedSite, Site, resolve_site

NAME = "patchscope_knockout"  # the attention function's name in transformers' AttentionInterface


class _LayerEdges:
    """The edges of one batch at one layer: `(ctx, key_positions) -> [batch, heads, q, k]` bool
    (True: blocked), or None when nothing is blocked in this call. A row may carry several."""

    def __init__(self, entries: Sequence[tuple[int, Edges]], n_heads: int) -> None:
        self.rows = torch.tensor([b for b, _ in entries])
        self.heads = torch.zeros(len(entries), n_heads, dtype=torch.bool)
        p = 1 + max([max(e.queries.indices + e.keys, default=0) for _, e in entries])
        self.queries = torch.zeros(len(entries), p, dtype=torch.bool)
        self.keys = torch.zeros(len(entries), p, dtype=torch.bool)
        for k, (_, e) in enumerate(entries):
            self.heads[k, list(e.heads) or slice(None)] = True
            self.queries[k, list(e.queries.indices)] = True
            self.keys[k, list(e.keys)] = True
        self.generated = torch.tensor([e.queries.generated for _, e in entries])
        self.previous = torch.tensor([e.all_previous for _, e in entries])
        self._placed: dict[Any, tuple] = {}

    def _on(self, device) -> tuple:
        if device not in self._placed:
            self._placed[device] = tuple(
                t.to(device) for t in (self.rows, self.heads, self.queries, self.keys, self.generated, self.previous)
            )
        return self._placed[device]

    def attach(self, modules: nn.Module, site: ResolvedSite, tracker) -> Callable[[], None]:
        """Install these edges on the attention of `site` (what `hooks.hooked` calls)."""
        return attach(modules, site, self, tracker)

    def __call__(self, ctx, key_pos: torch.Tensor) -> torch.Tensor | None:
        rows, heads, queries, keys, generated, previous = self._on(key_pos.device)
        p = queries.shape[1]
        qp = ctx.positions[rows]  # [E, q] absolute query positions
        is_gen = qp >= ctx.prompt_lengths[rows][:, None]
        explicit = queries.gather(1, qp.clamp(0, p - 1)) & (qp < p)
        chosen = ctx.real[rows] & torch.where(is_gen, generated[:, None], explicit)  # [E, q]
        if not bool(chosen.any()):
            return None
        kp = key_pos[rows]  # [E, k] absolute key positions (negative: padding)
        static = keys.gather(1, kp.clamp(0, p - 1)) & (kp < p) & (kp >= 0)  # [E, k]
        before = (kp[:, None, :] < qp[:, :, None]) & (kp[:, None, :] >= 0)  # [E, q, k]
        pair = (static[:, None, :] | (previous[:, None, None] & before)) & chosen[:, :, None]
        pair &= kp[:, None, :] <= qp[:, :, None]  # keys after the query are the causal mask's already
        per_entry = heads[:, :, None, None] & pair[:, None]  # [E, heads, q, k]
        out = torch.zeros((ctx.positions.shape[0], *per_entry.shape[1:]), dtype=torch.int32, device=kp.device)
        out.index_add_(0, rows, per_entry.int())
        return out > 0


def knockout_hooks(
    by_layer: dict[int, list[tuple[int, Edges]]], info: ModelInfo
) -> list[tuple[ResolvedSite, Callable]]:
    """One edge function per layer for a batch's (row, Edges) entries, on site blocks.{l}.attn."""
    return [
        (resolve_site(Site(f"blocks.{layer}.attn"), info), _LayerEdges(entries, info.n_heads))
        for layer, entries in sorted(by_layer.items())
    ]


def group_by_layer(rows: Sequence[Sequence[Edges | None]]) -> dict[int, list[tuple[int, Edges]]]:
    """(row, Edges) entries of a batch by layer; rows without edges and empty edges are left out."""
    by_layer: dict[int, list[tuple[int, Edges]]] = defaultdict(list)
    for b, edges in enumerate(rows):
        for e in edges:
            if e is not None and (e.queries.indices or e.queries.generated):
                for layer in e.layers:
                    by_layer[layer].append((b, e))
    return by_layer


@dataclass
class _Edit:
    """What the attention function does for one attention module: its own implementation, the
    batch's edges at its layer, and the tracker that knows the chunk's absolute positions."""

    own: Callable
    edges: Callable
    tracker: Any
    called: bool = False  # whether this forward of the module reached the attention function


def _additive(mask: torch.Tensor | None, query: torch.Tensor, k_len: int, start: int) -> torch.Tensor:
    """The model's mask as an additive float mask [batch or 1, 1 or heads, q, k]; None (sdpa's
    causal shortcut) becomes the causal mask of a chunk that starts at cache column `start`."""
    low = torch.finfo(query.dtype).min
    if mask is None:
        q = torch.arange(start, start + query.shape[2], device=query.device)
        allowed = torch.arange(k_len, device=query.device)[None, :] <= q[:, None]
        return torch.where(allowed, 0.0, low).to(query.dtype)[None, None]
    mask = mask[..., :k_len]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, low).to(query.dtype)
    return mask.to(query.dtype)


def knockout_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the module's own implementation with the dtype's
    minimum added to the blocked (row, head, query, key) scores."""
    edit: _Edit = module.config.__dict__["_patchscope_knockout"]
    edit.called = True
    n, k_len = query.shape[2], key.shape[2]
    tracker = edit.tracker
    if k_len < tracker.start + n:
        raise PatchscopeError(
            f"knockout: the attention sees {k_len} keys but the sequence has {tracker.start + n} "
            "positions (a sliding-window cache drops keys; knockout needs them all)"
        )
    ctx = tracker.context(n, query.device)
    key_pos = torch.arange(k_len, device=query.device)[None, :] - tracker.pads.to(query.device)[:, None]
    blocked = edit.edges(ctx, key_pos)
    if blocked is None:
        return edit.own(module, query, key, value, attention_mask, **kwargs)
    mask = _additive(attention_mask, query, k_len, tracker.start)
    mask = mask + torch.where(blocked, torch.finfo(query.dtype).min, 0.0).to(query.dtype)
    return edit.own(module, query, key, value, mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, knockout_attention)


_register()


def _own_implementation(module: nn.Module) -> Callable:
    """The attention module's own implementation: its modeling file's eager function, or the
    registered function its config names (sdpa, ...)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = module.config._attn_implementation
    if name in (None, "eager"):
        if getattr(module, "reorder_and_upcast_attn", False):
            raise PatchscopeError("knockout: GPT-2's reorder_and_upcast_attn path bypasses the attention function")
        scope = vars(sys.modules[type(module).__module__])  # the eager function its forward falls back to
        eager = sorted(
            n for n in code_names(type(module).forward) if n.endswith("eager_attention_forward") and n in scope
        )
        if not eager:
            raise PatchscopeError(f"knockout: {type(module).__name__} names no eager attention function to wrap")
        return scope[eager[0]]
    if name == NAME:
        raise PatchscopeError("knockout: this attention module already carries a knockout")
    return ALL_ATTENTION_FUNCTIONS[name]


def attach(modules: nn.Module, site: ResolvedSite, edges: Callable, tracker) -> Callable[[], None]:
    """Give the attention module of `site` a config copy that names the knockout attention function
    with this batch's edges; returns what undoes it."""
    try:
        module = modules.get_submodule(site.module)
    except AttributeError:
        raise PatchscopeError(f"knockout: {site.site.hook}: this layer has no attention module {site.module}") from None
    while isinstance(module._modules.get("_original_component"), nn.Module):  # a model that stayed bridged
        module = module._modules["_original_component"]
    reason = refusal(type(module))
    if reason:
        raise PatchscopeError(f"knockout: {site.site.hook} ({site.module}) cannot carry a knockout: {reason}")
    shared = module.config
    config = copy.copy(shared)
    edit = _Edit(_own_implementation(module), edges, tracker)
    config.__dict__["_attn_implementation_internal"] = NAME  # not the setter: it would recurse into shared sub-configs
    config.__dict__["_patchscope_knockout"] = edit
    module.__dict__["config"] = config

    def before(mod, args, kwargs):
        edit.called = False

    def after(mod, args, kwargs, out):  # a branch of forward that bypassed the function: no silent no-op
        if not edit.called:
            raise PatchscopeError(
                f"knockout: {site.site.hook} ({type(module).__name__}) ran without calling the "
                "attention function, so the knockout would change nothing; refused"
            )

    handles = [
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after, with_kwargs=True),
    ]

    def undo() -> None:
        module.__dict__["config"] = shared
        for h in handles:
            h.remove()

    return undo
