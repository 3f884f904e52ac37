"""A forward pass from a layer and position on, and batching rows by where they start.

Causal tracing, activation patching and attribution patching all run rows that equal a stored
run below some layer L0 and before some position p: `starting_at` feeds block L0 a stored
input (the layers below are skipped), `forward_from` runs positions p.. of layers L0.. with the
keys and values of the positions before p from the stored run's KV cache, and
`batches_by_position` groups rows so a batch starts near one position
(docs/causal_tracing.md). Each method guards the shortcut with a self-check against the full
forward pass on each model.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..models.info import ModelInfo
from .hooks import hooked
from .readings import input_device


def batches_by_position(rows, m: int, batch_size: int, max_spread: int) -> list[list[int]]:
    """Row indices in batches for `forward_from`: rows (with .position, the first position they
    change, and .start, the first layer) of one position p, ordered by start layer, up to
    batch_size x m tokens (a row computes m - p of them), cut where the start layers would
    spread by more than max_spread layers (a batch recomputes the layers between its lowest
    start and each row's own)."""
    by_position: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_position[row.position].append(i)
    batches = []
    for p, idx in by_position.items():
        idx.sort(key=lambda i: rows[i].start)
        limit = max(1, batch_size * m // max(1, m - p))
        current: list[int] = []
        for i in idx:
            if current and (len(current) >= limit or rows[i].start - rows[current[0]].start > max_spread):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    return batches


def forward_from(
    engine,
    ids: Sequence[int],
    hooks,
    inputs: dict[int, torch.Tensor],
    cache,
    samples: torch.Tensor,
    p: int,
    start: int,
    keep: int = 1,
) -> torch.Tensor:
    """Logits [rows, keep, vocab] of rows that equal stored base runs below layer `start` and
    before position p: row r starts from base run samples[r]'s input to block `start` (inputs:
    layer -> [runs, tokens, d_model]) and its KV cache cropped to positions < p, and computes
    only positions p.. of layers start.., with `hooks` (writes at absolute positions)."""
    n = len(samples)
    cache = copy.deepcopy(cache)
    cache.batch_select_indices(samples)
    cache.crop(p - len(ids))  # keep positions < p
    hidden = inputs[start][samples, p:]
    t = torch.tensor([list(ids)[p:]] * n, device=input_device(engine.model))
    mask = torch.ones(n, len(ids), dtype=torch.long, device=t.device)
    # hooks first: they find their modules by path, which the shortened block list would shift
    with (
        hooked(engine.modules, engine.model, hooks, [0] * n, [len(ids)] * n),
        starting_at(engine.modules, engine.info, start, hidden),
    ):
        out = engine.modules(
            input_ids=t,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.arange(p, len(ids), device=t.device)[None].expand(n, -1),
            logits_to_keep=keep,
        )
    return out.logits


@contextmanager
def starting_at(modules: torch.nn.Module, info: ModelInfo, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run only blocks `layer`.. of `modules`, the first of them fed `hidden` [batch, chunk, d_model]
    instead of what the blocks below would give (the bridge's component mapping names the blocks)."""
    path = info.components["blocks"].name
    parent_path, _, name = path.rpartition(".")
    parent = modules.get_submodule(parent_path) if parent_path else modules
    blocks = parent._modules[name]
    first = blocks[layer]

    def feed(module, args, kwargs):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # prepended: a write at this block's own input (hook_resid_pre) must act on `hidden`
    handle = first.register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
    parent._modules[name] = torch.nn.ModuleList(list(blocks)[layer:])
    try:
        yield
    finally:
        parent._modules[name] = blocks
        handle.remove()
