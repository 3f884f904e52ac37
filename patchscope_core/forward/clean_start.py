"""Scoring rows that start at their first touched layer, from the clean run's stored block input.

`Engine._score` runs each row's prompt + answer once, teacher-forced. A row whose interventions
all sit at layer >= l (its sites' layers, a knockout's first layer) equals the clean run of the
same tokens below block l: nothing it does reaches the layers below. So, as causal tracing and
activation patching do (`partial.starting_at`), it starts from the clean run's stored input to
block l and computes only blocks l.. (a row without interventions needs only the last block).
`kind: intervention` head-ablation grids gain most: a row ablating a head of layer l no longer
recomputes the l layers below it (BENCHMARKS.md). Rows that change nothing run the plain way.

- `first_layer(run)`: where a row may start; `Engine._cut` keeps rows whose first
  layers spread by more than `Engine.start_spread` in separate batches (a batch starts at its
  lowest row's layer and recomputes the layers between it and each row's own).
- `CleanStates`: each distinct token sequence's clean block inputs [n_layers, tokens, d_model],
  from one plain forward pass each (counted: engine.counts["clean_states"]), kept up to a bound.
  The first use on an engine checks the shortcut: starting mid-stack with no intervention must
  give the clean run's own logits within 1e-4, else the engine scores the plain way.

Generation is not shortened: HF `generate` needs every layer's keys and values of the prompt,
and the decoded tokens pass through every layer anyway; a generating row's answer score still is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..interventions.runs import ResolvedRun
from ..models.sites import Site, resolve_site
from .hooks import hooked, left_pad, position_ids_from_mask
from .partial import starting_at
from .readings import input_device

MAX_ELEMENTS = 2**26  # floats kept over all stored sequences (256 MB in float32)


def first_layer(run: ResolvedRun) -> int:
    """The lowest block any intervention of `run` touches; 0 for sites outside the blocks
    (hook_embed) and for a run that changes nothing (no interventions, or only knockouts that
    block no edge): it runs the plain way, bit for bit its clean baseline, as before."""
    layers = []
    for iv in run.interventions:
        if iv.edges is None:
            layers.append(0 if iv.site.site.layer is None else iv.site.site.layer)
        elif iv.edges.queries.indices or iv.edges.queries.generated:  # an empty knockout changes nothing
            layers.append(min(iv.edges.layers, default=0))
    return min(layers, default=0)


class CleanStates:
    """Clean block inputs per token sequence, and forward passes that start from them."""

    def __init__(self, engine, max_elements: int = MAX_ELEMENTS) -> None:
        self.engine = engine
        self.max_elements = max_elements
        self._states: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._last_logits: dict[tuple[int, ...], torch.Tensor] = {}
        self.ok: bool | None = None  # the self-check's verdict, once run

    def state(self, ids: tuple[int, ...]) -> torch.Tensor:
        """[n_layers, tokens, d_model]: the input of every block in the clean run of `ids`."""
        if ids in self._states:
            self._states.move_to_end(ids)
            return self._states[ids]
        engine, n = self.engine, self.engine.info.n_layers
        inputs: dict[int, torch.Tensor] = {}

        def keep(layer):
            def fn(x, ctx):
                inputs[layer] = x[0].detach().clone()

            return fn

        hooks = [(resolve_site(Site(f"blocks.{l}.hook_resid_pre"), engine.info), keep(l)) for l in range(n)]
        t = torch.tensor([list(ids)], device=input_device(engine.model))
        mask = torch.ones_like(t)
        with hooked(engine.modules, engine.model, hooks, [0], [len(ids)]):
            out = engine.modules(
                input_ids=t,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                logits_to_keep=1,
            )
        engine.counts["clean_states"] += 1
        state = torch.stack([inputs[l] for l in range(n)])
        self._states[ids] = state
        self._last_logits[ids] = out.logits[0, -1].float()
        while sum(s.numel() for s in self._states.values()) > self.max_elements and len(self._states) > 1:
            old, _ = self._states.popitem(last=False)
            self._last_logits.pop(old, None)
        return state

    def hidden(self, rows: Sequence[tuple[int, ...]], pads: Sequence[int], layer: int) -> torch.Tensor:
        """[rows, longest, d_model]: each row's clean input to block `layer`, left padded with zeros
        (padding is masked out of every real token's attention)."""
        states = [self.state(r)[layer] for r in rows]
        width = max(len(r) for r in rows)
        out = states[0].new_zeros(len(rows), width, states[0].shape[-1])
        for b, (s, pad) in enumerate(zip(states, pads)):
            out[b, pad:] = s
        return out

    def forward(
        self, rows: Sequence[tuple[int, ...]], prompt_lengths: Sequence[int], hooks, keep: int, layer: int
    ) -> tuple[torch.Tensor, list[int]]:
        """Logits of the last `keep` columns of the left-padded rows, blocks `layer`.. only, with
        `hooks`, and each row's padding (as `Engine._forward`)."""
        engine = self.engine
        ids, mask, pads = left_pad(rows, engine.model.tokenizer.pad_token_id, input_device(engine.model))
        hidden = self.hidden(rows, pads, layer)
        # hooks first: they find their modules by path, which the shortened block list would shift
        with (
            hooked(engine.modules, engine.model, hooks, pads, list(prompt_lengths)),
            starting_at(engine.modules, engine.info, layer, hidden),
        ):
            logits = engine.modules(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                logits_to_keep=keep,
            ).logits
        return logits.float(), pads

    def score_logits(self, batch: Sequence[ResolvedRun], hooks, keep: int) -> torch.Tensor | None:
        """`Engine._score`'s logits of the batch from its lowest first layer on; None where it would
        start at block 0 or the self-check refused the shortcut (then every layer runs)."""
        start = min(first_layer(r) for r in batch)
        if not start or not self.usable(batch[0].prompt_ids + batch[0].answer_ids):
            return None
        return self.forward(
            [r.prompt_ids + r.answer_ids for r in batch], [len(r.prompt_ids) for r in batch], hooks, keep, start
        )[0]

    def usable(self, ids: tuple[int, ...]) -> bool:
        """Once per engine: does starting mid-stack from the stored input reproduce the clean
        run's last logits (within 1e-4)? If the architecture does not allow it, never shortcut."""
        if self.ok is None:
            layer = self.engine.info.n_layers // 2
            self.state(ids)
            try:
                logits, _ = self.forward([ids], [len(ids)], [], 1, layer)
                self.ok = bool((logits[0, -1] - self._last_logits[ids]).abs().max() < 1e-4)
            except Exception:  # noqa: BLE001 - any failure means: not on this architecture
                self.ok = False
        return self.ok
