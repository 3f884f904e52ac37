"""`kind: recipe`: one of the paper's named Patchscopes (`patchscope_core.recipes.RECIPES`),
section `recipe` (`recipe.name` picks it; each recipe's section and sweep side are one file here,
listed in `PARTS`).

The recipe, with each model's layers, turns each input row into probes: Patchscopes over
(l, l*), lenses, plain questions, controls. A `RecipeCell` is one probe of one model; a task
holds probes of one model across many rows (`packs`: up to batches_per_task forward batches,
`sweeps.grid`), and the worker reads each row's hidden states once per task. Rows are counted with the recipe's arithmetic `count` and expanded
one row at a time. A cell's id is a digest of its probe, its model, the recipe's settings and fit
windows (`context["key"]`) and the generation settings; a task's payload is the probes as plain
data with the recipe's settings and fit windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from patchscope_core import PatchscopeError, tokenize
from patchscope_core.models.tokens import context_problem
from patchscope_core.recipes import RECIPES, Probe

from ...config import ConfigError
from ...config.models import ModelPlan, model_info_for
from ..base import KindDefaults, Schema, check_generates, digest, generation_key, run_columns
from . import attribute_extraction, cross_model, entity_description, multi_hop, token_identity

# Every recipe's sweep side, by recipe name (the names of patchscope_core.recipes.RECIPES).
PARTS = {
    m.PART.name: m.PART for m in (token_identity, attribute_extraction, entity_description, cross_model, multi_hop)
}
RECIPE_SECTIONS = {name: part.Section for name, part in PARTS.items()}


def _known_name(v: Any) -> Any:
    if isinstance(v, dict) and v.get("name") not in RECIPE_SECTIONS:
        what = f"unknown recipe {v['name']!r}" if "name" in v else "missing"
        raise ValueError(f"recipe.name: {what} (allowed: {', '.join(RECIPE_SECTIONS)})")
    return v


RecipeSection = Annotated[
    Union[tuple(RECIPE_SECTIONS.values())],  # noqa: UP007 - a union built from the registry at run time
    Field(discriminator="name"),
    BeforeValidator(_known_name),
]

RECIPE_COLUMNS = (
    "cell_id",
    "model",
    "recipe",
    "row",
    "role",
    "method",
    "relation",
    "subject",
    "source_model",
    "source_prompt",
    "source_layer",
    "source_position",
    "target_prompt",
    "target_layer",
    "target_position",
    "prompt",
    "expected",
    "control",
)
# A recipe's probe: its score by the recipe's metric and what it produced (patchscope_core.recipes).
RECIPE_RESULTS = (
    "score",
    "control_score",
    "surprisal",
    "predicted_token_id",
    "expected_token_id",
    "predicted_token",
    "expected_token",
    "generated_text",
    "generated_token_ids",
    "top_token_ids",
    "top_logprobs",
    "source_position_abs",
    "target_position_abs",
    "max_new_tokens",
)
RECIPE_TABLE = (
    "cell_id",
    "model",
    "recipe",
    "row",
    "role",
    "method",
    "relation",
    "subject",
    "source_layer",
    "target_layer",
    "source_position",
    "score",
    "control_score",
    "surprisal",
    "predicted_token",
    "expected_token",
    "expected",
    "generated_text",
    "source_prompt",
    "target_prompt",
    "prompt",
    "generated_token_ids",
)


@dataclass(frozen=True)
class RecipeCell:
    model: str
    recipe: str
    probe: Probe
    relation: str | None = None  # the row's relation (attribute extraction), question (multi-hop)
    subject: str | None = None  # the row's subject, entity or first hop
    source_model: str | None = None  # cross_model's source model; else the model itself
    key: str = ""  # digest of the recipe's settings, fit windows and the generation settings
    KIND = "recipe"

    @property
    def cell_id(self) -> str:
        return digest(
            [
                "recipe",
                self.model,
                self.recipe,
                self.probe.to_dict(),
                self.relation,
                self.subject,
                self.source_model,
                self.key,
            ]
        )

    @property
    def group(self) -> str:
        return f"{self.recipe} row {self.probe.row}"

    def params(self) -> dict[str, Any]:
        p = self.probe
        s, t = p.source, p.target
        return {
            "cell_id": self.cell_id,
            "model": self.model,
            "recipe": self.recipe,
            "row": p.row,
            "role": p.role,
            "method": p.method,
            "relation": self.relation,
            "subject": self.subject,
            "source_model": self.source_model or self.model,
            "source_prompt": s and s.prompt,
            "source_layer": s and s.layer,
            "source_position": s and s.position,
            "target_prompt": t and t.prompt,
            "target_layer": t and t.layer,
            "target_position": t and t.positions[0],
            "prompt": p.prompt,
            "expected": p.expected,
            "control": p.control,
        }


def _fit_vectors(src, fit: list[str]) -> None:
    """A least-squares map from d_model + 1 inputs needs many more vectors than that."""
    n = sum(len(tokenize(src, t)) - int(src.prepend_bos) for t in fit)
    need = 2 * (src.d_model + 1)
    if n < need:
        raise ConfigError(
            f"recipe.fit_windows: {len(fit)} windows give {n} vectors on {src.name}, fewer than "
            f"2 x (d_model + 1) = {need}; a least-squares map needs thousands (give more fit_windows)"
        )


def _check_rows(config, part, plan: ModelPlan, src, recipe, rows: list[dict[str, Any]]) -> None:
    """Every prompt of every row (plus max_new_tokens where it generates) against the context."""
    info, new = plan.info, config.generation.max_new_tokens
    for k, row in enumerate(rows):
        for field_name, prompt, generates in part.prompts(config, row, recipe):
            ids = tokenize(src if field_name == "recipe.corpus" else info, prompt, field_name)
            problem = context_problem(len(ids), new if generates else 0, info)
            if problem:
                raise ConfigError(f"{field_name}: row {k + 1}: {problem} (prompt {prompt[:40]!r})")
            if field_name == "recipe.corpus":
                plan.n_tokens[prompt] = len(ids)
                part.check_window(config, k, len(ids))


def _recipe(context: dict[str, Any], model: str):
    return RECIPES[context["recipe"]].from_settings(context["settings"][model])


def _no_tokens(prompt: str) -> int:
    raise AssertionError("a recipe's count needs no token counts")


def _tokens(plan: ModelPlan):
    return lambda prompt: plan.n_tokens[prompt]


class RecipeKind(KindDefaults):
    name = "recipe"
    packs = True  # its cells batch together whatever their group: tasks span many groups
    sections = {"recipe": RecipeSection}
    tagged = {"recipe": RECIPE_SECTIONS}
    operation = "recipe"
    schema = Schema(
        RECIPE_COLUMNS,
        RECIPE_RESULTS,
        RECIPE_TABLE,
        ("generated_token_ids",),
        ("row", "source_layer", "target_layer", "score", "control_score"),
        ("recipe", "role", "method"),
        # what the recipes' pictures and summaries read besides (`RecipePart.draw`, `summary`)
        ("relation", "subject", "source_model", "source_position", "surprisal", "generated_text"),
    )
    marks = frozenset({"role", "score"})

    def check_config(self, config) -> None:
        check_generates(config, self.name)

    def report_needs(self, config: dict[str, Any] | None) -> tuple[str, ...]:
        """What the stored config's recipe draws and sums up from (`RecipePart.needs`)."""
        name = ((config or {}).get("recipe") or {}).get("name")
        return PARTS[name].needs if name in PARTS else ()

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]:
        """The recipe's rows as plain data, through the loaders of `patchscope_core.recipes`."""
        try:
            return PARTS[config.recipe.name].load_rows(config, base)
        except PatchscopeError as exc:
            raise ConfigError(str(exc)) from None

    def check(self, config, rows: list[dict[str, Any]], base: Path | None) -> dict[str, ModelPlan]:
        """Layers, every prompt against the context, positions, a shared tokenizer and enough fit
        vectors, on each model, reading configs and tokenizers only."""
        part = PARTS[config.recipe.name]
        n_cells = 0
        for i, name in enumerate(config.models):  # count first (a recipe's count needs no tokens), then check
            recipe = part.build(config, model_info_for(name, f"models[{i}]"))
            n_cells += sum(recipe.count(item, _no_tokens) for item in rows)
            config.execution.check_cells(n_cells)
        fit = part.fit_windows(config, base)
        plans = {}
        for i, name in enumerate(config.models):
            info = model_info_for(name, f"models[{i}]")
            src = part.source_info(config, info)
            recipe = part.build(config, info)
            layers = recipe.layers if hasattr(recipe, "layers") else recipe.source_layers
            targets = getattr(recipe, "target_layers", None)
            plan = ModelPlan(info, list(layers), None if targets is None else list(targets))
            try:
                part.check_before(config, info)
                _check_rows(config, part, plan, src, recipe, rows)
                part.check_after(config, src, info, name, rows, fit)
                if fit:
                    _fit_vectors(src, fit)
            except PatchscopeError as exc:
                raise ConfigError(f"{exc} (on {name})") from None
            plans[name] = plan
        return plans

    def context(self, config, rows: list[dict[str, Any]], base: Path | None) -> dict[str, Any]:
        """The recipe's name and settings per model, its fit windows and its source model."""
        part = PARTS[config.recipe.name]
        settings = {
            name: part.build(config, model_info_for(name, f"models[{i}]")).settings()
            for i, name in enumerate(config.models)
        }
        context = {
            "recipe": config.recipe.name,
            "settings": settings,
            "fit_texts": part.fit_windows(config, base),
            "source_model": getattr(config.recipe, "source_model", None),
        }
        return {**context, "key": digest([context["settings"], context["fit_texts"], context["source_model"]])}

    def other_models(self, config) -> tuple[str, ...]:
        """cross_model's source model: the states it reads decide the results too."""
        source = getattr(config.recipe, "source_model", None)
        return (source,) if source else ()

    def science(self, science, config, rows, context):
        science["rows"] = rows  # the recipe's rows as read from its data (plain data)
        science["context"] = context
        return science

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        for model in config.models:
            recipe = _recipe(context, model)
            for item in rows:
                yield model, recipe.count(item, _tokens(plans[model]))

    def cells(self, config, rows, plans, context) -> Iterator[RecipeCell]:
        key = f"{context['key']}:{generation_key(config)}"
        relation_key, subject_key = PARTS[context["recipe"]].labels
        for model in config.models:
            recipe = _recipe(context, model)
            for row, item in enumerate(rows):
                labels = dict(relation=item.get(relation_key), subject=item.get(subject_key))
                for probe in recipe.probes(row, item, _tokens(plans[model])):
                    yield RecipeCell(
                        model, context["recipe"], probe, source_model=context["source_model"], key=key, **labels
                    )

    def payload(self, task) -> dict[str, Any]:
        ctx = task.context
        return {
            "kind": self.operation,
            "recipe": ctx["recipe"],
            "settings": ctx["settings"][task.model],
            "fit_texts": ctx["fit_texts"],
            "source_model": ctx["source_model"],
            "probes": [c.probe.to_dict() for c in task.cells],
        }

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for cell, rec in zip(task.cells, output["records"], strict=True):
            row = cell.params()
            row.update({c: rec.get(c) for c in RECIPE_RESULTS})
            row["generated_token_ids"] = rec.get("generated_token_ids") or []  # lenses generate nothing
            row["max_new_tokens"] = cell.probe.max_new_tokens
            row.update(run_columns(output, rec))
            rows.append(row)
        return rows

    def describe(self, config, plan: ModelPlan, context) -> str:
        settings = context["settings"][plan.info.name]
        layers = {k: v for k, v in settings.items() if "layers" in k and v is not None}
        return (
            f"{config.recipe.name}: "
            + " x ".join(f"{k} {v}" for k, v in layers.items())
            + f" ({len(context['fit_texts'])} fit windows)"
        )

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        """Every recipe's picture and table, per model."""
        import matplotlib

        paths: dict[str, Path] = {}
        with matplotlib.rc_context({"text.parse_math": False}):
            for (model, recipe), g in df.groupby(["model", "recipe"], sort=False):
                paths.update(PARTS[recipe].draw(g, model, Path(out_dir)))
        return paths

    def summary(self, df) -> str:
        lines = []
        for (model, recipe), g in df.groupby(["model", "recipe"], sort=False):
            lines.append(f"== {model} {recipe}")
            lines += PARTS[recipe].summary(g)
        return "\n".join(lines)

    def summary_figures(self, df) -> dict[str, Any]:
        """The recipe's own (`RecipePart.summary_figures`), under its name."""
        return {
            f"{recipe}/{k}": v
            for recipe, g in df.groupby("recipe", sort=True)
            for k, v in PARTS[recipe].summary_figures(g).items()
        }


KIND = RecipeKind()
