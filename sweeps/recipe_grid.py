"""The grid of a recipe sweep (`kind: recipe`): a `RecipeCell` is one probe of one model.

The recipe (`patchscope_core.recipes`, with the model's layers: `recipe_rows.recipe_for`) turns
each input row into probes: Patchscopes over (l, l*), lenses, plain questions, controls. A
task holds probes of one model and one row, at most batch_size of them, so the worker reads the
row's hidden states once per task. Rows are counted with the recipe's arithmetic `count` and
expanded one row at a time (`sweeps/grid.py` dispatches here). A cell's id is a digest of its
probe, its model, the recipe's settings and fit windows (`context["key"]`) and the generation
settings; what travels to a worker is the probes as plain data with the recipe's settings and
fit windows (`RecipeCell.payload`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

from patchscope_core.recipes import RECIPES, Probe

from .config import SweepConfig
from .plan import ModelPlan

RECIPE_COLUMNS = (
    "cell_id", "model", "recipe", "row", "role", "method", "relation", "subject", "source_model", "source_prompt",
    "source_layer", "source_position", "target_prompt", "target_layer", "target_position", "prompt", "expected",
    "control",
)
# What a row contributes to its cells' columns: (relation, subject) by recipe.
_LABELS = {"attribute_extraction": ("relation", "subject"), "entity_description": (None, "entity"),
           "multi_hop": ("second_hop", "first_hop")}


@dataclass(frozen=True)
class RecipeCell:
    model: str
    recipe: str
    probe: Probe
    relation: str | None = None  # the row's relation (attribute extraction), question (multi-hop)
    subject: str | None = None  # the row's subject, entity or first hop
    source_model: str | None = None  # cross_model's source model; else the model itself
    key: str = ""  # digest of the recipe's settings, fit windows and the generation settings
    KIND: ClassVar[str] = "recipe"

    @property
    def cell_id(self) -> str:
        from .grid import _digest

        return _digest(["recipe", self.model, self.recipe, self.probe.to_dict(), self.relation, self.subject,
                        self.source_model, self.key])

    @property
    def group(self) -> str:
        return f"{self.recipe} row {self.probe.row}"

    def params(self) -> dict[str, Any]:
        p = self.probe
        s, t = p.source, p.target
        return {"cell_id": self.cell_id, "model": self.model, "recipe": self.recipe, "row": p.row, "role": p.role,
                "method": p.method, "relation": self.relation, "subject": self.subject,
                "source_model": self.source_model or self.model, "source_prompt": s and s.prompt,
                "source_layer": s and s.layer, "source_position": s and s.position, "target_prompt": t and t.prompt,
                "target_layer": t and t.layer, "target_position": t and t.positions[0], "prompt": p.prompt,
                "expected": p.expected, "control": p.control}

    @staticmethod
    def payload(task) -> dict[str, Any]:
        ctx = task.context
        return {"kind": "recipe", "recipe": ctx["recipe"], "settings": ctx["settings"][task.model],
                "fit_texts": ctx["fit_texts"], "source_model": ctx["source_model"],
                "probes": [c.probe.to_dict() for c in task.cells]}


def _recipe(context: dict[str, Any], model: str):
    return RECIPES[context["recipe"]].from_settings(context["settings"][model])


def _tokens(plan: ModelPlan):
    return lambda prompt: plan.n_tokens[prompt]


def recipe_group_sizes(config: SweepConfig, rows: list[dict], plans: dict[str, ModelPlan],
                       context: dict[str, Any]) -> Iterator[tuple[str, int, bool]]:
    """(model, cells, False) per task group (one model, one row), counted without building cells."""
    for model in config.models:
        recipe = _recipe(context, model)
        for item in rows:
            yield model, recipe.count(item, _tokens(plans[model])), False


def recipe_cells(config: SweepConfig, rows: list[dict], plans: dict[str, ModelPlan],
                 context: dict[str, Any]) -> Iterator[RecipeCell]:
    """Every cell, one model and row after another (the cells of a task group come together)."""
    from .grid import generation_key

    key = f"{context['key']}:{generation_key(config)}"
    relation_key, subject_key = _LABELS.get(context["recipe"], (None, None))
    for model in config.models:
        recipe = _recipe(context, model)
        for row, item in enumerate(rows):
            labels = dict(relation=item.get(relation_key), subject=item.get(subject_key))
            for probe in recipe.probes(row, item, _tokens(plans[model])):
                yield RecipeCell(model, context["recipe"], probe, source_model=context["source_model"], key=key, **labels)
