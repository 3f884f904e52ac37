"""The Patchscope spec (the paper's notation) and its validation.

A Patchscope reads the hidden representation h at (source model M, prompt S, layer l,
position i), maps it (f), writes f(h) into (target model M*, prompt T, layer l*,
positions i*) and lets M* generate.

Conventions:
- layer l is the residual stream *after* block l (`blocks.{l}.hook_resid_post`); valid layers
  are 0 .. n_layers-1. That is HF `hidden_states[l + 1]` except for the last layer: Hugging Face
  applies the final norm to its last hidden state, this residual stream is before it.
- a position indexes the prompt's tokens as the model sees them (BOS included when the
  model prepends one); negative positions count from the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import PatchscopeError
from .mapping import Identity, Mapping
from .models import ModelInfo


@dataclass(frozen=True)
class Source:
    prompt: str
    layer: int
    position: int = -1
    model: str | None = None  # None: the engine's source model


@dataclass(frozen=True)
class Target:
    prompt: str
    layer: int
    positions: tuple[int, ...] = (-1,)
    model: str | None = None  # None: the engine's target model

    def __post_init__(self) -> None:
        positions = (self.positions,) if isinstance(self.positions, int) else tuple(self.positions)
        object.__setattr__(self, "positions", positions)


@dataclass(frozen=True)
class Patchscope:
    source: Source
    target: Target
    mapping: Mapping = field(default_factory=Identity)
    max_new_tokens: int = 20

    def to_dict(self) -> dict:
        """Plain data (what travels to a sweep's workers); only the identity mapping travels."""
        if not isinstance(self.mapping, Identity):
            raise PatchscopeError("mapping: only the identity mapping can be sent as plain data")
        s, t = self.source, self.target
        return {
            "source": {"prompt": s.prompt, "layer": s.layer, "position": s.position, "model": s.model},
            "target": {"prompt": t.prompt, "layer": t.layer, "positions": list(t.positions), "model": t.model},
            "max_new_tokens": self.max_new_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Patchscope:
        target = dict(data["target"], positions=tuple(data["target"]["positions"]))
        return cls(Source(**data["source"]), Target(**target), max_new_tokens=data["max_new_tokens"])


@dataclass(frozen=True)
class ResolvedPatchscope:
    """A Patchscope checked against its models: token ids and absolute positions."""

    spec: Patchscope
    source_token_ids: tuple[int, ...]
    target_token_ids: tuple[int, ...]
    source_position: int
    target_positions: tuple[int, ...]


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


def check_layer(layer: int, info: ModelInfo, field_name: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise PatchscopeError(f"{field_name}: expected an integer, got {layer!r}")
    if not 0 <= layer < info.n_layers:
        raise PatchscopeError(
            f"{field_name}: {layer} is out of range 0 .. {info.n_layers - 1} for {info.name} "
            f"({info.n_layers} layers; layer l is the residual stream after block l)"
        )
    return layer


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


def resolve(spec: Patchscope, source: ModelInfo, target: ModelInfo) -> ResolvedPatchscope:
    """Validate `spec` against both models and resolve its positions; raises PatchscopeError."""
    if not isinstance(spec.max_new_tokens, int) or spec.max_new_tokens < 1:
        raise PatchscopeError(f"max_new_tokens: expected an integer >= 1, got {spec.max_new_tokens!r}")
    check_layer(spec.source.layer, source, "source.layer")
    check_layer(spec.target.layer, target, "target.layer")
    src_ids = tokenize(source, spec.source.prompt, "source.prompt")
    tgt_ids = tokenize(target, spec.target.prompt, "target.prompt")
    check_context(len(src_ids), 0, source, "source.prompt")
    check_context(len(tgt_ids), spec.max_new_tokens, target, "target.prompt")
    if not spec.target.positions:
        raise PatchscopeError("target.positions: at least one position is needed")
    src_pos = resolve_position(spec.source.position, len(src_ids), "source.position")
    tgt_pos = tuple(sorted({resolve_position(p, len(tgt_ids), "target.positions") for p in spec.target.positions}))
    spec.mapping.check(source.d_model, target.d_model)
    return ResolvedPatchscope(spec, src_ids, tgt_ids, src_pos, tgt_pos)


def resolve_all(specs: Sequence[Patchscope], source: ModelInfo, target: ModelInfo) -> list[ResolvedPatchscope]:
    """Resolve every spec; the error names the index of the first bad one."""
    out = []
    for i, spec in enumerate(specs):
        try:
            out.append(resolve(spec, source, target))
        except PatchscopeError as exc:
            raise PatchscopeError(f"patchscopes[{i}].{exc}") from exc
    return out
