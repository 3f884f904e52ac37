"""Attribute extraction (paper §4.2) on the LRE relations released with the paper.

Each row is one (relation, subject, source context): the source is the WikiText context cut
right after the subject (`"".join(source_cropped_toks)`), read at its last token (-1), the
subject's last token by construction; the target is the relation's verbalisation ending in
`x` (`prompt_target`, e.g. "The capital city of x"), patched at `x` (-1); every (l, l*) of the
grid. A generation is correct when the object appears in it (whitespace removed, case kept, as
the paper's code checks), within `max_new_tokens` (20) tokens.

Beside the grid: the model's own answer to the plain question (the verbalisation with `x`
replaced by the subject), once per subject (`question` probes), which splits facts into those
the model knows and those it does not; and the shuffled-label control, each generation also
scored against the object of another subject of the same relation (`control_score`), which is
high for few-class relations (substance_phase, word_sentiment) whatever the Patchscope does.
"""

from __future__ import annotations

import ast
import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..errors import PatchscopeError
from ..spec import Source, Target
from .metrics import shuffled_labels
from .probes import Probe, Recipe


def _unescape(text: str) -> str:
    """Some objects are stored with JSON escapes (`Bogot\\u00e1`): the characters they stand for."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def _relation_file(root: Path, relation: str, field_name: str) -> Path:
    found = sorted(root.glob(f"*/{relation}.tsv"))
    if not found:
        known = sorted(p.stem for p in root.glob("*/*.tsv"))
        raise PatchscopeError(f"{field_name}: no relation {relation!r} in {root} (relations: {', '.join(known) or 'none'})")
    return found[0]


def load_lre(root: str | Path, relations: Sequence[str], subjects: int | None = None, contexts: int = 1,
             seed: int = 0, field_name: str = "relations") -> list[dict[str, Any]]:
    """Rows of the LRE attribute-extraction data: per relation, `subjects` subjects (all when
    None) in a seeded order, each with its first `contexts` source contexts; every row with its
    plain question (`ask`: the subject's first row asks it) and its control object."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PatchscopeError(f"{field_name}: no data directory {str(root)!r}")
    rows: list[dict[str, Any]] = []
    for relation in relations:
        path = _relation_file(root, relation, field_name)
        with open(path, encoding="utf-8", newline="") as fh:
            table = list(csv.DictReader(fh, delimiter="\t"))
        by_subject: dict[str, list[dict]] = {}
        for rec in table:
            by_subject.setdefault(rec["subject"], []).append(rec)
        chosen = list(by_subject)
        random.Random(seed).shuffle(chosen)
        chosen = chosen[:subjects] if subjects else chosen
        start = len(rows)
        for subject in chosen:
            for k, rec in enumerate(by_subject[subject][:contexts]):
                target = rec["prompt_target"]
                if not target.endswith(" x"):
                    raise PatchscopeError(f"{field_name}: {path.name}: prompt_target {target!r} does not end in ' x'")
                rows.append({"relation": relation, "subject": subject, "object": _unescape(rec["object"]),
                             "source": "".join(ast.literal_eval(rec["source_cropped_toks"])), "target": target,
                             "question": target[:-1] + subject, "ask": k == 0})
        mine = rows[start:]
        for row, control in zip(mine, shuffled_labels([r["subject"] for r in mine], [r["object"] for r in mine], seed)):
            row["control"] = control
    return rows


@dataclass(frozen=True)
class AttributeExtraction(Recipe):
    """Every (l, l*) Patchscope of each row, and the plain question once per subject."""

    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    max_new_tokens: int = 20
    name: ClassVar[str] = "attribute_extraction"
    metric: ClassVar[str] = "contains"

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        known = dict(expected=item["object"], control=item["control"], max_new_tokens=self.max_new_tokens)
        out = [Probe("patchscope", row, source=Source(item["source"], l, -1), target=Target(item["target"], lt, (-1,)),
                     **known) for l in self.source_layers for lt in self.target_layers]
        if item["ask"]:
            out.append(Probe("plain", row, role="question", prompt=item["question"], **known))
        return out

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return len(self.source_layers) * len(self.target_layers) + int(bool(item["ask"]))
