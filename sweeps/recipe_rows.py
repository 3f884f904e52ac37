"""The rows of a recipe sweep (`kind: recipe`), read from the recipe's data and checked against
every model before any weights load (the config stage of `kind: recipe`: `sweeps/rows.py` and
`sweeps/plan.py` dispatch here).

- `load_recipe_rows`: the recipe's input rows as plain data, through the loaders of
  `patchscope_core.recipes`: windows of the corpus (`{"text": ...}`), LRE facts, entities with
  their references, two-hop chains;
- `fit_windows`: the windows the tuned lens or the cross-model maps are fitted on, disjoint
  from the evaluated ones;
- `recipe_for`: the recipe (a `patchscope_core.recipes.Recipe`) with one model's layers;
- `check_recipe`: layers against each model, every prompt (plus max_new_tokens) against its
  context, positions against each window, a shared tokenizer and enough fit vectors for the maps.
Every error is a ConfigError naming its field, e.g. `recipe.relations: no relation 'x' in ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchscope_core import ModelInfo, PatchscopeError, model_info, tokenize
from patchscope_core.recipes import (AttributeExtraction, CrossModel, EntityDescription, MultiHop, Recipe,
                                     TokenIdentity, corpus_windows, load_chains, load_entities, load_lre,
                                     positions_in, pydoc_text)
from patchscope_core.recipes.lenses import _aligned
from patchscope_core.spec import context_problem

from .config import ConfigError, SweepConfig, read_text
from .plan import ModelPlan, checked_layers
from .rows import locate

CORPUS_RECIPES = ("token_identity", "cross_model")
# The four LRE relations shipped with the examples (sweeps/examples/lre/README.md): recipe.data by default.
SHIPPED_LRE = Path(__file__).resolve().parent / "examples" / "lre"


def _corpus(config: SweepConfig, base: Path | None) -> tuple[list[str], list[str]]:
    rs = config.recipe
    text = pydoc_text() if rs.corpus == "pydoc" else read_text(locate(rs.corpus, base, "recipe.corpus"), "recipe.corpus")
    try:
        return corpus_windows(text, rs.words, rs.windows, rs.fit_windows, rs.seed, "recipe.corpus")
    except PatchscopeError as exc:
        raise ConfigError(str(exc)) from None



def load_recipe_rows(config: SweepConfig, base: Path | None = None) -> list[dict[str, Any]]:
    """The recipe's rows, plain data; a relative file or directory is read from the current
    directory, or else beside the config."""
    rs = config.recipe
    try:
        if rs.name in CORPUS_RECIPES:
            return [{"text": w} for w in _corpus(config, base)[0]]
        if rs.name == "attribute_extraction":
            data = locate(rs.data, base, "recipe.data", directory=True) if rs.data else SHIPPED_LRE
            return load_lre(data, rs.relations, rs.subjects, rs.contexts, rs.seed, "recipe.relations")
        if rs.name == "entity_description":
            return load_entities(locate(rs.file, base, "recipe.file"), rs.source_template, rs.seed, "recipe.file")
        return load_chains(locate(rs.file, base, "recipe.file"), rs.seed, "recipe.file")
    except PatchscopeError as exc:
        raise ConfigError(str(exc)) from None


def fit_windows(config: SweepConfig, base: Path | None = None) -> list[str]:
    """The windows the recipe's maps are fitted on (none for recipes without maps)."""
    rs = config.recipe
    if rs.name == "cross_model" or (rs.name == "token_identity" and "tuned_lens" in rs.baselines):
        return _corpus(config, base)[1]
    return []


def _info(name: str, field_name: str) -> ModelInfo:
    try:
        return model_info(name)
    except PatchscopeError as exc:
        raise ConfigError(f"{field_name}: {str(exc).removeprefix('model: ')}") from None


def source_info(config: SweepConfig, info: ModelInfo) -> ModelInfo:
    """The model whose states a recipe reads: cross_model's source model, else the model itself."""
    rs = config.recipe
    return _info(rs.source_model, "recipe.source_model") if rs.name == "cross_model" else info


def recipe_for(config: SweepConfig, info: ModelInfo) -> Recipe:
    """The recipe of the config with `info`'s layers (cross_model: the source model's source layers)."""
    rs, new = config.recipe, config.generation.max_new_tokens
    if rs.name == "token_identity":
        return TokenIdentity(tuple(checked_layers(rs.layers, info, "recipe.layers")), rs.positions, rs.min_context,
                             tuple(rs.baselines), rs.target_prompt)
    if rs.name == "cross_model":
        src = source_info(config, info)
        return CrossModel(tuple(checked_layers(rs.source_layers, src, "recipe.source_layers")),
                          tuple(checked_layers(rs.target_layers, info, "recipe.target_layers")))
    if rs.name == "entity_description":
        targets = None if rs.target_layers == "same" else tuple(checked_layers(rs.target_layers, info, "recipe.target_layers"))
        return EntityDescription(tuple(checked_layers(rs.layers, info, "recipe.layers")), targets, new, rs.target_prompt)
    layers = (tuple(checked_layers(rs.source_layers, info, "recipe.source_layers")),
              tuple(checked_layers(rs.target_layers, info, "recipe.target_layers")), new)
    if rs.name == "attribute_extraction":
        return AttributeExtraction(*layers)
    return MultiHop(*layers, rs.source_template, rs.target_template, rs.hop1_template, rs.hop2_template)


def _prompts(config: SweepConfig, row: dict[str, Any], recipe: Recipe) -> list[tuple[str, str, bool]]:
    """(field, prompt, generates after it) of every prompt a row runs."""
    rs = config.recipe
    if rs.name in CORPUS_RECIPES:
        return [("recipe.corpus", row["text"], False)]
    if rs.name == "attribute_extraction":
        return [("recipe.relations", row["source"], False), ("recipe.relations", row["target"], True),
                ("recipe.relations", row["question"], True)]
    if rs.name == "entity_description":
        return [("recipe.file", row["source"], False)]
    q = recipe.prompts(row)
    return [("recipe.file", q[k], k != "source" and k != "control") for k in q if q[k] is not None]


def _fit_vectors(config: SweepConfig, src: ModelInfo, fit: list[str]) -> None:
    """A least-squares map from d_model + 1 inputs needs many more vectors than that."""
    n = sum(len(tokenize(src, t)) - int(src.prepend_bos) for t in fit)
    need = 2 * (src.d_model + 1)
    if n < need:
        raise ConfigError(f"recipe.fit_windows: {len(fit)} windows give {n} vectors on {src.name}, fewer than "
                          f"2 x (d_model + 1) = {need}; a least-squares map needs thousands (give more fit_windows)")


def check_recipe(config: SweepConfig, rows: list[dict[str, Any]], base: Path | None = None) -> dict[str, ModelPlan]:
    """Every check of a recipe sweep against each model, reading configs and tokenizers only."""
    rs, new = config.recipe, config.generation.max_new_tokens
    fit = fit_windows(config, base)
    plans = {}
    for i, name in enumerate(config.models):
        info = _info(name, f"models[{i}]")
        src = source_info(config, info)
        recipe = recipe_for(config, info)
        layers = recipe.layers if hasattr(recipe, "layers") else recipe.source_layers
        targets = getattr(recipe, "target_layers", None)
        plan = ModelPlan(info, list(layers), None if targets is None else list(targets))
        try:
            if rs.name in ("token_identity", "entity_description"):
                n = len(tokenize(info, rs.target_prompt, "recipe.target_prompt"))
                problem = context_problem(n, 1 if rs.name == "token_identity" else new, info)
                if problem:
                    raise ConfigError(f"recipe.target_prompt: {problem}")
            for k, row in enumerate(rows):
                for field_name, prompt, generates in _prompts(config, row, recipe):
                    ids = tokenize(src if field_name == "recipe.corpus" else info, prompt, field_name)
                    problem = context_problem(len(ids), new if generates else 0, info)
                    if problem:
                        raise ConfigError(f"{field_name}: row {k + 1}: {problem} (prompt {prompt[:40]!r})")
                    if field_name == "recipe.corpus":
                        plan.n_tokens[prompt] = len(ids)
                        if rs.name == "token_identity":
                            positions_in(len(ids), rs.positions, rs.min_context, f"recipe.positions (window {k + 1})")
            if rs.name == "cross_model":
                if src.prepend_bos != info.prepend_bos:
                    raise ConfigError(f"recipe.source_model: {src.name} and {name} differ in prepending a BOS token; "
                                      "cross-model patching here needs the same tokens at the same positions")
                _aligned(src, info, [r["text"] for r in rows] + fit, "recipe.corpus")
            if fit:
                _fit_vectors(config, src, fit)
        except PatchscopeError as exc:
            raise ConfigError(f"{exc} (on {name})") from None
        plans[name] = plan
    return plans


def recipe_context(config: SweepConfig, rows: list[dict[str, Any]], base: Path | None = None) -> dict[str, Any]:
    """What every task of a recipe sweep shares: the recipe's name and settings per model, its
    fit windows and its source model (cross_model)."""
    settings = {name: recipe_for(config, _info(name, f"models[{i}]")).settings() for i, name in enumerate(config.models)}
    return {"recipe": config.recipe.name, "settings": settings, "fit_texts": fit_windows(config, base),
            "source_model": getattr(config.recipe, "source_model", None)}


