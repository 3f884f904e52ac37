"""The second stage of the config, after `sweeps.config` (types) and `sweeps.rows` (the prompts):
every setting checked against each model's config and tokenizer, never its weights, and the
plan the grid is built from (`ModelPlan`: layers, token counts) with the hash that identifies
the sweep's results (`config_hash`).

- `check_against_models` (Patchscope sweeps): layer ranges, positions against the tokenized
  prompts, prompt + max_new_tokens against each model's context;
- `check_studies` (intervention, causal-trace and recipe sweeps): layers, sites, heads and
  neurons, kinds, positions, answers, subjects, context.
Every error is a `ConfigError` whose message starts with the field, e.g.
`source.layers: 31 is out of range 0 .. 29 for smollm2-135m (...)`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchscope_core import ModelInfo, PatchscopeError, model_info, tokenize
from patchscope_core.spec import check_layer, context_problem, resolve_position

from .config import KIND_SECTIONS, ConfigError, SweepConfig, axis, expand_layers
from .rows import PromptRow, Row, locate, prompt_list


@dataclass
class ModelPlan:
    """What one model runs: its layers and the token count of every prompt."""

    info: ModelInfo
    source_layers: list[int]
    target_layers: list[int] | None  # None: same as the source layer
    n_tokens: dict[str, int] = field(default_factory=dict)


def checked_layers(spec: Any, info: ModelInfo, field_name: str) -> list[int]:
    try:
        layers = expand_layers(spec, info.n_layers)
    except ValueError as exc:
        raise ConfigError(f"{field_name}: {exc}") from None
    for layer in layers:
        check_layer(layer, info, field_name)
    return layers


def _prompt_field(config: SweepConfig, row: Row, role: str) -> str:
    """Where a row's source or target prompt was given, as the start of an error message."""
    if role == "target":
        return "target.prompt" if config.target.prompt is not None else f"target.prompt_column: {row.where}"
    return row.where if config.source.prompts is not None else f"source.prompt_column: {row.where}"


def _check_context(config: SweepConfig, info: ModelInfo, row: Row, role: str, n: int) -> None:
    """A source prompt must fit the model's context; a target prompt with max_new_tokens too."""
    new = config.generation.max_new_tokens if role == "target" else 0
    problem = context_problem(n, new, info)
    if problem:
        prompt = row.target_prompt if role == "target" else row.source_prompt
        why = ", the new ones from generation.max_new_tokens" if n <= info.n_ctx else ""
        raise ConfigError(f"{_prompt_field(config, row, role)}: {problem}{why} ({role} prompt {prompt[:40]!r})")


def check_against_models(config: SweepConfig, rows: list[Row]) -> dict[str, ModelPlan]:
    """Layers against each model's config, positions against each tokenized prompt, prompt
    lengths and max_new_tokens against each model's context; reads configs and tokenizers only,
    never weights. Raises ConfigError naming the field."""
    plans = {}
    for i, name in enumerate(config.models):
        try:
            info = model_info(name)
        except PatchscopeError as exc:
            msg = str(exc).removeprefix("model: ")
            raise ConfigError(f"models[{i}]: {msg}") from None
        if info.n_ctx and config.generation.max_new_tokens >= info.n_ctx:
            raise ConfigError(f"generation.max_new_tokens: {config.generation.max_new_tokens} does not fit {name}'s "
                              f"context of {info.n_ctx} tokens (prompt tokens + new tokens must be at most {info.n_ctx})")
        try:
            plan = ModelPlan(
                info,
                checked_layers(config.source.layers, info, "source.layers"),
                None if config.target.layers == "same" else checked_layers(config.target.layers, info, "target.layers"),
            )
            for row in rows:
                for prompt, role, positions in (
                    (row.source_prompt, "source", config.source.positions),
                    (row.target_prompt, "target", config.target.positions),
                ):
                    if prompt in plan.n_tokens and role == "target":
                        n = plan.n_tokens[prompt]
                    else:
                        n = len(tokenize(info, prompt, f"{role}.prompt"))
                        plan.n_tokens[prompt] = n
                    _check_context(config, info, row, role, n)
                    if positions == "all":
                        continue
                    for p in positions:
                        try:
                            resolve_position(p, n, f"{role}.positions")
                        except PatchscopeError as exc:
                            raise ConfigError(f"{exc} ({role} prompt {prompt[:60]!r} of {row.where}, on {name})") from None
        except PatchscopeError as exc:
            raise ConfigError(str(exc)) from None
        plans[name] = plan
    return plans


def site_hooks(config: SweepConfig, layers: list[int]) -> list[str]:
    """Every hook name of the intervention grid: each site, {layer} filled with each layer."""
    out = []
    for site in axis(config.intervention.site):
        out += [site.format(layer=l) for l in layers] if "{layer}" in site else [site]
    return list(dict.fromkeys(out))


def intervention_kinds(config: SweepConfig, rows: list[PromptRow], base: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """(kind, its field values as plain data) for every kind x strength of the grid; vectors and
    prompt files are read here, before any weights load."""
    from patchscope_core.interventions import load_vector

    iv = config.intervention
    reference = prompt_list(iv.reference, base, "intervention.reference") or tuple(dict.fromkeys(r.prompt for r in rows))
    vector = load_vector(locate(iv.vector, base, "intervention.vector"), "intervention.vector").tolist() if iv.vector else None
    out = []
    for kind in axis(iv.kind):
        if kind == "add":
            extra = ({"vector": vector} if vector is not None else
                     {"positive": list(prompt_list(iv.positive, base, "intervention.positive")),
                      "negative": list(prompt_list(iv.negative, base, "intervention.negative"))})
            out += [(kind, {"alpha": float(a), **extra}) for a in axis(iv.alpha)]
        elif kind == "scale":
            out += [(kind, {"factor": float(f)}) for f in axis(iv.factor)]
        elif kind == "noise":
            out += [(kind, {"scale": float(x), "reference": list(reference), "seed": int(sd)})
                    for x in axis(iv.noise_scale) for sd in axis(iv.seed)]
        elif kind == "mean":
            out.append((kind, {"reference": list(reference)}))
        elif kind == "resample":
            out.append((kind, {"source": iv.source}))
        elif kind == "replace":
            out.append((kind, {"vector": vector} if vector is not None else
                        {"source": iv.source, "source_position": iv.source_position}))
        else:
            out.append((kind, {}))
    return out


def units(spec: Any, count: int) -> list[int | None]:
    if spec is None:
        return [None]
    return list(range(count)) if spec == "all" else list(spec)


def check_studies(config: SweepConfig, rows: list[PromptRow], base: Path | None = None) -> dict[str, ModelPlan]:
    """Checks of an intervention or causal-trace sweep against each model, before any weights
    load: layers, sites, heads and neurons, kinds, positions, answers, subjects, context."""
    from patchscope_core import Intervention, InterventionRun, Positions, Site
    from patchscope_core.interventions import make_kind, resolve_run
    from patchscope_core.sites import resolve_site
    from patchscope_core.tracing import TRACE_SITES, subject_span

    if config.kind == "recipe":
        from .recipe_rows import check_recipe

        return check_recipe(config, rows, base)
    plans = {}
    kinds = intervention_kinds(config, rows, base) if config.kind == "intervention" else []
    for i, name in enumerate(config.models):
        try:
            info = model_info(name)
        except PatchscopeError as exc:
            raise ConfigError(f"models[{i}]: {str(exc).removeprefix('model: ')}") from None
        section = config.intervention if config.kind == "intervention" else config.trace
        field_name = "intervention" if config.kind == "intervention" else "trace"
        layers = checked_layers(section.layers, info, f"{field_name}.layers")
        plan = ModelPlan(info, layers, None)
        try:
            for row in rows:
                plan.n_tokens[row.prompt] = len(tokenize(info, row.prompt, f"prompts ({row.where})"))
            if config.kind == "causal_trace":
                for row in rows:
                    subject_span(info, row.prompt, row.subject, f"prompts.subject_column ({row.where})")
                    if not info.tokenizer(row.answer, add_special_tokens=False)["input_ids"]:
                        raise ConfigError(f"prompts.answer_column: {row.where} has an answer without tokens")
                    if section.positions != "all":
                        for p in section.positions:
                            resolve_position(p, plan.n_tokens[row.prompt], f"trace.positions ({row.where})")
                for site in section.sites:
                    resolve_site(Site(TRACE_SITES[site].format(l=layers[0])), info, "trace.sites")
                plans[name] = plan
                continue
            iv = config.intervention
            hooks = site_hooks(config, layers)
            sites = [Site(h, head=tuple(h_ for h_ in [hd] if h_ is not None), neuron=tuple(n for n in [nr] if n is not None))
                     for h in hooks for hd in units(iv.heads, info.n_heads) for nr in units(iv.neurons, info.d_mlp)]
            for site in sites:
                resolve_site(site, info, "intervention.site")
            positions = Positions.parse(iv.positions, "intervention.positions")
            for kind, values in kinds:
                k = make_kind(kind, values, "intervention.kind")
                for row in rows:
                    run = InterventionRun(row.prompt, (Intervention(sites[0], k, positions),), row.answer,
                                          config.generation.max_new_tokens)
                    resolve_run(run, info, f"intervention ({row.where})")
        except PatchscopeError as exc:
            raise ConfigError(f"{exc} (on {name})") from None
        plans[name] = plan
    return plans


def config_hash(config: SweepConfig, rows: list, context: Any = None) -> str:
    """Hash of everything that decides the results (models, prompts, layers, positions,
    generation; a study's kinds with the vectors and prompt sets read from their files);
    execution and output settings may change between resumed runs."""
    sections = set(KIND_SECTIONS[config.kind]) | {"kind", "models", "generation"}
    science = config.model_dump(mode="json", include=sections, exclude_defaults=False)
    if config.kind == "patchscope":
        science.pop("kind")  # hashes of patchscope sweeps stay what they were
        science["source"].pop("file", None)  # the rows stand for the file's content
        science["rows"] = [[r.source_prompt, r.target_prompt, [list(x) for x in r.refs]] for r in rows]
    elif config.kind == "recipe":
        science["rows"] = rows  # the recipe's rows as read from its data (plain data)
        science["context"] = context
    else:
        science["prompts"].pop("file", None)
        science["rows"] = [[r.prompt, r.answer, r.subject, [list(x) for x in r.refs]] for r in rows]
        science["context"] = context
    blob = json.dumps(science, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
