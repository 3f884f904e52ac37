"""Recipe `entity_description` (paper section 4.3): an entity's state at layer l patched into a
few-shot description prompt; RougeL of the description against the reference, and a control."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from patchscope_core.base.values import template_problem
from patchscope_core.recipes import EntityDescription, description_of, load_entities

from ... import pictures
from ...config import Layers, TargetLayers
from ...config.files import locate
from ...config.models import checked_layers
from .common import RecipePart, RecipeSection, grid_lines, heat, layer_grid, target_prompt_fits


class EntityDescriptionRecipe(RecipeSection):
    name: Literal["entity_description"]
    file: str = Field(description="CSV with columns entity, description (and optionally source)")
    source_template: str = "{entity}"
    layers: Layers = "all"
    target_layers: TargetLayers = "same"
    target_prompt: str = (
        "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
        "multinational major appliance and consumer electronics corporation, x"
    )

    @field_validator("source_template", mode="after")
    @classmethod
    def _template(cls, v: str) -> str:
        problem = template_problem(v, ("entity",), needs=("entity",))
        if problem:
            raise ValueError(problem)
        return v


def _by_layer(df: pd.DataFrame, table: pd.DataFrame, model: str, key: str, out: Path) -> dict[str, Path]:
    """RougeL by layer beside the control, and each entity's description by layer; past the
    readable size (`pictures.READABLE_ROWS` entities) the curves get their 95% intervals over
    entities, only the top entities (highest mean RougeL) get a row, and a seeded sample of the
    descriptions goes to `<key>_sample.csv`."""
    everyone = list(dict.fromkeys(df.sort_values("row")["subject"]))
    few = pictures.readable(len(everyone))
    entities = everyone if few else pictures.top_rows(df.sort_values("row"), "subject", "score")
    layers = sorted(df["source_layer"].unique())
    fig, (ax1, ax2) = pictures.plt().subplots(
        2,
        1,
        figsize=(min(16, max(8, 0.55 * len(layers))), 3 + 0.3 * len(entities)),
        gridspec_kw={"height_ratios": [1, max(1.5, len(entities) / 6)]},
    )
    ax1.plot(table["source_layer"], table["rouge_l"], marker="o", ms=3, label="Patchscope description vs reference")
    ax1.plot(
        table["source_layer"],
        table["control_rouge_l"],
        marker="o",
        ms=3,
        ls="--",
        label="control: vs another entity's reference",
    )
    if not few:
        for value in ("score", "control_score"):
            band = pictures.means_by(df, ["source_layer"], "row", value)
            ax1.fill_between(band["source_layer"], band["low"], band["high"], alpha=0.2)
    ax1.set(
        xlabel="layer l (l* = l)",
        ylabel="RougeL",
        ylim=(0, max(0.05, float(table[["rouge_l", "control_rouge_l"]].max().max())) * 1.15),
        title=f"{model}: entity description, {len(everyone)} entities"
        + ("" if few else " (95% intervals over entities, normal approximation)"),
    )
    ax1.legend(fontsize=7)
    pivot = df.pivot_table(index="subject", columns="source_layer", values="score", aggfunc="mean").reindex(entities)
    ax2.imshow(pivot.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    text = df.set_index(["subject", "source_layer"])["generated_text"]
    for i, e in enumerate(entities):
        for j, l in enumerate(layers):
            note = textwrap.shorten(description_of(text.get((e, l), "")), 22, placeholder="…")
            ax2.text(j, i, pictures.literal(note), ha="center", va="center", fontsize=3.6, color="white")
    ax2.set_xticks(range(len(layers)), [str(int(l)) for l in layers], fontsize=7)
    ax2.set_yticks(range(len(entities)), [pictures.literal(e) for e in entities], fontsize=7)
    ax2.set_xlabel(
        "layer l (l* = l); colour: RougeL, text: the description generated"
        + ("" if few else f"\nthe {len(entities)} of {len(everyone)} entities of highest mean RougeL")
    )
    made = {key: pictures.save(fig, out / f"{key}.png")}
    if not few:
        columns = ["row", "subject", "source_layer", "target_layer", "score", "control_score", "generated_text"]
        made[f"{key}_sample"] = out / f"{key}_sample.csv"
        pictures.sample(df)[[c for c in columns if c in df.columns]].to_csv(made[f"{key}_sample"], index=False)
    return made


class EntityDescriptionPart(RecipePart):
    name = "entity_description"
    needs = ("subject", "generated_text")
    Section = EntityDescriptionRecipe
    labels = (None, "entity")

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]:
        rs = config.recipe
        return load_entities(locate(rs.file, base, "recipe.file"), rs.source_template, rs.seed, "recipe.file")

    def build(self, config, info) -> EntityDescription:
        rs = config.recipe
        targets = (
            None
            if rs.target_layers == "same"
            else tuple(checked_layers(rs.target_layers, info, "recipe.target_layers"))
        )
        return EntityDescription(
            tuple(checked_layers(rs.layers, info, "recipe.layers")),
            targets,
            config.generation.max_new_tokens,
            rs.target_prompt,
        )

    def prompts(self, config, row, recipe) -> list[tuple[str, str, bool]]:
        return [("recipe.file", row["source"], False)]

    def check_before(self, config, info) -> None:
        target_prompt_fits(config, info, config.generation.max_new_tokens)

    def draw(self, df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
        key = f"recipe_{pictures.safe_name(model)}_entity_description"
        table = (
            df.groupby(["source_layer", "target_layer"])
            .agg(rouge_l=("score", "mean"), control_rouge_l=("control_score", "mean"), entities=("score", "size"))
            .reset_index()
        )
        table.to_csv(out / f"{key}.csv", index=False)
        if (df["target_layer"] != df["source_layer"]).any():  # a grid of (l, l*)
            fig, ax = pictures.plt().subplots(figsize=(6.5, 5))
            heat(ax, layer_grid(df), f"{model}: entity description RougeL", vmax=float(df["score"].max() or 1))
            return {key: pictures.save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}
        return {**_by_layer(df, table, model, key, out), f"{key}_table": out / f"{key}.csv"}

    def summary(self, g: pd.DataFrame) -> list[str]:
        return grid_lines(g)


PART = EntityDescriptionPart()
