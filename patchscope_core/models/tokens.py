"""Tokens and positions as the model sees them: the one tokenizer call, positions and spans.

`tokenize` gives a prompt's token ids with BOS where the model prepends one (TransformerLens'
rule, read from the model's config by `models/info.py`); every position in this project indexes
those ids, BOS counted, negative from the end (`resolve_position`). `subject_span` finds a
subject's tokens, as whole words (causal tracing, knockout); `context_problem` says when a
prompt and the tokens to generate exceed the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base.errors import PatchscopeError
from .info import ModelInfo


def tokenize(info: ModelInfo, prompt: str, field_name: str = "prompt") -> tuple[int, ...]:
    """Token ids as the model sees the prompt: BOS first when the model prepends one.

    `info`: a `ModelInfo` (`model_info(name)`, no weights) or a loaded model (`load_model`'s
    TransformerBridge). The same ids as `TransformerBridge.to_tokens(prompt)` (a test checks it),
    computed from the tokenizer alone so that validation needs no weights.
    """
    if isinstance(info, ModelInfo):
        tok, prepend_bos = info.tokenizer, info.prepend_bos
    elif getattr(info, "tokenizer", None) is not None and hasattr(getattr(info, "cfg", None), "n_layers"):
        tok, prepend_bos = info.tokenizer, bool(getattr(info.cfg, "default_prepend_bos", True))  # a bridge
    else:
        raise PatchscopeError(
            f"info: tokenize takes a ModelInfo (model_info(name)) or a loaded model "
            f"(load_model(name)), got {type(info).__name__}"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise PatchscopeError(f"{field_name}: empty prompt")
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    if prepend_bos and tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    return tuple(ids)


def tokenize_many(info: ModelInfo, prompts: Sequence[str], field_name: str = "prompts") -> list[tuple[int, ...]]:
    """`tokenize` of many prompts in one call of the tokenizer (its batch path: a grid of millions
    of prompts is planned in seconds); the same ids as `tokenize` of each (a test checks it)."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PatchscopeError(f"{field_name}[{i}]: empty prompt")
    if not prompts:
        return []
    tok = info.tokenizer
    bos = (tok.bos_token_id,) if info.prepend_bos and tok.bos_token_id is not None else ()
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:  # the Rust tokenizer itself: the wrapper's per-prompt conversion costs more
        return [bos + tuple(e.ids) for e in backend.encode_batch(list(prompts), add_special_tokens=False)]
    return [bos + tuple(ids) for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]


def resolve_position(position: int, n_tokens: int, field_name: str) -> int:
    """Absolute index of `position` (negative counts from the end) in a prompt of n_tokens."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise PatchscopeError(f"{field_name}: expected an integer, got {position!r}")
    if not -n_tokens <= position < n_tokens:
        raise PatchscopeError(
            f"{field_name}: {position} is out of range for a prompt of {n_tokens} tokens "
            f"(allowed {-n_tokens} .. {n_tokens - 1})"
        )
    return position % n_tokens


def context_problem(n_prompt: int, max_new_tokens: int, info: ModelInfo) -> str | None:
    """What is wrong when a prompt, and the tokens generated after it, do not fit the model's
    context (n_ctx; 0: unknown); None when they fit."""
    if not info.n_ctx or n_prompt + max_new_tokens <= info.n_ctx:
        return None
    if n_prompt > info.n_ctx or not max_new_tokens:
        return f"{n_prompt} tokens exceed {info.name}'s context of {info.n_ctx} tokens"
    return f"{n_prompt} prompt tokens + {max_new_tokens} new tokens exceed {info.name}'s context of {info.n_ctx} tokens"


def check_context(n_prompt: int, max_new_tokens: int, info: ModelInfo, field_name: str) -> None:
    """Raise naming the prompt when it alone is too long for the context, else max_new_tokens."""
    problem = context_problem(n_prompt, max_new_tokens, info)
    if problem:
        raise PatchscopeError(f"{field_name if n_prompt > info.n_ctx else 'max_new_tokens'}: {problem}")


def whole_word_at(prompt: str, subject: str) -> int:
    """Where `subject` first occurs in `prompt` as whole words (no letter or digit joins it on
    either side: `cat` in "the cat." but not in "category" or "bobcat"); -1 if nowhere."""
    at = prompt.find(subject)
    while at >= 0:
        end = at + len(subject)
        joined_before = at > 0 and prompt[at - 1].isalnum() and subject[0].isalnum()
        joined_after = end < len(prompt) and prompt[end].isalnum() and subject[-1].isalnum()
        if not (joined_before or joined_after):
            return at
        at = prompt.find(subject, at + 1)
    return -1


def _word_around(prompt: str, at: int, n: int) -> str:
    """The word of `prompt` that holds prompt[at : at + n]."""
    start, end = at, at + n
    while start > 0 and prompt[start - 1].isalnum():
        start -= 1
    while end < len(prompt) and prompt[end].isalnum():
        end += 1
    return prompt[start:end]


def subject_span(info: ModelInfo, prompt: str, subject: str, field_name: str = "subject") -> tuple[int, int]:
    """[start, end) of the subject's tokens in the prompt as the model sees it (BOS counted):
    every token that overlaps the subject's first whole-word occurrence (`whole_word_at`); a
    subject found only inside other words (`cat` in "category") is refused, naming the word."""
    if not isinstance(subject, str) or not subject.strip():
        raise PatchscopeError(f"{field_name}: empty subject")
    at = whole_word_at(prompt, subject)
    if at < 0:
        inside = prompt.find(subject)
        if inside < 0:
            raise PatchscopeError(f"{field_name}: {subject!r} does not occur in the prompt {prompt!r}")
        raise PatchscopeError(
            f"{field_name}: {subject!r} occurs in the prompt {prompt!r} only inside another word "
            f"({_word_around(prompt, inside, len(subject))!r}); a subject is whole words of the prompt"
        )
    enc = info.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    bos = len(tokenize(info, prompt)) - len(enc["input_ids"])
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(subject) and b > at and b > a]
    if not inside:
        raise PatchscopeError(f"{field_name}: {subject!r} covers no token of the prompt")
    return bos + inside[0], bos + inside[-1] + 1
