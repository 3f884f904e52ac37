"""Reading activations from forward passes: the values interventions write.

A Patchscope's source vector h, a `replace` or `resample` value from another prompt, the mean
and std of a site over reference prompts, a steering direction from two prompt sets: each is a
site's activation over some prompts. `SiteReader` computes them in batched, left-padded forward
passes that capture only the sites asked for and stop once the last one has fired, and keeps
every result, so each (site, prompt) and each statistic is computed once per engine
(`counts` says how many forward passes each purpose took).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from ..models.info import ModelInfo
from ..models.sites import ResolvedSite
from ..models.tokens import tokenize
from .hooks import HookContext, hooked, left_pad, position_ids_from_mask


class _Stop(Exception):
    pass


def input_device(bridge) -> torch.device:
    return bridge.original_model.get_input_embeddings().weight.device


class SiteReader:
    """Activations of one model at resolved sites, cached: values per (site, prompt), and the
    mean and std of a site over a set of prompts (every token except a prepended BOS)."""

    def __init__(self, bridge, modules: torch.nn.Module, info: ModelInfo, batch_size: int = 32) -> None:
        self.bridge, self.modules, self.info, self.batch_size = bridge, modules, info, batch_size
        self._values: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._stats: dict[tuple[str, tuple[str, ...]], tuple[torch.Tensor, float]] = {}
        self.counts: Counter = Counter()

    # ------------------------------------------------------------ the Reader protocol

    def values(self, site: ResolvedSite, prompt: str | Sequence[int]) -> torch.Tensor:
        """[tokens, width] float32: the site's activation at every position of the prompt."""
        ids = tuple(prompt) if not isinstance(prompt, str) else tokenize(self.info, prompt)
        key = (site.site.hook, ids)
        if key not in self._values:
            self.read([site], [ids], purpose="values")
        return self._values[key]

    def mean(self, site: ResolvedSite, prompts: tuple[str, ...]) -> torch.Tensor:
        return self._statistics(site, prompts)[0]

    def std(self, site: ResolvedSite, prompts: tuple[str, ...]) -> float:
        return self._statistics(site, prompts)[1]

    def _statistics(self, site: ResolvedSite, prompts: tuple[str, ...]) -> tuple[torch.Tensor, float]:
        key = (site.site.hook, tuple(prompts))
        if key not in self._stats:
            self.statistics([site], prompts)
        return self._stats[key]

    def statistics(self, sites: Sequence[ResolvedSite], prompts: tuple[str, ...]) -> None:
        """Mean and std of each site over the prompts' tokens (all sites in the same passes)."""
        sites = [s for s in sites if (s.site.hook, tuple(prompts)) not in self._stats]
        if not sites:
            return
        rows = [tokenize(self.info, p) for p in prompts]
        values = self.read(sites, rows, purpose="statistics", keep=False)
        skip = 1 if self.info.prepend_bos else 0
        for site in sites:
            tokens = torch.cat([values[(site.site.hook, r)][skip:] for r in rows]).double()  # [tokens, width]
            self._stats[(site.site.hook, tuple(prompts))] = (tokens.mean(0).float(), float(tokens.std()))

    # ------------------------------------------------------------ batched reading

    @torch.no_grad()
    def read(
        self,
        sites: Sequence[ResolvedSite],
        prompts: Sequence[tuple[int, ...]],
        purpose: str = "values",
        keep: bool = True,
    ) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
        """Every site's activation over every prompt, [tokens, width] each, keyed (hook name,
        token ids); kept for later calls unless keep=False."""
        out: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        distinct = list(dict.fromkeys(tuple(p) for p in prompts))
        sites = list({s.site.hook: s for s in sites}.values())
        for start in range(0, len(distinct), self.batch_size):
            chunk = distinct[start : start + self.batch_size]
            ids, mask, pads = left_pad(chunk, self.bridge.tokenizer.pad_token_id, input_device(self.bridge))
            fired: set[str] = set()

            def capture(site: ResolvedSite, chunk: list, pads: list[int], fired: set[str]):
                def fn(x: torch.Tensor, ctx: HookContext) -> None:
                    flat = x.reshape(x.shape[0], x.shape[1], site.width)
                    for b, row in enumerate(chunk):
                        out[(site.site.hook, row)] = flat[b, pads[b] :].detach().float().clone()
                    fired.add(site.site.hook)
                    if len(fired) == len(sites):
                        raise _Stop

                return fn

            with hooked(
                self.modules,
                self.bridge,
                [(s, capture(s, chunk, pads, fired)) for s in sites],
                pads,
                [len(r) for r in chunk],
            ):
                self.counts[purpose] += 1
                try:
                    self.modules(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=position_ids_from_mask(mask),
                        use_cache=False,
                        logits_to_keep=1,
                    )
                except _Stop:
                    pass
        if keep:
            self._values.update(out)
        return out
