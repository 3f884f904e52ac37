"""Recipe `cross_model` (paper section 4.4): a source model's states patched into the sweep's
models through least-squares affine maps fitted on corpus windows; precision@1 by (l, l*)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from patchscope_core.recipes import CrossModel
from patchscope_core.recipes.lenses import aligned_tokens

from ... import pictures
from ...config import ConfigError, Layers
from ...config.models import model_info_for
from .common import CorpusSection, RecipePart, corpus, grid_lines, heat, layer_grid, layer_pairs


class CrossModelRecipe(CorpusSection):
    name: Literal["cross_model"]
    source_model: str = Field(description="the model M whose states are read; the sweep's models are the targets M*")
    source_layers: Layers = "all"
    target_layers: Layers = "all"


class CrossModelPart(RecipePart):
    name = "cross_model"
    needs = ("source_model", "surprisal")
    Section = CrossModelRecipe

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]:
        return [{"text": w} for w in corpus(config, base)[0]]

    def fit_windows(self, config, base: Path | None) -> list[str]:
        return corpus(config, base)[1]

    def source_info(self, config, info):
        return model_info_for(config.recipe.source_model, "recipe.source_model")

    def build(self, config, info) -> CrossModel:
        return CrossModel(*layer_pairs(config, self.source_info(config, info), info))

    def prompts(self, config, row, recipe) -> list[tuple[str, str, bool]]:
        return [("recipe.corpus", row["text"], False)]

    def check_after(self, config, src, info, name: str, rows: list, fit: list[str]) -> None:
        if src.prepend_bos != info.prepend_bos:
            raise ConfigError(
                f"recipe.source_model: {src.name} and {name} differ in prepending a BOS token; "
                "cross-model patching here needs the same tokens at the same positions"
            )
        aligned_tokens(src, info, [r["text"] for r in rows] + fit, "recipe.corpus")

    def draw(self, df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
        source = df["source_model"].iloc[0]
        table = (
            df.groupby(["source_layer", "target_layer"])
            .agg(precision_at_1=("score", "mean"), surprisal=("surprisal", "mean"))
            .reset_index()
        )
        fig, ax = pictures.plt().subplots(figsize=(6.5, 5))
        heat(
            ax,
            layer_grid(df),
            f"{source} -> {model}: precision@1 through least-squares affine maps, "
            f"{df.groupby(['row', 'source_position']).ngroups} positions",
        )
        key = f"recipe_{pictures.safe_name(model)}_cross_model"
        table.to_csv(out / f"{key}.csv", index=False)
        return {key: pictures.save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}

    def summary(self, g: pd.DataFrame) -> list[str]:
        return grid_lines(g)


PART = CrossModelPart()
