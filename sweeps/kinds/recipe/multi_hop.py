"""Recipe `multi_hop` (paper section 4.5): two-hop chains; the CoT Patchscope patches the first
hop's state into the second hop's question, against vanilla prompting and a control."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from patchscope_core.base.values import template_problem
from patchscope_core.recipes import MultiHop, load_chains
from patchscope_core.recipes.multihop import COLUMNS

from ... import pictures
from ...config import Layers
from ...config.files import locate
from .common import RecipePart, RecipeSection, any_cell, heat, layer_grid, layer_pairs


class MultiHopRecipe(RecipeSection):
    name: Literal["multi_hop"]
    file: str = Field(description="CSV with columns first_hop, bridge, second_hop, answer")
    source_layers: Layers = "all"
    target_layers: Layers = "all"
    source_template: str = Field("{second_hop}", description="the CoT Patchscope's source; the paper's bare phrase")
    target_template: str = Field("{first_hop}", description="its target; vanilla = source + ' ' + target")
    hop1_template: str = Field("{first_hop}", description="the plain first-hop question (must name the bridge)")
    hop2_template: str = Field("{second_hop} {bridge}", description="the plain second-hop question")

    @field_validator("source_template", "target_template", "hop1_template", "hop2_template", mode="after")
    @classmethod
    def _template(cls, v: str) -> str:
        problem = template_problem(v, COLUMNS)
        if problem:
            raise ValueError(problem)
        return v


def multihop_summary(df: pd.DataFrame) -> tuple[pd.DataFrame, set]:
    hop = {role: df[df["role"] == role].set_index("row")["score"] for role in ("hop1", "hop2", "vanilla")}
    rows = sorted(df["row"].unique())
    right = {r for r in rows if hop["hop1"].get(r, 0) > 0 and hop["hop2"].get(r, 0) > 0}
    grid, control = df[df["role"] == "patchscope"], df[df["role"] == "control"]
    on = lambda d: d[d["row"].isin(right)]  # noqa: E731
    best = layer_grid(on(grid)).stack() if right else pd.Series(dtype=float)
    control_best = layer_grid(on(control)).stack() if right and len(control) else pd.Series(dtype=float)
    summary = pd.DataFrame(
        [
            {
                "chains": len(rows),
                "hop1_right": int((hop["hop1"] > 0).sum()),
                "hop2_right": int((hop["hop2"] > 0).sum()),
                "right_hop_by_hop": len(right),
                "vanilla_all": float(hop["vanilla"].mean()),
                "vanilla_on_right": float(hop["vanilla"][list(right)].mean()) if right else float("nan"),
                "patchscope_any_cell_on_right": any_cell(on(grid)),
                "patchscope_any_cell_all": any_cell(grid),
                "patchscope_best_cell_on_right": float(best.max()) if len(best) else float("nan"),
                "best_l": int(best.idxmax()[0]) if len(best) else None,
                "best_l_star": int(best.idxmax()[1]) if len(best) else None,
                "control_any_cell_on_right": any_cell(on(control)),
                "control_any_cell_all": any_cell(control),
                "control_best_cell_on_right": float(control_best.max()) if len(control_best) else float("nan"),
            }
        ]
    )
    return summary, right


class MultiHopPart(RecipePart):
    name = "multi_hop"
    Section = MultiHopRecipe
    labels = ("second_hop", "first_hop")

    def load_rows(self, config, base: Path | None) -> list[dict[str, Any]]:
        rs = config.recipe
        return load_chains(locate(rs.file, base, "recipe.file"), rs.seed, "recipe.file")

    def build(self, config, info) -> MultiHop:
        rs = config.recipe
        return MultiHop(
            *layer_pairs(config, info, info),
            config.generation.max_new_tokens,
            rs.source_template,
            rs.target_template,
            rs.hop1_template,
            rs.hop2_template,
        )

    def prompts(self, config, row, recipe) -> list[tuple[str, str, bool]]:
        q = recipe.prompts(row)
        return [("recipe.file", q[k], k != "source" and k != "control") for k in q if q[k] is not None]

    def draw(self, df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
        summary, right = multihop_summary(df)
        s = summary.iloc[0]
        on = df[df["row"].isin(right)] if right else df
        which = "chains right hop by hop" if right else "all chains (none is right hop by hop)"
        fig, axes = pictures.plt().subplots(1, 2, figsize=(11, 4.6))
        heat(
            axes[0],
            layer_grid(on[on["role"] == "patchscope"]),
            f"CoT Patchscope accuracy on {on['row'].nunique()} {which} (vanilla {s.vanilla_on_right:.2f}; "
            f"any (l, l*) {s.patchscope_any_cell_on_right:.2f}; best cell {s.patchscope_best_cell_on_right:.2f})",
        )
        control = on[on["role"] == "control"]
        if len(control):
            heat(
                axes[1],
                layer_grid(control),
                f"control: another chain's question patched in (any (l, l*) "
                f"{s.control_any_cell_on_right:.2f}; best cell "
                f"{s.control_best_cell_on_right:.2f})",
            )
        fig.suptitle(
            f"{model}: multi-hop, {int(s.chains)} chains, {int(s.right_hop_by_hop)} right hop by hop", fontsize=10
        )
        key = f"recipe_{pictures.safe_name(model)}_multi_hop"
        summary.to_csv(out / f"{key}.csv", index=False)
        return {key: pictures.save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}

    def summary(self, g: pd.DataFrame) -> list[str]:
        s = multihop_summary(g)[0].iloc[0]
        return [
            f"  {int(s.right_hop_by_hop)} of {int(s.chains)} chains right hop by hop; vanilla {s.vanilla_on_right:.2f}; "
            f"CoT Patchscope any (l, l*) {s.patchscope_any_cell_on_right:.2f}, best cell "
            f"{s.patchscope_best_cell_on_right:.2f}; control any {s.control_any_cell_on_right:.2f}, best cell "
            f"{s.control_best_cell_on_right:.2f}"
        ]


PART = MultiHopPart()
