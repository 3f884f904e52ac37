"""`kind: intervention`: ablation, steering and patching grids at TransformerLens sites, sections
`prompts` and `intervention` (the intervention kinds are `patchscope_core.interventions.KINDS`).

An `InterventionCell` is one point of model x prompt row x site x layer x head or neuron x kind
x strength (a site given as a mapping, `InterventionSite`, has its own positions, heads or
neurons: `site_settings`); a task holds cells of many prompts (`packs`: up to batches_per_task forward batches,
`sweeps.grid`; the engine computes each prompt's clean baseline once). The context is the grid's table of kinds (by the digest of their values; vectors and
prompt files read before any weights load). The report draws layer x head (or layer x site)
heatmaps, per kind and strength, of the config's `report` measure (default: the mean change in
the answer's log-probability; `report.contrast`: a difference of two groups of prompts), the top
heads, and for `add` the steered generations by alpha.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from patchscope_core import KINDS as INTERVENTION_KINDS
from patchscope_core import PatchscopeError
from patchscope_core.base.values import number_problem, seed_problem, template_problem
from patchscope_core.models.sites import site_template
from patchscope_core.models.tokens import subject_span

from .. import pictures
from ..config import ConfigError, Layers, Strict, axis
from ..config.fields import site_entries
from ..config.files import locate, prompt_list
from ..config.models import ModelPlan
from .answers import check_prompt_answers
from .base import Curve, KindDefaults, Schema, digest, generation_key, run_columns
from .prompts import (
    PromptRow,
    PromptsConfig,
    count_tokens,
    load_prompt_rows,
    model_plans,
    prompt_rows_science,
    study_groups,
)


class InterventionSite(Strict):
    """One site with its own positions, heads or neurons (`site: [{site: ..., positions: all}]`); a
    setting left out is the section's."""

    site: str = Field(description="a TransformerLens hook name ({layer} takes each of `layers`) or a short name")
    positions: Any = Field(None, description="prompt positions, 'prompt', 'generated' or 'all'; none: the section's")
    heads: Any = Field(None, description="attn.hook_z: 'all', a head or a list; none: the section's")
    neurons: Any = Field(None, description="mlp.hook_post: a neuron or a list; none: the section's")

    @field_validator("site", mode="after")
    @classmethod
    def _short_name(cls, v: str) -> str:
        return site_template(v, "")

    @field_validator("heads", "neurons", mode="after")
    @classmethod
    def _units(cls, v: Any) -> Any:
        return unit_values(v)


def unit_values(v: Any) -> Any:
    """`heads` / `neurons`: None, 'all', an integer or a list of integers (as a list)."""
    if v is None or v == "all":
        return v
    values = axis(v)
    if not values or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise ValueError(f"expected 'all', an integer or a list of integers, got {v!r}")
    return values


class InterventionConfig(Strict):
    """An intervention grid. Lists are grid axes: site, layers, heads, neurons, kind, alpha,
    factor, noise_scale, seed."""

    site: str | InterventionSite | list[str | InterventionSite] = Field(
        description="TransformerLens hook names ({layer} takes each of `layers`), short names (z, resid_pre, "
        "attn_out), or {site, positions, heads, neurons} mappings"
    )
    layers: Layers = "all"
    heads: Any = Field(None, description="attn.hook_z: 'all', a head or a list; one cell per head")
    neurons: Any = Field(None, description="mlp.hook_post: a neuron or a list; one cell per neuron")
    positions: Any = Field("all", description="prompt positions, 'prompt', 'generated' or 'all'")
    kind: str | list[str] = "zero"
    alpha: float | list[float] = Field(1.0, description="add: alpha x vector")
    factor: float | list[float] = Field(0.0, description="scale: the factor")
    noise_scale: float | list[float] = Field(3.0, description="noise: x the site's std over the reference prompts")
    seed: int | list[int] = Field(0, description="noise: the seed")
    vector: str | None = Field(None, description="add / replace: a .safetensors or .pt file holding one vector")
    positive: str | list[str] | None = Field(None, description="add: prompts (a list or a file, one a line) ...")
    negative: str | list[str] | None = Field(None, description="... whose mean activations' difference is the vector")
    reference: str | list[str] | None = Field(None, description="mean / noise: prompts; default the sweep's own")
    source: str | None = Field(None, description="resample / replace: the prompt whose values are written")
    source_position: int = Field(-1, description="replace: the source prompt's position")
    from_: Any = Field("last", alias="from", description="knockout: the queries: last, generated, prompt positions")
    to: Any = Field(
        None,
        description="knockout: a list of key sets, one cell each: subject, non_subject, last, "
        "all_previous, a position, or a list of these blocked together",
    )
    window: int | list[int] = Field(1, description="knockout: the layers of a window centred on the site's layer")

    @field_validator("site", mode="before")
    @classmethod
    def _site_entries(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return site_entries([v], InterventionSite, "intervention.site")[0]
        return site_entries(v, InterventionSite, "intervention.site")

    @field_validator("site", "kind", "alpha", "factor", "noise_scale", "seed", "window", "to", mode="after")
    @classmethod
    def _axis(cls, v: Any, info) -> Any:
        values = axis(v)
        if not values:
            raise ValueError("empty list: an axis of the grid needs at least one value (or leave the key out)")
        if info.field_name == "site":  # TransformerLens's short names (get_act_name's) as the templates they name
            short = lambda x: site_template(x, "") if isinstance(x, str) else x  # noqa: E731
            v = [short(x) for x in values] if isinstance(v, list) else short(v)
        for x in values:
            if info.field_name in ("alpha", "factor", "noise_scale"):
                problem = number_problem(x) or (
                    f"must be >= 0, got {x!r}" if info.field_name == "noise_scale" and x < 0 else None
                )
            elif info.field_name == "seed":
                problem = seed_problem(x)
            else:
                problem = None
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("heads", "neurons", mode="after")
    @classmethod
    def _units(cls, v: Any) -> Any:
        return unit_values(v)

    @model_validator(mode="after")
    def _kinds(self) -> InterventionConfig:
        for k in axis(self.kind):
            if k not in INTERVENTION_KINDS:
                raise ValueError(f"intervention.kind: unknown kind {k!r} (allowed: {', '.join(INTERVENTION_KINDS)})")
            if k == "add" and self.vector is None and (self.positive is None or self.negative is None):
                raise ValueError("intervention.vector: add needs a vector file, or positive and negative prompts")
            if k in ("replace", "resample") and self.source is None and (k == "resample" or self.vector is None):
                raise ValueError(
                    f"intervention.source: {k} needs a source prompt" + (" or a vector" if k == "replace" else "")
                )
        if "knockout" in axis(self.kind) and self.to is None:
            raise ValueError("intervention.to: a knockout needs the keys to block (subject, non_subject, last, ...)")
        names = [x.site if isinstance(x, InterventionSite) else x for x in axis(self.site)]
        if any(isinstance(x, InterventionSite) for x in axis(self.site)):
            twice = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
            if twice:
                raise ValueError(
                    f"intervention.site: {', '.join(twice)} named twice: give each site once, with its settings"
                )
        for site in names:
            if not isinstance(site, str) or not site.strip():
                raise ValueError(f"intervention.site: expected TransformerLens hook names, got {site!r}")
            problem = template_problem(site, ("layer",))
            if problem:
                raise ValueError(f"intervention.site: {site!r}: {problem}")
        return self


INTERVENTION_COLUMNS = (
    "cell_id",
    "model",
    "row",
    "prompt",
    "answer",
    "site",
    "layer",
    "head",
    "neuron",
    "kind",
    "alpha",
    "factor",
    "noise_scale",
    "seed",
    "positions",
)
# A steering row's strength against the site's own scale (`engine.steering_norms`; null otherwise).
STEERING_NORMS = ("vector_norm", "site_norm", "relative_strength")
# The engine's "clean" run is this prompt without the intervention: in the results it is the
# baseline (in patching "clean" means the other prompt). Stores written before keep the old
# names; `renamed` maps them when they are read.
BASELINE = {
    "clean_answer_logprob": "baseline_answer_logprob",
    "p_answer_clean": "baseline_p_answer",
    "clean_generated_text": "baseline_generated_text",
    "clean_generated_token_ids": "baseline_generated_token_ids",
}
INTERVENTION_RESULTS = (
    "delta_logprob",
    "answer_logprob",
    "baseline_answer_logprob",
    "p_answer",
    "baseline_p_answer",
    "generated_text",
    "baseline_generated_text",
    "generated_token_ids",
    "baseline_generated_token_ids",
    "answer_token_ids",
    "answer_logprobs",
    "prompt_token_ids",
    "top_token_ids",
    "top_logprobs",
    "max_new_tokens",
) + STEERING_NORMS
INTERVENTION_TABLE = (
    "cell_id",
    "model",
    "row",
    "prompt",
    "answer",
    "site",
    "layer",
    "head",
    "neuron",
    "kind",
    "knockout",
    "alpha",
    "factor",
    "noise_scale",
    "seed",
    "positions",
    "p_change_pct",
    "delta_logprob",
    "answer_logprob",
    "baseline_answer_logprob",
    "p_answer",
    "baseline_p_answer",
    "generated_text",
    "baseline_generated_text",
    "generated_token_ids",
)


@dataclass(frozen=True)
class InterventionCell:
    model: str
    prompt: str
    answer: str | None
    site: str  # the TransformerLens hook name, layer filled in
    layer: int | None
    head: int | None
    neuron: int | None
    kind: str
    variant: str  # digest of the kind's field values: its entry in the task's table of kinds
    alpha: float | None  # add
    factor: float | None  # scale
    noise_scale: float | None  # noise
    seed: int | None  # noise
    positions: Any  # as in the config: 'all', 'prompt', 'generated' or a list of prompt positions
    row: int = 0
    refs: tuple[tuple[str, Any], ...] = ()
    generation_key: str = ""
    max_new_tokens: int = 20
    subject: str | None = None  # a knockout's `to: subject / non_subject`
    edges: str | None = None  # a knockout's edges as text ("last -> subject, window 9"): the `knockout` column
    KIND = "intervention"

    @property
    def cell_id(self) -> str:
        parts = [
            "intervention",
            self.model,
            self.prompt,
            self.answer,
            self.site,
            self.head,
            self.neuron,
            self.kind,
            self.variant,
            self.positions,
            [list(r) for r in self.refs],
            self.generation_key,
        ]
        return digest(parts + [self.subject] if self.kind == "knockout" else parts)

    @property
    def group(self) -> str:
        return self.prompt

    def params(self) -> dict[str, Any]:
        from patchscope_core import Positions

        out = {k: getattr(self, k) for k in INTERVENTION_COLUMNS[1:]}
        out.update(cell_id=self.cell_id, positions=str(Positions.parse(self.positions)))
        out.update({f"ref_{k}": v for k, v in self.refs})
        if self.kind == "knockout":
            out["knockout"] = self.edges
        return out


# ---------------------------------------------------------------- the grid's kinds, sites and checks


def site_settings(iv) -> list[tuple[str, Any, Any, Any, str]]:
    """(site, positions, heads, neurons, the field its errors name) of every site, in order: a
    plain site takes the section's settings, a mapping its own where it gives them."""
    out = []
    for i, x in enumerate(axis(iv.site)):
        if isinstance(x, str):
            out.append((x, iv.positions, iv.heads, iv.neurons, "intervention.site"))
        else:
            own = [iv.positions if x.positions is None else x.positions]
            own += [iv.heads if x.heads is None else x.heads, iv.neurons if x.neurons is None else x.neurons]
            out.append((x.site, *own, f"intervention.site[{i}]"))
    return out


def site_hooks(config, layers: list[int]) -> list[str]:
    """Every hook name of the intervention grid: each site, {layer} filled with each layer."""
    out = []
    for site, *_ in site_settings(config.intervention):
        out += [site.format(layer=l) for l in layers] if "{layer}" in site else [site]
    return list(dict.fromkeys(out))


def intervention_kinds(config, rows: list[PromptRow], base: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(kind, its field values as plain data) for every kind x strength of the grid; vectors and
    prompt files are read here, before any weights load."""
    from patchscope_core.interventions import load_vector

    iv = config.intervention
    reference = prompt_list(iv.reference, base, "intervention.reference") or tuple(
        dict.fromkeys(r.prompt for r in rows)
    )
    vector = (
        load_vector(locate(iv.vector, base, "intervention.vector"), "intervention.vector").tolist()
        if iv.vector
        else None
    )
    out = []
    for kind in axis(iv.kind):
        if kind == "add":
            extra = (
                {"vector": vector}
                if vector is not None
                else {
                    "positive": list(prompt_list(iv.positive, base, "intervention.positive")),
                    "negative": list(prompt_list(iv.negative, base, "intervention.negative")),
                }
            )
            out += [(kind, {"alpha": float(a), **extra}) for a in axis(iv.alpha)]
        elif kind == "scale":
            out += [(kind, {"factor": float(f)}) for f in axis(iv.factor)]
        elif kind == "noise":
            out += [
                (kind, {"scale": float(x), "reference": list(reference), "seed": int(sd)})
                for x in axis(iv.noise_scale)
                for sd in axis(iv.seed)
            ]
        elif kind == "mean":
            out.append((kind, {"reference": list(reference)}))
        elif kind == "resample":
            out.append((kind, {"source": iv.source}))
        elif kind == "replace":
            out.append(
                (
                    kind,
                    {"vector": vector}
                    if vector is not None
                    else {"source": iv.source, "source_position": iv.source_position},
                )
            )
        elif kind == "knockout":  # each item of `to` is one key set (a word, a position or a list of them)
            queries = [q for q in axis(iv.from_)]
            out += [
                (kind, {"from": queries, "to": list(axis(t)), "window": int(w)})
                for t in axis(iv.to)
                for w in axis(iv.window)
            ]
        else:
            out.append((kind, {}))
    return out


def count_kinds(config) -> int:
    """How many (kind, strength) entries `intervention_kinds` gives, by arithmetic (nothing read)."""
    iv, n = config.intervention, 0
    for kind in axis(iv.kind):
        n += {
            "add": len(axis(iv.alpha)),
            "scale": len(axis(iv.factor)),
            "noise": len(axis(iv.noise_scale)) * len(axis(iv.seed)),
            "knockout": len(axis(iv.to)) * len(axis(iv.window)),
        }.get(kind, 1)
    return n


STRENGTH_KINDS = ("add", "scale", "noise")  # kinds whose entries differ in strength only: one check per kind suffices


KNOCKOUT_FIELDS = ("from_", "to", "window")  # in the config hash only where a knockout uses them (older hashes stay)


def with_subject(kind, subject: str | None):
    """A knockout gets its row's subject (for `to: subject / non_subject`); other kinds are as they are."""
    import dataclasses

    return dataclasses.replace(kind, subject=subject) if kind.name == "knockout" else kind


def edges_label(values: dict[str, Any]) -> str:
    words = lambda v: " ".join(str(x) for x in v)  # noqa: E731
    return f"{words(values['from'])} -> {words(values['to'])}, window {values['window']}"


def units(spec: Any, count: int) -> list[int | None]:
    if spec is None:
        return [None]
    return list(range(count)) if spec == "all" else list(spec)


def _check_model(config, plan: ModelPlan, rows: list[PromptRow], kinds) -> None:
    """Sites, heads and neurons, positions and every kind on every prompt, on one model."""
    from patchscope_core import Intervention, InterventionRun, Positions, Site, Zero
    from patchscope_core.interventions import make_kind, resolve_run
    from patchscope_core.models.sites import resolve_site

    iv, info = config.intervention, plan.info
    grid = _hooks_and_units(config, plan)  # heads where a site has them (attn.hook_z), neurons likewise (mlp.hook_post)
    sites = [Site(h, head=() if hd is None else (hd,), neuron=() if nr is None else (nr,)) for h, hd, nr, _ in grid]
    for site, _, heads, neurons, field_name in site_settings(iv):  # a mapping's own heads or neurons
        if field_name == "intervention.site":
            continue
        for key, values, owner in (("heads", heads, "attn.hook_z"), ("neurons", neurons, "mlp.hook_post")):
            if values is not None and values != getattr(iv, key) and not site.endswith(owner):
                raise ConfigError(f"{field_name}.{key}: {site} has no {key} (only {owner} does)")
    hooks = site_hooks(config, plan.source_layers)
    for key, unit in (("heads", "head"), ("neurons", "neuron")):  # given, but no site takes them: the core says why
        values = getattr(iv, key)
        if values is not None and all(getattr(s_, unit) == () for s_ in sites):
            first = 0 if values == "all" else values[0]
            sites.append(Site(hooks[0], **{unit: (first,)}))
    for site in sites:
        resolve_site(site, info, "intervention.site")
    positions = Positions.parse(iv.positions, "intervention.positions")
    for _, own, _, _, field_name in site_settings(iv):  # each mapping's own positions, on every prompt
        if own is not iv.positions:
            where = f"{field_name}.positions"
            for row in rows:
                at = (Intervention(sites[0], Zero(), Positions.parse(own, where)),)
                run = InterventionRun(row.prompt, at, row.answer, config.generation.max_new_tokens)
                resolve_run(run, info, f"{where} ({row.where})")
    checked = set()
    for kind, values in kinds:
        # add, scale and noise entries differ only in strength (alpha, factor, scale, seed: checked by the types)
        same = kind if kind in STRENGTH_KINDS else digest([kind, values])
        if same in checked:
            continue
        checked.add(same)
        k = make_kind(kind, values, "intervention.kind")
        spans = any(v in ("subject", "non_subject") for v in getattr(k, "to", ()))  # a knockout's keys need the subject
        for row in rows:
            if spans and row.subject is not None:  # the column's fault, named as causal_trace names it
                subject_span(info, row.prompt, row.subject, f"prompts.subject_column ({row.where})")
            run = InterventionRun(
                row.prompt,
                (Intervention(sites[0], with_subject(k, row.subject), positions),),
                row.answer,
                config.generation.max_new_tokens,
            )
            resolve_run(run, info, f"intervention ({row.where})")


def _check_contrast(config, rows: list[PromptRow]) -> None:
    """report.contrast names a reference column of the prompts and values it holds."""
    c = config.report.contrast
    if c is None:
        return
    values = {str(dict(r.refs).get(c.column)) for r in rows if c.column in dict(r.refs)}
    if not values:
        raise ConfigError(
            f"report.contrast.column: {c.column!r} is not a reference column of the prompts (prompts.reference_columns)"
        )
    for side in ("plus", "minus"):
        if str(getattr(c, side)) not in values:
            raise ConfigError(
                f"report.contrast.{side}: no prompt has {c.column} = {getattr(c, side)!r} "
                f"(it holds {', '.join(sorted(values))})"
            )


def _hooks_and_units(config, plan: ModelPlan) -> list[tuple[str, int | None, int | None, Any]]:
    """(hook, head, neuron, positions) of every point of the grid but the prompts and kinds."""
    iv, info = config.intervention, plan.info
    if not any(isinstance(x, InterventionSite) for x in axis(iv.site)):  # the section's settings for every site
        out = []
        for hook in site_hooks(config, plan.source_layers):
            heads = units(iv.heads, info.n_heads) if hook.endswith("attn.hook_z") else [None]
            neurons = units(iv.neurons, info.d_mlp) if hook.endswith("mlp.hook_post") else [None]
            out += [(hook, h, n, iv.positions) for h in heads for n in neurons]
        return out
    out, seen = [], set()
    for site, positions, head_spec, neuron_spec, _ in site_settings(iv):
        for hook in [site.format(layer=l) for l in plan.source_layers] if "{layer}" in site else [site]:
            if hook in seen:
                continue
            seen.add(hook)
            heads = units(head_spec, info.n_heads) if hook.endswith("attn.hook_z") else [None]
            neurons = units(neuron_spec, info.d_mlp) if hook.endswith("mlp.hook_post") else [None]
            out += [(hook, h, n, positions) for h in heads for n in neurons]
    return out


# ---------------------------------------------------------------- the report


def _given(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def _variant(df) -> list[str]:
    """A label per row for what was done: kind and strength (alpha, factor, noise scale, seed)."""
    labels = []
    for r in df.itertuples():
        extra = [f"{k}={getattr(r, k):g}" for k in ("alpha", "factor", "noise_scale") if _given(getattr(r, k, None))]
        if _given(getattr(r, "seed", None)) and r.kind == "noise":
            extra.append(f"seed={int(r.seed)}")
        labels.append(" ".join([r.kind] + extra))
    return labels


def _delta_heatmap(
    plt,
    pivot,
    path: Path,
    title: str,
    xticks: list[str],
    size: tuple[float, float],
    xlabel=None,
    rotate: bool = False,
    cbar: str = "mean delta_logprob",
) -> Path:
    """A layer x (head or site) picture of the report's measure, centred on 0."""
    fig, ax = plt.subplots(figsize=size)
    lim = float(np.nanmax(np.abs(pivot.to_numpy()))) or 1.0
    im = ax.imshow(pivot.to_numpy(dtype=float), aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, origin="lower")
    ax.set_xticks(range(pivot.shape[1]), xticks, **({"rotation": 30, "ha": "right"} if rotate else {}))
    ax.set_yticks(range(pivot.shape[0]), [str(int(l)) for l in pivot.index])
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(pictures.literal(title), fontsize=9, **({} if rotate else {"wrap": True}))
    fig.colorbar(im, ax=ax, label=pictures.literal(pictures.short(cbar, 40)), fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


REPORT_METRICS = ("delta_logprob", "answer_logprob", "p_answer", "p_change_pct")
_GROUP = ("model", "site", "layer", "head", "neuron", "variant")


def measured(df, settings: dict | None):
    """(frame, label): per (model, site, layer, head or neuron, variant) the `value` the report
    shows and the `prompts` behind it, and what it is, in words: the mean of `report.metric`
    (default delta_logprob) over prompts, or with `report.contrast` the mean over the `plus`
    rows minus the mean over the `minus` rows."""
    settings = settings or {}
    metric = settings.get("metric") or "delta_logprob"
    keys = [c for c in _GROUP if c in df]
    df = df[df[metric].notna()]
    contrast = settings.get("contrast")
    if not contrast:
        g = df.groupby(keys, dropna=False)[metric].agg(value="mean", prompts="count").reset_index()
        return g, f"mean {metric}"
    col = f"ref_{contrast['column']}"
    sides = [
        df[df[col].astype(str) == str(contrast[side])].groupby(keys, dropna=False)[metric].agg(["mean", "count"])
        for side in ("plus", "minus")
    ]
    g = sides[0].merge(sides[1], left_index=True, right_index=True, suffixes=("_plus", "_minus"))
    g = g.assign(value=g["mean_plus"] - g["mean_minus"], prompts=g["count_plus"] + g["count_minus"]).reset_index()
    return g, (
        f"mean {metric} where {contrast['column']}={contrast['plus']} minus where "
        f"{contrast['column']}={contrast['minus']}"
    )


def _head_pictures(plt, out_dir: Path, heads, label: str, out: dict[str, Path]) -> list:
    top = []
    for (model, variant), g in heads.groupby(["model", "variant"], sort=False):
        pivot = g.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
        key = f"{pictures.safe_name(model)}_layer_x_head" + (
            "" if heads["variant"].nunique() == 1 else f"_{pictures.safe_name(variant)}"
        )
        out[key] = _delta_heatmap(
            plt,
            pivot,
            out_dir / f"heatmap_{key}.png",
            f"{model}: {variant} of each head; {label} over {int(g['prompts'].max())} prompts",
            [str(int(h)) for h in pivot.columns],
            (2.5 + 0.5 * pivot.shape[1], 1.5 + 0.25 * pivot.shape[0]),
            xlabel="head",
            cbar=label,
        )
        top.append(g[["model", "variant", "layer", "head", "value", "prompts"]])
    return top


def knockout_curves(df, n_boot: int = 1000, seed: int = 0):
    """Geva et al.'s curves: per model, knockout (edges) and window centre, the mean % change of
    p(answer's first token) over the prompts, with a 95% percentile bootstrap interval over prompts."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    out = []
    for (model, edges, layer), g in df.groupby(["model", "knockout", "layer"], sort=True):
        v = g["p_change_pct"].to_numpy(dtype=float)
        boot = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
        out.append(
            {
                "model": model,
                "knockout": edges,
                "layer": int(layer),
                "mean": v.mean(),
                "low": np.percentile(boot, 2.5),
                "high": np.percentile(boot, 97.5),
                "prompts": len(v),
            }
        )
    return pd.DataFrame(out)


def _knockout_pictures(plt, out_dir: Path, df, out: dict[str, Path]) -> None:
    ko = df[(df["kind"] == "knockout") & df.get("p_change_pct", df["kind"]).notna()] if "knockout" in df else df[:0]
    if ko.empty or "p_change_pct" not in ko:
        return
    curves = knockout_curves(ko)
    out["knockout_curves"] = out_dir / "knockout_curves.csv"
    curves.to_csv(out["knockout_curves"], index=False)
    for model, g in curves.groupby("model", sort=False):
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for edges, c in g.groupby("knockout", sort=True):
            ax.plot(c["layer"], c["mean"], marker="o", ms=3, label=pictures.literal(edges))
            ax.fill_between(c["layer"], c["low"], c["high"], alpha=0.2)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("layer (window centre)")
        ax.set_ylabel("% change of p(answer)")
        ax.set_title(
            pictures.literal(
                f"{model}: attention knockout, mean over {int(g['prompts'].max())} prompts (95% bootstrap band)"
            ),
            fontsize=9,
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        key = f"knockout_{pictures.safe_name(model)}"
        out[key] = out_dir / f"{key}.png"
        fig.savefig(out[key], dpi=110)
        plt.close(fig)


def intervention_report(out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
    """Knockout curves; layer x head heatmaps (per kind and strength) and the top heads, or a
    layer x site heatmap, of the report's measure (`measured`); the steered generations by alpha."""
    import pandas as pd

    plt = pictures.plt()
    out: dict[str, Path] = {}
    df = df.copy()
    df["variant"] = _variant(df)
    scored = df[df["delta_logprob"].notna()]  # rows with an answer to score
    _knockout_pictures(plt, out_dir, scored, out)
    if "knockout" in scored:  # drawn as curves above, not as a layer x site heatmap
        scored = scored[scored["kind"] != "knockout"]
    values, label = measured(scored, settings)
    top = _head_pictures(plt, out_dir, values[values["head"].notna()], label, out) if "head" in values else []
    if top:
        table = pd.concat(top, ignore_index=True).sort_values("value", key=abs, ascending=False).head(30)
        table = table.rename(columns={"value": "contrast" if " minus " in label else label.replace(" ", "_")})
        out["top_heads"] = out_dir / "top_heads.csv"
        table.to_csv(out["top_heads"], index=False)
    rest = values[values["head"].isna()] if "head" in values else values
    for model, g in rest.groupby("model", sort=False):
        if g.empty or g["layer"].isna().all():
            continue
        g = g.assign(what=[f"{s.split('.')[-1]} {v}" for s, v in zip(g["site"], g["variant"])])
        pivot = g.pivot_table(index="layer", columns="what", values="value", aggfunc="mean")
        key = f"{pictures.safe_name(model)}_layer_x_site"
        out[key] = _delta_heatmap(
            plt,
            pivot,
            out_dir / f"heatmap_{key}.png",
            f"{model}: {label} over {int(g['prompts'].max())} prompts, per site, kind and strength",
            [pictures.literal(c) for c in pivot.columns],
            (3 + 1.2 * pivot.shape[1], 1.5 + 0.25 * pivot.shape[0]),
            rotate=True,
            cbar=label,
        )
    for model, g in df[df["kind"] == "add"].groupby("model", sort=False):
        table = g.pivot_table(index=["prompt", "layer"], columns="alpha", values="generated_text", aggfunc="first")
        table.insert(0, "baseline", g.groupby(["prompt", "layer"])["baseline_generated_text"].first())
        table.columns = [c if c == "baseline" else f"alpha={c:g}" for c in table.columns]
        out[f"steering_{pictures.safe_name(model)}"] = out_dir / f"steering_{pictures.safe_name(model)}.csv"
        table.to_csv(out[f"steering_{pictures.safe_name(model)}"])
    return out


class InterventionKind(KindDefaults):
    name = "intervention"
    packs = True  # its cells batch together whatever their group: tasks span many groups
    sections = {"prompts": PromptsConfig, "intervention": InterventionConfig}
    operation = "intervention"
    schema = Schema(
        INTERVENTION_COLUMNS,
        INTERVENTION_RESULTS,
        INTERVENTION_TABLE,
        ("generated_token_ids",),
        (
            "row",
            "layer",
            "head",
            "neuron",
            "alpha",
            "factor",
            "noise_scale",
            "seed",
            "delta_logprob",
            "answer_logprob",
            "baseline_answer_logprob",
        ),
        ("prompt", "site", "kind"),
        # knockout curves, the measures `report.metric` may name, the steering table
        ("knockout", *REPORT_METRICS, "generated_text", "baseline_generated_text"),
    )
    marks = frozenset({"delta_logprob"})
    report_metrics = REPORT_METRICS  # what `report.metric` may name
    renamed = BASELINE  # old column names -> new, for stores written before

    def load_rows(self, config, base: Path | None) -> list[PromptRow]:
        return load_prompt_rows(config, base)

    def check(self, config, rows: list[PromptRow], base: Path | None) -> dict[str, ModelPlan]:
        """Layers, sites, heads and neurons, kinds, positions, answers and context on each model."""
        n_kinds = count_kinds(config)
        n_rows = sum(len(g) for m, g in study_groups(config, rows, by_fact=False) if m == config.models[0])
        plans, n_cells = {}, 0
        for name, plan in model_plans(config, rows, "intervention"):  # count first: nothing per cell is built yet
            n_cells += n_rows * len(_hooks_and_units(config, plan)) * n_kinds
            config.execution.check_cells(n_cells)
            plans[name] = plan
        kinds = intervention_kinds(config, rows, base)
        _check_contrast(config, rows)
        for name, plan in plans.items():
            try:
                count_tokens(plan, rows, config.generation.max_new_tokens)
                _check_model(config, plan, rows, kinds)
            except PatchscopeError as exc:
                raise ConfigError(f"{exc} (on {name})") from None
            plans[name] = plan
        check_prompt_answers(
            config,
            plans,
            rows,
            "answer_logprob sums the log-probabilities of every answer token (teacher-forced); "
            "p_answer is the probability of its first token",
        )
        return plans

    def context(self, config, rows: list[PromptRow], base: Path | None) -> dict[str, Any]:
        """The grid's table of kinds: (kind, values) by the digest of both."""
        return {digest([k, v]): (k, v) for k, v in intervention_kinds(config, rows, base)}

    def science(self, science, config, rows, context):
        if "knockout" not in axis(config.intervention.kind):
            science["intervention"] = {k: v for k, v in science["intervention"].items() if k not in KNOCKOUT_FIELDS}
        return prompt_rows_science(science, rows, context)

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        for model, group in study_groups(config, rows, by_fact=False):
            yield model, len(group) * len(_hooks_and_units(config, plans[model])) * len(context)

    def cells(self, config, rows, plans, context) -> Iterator[InterventionCell]:
        gen, max_new = generation_key(config), config.generation.max_new_tokens
        for model, group in study_groups(config, rows, by_fact=False):
            for row in group:
                for hook, head, neuron, positions in _hooks_and_units(config, plans[model]):
                    layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else None
                    for variant, (kind, values) in context.items():
                        yield InterventionCell(
                            model,
                            row.prompt,
                            row.answer,
                            hook,
                            layer,
                            head,
                            neuron,
                            kind,
                            variant,
                            values.get("alpha"),
                            values.get("factor"),
                            values.get("scale"),
                            values.get("seed"),
                            positions,
                            row.index,
                            row.refs,
                            gen,
                            max_new,
                            row.subject if kind == "knockout" else None,
                            edges_label(values) if kind == "knockout" else None,
                        )

    def payload(self, task) -> dict[str, Any]:
        """Each cell as the core's InterventionRun, in the core's plain-data form (run_to_dict)."""
        from patchscope_core import Intervention, InterventionRun, Site
        from patchscope_core.interventions import make_kind, run_to_dict

        kinds = {v: make_kind(*task.context[v]) for v in dict.fromkeys(c.variant for c in task.cells)}
        runs = []
        for c in task.cells:
            site = Site(
                c.site, head=() if c.head is None else (c.head,), neuron=() if c.neuron is None else (c.neuron,)
            )
            kind = with_subject(kinds[c.variant], c.subject)
            run = InterventionRun(c.prompt, (Intervention(site, kind, c.positions),), c.answer, c.max_new_tokens)
            runs.append(run_to_dict(run))
        return {"kind": self.operation, "runs": runs}

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for cell, rec in zip(task.cells, output["records"], strict=True):
            row = cell.params()
            row.update({BASELINE.get(k, k): v for k, v in rec.items() if BASELINE.get(k, k) in INTERVENTION_RESULTS})
            row.update({c: rec.get(c) for c in STEERING_NORMS})  # every row: one schema per file
            row["max_new_tokens"] = cell.max_new_tokens
            a, c = rec["answer_logprob"], rec["clean_answer_logprob"]
            row["delta_logprob"] = None if a is None or c is None else a - c
            if cell.kind == "knockout" and rec.get("p_answer") is not None and rec.get("p_answer_clean"):
                row["p_change_pct"] = 100.0 * (rec["p_answer"] - rec["p_answer_clean"]) / rec["p_answer_clean"]
            row.update(run_columns(output, rec))
            rows.append(row)
        return rows

    def describe(self, config, plan: ModelPlan, context) -> str:
        iv = config.intervention
        kinds = sorted({k for k, _ in context.values()})
        if any(isinstance(x, InterventionSite) for x in axis(iv.site)):
            each = "; ".join(
                f"{site} positions {p}" + (f" heads {h}" if h else "") + (f" neurons {n}" if n else "")
                for site, p, h, n, _ in site_settings(iv)
            )
            return (
                f"layers {plan.source_layers} x sites [{each}] x "
                f"{len(context)} kind(s) and strength(s) ({', '.join(kinds)})"
            )
        return (
            f"layers {plan.source_layers} x site {iv.site} x heads {iv.heads or '-'} x neurons {iv.neurons or '-'} x "
            f"{len(context)} kind(s) and strength(s) ({', '.join(kinds)}), positions {iv.positions}"
        )

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        return intervention_report(out_dir, df, settings)

    def summary(self, df, max_rows: int = 15) -> str:
        # every axis the sweep varied is a group (kind and strength: the variant), never averaged over
        df = df.assign(variant=_variant(df))
        keys = [c for c in ("model", "site", "head", "neuron", "variant") if c in df]
        g = df.groupby(keys, dropna=False)["delta_logprob"].agg(["mean", "count"]).reset_index()
        g = g.sort_values("mean", key=abs, ascending=False).head(max_rows)
        lines = [
            "== the interventions that change the answer's log-probability most (mean over prompts, "
            "per site, head or neuron, kind and strength)"
        ]
        lines += [
            f"  {r.model} {r.site}{'' if r.head != r.head else f' head {int(r.head)}'}"
            f"{'' if getattr(r, 'neuron', None) is None or r.neuron != r.neuron else f' neuron {int(r.neuron)}'} "
            f"{r.variant}: {r.mean:+.3f} ({r.count} prompts)"
            for r in g.itertuples()
        ]
        return "\n".join(lines)

    def summary_figures(self, df) -> dict[str, Any]:
        """Per knockout (edges): the largest drop of p(answer), the lowest mean % change over prompts
        (`knockout/<edges>/largest_drop_pct`, its `_layer`: the window centre); of the other
        scored interventions, the one whose mean delta_logprob over prompts is largest in size
        (`largest_effect`, `largest_effect_at` in words) and of those on heads `top_head`
        (<site> L<layer>H<head> <variant>) with `top_head_delta_logprob`."""
        out: dict[str, Any] = {}
        scored = df[df["delta_logprob"].notna()].assign(variant=lambda d: _variant(d))
        if "knockout" in scored and "p_change_pct" in scored:
            ko = scored[(scored["kind"] == "knockout") & scored["p_change_pct"].notna()]
            for edges, g in ko.groupby("knockout", sort=True):
                means = g.groupby("layer")["p_change_pct"].mean()
                out[f"knockout/{edges}/largest_drop_pct"] = float(means.min())
                out[f"knockout/{edges}/largest_drop_layer"] = int(means.idxmin())
            scored = scored[scored["kind"] != "knockout"]
        keys = [c for c in ("site", "layer", "head", "neuron", "variant") if c in scored]
        means = scored.groupby(keys, dropna=False)["delta_logprob"].mean().dropna().reset_index()
        if len(means):
            best = means.loc[means["delta_logprob"].abs().idxmax()]
            out["largest_effect"] = float(best["delta_logprob"])
            out["largest_effect_at"] = _where(best)
        heads = means[means["head"].notna()] if "head" in means else means[:0]
        if len(heads):
            best = heads.loc[heads["delta_logprob"].abs().idxmax()]
            out["top_head"] = _where(best)
            out["top_head_delta_logprob"] = float(best["delta_logprob"])
        return out

    def curves(self, df) -> dict[str, Curve]:
        """The knockout curves: mean % change of p(answer) by window centre, one line per knockout."""
        if "knockout" not in df or "p_change_pct" not in df:
            return {}
        ko = df[(df["kind"] == "knockout") & df["p_change_pct"].notna() & df["delta_logprob"].notna()]
        if ko.empty:
            return {}
        frame = knockout_curves(ko, n_boot=1)[["knockout", "layer", "mean"]].rename(columns={"mean": "p_change_pct"})
        return {
            "knockout": Curve(
                frame, "layer", "p_change_pct", "knockout", "attention knockout: mean % change of p(answer)"
            )
        }


def _where(r) -> str:
    """An intervention in words: site, L<layer>, H<head> or N<neuron>, variant."""
    unit = "".join(f"{k}{int(r[c])}" for k, c in (("H", "head"), ("N", "neuron")) if c in r and _given(r[c]))
    layer = f" L{int(r['layer'])}" if "layer" in r and _given(r["layer"]) else ""
    return f"{r['site']}{layer}{unit} {r['variant']}"


KIND = InterventionKind()
