"""What every recipe of `kind: recipe` shares: the section fields all recipes take, the corpus
windows of the next-token recipes, the `RecipePart` base (what one recipe file declares) and the
(l, l*) panels of the reports.

A recipe file (`token_identity.py`, ...) holds one paper recipe's sweep side: its config
section (`Section`, with `name: Literal[...]`), its rows from its data, its `patchscope_core.
recipes.Recipe` with one model's layers, the prompts each row runs (checked against the context),
its extra checks, its picture and table, and its summary lines. It registers by being listed in
`sweeps/kinds/recipe/__init__.py`'s `PARTS`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from patchscope_core import ModelInfo, PatchscopeError
from patchscope_core.base.values import MAX_SEED
from patchscope_core.recipes import Recipe, corpus_windows, pydoc_text

from ...config import ConfigError, Strict, read_text
from ...config.files import locate


class RecipeSection(Strict):
    """What every recipe section takes (`recipe.name` picks the recipe; patchscope_core.recipes)."""

    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="orders windows and subjects, and pairs rows for the shuffled-label control"
    )


class CorpusSection(RecipeSection):
    corpus: str = Field("pydoc", description="pydoc (CPython's pydoc_data.topics) or a UTF-8 text file")
    words: int = Field(48, ge=4, description="words per window")
    windows: int = Field(40, ge=1, description="evaluated windows")
    fit_windows: int = Field(200, ge=1, description="windows the maps are fitted on, disjoint from the evaluated ones")


def corpus(config, base: Path | None) -> tuple[list[str], list[str]]:
    """(evaluated windows, fit windows) of a corpus recipe."""
    rs = config.recipe
    text = (
        pydoc_text() if rs.corpus == "pydoc" else read_text(locate(rs.corpus, base, "recipe.corpus"), "recipe.corpus")
    )
    try:
        return corpus_windows(text, rs.words, rs.windows, rs.fit_windows, rs.seed, "recipe.corpus")
    except PatchscopeError as exc:
        raise ConfigError(str(exc)) from None


class RecipePart:
    """One recipe's sweep side; the defaults are what most recipes do."""

    name: ClassVar[str]
    Section: ClassVar[type]
    labels: ClassVar[tuple[str | None, str | None]] = (None, None)  # row keys giving relation, subject
    needs: ClassVar[tuple[str, ...]] = ()  # the result columns its `draw` and `summary` read besides the kind's

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]: ...

    def fit_windows(self, config, base: Path | None) -> list[str]:
        """The windows the recipe's maps are fitted on (none for recipes without maps)."""
        return []

    def source_info(self, config, info: ModelInfo) -> ModelInfo:
        """The model whose states the recipe reads (the model itself)."""
        return info

    def build(self, config, info: ModelInfo) -> Recipe: ...

    def prompts(self, config, row: dict[str, Any], recipe: Recipe) -> list[tuple[str, str, bool]]:
        """(field, prompt, generates after it) of every prompt a row runs."""

    def check_before(self, config, info: ModelInfo) -> None:
        """Checks of the section on one model, before its rows."""

    def check_window(self, config, k: int, n_tokens: int) -> None:
        """A corpus window of n tokens (row k) against the section."""

    def check_after(self, config, src: ModelInfo, info: ModelInfo, name: str, rows: list, fit: list[str]) -> None:
        """Checks across all rows (and fit windows) on one model."""

    def draw(self, df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]: ...

    def summary(self, df: pd.DataFrame) -> list[str]: ...

    def summary_figures(self, df: pd.DataFrame) -> dict[str, Any]:
        """The headline numbers of one model's rows: the mean score over probes (`score`) and the
        (l, l*) cell of highest mean score (`best_score`, `best_source_layer`, `best_target_layer`)."""
        out: dict[str, Any] = {"score": float(df["score"].astype(float).mean())}
        grid = df[df["source_layer"].notna() & df["target_layer"].notna()]
        means = grid.groupby(["source_layer", "target_layer"])["score"].mean().dropna()
        if len(means):
            (l, lt), best = means.idxmax(), float(means.max())
            out.update(best_score=best, best_source_layer=int(l), best_target_layer=int(lt))
        return out


def layer_pairs(config, source: ModelInfo, target: ModelInfo) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """recipe.source_layers on the source model and recipe.target_layers on the target, checked."""
    from ...config.models import checked_layers

    rs = config.recipe
    return (
        tuple(checked_layers(rs.source_layers, source, "recipe.source_layers")),
        tuple(checked_layers(rs.target_layers, target, "recipe.target_layers")),
    )


def target_prompt_fits(config, info: ModelInfo, new_tokens: int) -> None:
    """recipe.target_prompt plus new_tokens must fit the model's context."""
    from patchscope_core import tokenize
    from patchscope_core.models.tokens import context_problem

    n = len(tokenize(info, config.recipe.target_prompt, "recipe.target_prompt"))
    problem = context_problem(n, new_tokens, info)
    if problem:
        raise ConfigError(f"recipe.target_prompt: {problem}")


# ---------------------------------------------------------------- the reports' (l, l*) panels


def heat(ax, pivot: pd.DataFrame, title: str, vmax: float = 1.0, annotate: bool = True) -> None:
    """A (source layer x target layer) panel: l across, l* up, as the paper draws it."""
    m = pivot.to_numpy(dtype=float).T  # rows: target layers
    im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xticks(range(pivot.shape[0]), [str(int(x)) for x in pivot.index], fontsize=7)
    ax.set_yticks(range(pivot.shape[1]), [str(int(x)) for x in pivot.columns], fontsize=7)
    ax.set_xlabel("source layer l")
    ax.set_ylabel("target layer l*")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=8)
    if annotate and m.size <= 144:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=5.5,
                        color="white" if m[i, j] < 0.5 * vmax else "black",
                    )
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def layer_grid(df: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    return df.pivot_table(index="source_layer", columns="target_layer", values=value, aggfunc="mean")


def any_cell(df: pd.DataFrame, value: str = "score") -> float:
    """Share of rows right at some cell."""
    return float(df.groupby("row")[value].max().mean()) if len(df) else float("nan")


def grid_lines(g: pd.DataFrame) -> list[str]:
    """The mean score per (l, l*), for the terminal."""
    t = g.groupby(["source_layer", "target_layer"])["score"].mean()
    return [f"  l={int(l)} l*={int(lt)}: {v:.3f}" for (l, lt), v in t.items()][:40]
