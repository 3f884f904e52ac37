"""`kind: feature_explanation`: explain directions (SAE latents, MLP neurons, vectors of your own)
by writing each at the placeholders of explanation templates and letting the model say what it
means (SelfIE; Kharlapenko et al. 2024). Sections `features` and `explanation`.

A `Cell` is one point of model x feature x template x write site x scale; a norm-matched random
direction per write site is run beside the features (`source: control`). The directions, the
written vectors and the measures come from the core (`patchscope_core.methods.directions`,
`explain_cells`, the worker operation `feature_explanation`). A task holds a chunk of whole
features (`one_task`: a feature's every template, site and scale together), so `chosen`, the rung
`choose_scale` picks per (feature, template, site), is computed where all its rungs are. The
input row is the resolved source (paths made absolute, top prompts read); each model's plan
holds its features (an SAE's hookpoint translated to the bridge's site, ids checked against the
SAE's cfg.json, a neuron list against d_mlp, a vectors file against d_model), all before any
weights load. The report: a table per feature (its chosen explanation, measures, logit-lens
tokens), a histogram of each measure with the control beside the features.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from patchscope_core import PatchscopeError
from patchscope_core.methods.directions import (
    AUTO_LADDER,
    placeholders,
    read_vectors,
    sae_header,
)
from patchscope_core.models.sites import Site as CoreSite
from patchscope_core.models.sites import check_layer, resolve_site
from patchscope_core.models.tokens import check_context, tokenize

from .. import pictures
from ..config import ConfigError, Layers, Strict
from ..config.files import locate, prompt_list
from ..config.models import ModelPlan, checked_layers, model_info_for
from .base import KindDefaults, Schema, digest, generation_key, run_columns

_SLICE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*(?::\s*(\d*)\s*)?$")


def parse_ids(value: Any) -> str | list[int]:
    """'all', 'start:stop[:step]', an int or a non-empty list of ids >= 0."""
    if isinstance(value, bool):
        raise ValueError(f"expected 'all', 'start:stop' or a list of ids, got {value!r}")
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        if value.strip() == "all" or _SLICE.match(value):
            return value.strip()
        raise ValueError(f"expected 'all', 'start:stop' or a list of ids, got {value!r}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty id list: give at least one id, a range 'start:stop' or all")
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"expected ids >= 0, got {v!r}")
        return list(dict.fromkeys(value))
    raise ValueError(f"expected 'all', 'start:stop' or a list of ids, got {value!r}")


def expand_ids(spec: str | list[int], n: int, field_name: str, what: str) -> list[int]:
    """The ids a parsed spec names among n; out of range refused naming the field."""
    if spec == "all":
        return list(range(n))
    if isinstance(spec, str):
        start, stop, step = (int(g) if g else None for g in _SLICE.match(spec).groups())
        ids = list(range(start or 0, n if stop is None else stop, step or 1))
        if not ids:
            raise ConfigError(f"{field_name}: {spec!r} names no id")
    else:
        ids = spec
    bad = [i for i in ids if i >= n]
    if bad:
        raise ConfigError(f"{field_name}: {what} {bad[0]} is out of range 0 .. {n - 1} ({n} {what}s)")
    return ids


Ids = Annotated[Any, AfterValidator(parse_ids)]


class SaeConfig(Strict):
    path: str | None = Field(None, description="sparsify's on-disk SAE (SparseCoder.save_to_disk)")
    hub: str | None = Field(None, description="a hub repository of sparsify SAEs (SparseCoder.load_from_hub)")
    hookpoint: str | None = Field(None, description="the Hugging Face module it reads, e.g. layers.12")
    saelens: str | None = Field(None, description="a directory in SAELens's saved format")

    @model_validator(mode="after")
    def _one(self) -> SaeConfig:
        given = [k for k in ("path", "hub", "saelens") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of path, hub or saelens")
        if not self.saelens and not self.hookpoint:
            raise ValueError("hookpoint: a sparsify SAE needs the module it reads, e.g. layers.12")
        return self


class NeuronsConfig(Strict):
    layers: Layers
    ids: Ids = "all"


class VectorsConfig(Strict):
    file: str
    site: str = "blocks.{layer}.hook_resid_post"
    layers: list[int] = Field(..., min_length=1)


class TopConfig(Strict):
    k: int = Field(..., ge=1)
    prompts: str | list[str] = Field(..., description="a file of one prompt a line, or a list")


class FeaturesConfig(Strict):
    sae: SaeConfig | None = None
    neurons: NeuronsConfig | None = None
    vectors: VectorsConfig | None = None
    ids: Ids | None = None
    top: TopConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FeaturesConfig:
        if sum(x is not None for x in (self.sae, self.neurons, self.vectors)) != 1:
            raise ValueError("give exactly one of sae, neurons or vectors")
        if self.sae is None and (self.ids is not None or self.top is not None):
            raise ValueError("ids and top choose SAE latents; neurons take neurons.ids, vectors every vector")
        if self.sae is not None and (self.ids is None) == (self.top is None):
            raise ValueError("give exactly one of ids or top for an SAE's latents")
        return self


class ExplanationConfig(Strict):
    templates: list[str] = Field(..., min_length=1)
    scales: list[float] | Literal["auto"] = "auto"
    write: Literal["replace", "add"] = "replace"
    layers: Literal["own"] | list[int] = "own"
    max_new_tokens: int = Field(16, ge=1)
    logit_lens_k: int = Field(5, ge=1, description="logit-lens tokens per direction")
    control: bool = True
    seed: int = Field(0, ge=0, description="the random control's seed")

    @field_validator("templates", mode="after")
    @classmethod
    def _placeholder(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            if not re.search(r"(?<![A-Za-z0-9_])X(?![A-Za-z0-9_])", t):
                raise ValueError(f"[{i}] {t[:50]!r} has no placeholder X to write at")
        return v

    @field_validator("scales", mode="after")
    @classmethod
    def _scales(cls, v):
        if v == "auto":
            return v
        if not v:
            raise ValueError("empty list of scales")
        for s in v:
            if not math.isfinite(s) or s <= 0:
                raise ValueError(f"every scale must be a finite number > 0, got {s!r}")
        return list(dict.fromkeys(float(s) for s in v))

    @property
    def ladder(self) -> list[float]:
        return list(AUTO_LADDER) if self.scales == "auto" else self.scales


@dataclass(frozen=True)
class Source:
    """The features' source as resolved (plain data: what the worker receives)."""

    spec: str  # json of the plain dict

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.spec)


@dataclass(frozen=True)
class Feature:
    source: str  # sae | neuron | vector | control
    feature: str  # id or name ('' for a top rank: the worker finds the latent)
    site: str  # the direction's own site
    rank: int | None = None
    layer: int | None = None  # a neuron's layer


@dataclass
class FeaturePlan(ModelPlan):
    features: list[Feature] = field(default_factory=list)
    sites: dict[str, list[str]] = field(default_factory=dict)  # own site -> write sites


PARAM_COLUMNS = ("cell_id", "model", "source", "feature", "rank", "site", "layer", "template", "scale")
RESULT_COLUMNS = (
    "norm",
    "site_norm",
    "generated_text",
    "generated_token_ids",
    "self_similarity",
    "entropy",
    "relevancy",
    "logit_lens_tokens",
    "logit_lens_token_ids",
    "matches_logit_lens",
    "chosen",
)
TABLE_COLUMNS = (
    "cell_id",
    "model",
    "source",
    "feature",
    "site",
    "template",
    "scale",
    "chosen",
    "generated_text",
    "self_similarity",
    "entropy",
    "relevancy",
    "logit_lens_tokens",
    "matches_logit_lens",
    "norm",
)
MEASURES = ("self_similarity", "entropy", "relevancy")


@dataclass(frozen=True)
class Cell:
    model: str
    feature: Feature
    template: str
    template_index: int
    site: str  # where it is written
    scale: float
    group: str
    key: str  # the digest of what else decides the result (source, write, tokens, generation)
    KIND = "feature_explanation"

    @cached_property
    def cell_id(self) -> str:
        f = self.feature
        return digest(
            [self.model, f.source, f.feature, f.rank, f.layer, self.template, self.site, self.scale, self.key]
        )

    @property
    def layer(self) -> int:
        layer = CoreSite(self.site).layer
        return -1 if layer is None else layer

    def params(self) -> dict[str, Any]:
        f = self.feature
        return {
            "cell_id": self.cell_id,
            "model": self.model,
            "source": f.source,
            "feature": f.feature,
            "rank": -1 if f.rank is None else f.rank,
            "site": self.site,
            "layer": self.layer,
            "template": self.template,
            "scale": self.scale,
        }


# ---------------------------------------------------------------- rows and checks


def resolve_source(config, base: Path | None) -> Source:
    """The source with paths made absolute (found from the current directory or beside the
    config) and top prompts read."""
    f = config.features
    if f.sae is not None:
        sae = f.sae.model_dump(exclude_none=True)
        for key in ("path", "saelens"):
            if key in sae:
                sae[key] = str(locate(sae[key], base, f"features.sae.{key}", directory=True).resolve())
        data: dict[str, Any] = {"source": "sae", "sae": sae}
        if f.top is not None:
            data["top"] = {"k": f.top.k, "prompts": list(prompt_list(f.top.prompts, base, "features.top.prompts"))}
    elif f.neurons is not None:
        data = {"source": "neuron"}
    else:
        path = locate(f.vectors.file, base, "features.vectors.file").resolve()
        data = {"source": "vector", "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    data["seed"] = config.explanation.seed
    return Source(json.dumps(data, sort_keys=True))


def _features(config, info, source: dict) -> list[Feature]:
    f = config.features
    try:
        if f.sae is not None:
            header = sae_header(source["sae"], info, "features.sae")
            if f.top is not None:
                if f.top.k > header.n_latents:
                    raise ConfigError(f"features.top.k: {f.top.k} is more than the SAE's {header.n_latents} latents")
                for p in source["top"]["prompts"]:
                    tokenize(info, p, "features.top.prompts")
                return [Feature("sae", "", header.site, rank=r) for r in range(f.top.k)]
            ids = expand_ids(f.ids, header.n_latents, "features.ids", "latent")
            return [Feature("sae", str(i), header.site) for i in ids]
        if f.neurons is not None:
            out = []
            for layer in checked_layers(f.neurons.layers, info, "features.neurons.layers"):
                resolve_site(CoreSite(f"blocks.{layer}.mlp.hook_post"), info, "features.neurons.layers")
                site = f"blocks.{layer}.hook_resid_post"
                ids = expand_ids(f.neurons.ids, info.d_mlp, "features.neurons.ids", "neuron")
                out += [Feature("neuron", str(i), site, layer=layer) for i in ids]
            return out
        names = list(read_vectors(source["file"], info.d_model, "features.vectors.file"))
        out = []
        for layer in f.vectors.layers:
            check_layer(layer, info, "features.vectors.layers")
            if "{layer}" not in f.vectors.site:
                raise ConfigError(f"features.vectors.site: {f.vectors.site!r} has no {{layer}} to fill in")
            site = resolve_site(CoreSite(f.vectors.site.format(layer=layer)), info, "features.vectors.site")
            if site.shape != (info.d_model,):
                raise ConfigError(f"features.vectors.site: {site.site.hook} is not residual-width ({info.d_model})")
            out += [Feature("vector", n, site.site.hook) for n in names]
        return out
    except PatchscopeError as exc:
        raise ConfigError(str(exc)) from None


def _write_sites(config, info, own: str) -> list[str]:
    layers = config.explanation.layers
    if layers == "own":
        return [own]
    form = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", own) if own.startswith("blocks.") else "blocks.{l}.hook_resid_post"
    out = []
    for layer in layers:
        try:
            check_layer(layer, info, "explanation.layers")
        except PatchscopeError as exc:
            raise ConfigError(str(exc)) from None
        out.append(form.format(l=layer))
    return out


def check_features(config, rows: list[Source]) -> dict[str, FeaturePlan]:
    source = rows[0].data
    plans = {}
    for i, name in enumerate(config.models):
        info = model_info_for(name, f"models[{i}]")
        ex = config.explanation
        try:
            for j, t in enumerate(ex.templates):
                ids, _ = placeholders(info, t, f"explanation.templates[{j}]")
                check_context(len(ids), ex.max_new_tokens, info, f"explanation.templates[{j}]")
        except PatchscopeError as exc:
            raise ConfigError(str(exc)) from None
        features = _features(config, info, source)
        sites = {f.site: _write_sites(config, info, f.site) for f in features}
        if ex.control:
            for s in dict.fromkeys(w for ws in sites.values() for w in ws):
                features.append(Feature("control", "random", s))
                sites.setdefault(s, [s])
        plans[name] = FeaturePlan(info, [], None, features=features, sites=sites)
    return plans


# ---------------------------------------------------------------- the grid


def _chunk(config) -> int:
    """Features per task: about execution.batch_size x batches_per_task cells."""
    ex = config.explanation
    per_feature = len(ex.templates) * len(ex.ladder) * (1 if ex.layers == "own" else len(ex.layers))
    return max(1, config.execution.batch_rows * config.execution.batches_per_task // per_feature)


def _key(config, source: dict) -> str:
    """What decides a cell's result besides its own axes: the source (a top list's k aside, so
    growing k adds ranks and keeps the rest), the write, the tokens and the generation settings."""
    ex = config.explanation
    what = dict(source, top={"prompts": source["top"]["prompts"]}) if "top" in source else source
    return digest([what, ex.write, ex.max_new_tokens, ex.logit_lens_k, generation_key(config)])


def _walk(config, rows, plans) -> Iterator[Cell]:
    ex, key, chunk = config.explanation, _key(config, rows[0].data), _chunk(config)
    for model in config.models:
        plan = plans[model]
        for n, f in enumerate(plan.features):
            group = f"{f.source}:{n // chunk}"
            for t, template in enumerate(ex.templates):
                for site in plan.sites[f.site] if f.source != "control" else [f.site]:
                    for scale in ex.ladder:
                        yield Cell(model, f, template, t, site, float(scale), group, key)


class FeatureExplanationKind(KindDefaults):
    name = "feature_explanation"
    sections = {"features": FeaturesConfig, "explanation": ExplanationConfig}
    one_task = True  # a group is a chunk of whole features: every rung of a feature in one task
    operation = "feature_explanation"
    schema = Schema(
        PARAM_COLUMNS,
        RESULT_COLUMNS,
        TABLE_COLUMNS,
        ("generated_token_ids", "logit_lens_token_ids"),
        numbers=(*MEASURES, "scale", "norm"),
        needs=("source", "feature", "site", "template", "generated_text", "chosen", "logit_lens_tokens"),
        optional=("matches_logit_lens",),
    )
    marks = frozenset({"self_similarity", "relevancy"})
    order = ("model", "source", "feature", "rank", "site", "template", "scale")

    def load_rows(self, config, base: Path | None) -> list[Source]:
        return [resolve_source(config, base)]

    def check(self, config, rows, base) -> dict[str, FeaturePlan]:
        return check_features(config, rows)

    def context(self, config, rows, base) -> dict[str, Any]:
        """What every task's payload shares: the source and the explanation settings."""
        ex = config.explanation
        return {
            "source": rows[0].data,
            "templates": list(ex.templates),
            "write": ex.write,
            "max_new_tokens": ex.max_new_tokens,
            "logit_lens_k": ex.logit_lens_k,
        }

    def science(self, science, config, rows, context) -> dict[str, Any]:
        science["source"] = rows[0].data  # paths resolved, top prompts read, a vectors file's digest
        return science

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        return _grouped(config, rows, plans)

    def cells(self, config, rows, plans, context) -> Iterator[Cell]:
        return _walk(config, rows, plans)

    def payload(self, task) -> dict[str, Any]:
        cells = []
        for c in task.cells:
            f = c.feature
            numbered = f.source in ("sae", "neuron") and f.rank is None
            cells.append(
                {
                    "source": f.source,
                    "feature": int(f.feature) if numbered else f.feature,
                    "rank": f.rank,
                    "feature_layer": f.layer,
                    "feature_site": f.site,
                    "site": c.site,
                    "template": c.template_index,
                    "scale": c.scale,
                }
            )
        return {"kind": self.operation, **task.context, "cells": cells}

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for cell, rec in zip(task.cells, output["records"], strict=True):
            row = cell.params()
            row["feature"] = str(rec["feature"])
            row.update({c: rec[c] for c in RESULT_COLUMNS})
            row["logit_lens_tokens"] = json.dumps(rec["logit_lens_tokens"], ensure_ascii=False)  # text: one cell
            row.update(run_columns(output, rec))
            rows.append(row)
        return rows

    def describe(self, config, plan: FeaturePlan, context) -> str:
        ex = config.explanation
        n = {s: sum(f.source == s for f in plan.features) for s in ("sae", "neuron", "vector", "control")}
        what = ", ".join(f"{k} {v}" for k, v in n.items() if v)
        layers = "own site" if ex.layers == "own" else f"layers {ex.layers}"
        scales = f"auto ladder {list(AUTO_LADDER)}" if ex.scales == "auto" else ex.scales
        return f"features ({what}) x {len(ex.templates)} templates x {layers} x scales {scales}, write {ex.write}"

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        return draw_report(out_dir, df)

    def summary_figures(self, df) -> dict[str, Any]:
        """Over the chosen explanations (one per feature, template and site): per source (`sae`,
        `neuron`, `vector`, `control`) the mean of each measure (`<source>/<measure>`) and the share
        whose explanation contains one of the direction's logit-lens tokens
        (`<source>/matches_logit_lens`): what a runs table sorts by, the control beside the features."""
        chosen = df[df["chosen"].astype(bool)]
        out: dict[str, Any] = {}
        for source, part in chosen.groupby("source", sort=True):
            for m in (*MEASURES, "matches_logit_lens"):
                if m in part:
                    values = part[m].astype(float).dropna()
                    if len(values):
                        out[f"{source}/{m}"] = float(values.mean())
        return out

    def summary(self, df, max_rows: int = 40) -> str:
        chosen = df[df["chosen"].astype(bool)]
        lines = []
        for model, mdf in chosen.groupby("model", sort=False):
            lines.append(f"== {model}: the chosen explanation per feature and template")
            for _, r in mdf.head(max_rows).iterrows():
                lines.append(
                    f"  {r['source']} {pictures.short(str(r['feature']), 12):>12} @ {r['site']} x{r['scale']:g}: "
                    f"{pictures.short(r['generated_text'] or '', 60)!r}"
                )
            if len(mdf) > max_rows:
                lines.append(f"... {len(mdf) - max_rows} more in results.csv / features.csv")
        return "\n".join(lines)


def _grouped(config, rows, plans) -> Iterator[tuple[str, int]]:
    model, group, n = None, None, 0
    for cell in _walk(config, rows, plans):
        if (cell.model, cell.group) != (model, group):
            if n:
                yield model, n
            model, group, n = cell.model, cell.group, 0
        n += 1
    if n:
        yield model, n


def draw_report(out_dir: Path, df) -> dict[str, Path]:
    """features.csv (per feature and template: the chosen explanation, its measures, the
    logit-lens tokens) and a histogram of each measure, features beside the control."""
    out: dict[str, Path] = {}
    chosen = df[df["chosen"].astype(bool)].copy()
    columns = [c for c in ("model", "source", "feature", "site", "template", "scale", "generated_text") if c in df]
    columns += [*MEASURES, "logit_lens_tokens"] + (["matches_logit_lens"] if "matches_logit_lens" in df else [])
    out["features_table"] = out_dir / "features.csv"
    chosen[columns].to_csv(out["features_table"], index=False)
    plt = pictures.plt()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 3.6))
    for ax, m in zip(axes, MEASURES):
        for label, part in (
            ("features", chosen[chosen["source"] != "control"]),
            ("control", chosen[chosen["source"] == "control"]),
        ):
            values = part[m].astype(float).dropna()
            if len(values):
                ax.hist(values, bins=30, alpha=0.6, density=True, label=f"{label} ({len(values)})")
        ax.set_title(m)
        ax.legend(fontsize=8)
    fig.suptitle("measures of the chosen explanations: features and the random control")
    out["measures_histogram"] = pictures.save(fig, out_dir / "histogram_measures.png")
    return out


KIND = FeatureExplanationKind()
