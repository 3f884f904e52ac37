"""The paper's metrics, as small pure functions (each checked against hand-computed values).

- next-token decoding (§4.1, as the paper's code computes it): precision@1 is 1 when a method's
  top token equals the model's own final prediction at the source position; surprisal is minus
  the log-probability, under the model's own final distribution there, of the method's top token;
- attribute extraction and multi-hop answers (§4.2, §5): correct when the expected text appears
  in the generation, compared with all whitespace removed and case kept (the paper's code);
- entity description (§4.4): RougeL (F-measure, `rouge-score`) of the generated description
  against a reference description;
- the shuffled-label control: each row is scored against another row's expected value
  (`shuffled_labels`), which tells chance agreement (few-class relations) from extraction.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from functools import lru_cache

import torch


def precision_at_1(predicted: int, expected: int) -> float:
    return float(int(predicted) == int(expected))


def surprisal(model_logprobs: torch.Tensor, token: int) -> float:
    """-log p(token) under the model's own next-token distribution (log-probabilities [vocab])."""
    return float(-model_logprobs[int(token)])


def _squash(text: str) -> str:
    return "".join(str(text).split())


def contains_answer(generated: str, answer: str | None) -> bool:
    """The answer appears in the generated text, whitespace removed from both (case kept)."""
    if answer is None or not _squash(answer):
        return False
    return _squash(answer) in _squash(generated)


def description_of(generated: str) -> str:
    """The description the target gave after the patched `x`: the first entry of the generation
    (up to the next ',' or line break; the few-shot prompt separates entries with ', '), after
    its last ':' (the target may name the entity again before describing it)."""
    text = str(generated)
    for stop in (",", "\n"):
        text = text.split(stop, 1)[0]
    return text.split(":")[-1].strip()


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str | None) -> float:
    """RougeL F-measure of a prediction against a reference (rouge-score, no stemming)."""
    if reference is None:
        return float("nan")
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def shuffled_labels(keys: Sequence[Hashable], labels: Sequence[str], seed: int = 0) -> list[str | None]:
    """For each row, the label of a row with another key (a derangement of the distinct keys in
    a seeded order): the control label. Rows that share a key (one subject, several contexts)
    share their control; labels may coincide by chance, which is what the control measures.
    None for every row when there is only one key."""
    distinct = list(dict.fromkeys(keys))
    if len(distinct) < 2:
        return [None] * len(keys)
    label_of = {}
    for k, label in zip(keys, labels):
        label_of.setdefault(k, label)
    order = distinct[:]
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    return [label_of[partner[k]] for k in keys]
