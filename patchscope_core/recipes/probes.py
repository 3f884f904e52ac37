"""Probes: the unit every recipe is made of, and the one place they run on an engine.

A recipe (`token_identity`, `attribute_extraction`, ...) turns its inputs into `Probe`s, each
one reading of one row by one method:
- `patchscope`: a Patchscope (source prompt, layer l, position i -> target prompt, layer l*,
  positions i*), run by the engine's patched, KV-cached generation (`PatchscopeEngine.generate`);
- `affine`: the same with an affine map f(h) = W h + b fitted from the source model's layer l to
  the target model's layer l* (cross-model patching; `lenses.fit_affine_maps`);
- `logit_lens` / `tuned_lens`: the source model's output head applied to h, or to W h + b
  fitted from layer l to the last layer;
- `plain`: the model answers a prompt itself, with no intervention (`Engine.run_interventions`).
`RecipeRunner.run(probes, metric)` reads every hidden state the probes need in batched passes
(the engine's `SiteReader`), fits the maps once per runner, runs each method in batches and
scores every probe with the recipe's metric (`metrics.py`):
- `next_token`: precision@1 and surprisal against the source model's own next-token prediction
  at the source position (its output head on the last layer's state there);
- `contains`: the expected text appears in the generation (and the control's, for the control);
- `rouge_l`: RougeL of the generated description against the reference (and the control's).
A sweep's worker runs its tasks through the same runner (`workers/actor.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from ..base.errors import PatchscopeError
from ..interventions.runs import InterventionRun
from ..methods.mapping import Identity
from ..methods.patchscope import Patchscope, PatchscopeEngine, Source, Target
from ..models.sites import Site, resid_post, resolve_site
from ..models.tokens import resolve_position, tokenize
from . import metrics
from .lenses import final_logprobs, fit_affine_maps

METHODS = ("patchscope", "affine", "logit_lens", "tuned_lens", "plain")
METRICS = ("next_token", "contains", "rouge_l")


@dataclass(frozen=True)
class Probe:
    """One reading of one row of a recipe by one method (see the module docstring); `role` is
    what it stands for in its recipe (default: the method), e.g. a multi-hop chain's `hop1`,
    `hop2` and `vanilla` questions are all `plain` probes."""

    method: str
    row: int = 0
    role: str = ""
    source: Source | None = None  # where h is read (every method but plain)
    target: Target | None = None  # where f(h) is written (patchscope, affine)
    prompt: str | None = None  # plain: what the model answers
    expected: str | None = None  # what counts as right; None: the source model's own next token
    control: str | None = None  # another row's expected value: the shuffled-label control
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PatchscopeError(f"method: unknown method {self.method!r} (allowed: {', '.join(METHODS)})")
        if not self.role:
            object.__setattr__(self, "role", self.method)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "target": None if self.target is None else {**asdict(self.target), "positions": list(self.target.positions)}
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Probe:
        source = Source(**data["source"]) if data.get("source") else None
        target = (
            Target(**{**data["target"], "positions": tuple(data["target"]["positions"])})
            if data.get("target")
            else None
        )
        return cls(**{**data, "source": source, "target": target})


class Recipe:
    """A recipe's settings (a frozen dataclass) and how one input row becomes probes.

    Subclasses set `name` and `metric` and define `probes(row, item, tokens)` (`item`: the row as
    plain data; `tokens(prompt)`: its length in the source model's tokens), `count(item, tokens)`
    (the same number, computed without building them) and `pairs(n_layers)` (the layer pairs of
    the maps its probes use)."""

    name: ClassVar[str]
    metric: ClassVar[str]

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        raise NotImplementedError

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        raise NotImplementedError

    def pairs(self, n_layers: int) -> list[tuple[int, int]]:
        return []

    def build(self, items: Sequence[dict[str, Any]], tokens: Callable[[str], int]) -> list[Probe]:
        """Every probe of every row, rows in order."""
        return [p for row, item in enumerate(items) for p in self.probes(row, item, tokens)]

    def settings(self) -> dict[str, Any]:
        """Plain data (what travels to a sweep's workers); `from_settings` is its inverse."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_settings(cls, data: dict[str, Any]) -> Recipe:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class RecipeRunner:
    """Runs probes on one engine (cross-model: a PatchscopeEngine with its source model), with
    the fit texts and layer pairs of the recipe's maps (tuned lens: (l, last layer); affine:
    (l, l*)), fitted together at the first probe that needs one."""

    def __init__(
        self,
        engine: PatchscopeEngine,
        fit_texts: Sequence[str] = (),
        pairs: Sequence[tuple[int, int]] = (),
        batch_size: int = 32,
    ) -> None:
        self.engine = engine
        self.fit_texts, self.pairs = list(fit_texts), list(pairs)
        self.batch_size = batch_size
        self.maps: dict[tuple[int, int, bool], Any] = {}

    @property
    def source_info(self):
        return self.engine.source_info

    def _map(self, l: int, l_star: int, same_model: bool):
        """The fitted map from the source model's layer l to layer l* of the source model itself
        (tuned lens) or of the target model (affine); every pair of the runner is fitted at once."""
        if (l, l_star, same_model) not in self.maps:
            if (l, l_star) not in self.pairs:
                raise PatchscopeError(
                    f"layers: no map from layer {l} to layer {l_star} is fitted (pairs: {self.pairs})"
                )
            if not self.fit_texts:
                raise PatchscopeError("fit_texts: a tuned lens or an affine map needs texts to fit it on")
            target = self.engine.source_reader if same_model else self.engine.reader
            fitted = fit_affine_maps(
                self.engine.source_reader, target, self.fit_texts, self.pairs, batch_size=self.batch_size
            )
            self.maps.update({(a, b, same_model): m for (a, b), m in fitted.items()})
        return self.maps[(l, l_star, same_model)]

    # ------------------------------------------------------------------ running

    def run(self, probes: Sequence[Probe], metric: str) -> list[dict[str, Any]]:
        """One result per probe, in order: what it produced and its score."""
        if metric not in METRICS:
            raise PatchscopeError(f"metric: unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
        out: list[dict[str, Any]] = [dict() for _ in probes]
        states = self._states(probes, metric)
        last = self.source_info.n_layers - 1  # the tuned lens maps to it
        patched = [i for i, p in enumerate(probes) if p.method in ("patchscope", "affine")]
        if patched:
            specs = [
                Patchscope(probes[i].source, probes[i].target, self._mapping(probes[i]), probes[i].max_new_tokens)
                for i in patched
            ]
            resolved = self.engine.resolve(specs)
            vectors = [states[(r.source_token_ids, r.spec.source.layer)][r.source_position] for r in resolved]
            for i, res in zip(patched, self.engine.generate(resolved, vectors, self.batch_size)):
                out[i].update(
                    source_position_abs=res.source_position,
                    target_position_abs=res.target_positions[0],
                    generated_token_ids=res.generated_token_ids,
                    generated_text=res.generated_text,
                    top_token_ids=res.top_token_ids,
                    top_logprobs=res.top_logprobs,
                )
        lensed = [i for i, p in enumerate(probes) if p.method in ("logit_lens", "tuned_lens")]
        if lensed:
            hs = []
            for i in lensed:
                ids, pos = self._source(probes[i])
                h = states[(ids, probes[i].source.layer)][pos]
                if probes[i].method == "tuned_lens":
                    h = self._map(probes[i].source.layer, last, same_model=True)(h[None])[0]
                hs.append(h)
                out[i]["source_position_abs"] = pos
            top = final_logprobs(self.engine.source_model, torch.stack(hs)).topk(self.engine.top_k, dim=-1)
            for k, i in enumerate(lensed):
                out[i].update(top_token_ids=top.indices[k].tolist(), top_logprobs=top.values[k].tolist())
        plain = [i for i, p in enumerate(probes) if p.method == "plain"]
        if plain:
            runs = [InterventionRun(probes[i].prompt, (), None, probes[i].max_new_tokens) for i in plain]
            for i, res in zip(plain, self.engine.run_interventions(runs, self.batch_size, clean=False)):
                out[i].update(
                    generated_token_ids=res.generated_token_ids,
                    generated_text=res.generated_text,
                    top_token_ids=res.top_token_ids,
                    top_logprobs=res.top_logprobs,
                )
        own = self._own_predictions(probes, states) if metric == "next_token" else {}
        for p, o in zip(probes, out):
            o.update(self._score(p, o, metric, own))
        return out

    def _mapping(self, p: Probe):
        if p.method == "patchscope":
            return Identity()
        return self._map(p.source.layer, p.target.layer, same_model=False)

    def _source(self, p: Probe) -> tuple[tuple[int, ...], int]:
        ids = tokenize(self.source_info, p.source.prompt, "source.prompt")
        return ids, resolve_position(p.source.position, len(ids), "source.position")

    def _states(self, probes: Sequence[Probe], metric: str) -> dict[tuple, torch.Tensor]:
        """Every (source prompt, layer) state [tokens, d] the probes need, in batched passes of
        the source model; with the next-token metric also the last layer's (the model's own
        prediction)."""
        wanted: dict[int, list[tuple[int, ...]]] = {}
        for p in probes:
            if p.source is None:
                continue
            ids, _ = self._source(p)
            wanted.setdefault(p.source.layer, []).append(ids)
            if metric == "next_token":
                wanted.setdefault(self.source_info.n_layers - 1, []).append(ids)
        if not wanted:
            return {}
        reader = self.engine.source_reader
        sites = [resolve_site(Site(resid_post(l)), self.source_info, "source.layer") for l in wanted]
        reader.batch_size = self.batch_size
        rows = list(dict.fromkeys(r for rs in wanted.values() for r in rs))
        values = reader.read(sites, rows, purpose="recipe", keep=False)
        return {(ids, l): values[(resid_post(l), ids)] for l, rs in wanted.items() for ids in rs}

    def _own_predictions(self, probes: Sequence[Probe], states) -> dict[tuple, torch.Tensor]:
        """The source model's own next-token log-probabilities at each probe's source position:
        its output head on the last layer's state there."""
        keys = list(dict.fromkeys(self._source(p) for p in probes if p.source is not None))
        if not keys:
            return {}
        last = self.source_info.n_layers - 1
        logprobs = final_logprobs(
            self.engine.source_model, torch.stack([states[(ids, last)][pos] for ids, pos in keys])
        )
        return dict(zip(keys, logprobs))

    def _score(self, p: Probe, o: dict[str, Any], metric: str, own: dict[tuple, torch.Tensor]) -> dict[str, Any]:
        if metric == "next_token":
            model = own[self._source(p)]
            expected, predicted = int(model.argmax()), int(o["top_token_ids"][0])
            tok = self.engine.source_model.tokenizer
            return {
                "expected_token_id": expected,
                "predicted_token_id": predicted,
                "expected_token": tok.decode([expected]),
                "predicted_token": tok.decode([predicted]),
                "score": metrics.precision_at_1(predicted, expected),
                "surprisal": metrics.surprisal(model, predicted),
                "control_score": None,
            }
        text = o.get("generated_text", "")
        if metric == "contains":
            score = lambda ref: float(metrics.contains_answer(text, ref))  # noqa: E731
        else:
            score = lambda ref: metrics.rouge_l(metrics.description_of(text), ref)  # noqa: E731
        return {"score": score(p.expected), "control_score": None if p.control is None else score(p.control)}


def run_recipe(
    engine: PatchscopeEngine,
    recipe: Recipe,
    items: Sequence[dict[str, Any]],
    fit_texts: Sequence[str] = (),
    batch_size: int = 32,
) -> list[tuple[Probe, dict[str, Any]]]:
    """A whole recipe in-process: its probes for `items` and each probe's result."""
    tokens = lambda prompt: len(tokenize(engine.source_info, prompt))  # noqa: E731
    probes = recipe.build(items, tokens)
    runner = RecipeRunner(engine, fit_texts, recipe.pairs(engine.source_info.n_layers), batch_size)
    return list(zip(probes, runner.run(probes, recipe.metric)))
