"""Hooks that know where they are: `fn(activation, ctx)` on a site, through cached generation.

Every hook of the engine goes through here: the built-in intervention kinds, the reads of
source values and statistics, and your own hooks (`Engine.generate_with_hooks`,
`Engine.run_with_hooks`). A hook is a pair (TransformerLens hook name or `Site`, fn); fn gets
the activation as TransformerLens shapes it (`[batch, chunk, d_model]`, or
`[batch, chunk, n_heads, d_head]` for `attn.hook_z`) and a `HookContext` that says, for each
column of the chunk, its absolute position in its row (BOS counted, as positions are
everywhere here), whether it is a real token or left padding, and the step. It returns a new
activation or None (leave it).

With the KV cache on, the prefill (step 0) sees the whole left-padded prompt and every later
step sees one new token; the context derives absolute positions from the running cache length
(never from the chunk's length), so the same fn acts at the same positions with and without
the cache, and sees each position exactly once with it (docs/interventions.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.sites import ResolvedSite, boundary_module


def attached_hooks(bridge) -> list[str]:
    """The bridge's hook points that hooks were added to (`bridge.add_hook`, `bridge.hooks(...)`):
    those do not act inside the engine's runs, which run on the plain modules (`models/sites.py`)."""
    from transformer_lens.hook_points import HookPoint

    points = getattr(bridge, "hook_dict", None) or dict(bridge.named_modules())
    named: dict[int, str] = {}  # one name per hook point: the last, TransformerLens' alias where it has one
    for name, m in points.items():
        if isinstance(m, HookPoint) and (getattr(m, "fwd_hooks", None) or getattr(m, "bwd_hooks", None)):
            named[id(m)] = name
    return list(named.values())


@dataclass
class HookContext:
    """Where the chunk a hook sees lies, per row.

    positions: [batch, chunk] absolute position of each column in its row (0 = the first real
        token, BOS included); negative on left padding.
    real: [batch, chunk] True for the row's tokens, False for left padding.
    prompt_lengths: [batch] real prompt length of each row; positions at or past it are
        generated tokens (or, in a scoring run, the answer's tokens).
    step: 0 for the prefill (or the single forward pass of a scoring run), k for the forward
        pass that feeds back the k-th generated token; without a cache every step re-runs the
        whole sequence, so the same position is seen again at every step.
    """

    positions: torch.Tensor
    real: torch.Tensor
    prompt_lengths: torch.Tensor
    step: int

    @property
    def generated(self) -> torch.Tensor:
        """[batch, chunk] True at generated (or answer) tokens."""
        return self.positions >= self.prompt_lengths[:, None]

    @property
    def prompt(self) -> torch.Tensor:
        """[batch, chunk] True at the prompt's own tokens."""
        return self.real & ~self.generated


HookFn = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]


class _Tracker:
    """Knows the absolute start of the chunk the model sees now and the step.

    A pre-forward hook on the whole model reads the running KV-cache length: 0 in the prefill
    (and at every step without a cache), the number of cached tokens afterwards.
    """

    def __init__(self, pads: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
        self.pads = pads  # [batch] left-padding of each row
        self.prompt_lengths = prompt_lengths
        self.start = 0
        self.step = -1
        self.fed = 0  # tokens fed so far with a cache, for caches that keep no length
        self._ctx: dict[tuple[int, torch.device], HookContext] = {}

    def __call__(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_key_values")
        if cache is None:
            self.start = 0
        else:
            length = cached_length(cache)
            self.start = self.fed if length is None else length
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.fed = self.start + (ids.shape[1] if ids is not None else 0)
        self.step += 1
        self._ctx.clear()

    def context(self, n: int, device: torch.device) -> HookContext:
        key = (n, device)
        if key not in self._ctx:
            cols = torch.arange(self.start, self.start + n, device=device)
            positions = cols[None, :] - self.pads.to(device)[:, None]
            self._ctx[key] = HookContext(positions, positions >= 0, self.prompt_lengths.to(device), self.step)
        return self._ctx[key]


def cached_length(cache) -> int | None:
    """Tokens in a KV cache; None for a cache of linear-attention (recurrent) layers only, which
    keep no length (a tiny Qwen3-Next or Jamba whose layers are all recurrent)."""
    try:
        return int(cache.get_seq_length())
    except ValueError:
        return None


def _attach(module: nn.Module, side: str, site: ResolvedSite, fn: HookFn, tracker: _Tracker, scale: float = 1.0):
    """Register fn on one side of a module; fn sees TransformerLens' shape of the activation
    (and its value: the module's x scale, which a write divides out again)."""

    def call(x: torch.Tensor) -> torch.Tensor | None:
        if x.dim() > 2:
            b, n = x.shape[0], x.shape[1]
        else:  # some modules see [batch * chunk, width] (OPT's MLP): unflatten
            b = len(tracker.pads)
            n = x.shape[0] // b
        seen = x.view(b, n, *site.shape)
        new = fn(seen * scale if scale != 1.0 else seen, tracker.context(n, x.device))
        if new is None:
            return None
        return (new / scale if scale != 1.0 else new).reshape(x.shape)

    if side == "output":

        def hook(mod, args, out):
            several = isinstance(out, (tuple, list))  # (hidden, ...): OpenAI GPT's attention returns a list
            new = call(out[0] if several else out)
            if new is None:
                return None
            return type(out)([new, *out[1:]]) if several else new

        return module.register_forward_hook(hook)

    def pre_hook(mod, args, kwargs):
        if args:
            new = call(args[0])
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        new = call(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def hooked(
    modules: nn.Module,
    bridge,
    hooks: Sequence[tuple[ResolvedSite, HookFn]],
    pads: Sequence[int],
    prompt_lengths: Sequence[int],
) -> Iterator[_Tracker]:
    """Run `modules` with `hooks` on a left-padded batch (pads, prompt_lengths per row). A hook on
    an attention site (blocks.{l}.attn) acts inside the attention, not on a module's input or
    output: it installs itself (`fn.attach(modules, site, tracker)` returns what undoes it; a
    knockout's edges, `forward/knockout.py`)."""
    tracker = _Tracker(torch.tensor(list(pads)), torch.tensor(list(prompt_lengths)))
    with ExitStack() as stack:
        stack.callback(modules.register_forward_pre_hook(tracker, with_kwargs=True).remove)
        for site, fn in hooks:
            if site.side == "attention":  # fn(ctx, key positions) -> blocked edges; it knows where it goes
                stack.callback(fn.attach(modules, site, tracker))
                continue
            module, side, scale = boundary_module(modules, bridge, site)
            stack.callback(_attach(module, side, site, fn, tracker, scale).remove)
        yield tracker


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[batch, m] token ids and attention mask, left padded; and each row's pad count."""
    m = max(len(r) for r in rows)
    ids = torch.full((len(rows), m), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), m), dtype=torch.long)
    pads = []
    for b, row in enumerate(rows):
        pads.append(m - len(row))
        ids[b, m - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[b, m - len(row) :] = 1
    return ids.to(device), mask.to(device), pads


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's index within its row (pads get 0), as Hugging Face generate derives them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
