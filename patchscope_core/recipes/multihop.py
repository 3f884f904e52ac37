"""Multi-hop reasoning with the CoT Patchscope (paper §5), as the paper's code builds it.

A chain is a two-hop question such as "Who is the current CEO of the company that created
Xbox 360": its first hop ("the company that created Xbox 360") names a bridge entity
(Microsoft), its second hop asks about the bridge ("Who is the current CEO of", answer Satya
Nadella). The CoT Patchscope reads the last token of the second hop's words as the source, at
layer l, and patches it into the first hop as the target, at its last token and layer l*: the
target resolves the bridge first, then reads the question; it generates `max_new_tokens` (20)
tokens and is right when the answer appears in them. Every (l, l*) of the grid.

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

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import PatchscopeError
from ..spec import Source, Target
from .metrics import shuffled_labels
from .probes import Probe, Recipe

COLUMNS = ("first_hop", "bridge", "second_hop", "answer")


def load_chains(path: str | Path, seed: int = 0, field_name: str = "chains") -> list[dict[str, Any]]:
    """Rows of a chain file, each with the second hop of another chain (a different question)
    as its control source (none when every chain asks the same question)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchscopeError(f"{field_name}: no such file {str(path)!r}")
    with open(path, encoding="utf-8", newline="") as fh:
        table = list(csv.DictReader(fh))
    missing = set(COLUMNS) - set(table[0] if table else ())
    if missing:
        raise PatchscopeError(f"{field_name}: {path} needs columns {', '.join(COLUMNS)} (missing: {', '.join(sorted(missing))})")
    rows = []
    for i, rec in enumerate(table):
        values = {c: (rec.get(c) or "").strip() for c in COLUMNS}
        if not all(values.values()):
            raise PatchscopeError(f"{field_name}: {path} row {i + 1} has an empty {', '.join(c for c in COLUMNS if not values[c])}")
        rows.append(values)
    questions = [r["second_hop"] for r in rows]
    for row, control in zip(rows, shuffled_labels(questions, questions, seed)):
        row["control_source"] = control
    return rows


@dataclass(frozen=True)
class MultiHop(Recipe):
    """Per chain: hop1, hop2 and vanilla questions, the CoT Patchscope grid and its control grid."""

    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    max_new_tokens: int = 20
    name: ClassVar[str] = "multi_hop"
    metric: ClassVar[str] = "contains"

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        n = self.max_new_tokens
        answer = dict(expected=item["answer"], max_new_tokens=n)
        out = [Probe("plain", row, role="hop1", prompt=item["first_hop"], expected=item["bridge"], max_new_tokens=n),
               Probe("plain", row, role="hop2", prompt=f"{item['second_hop']} {item['bridge']}", **answer),
               Probe("plain", row, role="vanilla", prompt=f"{item['second_hop']} {item['first_hop']}", **answer)]
        sources = [("patchscope", item["second_hop"])] + ([("control", item["control_source"])] if item["control_source"] else [])
        for role, source in sources:
            out += [Probe("patchscope", row, role=role, source=Source(source, l, -1),
                          target=Target(item["first_hop"], lt, (-1,)), **answer)
                    for l in self.source_layers for lt in self.target_layers]
        return out

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return 3 + len(self.source_layers) * len(self.target_layers) * (2 if item["control_source"] else 1)
