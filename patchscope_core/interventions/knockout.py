"""The `knockout` kind: which attention edges it blocks, and on which models it can.

Attention knockout (Geva et al. 2023) writes no value: it blocks edges (query position -> key
position) inside the attention. This module holds the kind (its config fields and checks),
`resolve_edges` (a knockout on one prompt: absolute query and key positions, heads, the layer
window) and `check_attention` (before any weights load: a model whose attention modules compute
their scores themselves, bypassing transformers' `AttentionInterface`, is refused). How the
edges are blocked during a forward pass is `forward/knockout.py`'s.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..base.errors import PatchscopeError
from ..models.info import ModelInfo
from ..models.sites import (
    Site,
    resolve_site,
    window_layers,  # ROME's window of layers
)
from ..models.tokens import (
    resolve_position,
    subject_span,  # the subject as causal tracing finds it
)
from .kinds import Action, Kind, Positions

# A knockout's positions: queries (`from`) and keys (`to`), as the config and the CLI write them.
QUERY_WORDS = ("last", "generated")


KEY_WORDS = ("subject", "non_subject", "last", "all_previous")


def _words(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class Knockout(Kind):
    """Attention knockout (Geva et al. 2023): queries at `from` may not attend to keys at `to`, in
    `heads` (all by default), at site blocks.{l}.attn and the `window` layers centred on l (ROME's
    and Geva's window, clipped at the model's ends). The chosen (head, query, key) scores get the
    dtype's minimum added before the softmax (forward/knockout.py).

    from: `last` (the last prompt token), prompt positions (ints; negative from the end), `generated`
        (every generated token, blocked as it is decoded; in a scoring run: every answer token).
    to: prompt positions (ints), `subject` (the tokens of `subject`), `non_subject` (every prompt
        token that is neither the subject's nor the last one, BOS not counted), `last`, `all_previous`
        (every key before the query: the query then attends to itself alone).
    Empty `from` or `to`: nothing is blocked (bit-identical to no knockout)."""

    from_: tuple = field(default=("last",), metadata={"key": "from"})
    to: tuple = ()
    heads: tuple[int, ...] = ()
    window: int = 1
    subject: str | None = None
    name: ClassVar[str] = "knockout"
    edits_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("from_", "to", "heads"):
            value = getattr(self, name)
            object.__setattr__(self, name, () if value is None else _words(value))

    def check(self, site, info, positions, field_name):
        for key, values, words in (("from", self.from_, QUERY_WORDS), ("to", self.to, KEY_WORDS)):
            for v in values:
                if not (v in words or (isinstance(v, int) and not isinstance(v, bool))):
                    raise PatchscopeError(
                        f"{field_name}.{key}: expected prompt positions (integers) or {', '.join(words)}; got {v!r}"
                    )
        for h in self.heads:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < info.n_heads:
                raise PatchscopeError(
                    f"{field_name}.heads: {h!r} is out of range 0 .. {info.n_heads - 1} for {info.name}"
                )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise PatchscopeError(f"{field_name}.window: expected an integer >= 1, got {self.window!r}")
        if any(v in ("subject", "non_subject") for v in self.to) and self.subject is None:
            raise PatchscopeError(
                f"{field_name}.subject: to: subject / non_subject needs the subject (a substring of the prompt)"
            )

    def resolve(self, site, info, prompt, n_prompt, positions, layer, where):
        """The queries and the edges this knockout blocks on the prompt; refused where the model's
        attention bypasses the AttentionInterface."""
        if positions != Positions(prompt=True, generated=True):
            raise PatchscopeError(
                f"{where}.positions: a knockout's queries are its `from` field; leave positions unset"
            )
        self.check(site, info, positions, f"{where}.{self.name}")
        edges = resolve_edges(self, info, prompt, n_prompt, layer, f"{where}.{self.name}")
        check_attention(info, edges.layers, f"{where}.site")
        return edges.queries, edges

    def prepare(self, site, reader):
        return Action()  # nothing is written: the edges are blocked inside the attention (forward/knockout.py)


@dataclass(frozen=True)
class Edges:
    """A knockout resolved on one prompt: query positions (absolute; and/or every generated token),
    key positions (absolute prompt positions), whether every key before the query is blocked too,
    the heads (empty: all) and the layers."""

    queries: Positions
    keys: tuple[int, ...]
    all_previous: bool
    heads: tuple[int, ...]
    layers: tuple[int, ...]


def resolve_edges(kind: Knockout, info: ModelInfo, prompt: str, n_prompt: int, layer: int, field_name: str) -> Edges:
    """The edges `kind` blocks on a prompt of n_prompt tokens (BOS counted); refuses a knockout that
    leaves a query no key at all. Empty `from` or `to`: no edge."""
    queries = {
        resolve_position(-1 if q == "last" else q, n_prompt, f"{field_name}.from")
        for q in kind.from_
        if q != "generated"
    }
    span = (0, 0)
    if any(v in ("subject", "non_subject") for v in kind.to):
        span = subject_span(info, prompt, kind.subject, f"{field_name}.subject")
    bos = n_prompt - len(info.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    keys: set[int] = set()
    for v in kind.to:
        if v == "subject":
            keys |= set(range(*span))
        elif v == "non_subject":
            keys |= set(range(bos, n_prompt - 1)) - set(range(*span))
        elif v == "last":
            keys.add(n_prompt - 1)
        elif v != "all_previous":
            keys.add(resolve_position(v, n_prompt, f"{field_name}.to"))
    previous = "all_previous" in kind.to
    for q in sorted(queries):
        if kind.to and all(k in keys or (previous and k < q) for k in range(q + 1)):
            raise PatchscopeError(f"{field_name}.to: blocks every key of query position {q}; a query must keep one")
    blocks = bool(kind.to) and bool(keys or previous)
    layers = tuple(window_layers("attn_out", layer, kind.window, info.n_layers))
    return Edges(
        Positions(tuple(sorted(queries)) if blocks else (), generated=blocks and "generated" in kind.from_),
        tuple(sorted(keys)),
        previous,
        tuple(kind.heads),
        layers,
    )


def code_names(fn: Callable) -> set[str]:
    """The global and attribute names a function's code (and its nested code) refers to."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        c = stack.pop()
        names |= set(c.co_names)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


def refusal(cls: type) -> str | None:
    """Why a knockout cannot act on attention modules of class `cls`, or None: its forward must
    look up the attention function transformers' AttentionInterface names (ALL_ATTENTION_FUNCTIONS)."""
    if "ALL_ATTENTION_FUNCTIONS" not in code_names(cls.forward):
        return (
            f"{cls.__name__} computes its attention scores itself instead of calling the function transformers' "
            "AttentionInterface names (config._attn_implementation), so a knockout cannot reach them"
        )
    return None


_META: dict[int, tuple[Any, nn.Module | None]] = {}  # id(hf_config) -> (hf_config, its model on the meta device)


def _meta_model(hf_config) -> nn.Module | None:
    """The model of a Hugging Face config built on the meta device (no weights, no memory), or
    None where transformers cannot build it so (then `attach` decides at run time)."""
    if id(hf_config) not in _META:
        import transformers

        model = None
        try:
            config = copy.deepcopy(hf_config)  # building a model may set fields of its config
            arch = (getattr(config, "architectures", None) or [""])[0]
            cls = getattr(transformers, arch, None)
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
        except Exception:  # noqa: BLE001 - no early check; attach refuses at run time
            model = None
        _META[id(hf_config)] = (hf_config, model)
    return _META[id(hf_config)][1]


def _architecture(hf_config) -> str:
    return (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]


def check_attention(info: ModelInfo, layers: Sequence[int], field_name: str) -> None:
    """Refuse, before any weights load, a knockout on layers whose attention module bypasses the
    AttentionInterface (the modules' classes read from a meta-device copy of the model)."""
    model = _meta_model(info.hf_config) if info.hf_config is not None else None
    if model is None:
        return
    for layer in layers:
        path = resolve_site(Site(f"blocks.{layer}.attn"), info).module
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        reason = refusal(type(module))
        if reason:
            raise PatchscopeError(
                f"{field_name}: knockout is not supported on {_architecture(info.hf_config)} "
                f"(blocks.{layer}.attn is {path}): {reason}"
            )
