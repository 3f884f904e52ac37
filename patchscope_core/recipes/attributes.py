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
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..base.errors import PatchscopeError
from ..base.textfiles import read_csv
from ..methods.patchscope import Source, Target
from .metrics import shuffled_labels
from .probes import Probe, Recipe


def _unescape(text: str) -> str:
    """Some objects are stored with JSON escapes (`Bogot\\u00e1`): the characters they stand for."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)


def _relation_file(root: Path, relation: str, field_name: str) -> Path:
    found = sorted(root.glob(f"*/{relation}.tsv"))
    if not found:
        known = sorted(p.stem for p in root.glob("*/*.tsv"))
        raise PatchscopeError(
            f"{field_name}: no relation {relation!r} in {root} (relations: {', '.join(known) or 'none'})"
        )
    return found[0]


LRE_COLUMNS = ("prompt_target", "subject", "object", "source_cropped_toks")


def _source(text: str, where: str) -> str:
    """The source context: `source_cropped_toks` is a Python list of token strings, read as a
    literal (never run as code)."""
    try:
        toks = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        toks = None
    if not isinstance(toks, list) or not toks or not all(isinstance(t, str) for t in toks):
        raise PatchscopeError(
            f"{where}: source_cropped_toks must be a non-empty list of strings such as "
            f"[' the', ' United', ' States'], got {text[:60]!r}"
        )
    return "".join(toks)


def load_lre(
    root: str | Path,
    relations: Sequence[str],
    subjects: int | None = None,
    contexts: int = 1,
    seed: int = 0,
    field_name: str = "relations",
) -> list[dict[str, Any]]:
    """Rows of the LRE attribute-extraction data: per relation, `subjects` subjects (all when
    None) in a seeded order, each with its first `contexts` source contexts; every row with its
    plain question (`ask`: the subject's first row asks it) and its control object."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PatchscopeError(f"{field_name}: no data directory {str(root)!r}")
    rows: list[dict[str, Any]] = []
    for relation in relations:
        path = _relation_file(root, relation, field_name)
        table = read_csv(path, field_name, delimiter="\t")
        if not table:
            raise PatchscopeError(
                f"{field_name}: {path} has no rows (a header line {', '.join(LRE_COLUMNS)}, tab-separated, "
                "then one row per fact)"
            )
        missing = [c for c in LRE_COLUMNS if c not in table[0]]
        if missing:
            raise PatchscopeError(
                f"{field_name}: {path} has no column {', '.join(missing)} "
                f"(columns: {', '.join(str(c) for c in table[0])}; needed: {', '.join(LRE_COLUMNS)})"
            )
        by_subject: dict[str, list[dict]] = {}
        for i, rec in enumerate(table):
            empty = [c for c in LRE_COLUMNS if not (rec.get(c) or "").strip()]
            if empty:
                raise PatchscopeError(f"{field_name}: {path} row {i + 1} has an empty or missing {', '.join(empty)}")
            rec = {**rec, "source": _source(rec["source_cropped_toks"], f"{field_name}: {path} row {i + 1}")}
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
                rows.append(
                    {
                        "relation": relation,
                        "subject": subject,
                        "object": _unescape(rec["object"]),
                        "source": rec["source"],
                        "target": target,
                        "question": target[:-1] + subject,
                        "ask": k == 0,
                    }
                )
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
        out = [
            Probe(
                "patchscope",
                row,
                source=Source(item["source"], l, -1),
                target=Target(item["target"], lt, (-1,)),
                **known,
            )
            for l in self.source_layers
            for lt in self.target_layers
        ]
        if item["ask"]:
            out.append(Probe("plain", row, role="question", prompt=item["question"], **known))
        return out

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return len(self.source_layers) * len(self.target_layers) + int(bool(item["ask"]))
