"""Answers checked at planning (the kinds' `check`, with each model's tokenizer, before any
weights load), for the kinds that score an answer: `intervention` (and its knockout),
`causal_trace`, `activation_patching`, `attribution_patching`.

An answer is scored through its tokens as the tokenizer splits the answer alone, and most
measures read its first token only. Two ways that first token differs from what a reader
means are noted: an answer whose first token is not word-initial (it starts with a letter or
digit, no space before it: `Paris` where the model would say ` Paris`) after a prompt that ends
without a space, and an answer of several tokens. The sweep prints ONE warning line for all of
them (`warn`), naming the rows and what is scored, unless `prompts.answers: first_token` says
that this is meant. Nothing here is refused: the warning is advice, the run goes on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from patchscope_core import ModelInfo

SHOWN = 6  # rows named in the warning (then how many more)
WORD_START = ("Ġ", "▁", " ")  # how byte-level BPE and SentencePiece mark a token that starts a word


def word_initial(info: ModelInfo, token: int) -> bool:
    """Whether a token starts a word: its piece carries the tokenizer's word-start mark, or its
    text starts with whitespace or with no letter or digit (punctuation attaches anyway)."""
    tok = info.tokenizer
    piece = tok.convert_ids_to_tokens(token) or ""
    text = tok.decode([token])
    return piece.startswith(WORD_START) or not text[:1].isalnum()


@dataclass
class AnswerNotes:
    """The answers of one sweep that are not scored as written, gathered over its models."""

    notes: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (where, field, answer) -> why
    _pieces: dict[tuple[str, str], tuple[list[str], bool]] = field(default_factory=dict)

    def _split(self, info: ModelInfo, answer: str) -> tuple[list[str], bool]:
        """The answer's tokens as text, and whether the first starts a word (cached per model)."""
        key = (info.name, answer)
        if key not in self._pieces:
            ids = list(info.tokenizer(answer, add_special_tokens=False)["input_ids"])
            texts = [info.tokenizer.decode([i]) for i in ids]
            self._pieces[key] = (texts, bool(ids) and word_initial(info, ids[0]))
        return self._pieces[key]

    def check(self, info: ModelInfo, where: str, field_name: str, prompt: str, answer: str | None) -> None:
        """Note `answer` (of the row at `where`, from the column `field_name` names) when its first
        token is not word-initial after a prompt ending without a space, or it has several tokens."""
        if not answer or (where, field_name, answer) in self.notes:
            return
        texts, initial = self._split(info, answer)
        why = []
        if not initial and prompt[-1:] and not prompt[-1].isspace():
            why.append(f"its first token {texts[0]!r} does not start a word after the prompt's last character")
        if len(texts) > 1:
            why.append(f"{len(texts)} tokens {texts}, the first {texts[0]!r}")
        if why:
            self.notes[(where, field_name, answer)] = "; ".join(why)

    def warn(self, config, scored: str) -> None:
        """One warning line for the whole sweep (none if nothing was noted or the config's
        `prompts.answers` is first_token): the rows, why, and `scored` (what the measures read)."""
        if not self.notes or config.prompts.answers == "first_token":
            return
        items = list(self.notes.items())
        rows = ", ".join(
            f"{where} {name.removeprefix('prompts.')} {answer!r} ({why})"
            for (where, name, answer), why in items[:SHOWN]
        )
        more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
        print(
            f"warning: prompts.answers: {len(items)} answer(s) are not scored as written: {rows}{more}; "
            f"{scored}. Write an answer with its leading space (' Paris', not 'Paris') to score a word, or set "
            "prompts.answers: first_token if this is meant",
            file=sys.stderr,
        )


# What each measure reads of the answer, as the warning says it.
SCORED = {
    "logit_diff": "logit_diff compares the answer's first token with the wrong answer's first token",
    "prob": "prob is the probability of the answer's first token",
    "logprob": "logprob sums the log-probabilities of every answer token (teacher-forced)",
    "kl": "kl reads no answer",
}


def pair_scored(metrics) -> str | None:
    """What a pair kind's metrics read of the answer (None: none reads it, kl alone)."""
    read = [m for m in metrics if m != "kl"]
    return "; ".join(SCORED[m] for m in read) if read else None


def check_pairs(config, plans: dict, rows, metrics) -> None:
    """A pair kind's answers and wrong answers on every model, one warning for the sweep."""
    scored = pair_scored(metrics)
    if scored is None or config.prompts.answers == "first_token":
        return
    notes, wrong = AnswerNotes(), "logit_diff" in metrics  # only logit_diff reads the wrong answer
    for plan in plans.values():
        for row in rows:
            notes.check(plan.info, row.where, "prompts.answer_column", row.clean, row.answer)
            if wrong:
                notes.check(plan.info, row.where, "prompts.wrong_answer_column", row.clean, row.wrong_answer)
    notes.warn(config, scored)


def check_prompt_answers(config, plans: dict, rows, scored: str) -> None:
    """The answers of a prompts kind (intervention, causal_trace) on every model, one warning."""
    if config.prompts.answers == "first_token":
        return
    notes = AnswerNotes()
    for plan in plans.values():
        for row in rows:
            notes.check(plan.info, row.where, "prompts.answer_column", row.prompt, row.answer)
    notes.warn(config, scored)
