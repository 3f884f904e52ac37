"""Recipe `attribute_extraction` (paper section 4.2): LRE facts, the subject's state at (l, l*)
patched into a relation prompt, against the plain question and a shuffled-label control."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from patchscope_core.recipes import AttributeExtraction, load_lre

from ... import pictures
from ...config import Layers
from ...config.files import locate
from .common import RecipePart, RecipeSection, any_cell, heat, layer_grid, layer_pairs

# The four LRE relations shipped with the examples (sweeps/examples/lre/README.md): recipe.data by default.
SHIPPED_LRE = Path(__file__).resolve().parents[2] / "examples" / "lre"


class AttributeExtractionRecipe(RecipeSection):
    name: Literal["attribute_extraction"]
    data: str | None = Field(
        None, description="the LRE data directory (default: the four relations in sweeps/examples/lre)"
    )
    relations: list[str] = Field(min_length=1)
    subjects: int | None = Field(None, ge=1, description="subjects per relation (default: all)")
    contexts: int = Field(1, ge=1, description="source contexts per subject")
    source_layers: Layers = "all"
    target_layers: Layers = "all"


def attribute_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per relation: facts, known share, best cell, best source and target layer, any-(l, l*)
    accuracy on known and unknown facts, and the shuffled-label control."""
    out = []
    for relation, r in df.groupby("relation", sort=False):
        asked = r[r["role"] == "question"].set_index("subject")["score"]
        grid = r[r["role"] == "patchscope"]
        known = grid["subject"].map(asked).fillna(0) > 0
        cells = layer_grid(grid)
        (bl, bt), best = cells.stack().idxmax(), float(cells.stack().max())
        by_source = grid.groupby(["source_layer", "row"])["score"].max().groupby("source_layer").mean()
        by_target = grid.groupby(["target_layer", "row"])["score"].max().groupby("target_layer").mean()
        control = layer_grid(grid, "control_score")
        out.append(
            {
                "relation": relation,
                "facts": grid["row"].nunique(),
                "subjects": grid["subject"].nunique(),
                "known_subjects": float(asked.mean()),
                "best_l": int(bl),
                "best_l_star": int(bt),
                "best_cell": best,
                "best_source_layer": int(by_source.idxmax()),
                "best_source_layer_any_l_star": float(by_source.max()),
                "best_target_layer": int(by_target.idxmax()),
                "best_target_layer_any_l": float(by_target.max()),
                "any_cell": any_cell(grid),
                "any_cell_known": any_cell(grid[known]),
                "any_cell_unknown": any_cell(grid[~known]),
                "known_facts": int(grid[known]["row"].nunique()),
                "control_best_cell": float(control.stack().max()),
                "control_any_cell": any_cell(grid, "control_score"),
                "question_control": float(r[r["role"] == "question"]["control_score"].mean()),
            }
        )
    return pd.DataFrame(out)


class AttributeExtractionPart(RecipePart):
    name = "attribute_extraction"
    needs = ("relation", "subject")
    Section = AttributeExtractionRecipe
    labels = ("relation", "subject")

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]:
        rs = config.recipe
        data = locate(rs.data, base, "recipe.data", directory=True) if rs.data else SHIPPED_LRE
        return load_lre(data, rs.relations, rs.subjects, rs.contexts, rs.seed, "recipe.relations")

    def build(self, config, info) -> AttributeExtraction:
        return AttributeExtraction(*layer_pairs(config, info, info), config.generation.max_new_tokens)

    def prompts(self, config, row, recipe) -> list[tuple[str, str, bool]]:
        return [
            ("recipe.relations", row["source"], False),
            ("recipe.relations", row["target"], True),
            ("recipe.relations", row["question"], True),
        ]

    def draw(self, df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
        summary = attribute_summary(df)
        rel = list(summary["relation"])
        fig, axes = pictures.plt().subplots(len(rel), 2, figsize=(10, 3.8 * len(rel)), squeeze=False)
        for (ax1, ax2), s in zip(axes, summary.itertuples()):
            grid = df[(df["relation"] == s.relation) & (df["role"] == "patchscope")]
            heat(
                ax1,
                layer_grid(grid),
                f"{s.relation}: accuracy ({s.facts} facts; any (l, l*): {s.any_cell:.2f}, "
                f"known {s.any_cell_known:.2f}, unknown {s.any_cell_unknown:.2f}; plain "
                f"question {s.known_subjects:.2f})",
            )
            heat(
                ax2,
                layer_grid(grid, "control_score"),
                f"{s.relation}: shuffled-label control (another subject's "
                f"object; any (l, l*): {s.control_any_cell:.2f})",
            )
        fig.suptitle(f"{model}: attribute extraction", fontsize=10)
        key = f"recipe_{pictures.safe_name(model)}_attribute_extraction"
        summary.to_csv(out / f"{key}.csv", index=False)
        return {key: pictures.save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}

    def summary(self, g: pd.DataFrame) -> list[str]:
        return [
            f"  {s.relation}: best (l={s.best_l}, l*={s.best_l_star}) {s.best_cell:.2f}; any (l, l*) "
            f"{s.any_cell:.2f} (known {s.any_cell_known:.2f}, unknown {s.any_cell_unknown:.2f}); "
            f"plain question {s.known_subjects:.2f}; control any {s.control_any_cell:.2f}"
            for s in attribute_summary(g).itertuples()
        ]


PART = AttributeExtractionPart()
