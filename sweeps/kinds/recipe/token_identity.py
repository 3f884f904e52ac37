"""Recipe `token_identity` (paper section 4.1, figure 2): next-token decoding from each layer's
state, a Patchscope against the logit lens and the tuned lens, on windows of a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from patchscope_core.recipes import TokenIdentity, positions_in

from ... import pictures
from ...config import Layers
from ...config.models import checked_layers
from .common import CorpusSection, RecipePart, corpus, target_prompt_fits


class TokenIdentityRecipe(CorpusSection):
    name: Literal["token_identity"]
    layers: Layers = "all"
    positions: int = Field(5, ge=1, description="evaluated positions per window")
    min_context: int = Field(8, ge=0, description="the first evaluated position (BOS counted)")
    baselines: list[Literal["logit_lens", "tuned_lens"]] = ["logit_lens", "tuned_lens"]
    target_prompt: str = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


METHOD_STYLE = {
    "patchscope": ("Patchscope (token identity)", "C0"),
    "logit_lens": ("logit lens", "C1"),
    "tuned_lens": ("tuned lens (affine, least squares)", "C2"),
}


class TokenIdentityPart(RecipePart):
    name = "token_identity"
    needs = ("surprisal",)
    Section = TokenIdentityRecipe

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]:
        return [{"text": w} for w in corpus(config, base)[0]]

    def fit_windows(self, config, base: Path | None) -> list[str]:
        return corpus(config, base)[1] if "tuned_lens" in config.recipe.baselines else []

    def build(self, config, info) -> TokenIdentity:
        rs = config.recipe
        return TokenIdentity(
            tuple(checked_layers(rs.layers, info, "recipe.layers")),
            rs.positions,
            rs.min_context,
            tuple(rs.baselines),
            rs.target_prompt,
        )

    def prompts(self, config, row, recipe) -> list[tuple[str, str, bool]]:
        return [("recipe.corpus", row["text"], False)]

    def check_before(self, config, info) -> None:
        target_prompt_fits(config, info, 1)

    def check_window(self, config, k: int, n_tokens: int) -> None:
        rs = config.recipe
        positions_in(n_tokens, rs.positions, rs.min_context, f"recipe.positions (window {k + 1})")

    def draw(self, df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
        table = (
            df.groupby(["method", "source_layer"])
            .agg(precision_at_1=("score", "mean"), surprisal=("surprisal", "mean"), positions=("score", "size"))
            .reset_index()
        )
        fig, axes = pictures.plt().subplots(1, 2, figsize=(10, 3.6))
        for method, g in table.groupby("method", sort=False):
            label, colour = METHOD_STYLE.get(method, (method, None))
            axes[0].plot(g["source_layer"], g["precision_at_1"], marker="o", ms=3, label=label, color=colour)
            axes[1].plot(g["source_layer"], g["surprisal"], marker="o", ms=3, label=label, color=colour)
        n = int(table["positions"].max())
        axes[0].set(
            xlabel="layer l (l* = l)",
            ylabel="precision@1",
            ylim=(-0.02, 1.02),
            title=f"{model}: next-token decoding, {n} positions",
        )
        axes[1].set(xlabel="layer l (l* = l)", ylabel="surprisal (nats)", title="surprisal of the top token")
        axes[0].legend(fontsize=7)
        key = f"recipe_{pictures.safe_name(model)}_token_identity"
        table.to_csv(out / f"{key}.csv", index=False)
        return {key: pictures.save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}

    def summary_figures(self, df: pd.DataFrame) -> dict[str, Any]:
        """Per method: the highest precision@1 over layers (`<method>/precision_at_1`) and its layer."""
        out: dict[str, Any] = {}
        for method, g in df.groupby("method", sort=True):
            by_layer = g.groupby("source_layer")["score"].mean().dropna()
            if len(by_layer):
                out[f"{method}/precision_at_1"] = float(by_layer.max())
                out[f"{method}/best_layer"] = int(by_layer.idxmax())
        return out

    def summary(self, g: pd.DataFrame) -> list[str]:
        t = g.groupby(["source_layer", "method"])["score"].mean().unstack()
        return [f"  layer {int(l):>3}: " + ", ".join(f"{m} {v:.2f}" for m, v in row.items()) for l, row in t.iterrows()]


PART = TokenIdentityPart()
