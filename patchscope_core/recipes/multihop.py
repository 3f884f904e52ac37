"""Multi-hop reasoning with the CoT Patchscope (paper §5), as the paper's code builds it.

A chain is a two-hop question such as "Who is the current CEO of the company that created
Xbox 360": its first hop ("the company that created Xbox 360") names a bridge entity
(Microsoft), its second hop asks about the bridge ("Who is the current CEO of", answer Satya
Nadella). The CoT Patchscope splits the query where the paper's code does: the second hop's
words are the source, read at their last token and layer l, and patched into the first hop as
the target, at its last token and layer l*, so the target resolves the bridge in its own
layers below l* before the question arrives; it generates `max_new_tokens` (20) tokens and is
right when the answer appears in them. Every (l, l*) of the grid.

Per chain also: `hop1` (the first hop alone must name the bridge), `hop2` (the second hop asked
of the bridge must give the answer), `vanilla` (the whole two-hop question asked plainly, the
baseline), and the control: the same grid patching a different chain's second hop (another
question) into this chain's first hop, scored against this chain's answer, which says how
often the answer appears without the right question. The paper reports accuracy on the chains
right hop by hop: vanilla 19.6%, CoT Patchscope 50% (a chain counts when some (l, l*) is right).

Chain files are CSV with columns first_hop, bridge, second_hop, answer
(`sweeps/examples/multihop_chains.csv`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..base.errors import PatchscopeError
from ..base.textfiles import read_csv
from ..methods.patchscope import Source, Target
from .metrics import shuffled_labels
from .probes import Probe, Recipe

COLUMNS = ("first_hop", "bridge", "second_hop", "answer")


def load_chains(path: str | Path, seed: int = 0, field_name: str = "chains") -> list[dict[str, Any]]:
    """Rows of a chain file, each with the second hop of another chain (a different question)
    as its control source (none when every chain asks the same question)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchscopeError(f"{field_name}: no such file {str(path)!r}")
    table = read_csv(path, field_name)
    if not table:
        raise PatchscopeError(
            f"{field_name}: {path} has no rows (a header line {','.join(COLUMNS)}, then one row per chain)"
        )
    missing = set(COLUMNS) - set(table[0] if table else ())
    if missing:
        raise PatchscopeError(
            f"{field_name}: {path} needs columns {', '.join(COLUMNS)} (missing: {', '.join(sorted(missing))})"
        )
    rows = []
    for i, rec in enumerate(table):
        values = {c: (rec.get(c) or "").strip() for c in COLUMNS}
        if not all(values.values()):
            raise PatchscopeError(
                f"{field_name}: {path} row {i + 1} has an empty {', '.join(c for c in COLUMNS if not values[c])}"
            )
        rows.append(values)
    questions = [r["second_hop"] for r in rows]
    for row, control in zip(rows, shuffled_labels(questions, questions, seed)):
        row["control_source"] = control
    return rows


@dataclass(frozen=True)
class MultiHop(Recipe):
    """Per chain: hop1, hop2 and vanilla questions, the CoT Patchscope grid and its control grid.

    The templates ({first_hop}, {bridge}, {second_hop}, {answer}) default to the paper's bare
    phrases; a chat model may need them framed as questions (e.g. source "Q: {second_hop}",
    target "{first_hop}?\\nA:"). The vanilla question is always the source and the target joined
    by a space, the query the CoT Patchscope splits in two."""

    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    max_new_tokens: int = 20
    source_template: str = "{second_hop}"
    target_template: str = "{first_hop}"
    hop1_template: str = "{first_hop}"
    hop2_template: str = "{second_hop} {bridge}"
    name: ClassVar[str] = "multi_hop"
    metric: ClassVar[str] = "contains"

    def prompts(self, item: dict[str, Any]) -> dict[str, str]:
        """The prompts of one chain: source, target, control source (or None), hop1, hop2, vanilla."""
        source, target = self.source_template.format(**item), self.target_template.format(**item)
        control = item.get("control_source")
        return {
            "source": source,
            "target": target,
            "hop1": self.hop1_template.format(**item),
            "hop2": self.hop2_template.format(**item),
            "vanilla": f"{source} {target}",
            "control": self.source_template.format(**{**item, "second_hop": control}) if control else None,
        }

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        n, q = self.max_new_tokens, self.prompts(item)
        answer = dict(expected=item["answer"], max_new_tokens=n)
        out = [
            Probe("plain", row, role="hop1", prompt=q["hop1"], expected=item["bridge"], max_new_tokens=n),
            Probe("plain", row, role="hop2", prompt=q["hop2"], **answer),
            Probe("plain", row, role="vanilla", prompt=q["vanilla"], **answer),
        ]
        for role in ("patchscope", "control") if q["control"] else ("patchscope",):
            out += [
                Probe(
                    "patchscope",
                    row,
                    role=role,
                    source=Source(q["source" if role == "patchscope" else "control"], l, -1),
                    target=Target(q["target"], lt, (-1,)),
                    **answer,
                )
                for l in self.source_layers
                for lt in self.target_layers
            ]
        return out

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return 3 + len(self.source_layers) * len(self.target_layers) * (2 if item.get("control_source") else 1)
