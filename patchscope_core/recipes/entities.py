"""Entity description (paper §4.4): what does the model know of an entity at layer l?

The source is a short context ending with the entity (`source_template`, default "{entity}"),
read at its last token; the target is the paper's few-shot prompt of entity descriptions ending
in `x`, patched at `x` at layer l* = l (or each of `target_layers`). The description is the
generated text after the colon up to the next comma (`metrics.description_of`), scored by
RougeL against a reference description; the control scores it against another entity's
reference (the shuffled-label control), the level that generic descriptions reach anyway.

Reference files are CSV with columns `entity` and `description` (and optionally `source`, a
context per entity); `sweeps/examples/entity_descriptions.csv` is written for this project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..base.errors import PatchscopeError
from ..base.textfiles import read_csv
from ..base.values import template_problem
from ..methods.patchscope import Source, Target
from .metrics import shuffled_labels
from .probes import Probe, Recipe

ENTITY_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)


def load_entities(
    path: str | Path, source_template: str = "{entity}", seed: int = 0, field_name: str = "entities"
) -> list[dict[str, Any]]:
    """Rows of a reference file: entity, its source prompt, its description and a control
    description (another entity's)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchscopeError(f"{field_name}: no such file {str(path)!r}")
    table = read_csv(path, field_name)
    if not table:
        raise PatchscopeError(
            f"{field_name}: {path} has no rows (a header line entity,description, then one row per entity)"
        )
    missing = {"entity", "description"} - set(table[0] if table else ())
    if missing:
        raise PatchscopeError(
            f"{field_name}: {path} needs columns entity and description (missing: {', '.join(sorted(missing))})"
        )
    problem = template_problem(source_template, ("entity",), needs=("entity",))
    if problem:
        raise PatchscopeError(f"{field_name}.source_template: {problem} ({source_template!r})")
    rows = []
    for i, rec in enumerate(table):
        if not (rec.get("entity") or "").strip() or not (rec.get("description") or "").strip():
            raise PatchscopeError(f"{field_name}: {path} row {i + 1} has an empty entity or description")
        source = (rec.get("source") or "").strip() or source_template.format(entity=rec["entity"].strip())
        if not source.endswith(rec["entity"].strip()):
            raise PatchscopeError(f"{field_name}: {path} row {i + 1}: the source {source!r} must end with the entity")
        rows.append({"entity": rec["entity"].strip(), "source": source, "description": rec["description"].strip()})
    for row, control in zip(rows, shuffled_labels([r["entity"] for r in rows], [r["description"] for r in rows], seed)):
        row["control"] = control
    return rows


@dataclass(frozen=True)
class EntityDescription(Recipe):
    """One Patchscope per entity and layer (l* = l unless target_layers are given)."""

    layers: tuple[int, ...]
    target_layers: tuple[int, ...] | None = None
    max_new_tokens: int = 20
    target_prompt: str = ENTITY_PROMPT
    name: ClassVar[str] = "entity_description"
    metric: ClassVar[str] = "rouge_l"

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        return [
            Probe(
                "patchscope",
                row,
                source=Source(item["source"], l, -1),
                target=Target(self.target_prompt, lt, (-1,)),
                expected=item["description"],
                control=item["control"],
                max_new_tokens=self.max_new_tokens,
            )
            for l in self.layers
            for lt in (self.target_layers or (l,))
        ]

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return len(self.layers) * (len(self.target_layers) if self.target_layers else 1)
