"""Next-token decoding (paper §4.1) and cross-model patching (§4.5), with their corpus.

Token identity: the hidden state h at layer l and position i of a window of real text is
patched into the few-shot identity prompt `cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?` at its
last position, at layer l* = l; the patched first token should be what the model itself
predicts next at i (precision@1; surprisal: -log of that token under the model's own
distribution). The baselines read the same h: the logit lens, and the affine tuned lens fitted
from layer l to the last layer on windows disjoint from the evaluated ones.

Cross-model: h from the source model's layer l, at the last token of a window, is mapped by
W h + b, fitted by least squares from layer l to the target model's layer l* on the fit
windows, and patched into the target model running the same window at the same position,
layer l* (the paper's code); the target's prediction there against the source model's own
(precision@1, surprisal). The two models must share a tokenizer.

The corpus: windows of `words` words cut from a text (default: the Python Language Reference
topics that ship with CPython, `pydoc_data.topics`), deduplicated by paragraph, shuffled with
a seed; the first `n_eval` are evaluated, the next `n_fit` fit the maps (never the same window).
Token identity reads `positions` positions per window, spread evenly from `min_context` to the
last token, so each evaluated token has context (a source of one token right after BOS decodes
only at layer 0); cross-model reads each window's last token, the position whose prediction
the target's first generated token is.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..base.errors import PatchscopeError
from ..methods.patchscope import Source, Target
from .probes import Probe, Recipe

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"


def pydoc_text() -> str:
    """The Python Language Reference topics that ship with CPython, as one text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_windows(
    text: str, words: int = 48, n_eval: int = 40, n_fit: int = 200, seed: int = 0, field_name: str = "corpus"
) -> tuple[list[str], list[str]]:
    """(evaluation windows, fit windows): disjoint windows of `words` words (paragraphs
    deduplicated first), in a seeded order."""
    paragraphs = list(dict.fromkeys(p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()))
    tokens = " ".join(paragraphs).split()
    windows = list(dict.fromkeys(" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)))
    if len(windows) < n_eval + n_fit:
        raise PatchscopeError(
            f"{field_name}: {len(windows)} windows of {words} words, fewer than the "
            f"{n_eval} evaluated + {n_fit} fit windows asked for"
        )
    random.Random(seed).shuffle(windows)
    return windows[:n_eval], windows[n_eval : n_eval + n_fit]


def positions_in(n_tokens: int, k: int, min_context: int, field_name: str = "positions") -> list[int]:
    """k distinct positions spread evenly from min_context to the last token (BOS counted)."""
    lo, hi = min_context, n_tokens - 1
    if k < 1 or hi - lo + 1 < k:
        raise PatchscopeError(
            f"{field_name}: {k} positions from position {min_context} on do not fit a window "
            f"of {n_tokens} tokens; use longer windows or fewer positions"
        )
    if k == 1:
        return [hi]
    return [lo + round(j * (hi - lo) / (k - 1)) for j in range(k)]


@dataclass(frozen=True)
class TokenIdentity(Recipe):
    """The token-identity Patchscope with the logit-lens and tuned-lens baselines (l* = l)."""

    layers: tuple[int, ...]
    positions: int = 5
    min_context: int = 8
    baselines: tuple[str, ...] = ("logit_lens", "tuned_lens")
    target_prompt: str = IDENTITY_PROMPT
    name: ClassVar[str] = "token_identity"
    metric: ClassVar[str] = "next_token"

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        text, out = item["text"], []
        for pos in positions_in(tokens(text), self.positions, self.min_context):
            for layer in self.layers:
                src = Source(text, layer, pos)
                out.append(
                    Probe(
                        "patchscope", row, source=src, target=Target(self.target_prompt, layer, (-1,)), max_new_tokens=1
                    )
                )
                out += [Probe(b, row, source=src) for b in self.baselines]
        return out

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return self.positions * len(self.layers) * (1 + len(self.baselines))

    def pairs(self, n_layers: int) -> list[tuple[int, int]]:
        return [(layer, n_layers - 1) for layer in self.layers] if "tuned_lens" in self.baselines else []


@dataclass(frozen=True)
class CrossModel(Recipe):
    """Cross-model patching: source layer l -> affine map -> target layer l*, at the last token
    of the same text (where the first generated token is the prediction at the patched position)."""

    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    name: ClassVar[str] = "cross_model"
    metric: ClassVar[str] = "next_token"

    def probes(self, row: int, item: dict[str, Any], tokens: Callable[[str], int]) -> list[Probe]:
        text = item["text"]
        return [
            Probe("affine", row, source=Source(text, l, -1), target=Target(text, lt, (-1,)), max_new_tokens=1)
            for l in self.source_layers
            for lt in self.target_layers
        ]

    def count(self, item: dict[str, Any], tokens: Callable[[str], int]) -> int:
        return len(self.source_layers) * len(self.target_layers)

    def pairs(self, n_layers: int) -> list[tuple[int, int]]:
        return [(l, lt) for l in self.source_layers for lt in self.target_layers]
