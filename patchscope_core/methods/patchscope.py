"""Patchscopes (Ghandeharioun et al., ICML 2024): the spec in the paper's notation, and its engine.

A Patchscope reads the hidden representation h at (source model M, prompt S, layer l,
position i), maps it (f, `mapping.py`), writes f(h) into (target model M*, prompt T, layer l*,
positions i*) and lets M* generate. `PatchscopeEngine` runs lists of them on the engine's one
path: a Patchscope is `Replace(vector=f(h))` at `blocks.{l*}.hook_resid_post` and the target
positions, h read from the source run (all layers of a source prompt in one forward pass).

Conventions:
- layer l is the residual stream *after* block l (`blocks.{l}.hook_resid_post`); valid layers
  are 0 .. n_layers-1. That is HF `hidden_states[l + 1]` except for the last layer: Hugging Face
  applies the final norm to its last hidden state, this residual stream is before it.
- a position indexes the prompt's tokens as the model sees them (BOS included when the
  model prepends one); negative positions count from the end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..base.errors import PatchscopeError
from ..engine import Decoding, Engine, warn_attached_hooks
from ..forward.readings import SiteReader
from ..interventions.kinds import Positions, Replace
from ..interventions.runs import Intervention, ResolvedIntervention, ResolvedRun
from ..models.info import ModelInfo, info_of
from ..models.sites import Site, check_layer, plain_modules, resid_post, resolve_site
from ..models.tokens import check_context, resolve_position, tokenize
from .mapping import Identity, Mapping


@dataclass(frozen=True)
class Source:
    prompt: str
    layer: int
    position: int = -1
    model: str | None = None  # None: the engine's source model


@dataclass(frozen=True)
class Target:
    prompt: str
    layer: int
    positions: tuple[int, ...] = (-1,)
    model: str | None = None  # None: the engine's target model

    def __post_init__(self) -> None:
        positions = (self.positions,) if isinstance(self.positions, int) else tuple(self.positions)
        object.__setattr__(self, "positions", positions)


@dataclass(frozen=True)
class Patchscope:
    source: Source
    target: Target
    mapping: Mapping = field(default_factory=Identity)
    max_new_tokens: int = 20

    def to_dict(self) -> dict:
        """Plain data (what travels to a sweep's workers); only the identity mapping travels."""
        if not isinstance(self.mapping, Identity):
            raise PatchscopeError("mapping: only the identity mapping can be sent as plain data")
        s, t = self.source, self.target
        return {
            "source": {"prompt": s.prompt, "layer": s.layer, "position": s.position, "model": s.model},
            "target": {"prompt": t.prompt, "layer": t.layer, "positions": list(t.positions), "model": t.model},
            "max_new_tokens": self.max_new_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Patchscope:
        target = dict(data["target"], positions=tuple(data["target"]["positions"]))
        return cls(Source(**data["source"]), Target(**target), max_new_tokens=data["max_new_tokens"])

    @staticmethod
    def to_columns(patchscopes: Sequence[Patchscope]) -> dict[str, list]:
        """Many Patchscopes as plain data, a list per field (source_prompt, source_layer, ...,
        max_new_tokens): what a sweep's task carries, a few lists where `to_dict` makes two dicts a
        Patchscope; `from_columns` reads it back."""
        for p in patchscopes:
            if not isinstance(p.mapping, Identity):
                raise PatchscopeError("mapping: only the identity mapping can be sent as plain data")
        return {
            "source_prompt": [p.source.prompt for p in patchscopes],
            "source_layer": [p.source.layer for p in patchscopes],
            "source_position": [p.source.position for p in patchscopes],
            "source_model": [p.source.model for p in patchscopes],
            "target_prompt": [p.target.prompt for p in patchscopes],
            "target_layer": [p.target.layer for p in patchscopes],
            "target_positions": [list(p.target.positions) for p in patchscopes],
            "target_model": [p.target.model for p in patchscopes],
            "max_new_tokens": [p.max_new_tokens for p in patchscopes],
        }

    @classmethod
    def from_columns(cls, columns: dict[str, list]) -> list[Patchscope]:
        c = columns
        return [
            cls(Source(sp, sl, spos, sm), Target(tp, tl, tuple(tpos), tm), max_new_tokens=m)
            for sp, sl, spos, sm, tp, tl, tpos, tm, m in zip(
                c["source_prompt"],
                c["source_layer"],
                c["source_position"],
                c["source_model"],
                c["target_prompt"],
                c["target_layer"],
                c["target_positions"],
                c["target_model"],
                c["max_new_tokens"],
                strict=True,
            )
        ]


@dataclass(frozen=True)
class ResolvedPatchscope:
    """A Patchscope checked against its models: token ids and absolute positions."""

    spec: Patchscope
    source_token_ids: tuple[int, ...]
    target_token_ids: tuple[int, ...]
    source_position: int
    target_positions: tuple[int, ...]


def _token_ids(info: ModelInfo, prompt: str, field_name: str, cache: dict | None) -> tuple[int, ...]:
    """`tokenize`, once per (model, prompt) where a cache is given (a sweep's task repeats its
    prompts across layers and positions: tokenizing each cell's costs more than its forward pass)."""
    if cache is None:
        return tokenize(info, prompt, field_name)
    key = (id(info), prompt)
    if key not in cache:
        cache[key] = tokenize(info, prompt, field_name)
    return cache[key]


def resolve(spec: Patchscope, source: ModelInfo, target: ModelInfo, tokens: dict | None = None) -> ResolvedPatchscope:
    """Validate `spec` against both models and resolve its positions; raises PatchscopeError.
    `tokens`: a cache of token ids shared by the specs resolved together."""
    if not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens < 1:
        raise PatchscopeError(f"max_new_tokens: expected an integer >= 1, got {spec.max_new_tokens!r}")
    check_layer(spec.source.layer, source, "source.layer")
    check_layer(spec.target.layer, target, "target.layer")
    src_ids = _token_ids(source, spec.source.prompt, "source.prompt", tokens)
    tgt_ids = _token_ids(target, spec.target.prompt, "target.prompt", tokens)
    check_context(len(src_ids), 0, source, "source.prompt")
    check_context(len(tgt_ids), spec.max_new_tokens, target, "target.prompt")
    if not spec.target.positions:
        raise PatchscopeError("target.positions: at least one position is needed")
    src_pos = resolve_position(spec.source.position, len(src_ids), "source.position")
    tgt_pos = tuple(sorted({resolve_position(p, len(tgt_ids), "target.positions") for p in spec.target.positions}))
    spec.mapping.check(source.d_model, target.d_model)
    return ResolvedPatchscope(spec, src_ids, tgt_ids, src_pos, tgt_pos)


def resolve_all(specs: Sequence[Patchscope], source: ModelInfo, target: ModelInfo) -> list[ResolvedPatchscope]:
    """Resolve every spec; the error names the index of the first bad one."""
    out, tokens = [], {}
    for i, spec in enumerate(specs):
        try:
            out.append(resolve(spec, source, target, tokens))
        except PatchscopeError as exc:
            raise PatchscopeError(f"patchscopes[{i}].{exc}") from exc
    return out


@dataclass
class PatchscopeResult:
    patchscope: Patchscope
    source_token_ids: list[int]
    target_token_ids: list[int]
    source_position: int
    target_positions: list[int]
    generated_token_ids: list[int]
    generated_text: str
    top_token_ids: list[int]  # the first generated token's top-k under the patched target
    top_logprobs: list[float]
    timings: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A flat, JSON- and Parquet-friendly dict."""
        s, t = self.patchscope.source, self.patchscope.target
        record = {
            "source_model": s.model,
            "source_prompt": s.prompt,
            "source_layer": s.layer,
            "source_position": self.source_position,
            "target_model": t.model,
            "target_prompt": t.prompt,
            "target_layer": t.layer,
            "target_positions": self.target_positions,
            "mapping": getattr(self.patchscope.mapping, "name", repr(self.patchscope.mapping)),
            "max_new_tokens": self.patchscope.max_new_tokens,
        }
        # the result's own fields, read directly: dataclasses.asdict would deep-copy the whole spec
        # first (more than half of a cheap cell's cost in a worker)
        record.update({name: getattr(self, name) for name in _RECORD_FIELDS})
        record.update({f"time_{k}": v for k, v in self.timings.items()})
        return record


_SKIPPED = ("patchscope", "source_position", "target_positions", "timings")  # written above, or as time_*
_RECORD_FIELDS = tuple(f.name for f in fields(PatchscopeResult) if f.name not in _SKIPPED)


class PatchscopeEngine(Engine):
    """Runs lists of Patchscopes on loaded models, in batches.

    model: the target model M* (a TransformerBridge); source_model: M (default: the same).
    Patchscopes whose `source.model` / `target.model` is None are recorded with these names.
    """

    def __init__(
        self,
        model,
        source_model=None,
        *,
        name: str | None = None,
        source_name: str | None = None,
        decoding: Decoding = Decoding(),
        top_k: int = 10,
    ) -> None:
        super().__init__(model, name=name, decoding=decoding, top_k=top_k)
        self.target_model = model
        self.source_model = source_model if source_model is not None else model
        if source_model is None:
            self.source_info, self.source_reader = info_of(model, source_name or name), self.reader
        else:
            warn_attached_hooks(source_model, "source_model")
            self.source_info = info_of(source_model, source_name)
            self.source_reader = SiteReader(source_model, plain_modules(source_model), self.source_info)

    def _describe(self) -> str:
        if self.source_model is self.target_model:
            return super()._describe()
        return f"{super()._describe()}; source {self.source_info.name} ({self.source_info.n_layers} layers)"

    def resolve(self, patchscopes: Sequence[Patchscope]) -> list[ResolvedPatchscope]:  # type: ignore[override]
        return resolve_all(patchscopes, self.source_info, self.target_info)

    def run(self, patchscopes: Sequence[Patchscope], batch_size: int = 32) -> list[PatchscopeResult]:  # type: ignore[override]
        """One result per Patchscope, in input order. Validates everything before any forward pass."""
        if batch_size < 1:
            raise PatchscopeError(f"batch_size: expected an integer >= 1, got {batch_size}")
        resolved = self.resolve(patchscopes)
        if not resolved:
            return []
        t0 = time.perf_counter()
        sources = self.extract_sources(resolved, batch_size)
        extract_s = time.perf_counter() - t0
        vectors = [sources[(r.source_token_ids, r.spec.source.layer, r.source_position)] for r in resolved]
        results = self.generate(resolved, vectors, batch_size)
        for res in results:
            res.timings["extract_s"] = extract_s
        return results

    def generate(
        self, resolved: Sequence[ResolvedPatchscope], vectors: Sequence[torch.Tensor], batch_size: int = 32
    ) -> list[PatchscopeResult]:
        """Patched generation given each Patchscope's source vector h: `Replace(f(h))` at
        `blocks.{l*}.hook_resid_post` and the target positions, as an intervention run."""
        runs, actions = [], []
        for r, h in zip(resolved, vectors):
            site = resolve_site(Site(resid_post(r.spec.target.layer)), self.target_info, "target.layer")
            write = Intervention(site.site, Replace(vector=r.spec.mapping(h)), Positions(indices=r.target_positions))
            runs.append(
                ResolvedRun(
                    r,
                    r.target_token_ids,
                    (),
                    (ResolvedIntervention(write, site, write.positions),),
                    r.spec.max_new_tokens,
                )
            )
            actions.append([write.kind.prepare(site, self.reader)])
        results = []
        for r, out in zip(resolved, self.execute(runs, actions, batch_size)):
            results.append(
                PatchscopeResult(
                    patchscope=self._named(r.spec),
                    source_token_ids=list(r.source_token_ids),
                    target_token_ids=list(r.target_token_ids),
                    source_position=r.source_position,
                    target_positions=list(r.target_positions),
                    generated_token_ids=out.generated,
                    generated_text=self.model.tokenizer.decode(out.generated, skip_special_tokens=True),
                    top_token_ids=out.top_ids,
                    top_logprobs=out.top_logprobs,
                    timings={k: v for k, v in out.timings.items() if k != "batch_score_s"},
                )
            )
        return results

    def extract_sources(
        self, resolved: Sequence[ResolvedPatchscope], batch_size: int = 32
    ) -> dict[tuple, torch.Tensor]:
        """h for every distinct (source prompt, layer, position): batched forward passes of the
        source model over the distinct source prompts, reading only the layers asked for."""
        sites = {
            r.spec.source.layer: resolve_site(Site(resid_post(r.spec.source.layer)), self.source_info, "source.layer")
            for r in resolved
        }
        self.source_reader.batch_size = batch_size
        values = self.source_reader.read(
            list(sites.values()), [r.source_token_ids for r in resolved], purpose="sources", keep=False
        )
        return {
            (r.source_token_ids, r.spec.source.layer, r.source_position): values[
                (resid_post(r.spec.source.layer), r.source_token_ids)
            ][r.source_position]
            for r in resolved
        }

    def _named(self, spec: Patchscope) -> Patchscope:
        """The spec with its model names filled in from the engine."""
        if spec.source.model is None:
            spec = replace(spec, source=replace(spec.source, model=self.source_info.name))
        if spec.target.model is None:
            spec = replace(spec, target=replace(spec.target, model=self.target_info.name))
        return spec


def run_patchscopes(
    model, patchscopes: Sequence[Patchscope], batch_size: int = 32, **engine_kwargs
) -> list[PatchscopeResult]:
    """Shortcut: PatchscopeEngine(model, **engine_kwargs).run(patchscopes, batch_size)."""
    return PatchscopeEngine(model, **engine_kwargs).run(patchscopes, batch_size)
