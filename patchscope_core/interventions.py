"""What an intervention does (its kind), where (a site) and when (positions).

Every kind is a frozen dataclass with typed fields, registered by name in `KINDS` (the sweep
config and the CLI read it; pyvene's idea, with typed fields instead of `**kwargs`). Adding a
kind is one class here: `check` refuses bad values before any weights load, `prepare` turns the
kind into an `Action` on the site's activation `x` (one position's features, flattened):

    x' = scale * x + shift + table[position] + sigma * noise(seed, position)

written only at the selected positions and features (a site's heads or neurons), and only on
real tokens, never on left padding. Values that need a forward pass (a mean over reference
prompts, a std, another prompt's activations) come from a reader that computes each once.

One kind writes no value: `Knockout` blocks attention edges (query -> key positions, per head,
over a window of layers) at the site `blocks.{l}.attn`, inside Hugging Face's attention
(knockout.py); `ACTIVATION_KINDS` are the others.

A Patchscope is `Replace(vector=f(h))` at `blocks.{l*}.hook_resid_post` and the target positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from .errors import PatchscopeError
from .models import ModelInfo
from .sites import ResolvedSite, Site, resolve_site
from .spec import resolve_position, tokenize
from .values import check_finite, check_seed, quiet_torch_load

# ---------------------------------------------------------------- when: positions


@dataclass(frozen=True)
class Positions:
    """Prompt positions (ints; negative counts from the end; BOS counted), every prompt
    position (`prompt`), every generated token (`generated`; in a scoring run: every answer
    token), or both (`all`)."""

    indices: tuple[int, ...] = ()
    prompt: bool = False
    generated: bool = False

    @classmethod
    def parse(cls, value: Any, field_name: str = "positions") -> Positions:
        if isinstance(value, Positions):
            return value
        if value in ("all", "prompt", "generated"):
            return cls(prompt=value in ("all", "prompt"), generated=value in ("all", "generated"))
        values = [value] if isinstance(value, int) else value
        if (
            isinstance(values, (list, tuple))
            and values
            and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        ):
            return cls(indices=tuple(values))
        raise PatchscopeError(
            f"{field_name}: expected prompt positions (integers), 'prompt', 'generated' or 'all', got {value!r}"
        )

    def resolve(self, n_prompt: int, field_name: str = "positions") -> Positions:
        """Absolute prompt positions for a prompt of n_prompt tokens (`prompt` lists them all, so
        a kind's check sees every prompt position it will write)."""
        if not (self.indices or self.prompt or self.generated):
            raise PatchscopeError(f"{field_name}: no position selected")
        indices = {resolve_position(p, n_prompt, field_name) for p in self.indices}
        indices = tuple(sorted(indices | (set(range(n_prompt)) if self.prompt else set())))
        return Positions(indices, self.prompt, self.generated)

    def __str__(self) -> str:
        if self.prompt and self.generated:
            return "all"
        words = [str(i) for i in self.indices] + ["prompt"] * self.prompt + ["generated"] * self.generated
        return ",".join(words)


# ---------------------------------------------------------------- what: kinds


@dataclass(frozen=True)
class Action:
    """x' = scale * x + shift + table[position] + sigma * noise(seed, position), per feature."""

    scale: float = 1.0
    shift: torch.Tensor | None = None  # [width]
    table: torch.Tensor | None = None  # [positions, width]: a value per absolute position
    sigma: float = 0.0
    seed: int = 0


class Reader(Protocol):
    """Values read from forward passes at a site, each computed once."""

    def mean(self, site: ResolvedSite, prompts: tuple[str, ...]) -> torch.Tensor: ...  # [width]
    def std(self, site: ResolvedSite, prompts: tuple[str, ...]) -> float: ...
    def values(self, site: ResolvedSite, prompt: str) -> torch.Tensor: ...  # [tokens, width]


def noise_at(seed: int, position: int, width: int) -> torch.Tensor:
    """Standard Gaussian noise for one absolute position: the same whatever the batch, the
    cache or the step, so a noised run is reproducible (float32, on the CPU)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + position)
    return torch.randn(width, generator=g)


def site_vector(vector: torch.Tensor, site: ResolvedSite, field_name: str) -> torch.Tensor:
    """A vector for `site` flattened to its width: the site's own shape (d_model, d_mlp,
    [n_heads, d_head]), or for attn.hook_z one head's [d_head], used for every head."""
    if not isinstance(vector, torch.Tensor):
        raise PatchscopeError(f"{field_name}: expected a tensor, got {type(vector).__name__}")
    v = vector.detach().float()
    if tuple(v.shape) == site.shape or (v.ndim == 1 and v.numel() == site.width):
        return v.flatten()
    if len(site.shape) == 2 and tuple(v.shape) == site.shape[1:]:
        return v.repeat(site.shape[0])
    allowed = f"{list(site.shape)}" + (f" or [{site.shape[1]}] (one head)" if len(site.shape) == 2 else "")
    raise PatchscopeError(f"{field_name}: shape {list(v.shape)} does not fit {site.site.hook}, which takes {allowed}")


def load_vector(path, field_name: str = "vector") -> torch.Tensor:
    """A vector from a .safetensors file (its only tensor, or the one named 'vector') or a
    torch-saved tensor (.pt; read with weights_only, never unpickling code)."""
    from pathlib import Path

    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchscopeError(f"{field_name}: no such file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            if len(tensors) != 1 and "vector" not in tensors:
                raise PatchscopeError(
                    f"{field_name}: {path} holds {sorted(tensors)}; expected one tensor or one named 'vector'"
                )
            value = tensors.get("vector", next(iter(tensors.values())))
        else:
            value = quiet_torch_load(path)
    except PatchscopeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input, named as such
        raise PatchscopeError(f"{field_name}: cannot read {path} as a tensor ({type(exc).__name__})") from None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise PatchscopeError(f"{field_name}: {path} holds {type(value).__name__}, not a floating-point tensor")
    check_finite(value, field_name, str(path))
    return value


def _prompts(prompts: Sequence[str], info: ModelInfo, field_name: str) -> None:
    if not prompts:
        raise PatchscopeError(f"{field_name}: needs at least one prompt")
    for p in prompts:
        tokenize(info, p, field_name)


class Kind:
    """Base of the intervention kinds."""

    name: ClassVar[str]

    def check(self, site: ResolvedSite, info: ModelInfo, positions: Positions, field_name: str) -> None:
        """Refuse bad values before any weights load (field_name: where this kind sits)."""

    def prepare(self, site: ResolvedSite, reader: Reader) -> Action:
        raise NotImplementedError

    edits_attention: ClassVar[bool] = False  # True: acts on attention edges at blocks.{l}.attn, not on a value


@dataclass(frozen=True)
class Zero(Kind):
    """Set the activation to 0 (zero-ablation)."""

    name: ClassVar[str] = "zero"

    def prepare(self, site, reader):
        return Action(scale=0.0)


@dataclass(frozen=True)
class Scale(Kind):
    """Multiply the activation by `factor`."""

    factor: float = 0.0
    name: ClassVar[str] = "scale"

    def check(self, site, info, positions, field_name):
        if not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor):
            raise PatchscopeError(f"{field_name}.factor: expected a finite number, got {self.factor!r}")

    def prepare(self, site, reader):
        return Action(scale=float(self.factor))


@dataclass(frozen=True)
class Mean(Kind):
    """Replace with the mean activation over `reference` prompts (every token but BOS), computed once."""

    reference: tuple[str, ...] = ()
    name: ClassVar[str] = "mean"

    def check(self, site, info, positions, field_name):
        _prompts(self.reference, info, f"{field_name}.reference")

    def prepare(self, site, reader):
        return Action(scale=0.0, shift=reader.mean(site, tuple(self.reference)))


@dataclass(frozen=True)
class Noise(Kind):
    """Add Gaussian noise of `scale` x the std of the site's values over `reference` prompts
    (every token but BOS; or a given `std`), seeded by position (causal tracing: 3 x the
    embeddings' std at hook_embed)."""

    scale: float = 3.0
    reference: tuple[str, ...] = ()
    std: float | None = None
    seed: int = 0
    name: ClassVar[str] = "noise"

    def check(self, site, info, positions, field_name):
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
            raise PatchscopeError(f"{field_name}.scale: the noise scale must be a number >= 0, got {self.scale!r}")
        check_seed(self.seed, f"{field_name}.seed")
        if self.std is not None and not (
            isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std >= 0
        ):
            raise PatchscopeError(f"{field_name}.std: must be a number >= 0, got {self.std!r}")
        if self.std is None:
            _prompts(self.reference, info, f"{field_name}.reference")

    def prepare(self, site, reader):
        std = self.std if self.std is not None else reader.std(site, tuple(self.reference))
        return Action(sigma=float(self.scale) * std, seed=int(self.seed))


@dataclass(frozen=True)
class Resample(Kind):
    """Replace with the value the same site holds at the same position in another prompt."""

    source: str = ""
    name: ClassVar[str] = "resample"

    def check(self, site, info, positions, field_name):
        n = len(tokenize(info, self.source, f"{field_name}.source"))
        if positions.generated:
            raise PatchscopeError(
                f"{field_name}: resample takes prompt positions only (the source prompt has no generated tokens)"
            )
        if positions.indices and max(positions.indices) >= n:
            raise PatchscopeError(
                f"{field_name}.source: position {max(positions.indices)} is past the source prompt's {n} tokens"
            )

    def prepare(self, site, reader):
        return Action(scale=0.0, table=reader.values(site, self.source))


@dataclass(frozen=True, eq=False)
class Replace(Kind):
    """Replace with `vector`, or with the value the same site holds in another run
    (`source` prompt at `source_position`)."""

    vector: torch.Tensor | None = None
    source: str | None = None
    source_position: int = -1
    name: ClassVar[str] = "replace"

    def check(self, site, info, positions, field_name):
        if (self.vector is None) == (self.source is None):
            raise PatchscopeError(f"{field_name}: replace needs exactly one of a vector or a source prompt")
        if self.vector is not None:
            site_vector(self.vector, site, f"{field_name}.vector")
        else:
            n = len(tokenize(info, self.source, f"{field_name}.source"))
            resolve_position(self.source_position, n, f"{field_name}.source_position")

    def prepare(self, site, reader):
        if self.vector is not None:
            return Action(scale=0.0, shift=site_vector(self.vector, site, "vector"))
        return Action(scale=0.0, shift=reader.values(site, self.source)[self.source_position])


@dataclass(frozen=True, eq=False)
class Add(Kind):
    """Add `alpha` x a vector (steering): `vector`, or the difference of the mean activations of
    the `positive` and `negative` prompt sets (every token but BOS)."""

    alpha: float = 1.0
    vector: torch.Tensor | None = None
    positive: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    name: ClassVar[str] = "add"

    def check(self, site, info, positions, field_name):
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise PatchscopeError(f"{field_name}.alpha: expected a finite number, got {self.alpha!r}")
        if self.vector is not None:
            site_vector(self.vector, site, f"{field_name}.vector")
        elif self.positive or self.negative:
            _prompts(self.positive, info, f"{field_name}.positive")
            _prompts(self.negative, info, f"{field_name}.negative")
        else:
            raise PatchscopeError(f"{field_name}: add needs a vector, or positive and negative prompt sets")

    def prepare(self, site, reader):
        if self.vector is not None:
            v = site_vector(self.vector, site, "vector")
        else:
            v = reader.mean(site, tuple(self.positive)) - reader.mean(site, tuple(self.negative))
        return Action(scale=1.0, shift=float(self.alpha) * v)


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
    dtype's minimum added before the softmax (knockout.py).

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

    def prepare(self, site, reader):
        return Action()  # nothing is written: the edges are blocked inside the attention (knockout.py)


KINDS: dict[str, type[Kind]] = {k.name: k for k in (Replace, Add, Scale, Zero, Mean, Resample, Noise, Knockout)}
ACTIVATION_KINDS = {name: k for name, k in KINDS.items() if not k.edits_attention}  # kinds that write a site's value


# ---------------------------------------------------------------- an intervention and a run


@dataclass(frozen=True)
class Intervention:
    """Do `kind` at `site` at `positions` (default: every prompt position and generated token)."""

    site: Site
    kind: Kind
    positions: Positions = Positions(prompt=True, generated=True)

    def __post_init__(self) -> None:
        if isinstance(self.site, str):
            object.__setattr__(self, "site", Site(self.site))
        object.__setattr__(self, "positions", Positions.parse(self.positions))


@dataclass(frozen=True)
class InterventionRun:
    """A prompt run with interventions: what it generates (max_new_tokens, 0 for none) and,
    with an answer, the answer's teacher-forced log-probability."""

    prompt: str
    interventions: tuple[Intervention, ...] = ()
    answer: str | None = None
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))


@dataclass(frozen=True)
class ResolvedIntervention:
    intervention: Intervention
    site: ResolvedSite
    positions: Positions  # absolute (a knockout's: its queries)
    edges: Any = None  # a knockout's blocked edges on this prompt (knockout.Edges)


@dataclass(frozen=True)
class ResolvedRun:
    """A run checked against its model: token ids and absolute positions."""

    run: Any  # the InterventionRun (or Patchscope) it came from
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    interventions: tuple[ResolvedIntervention, ...]
    max_new_tokens: int


def resolve_run(run: InterventionRun, info: ModelInfo, field_name: str = "run") -> ResolvedRun:
    """Validate a run against the model; raises PatchscopeError naming the field."""
    n = run.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PatchscopeError(f"{field_name}.max_new_tokens: expected an integer >= 0, got {n!r}")
    prompt = tokenize(info, run.prompt, f"{field_name}.prompt")
    answer: tuple[int, ...] = ()
    if run.answer is not None:
        if not isinstance(run.answer, str) or not run.answer:
            raise PatchscopeError(f"{field_name}.answer: empty answer")
        answer = tuple(info.tokenizer(run.answer, add_special_tokens=False)["input_ids"])
        if not answer:
            raise PatchscopeError(f"{field_name}.answer: {run.answer!r} has no tokens")
    if info.n_ctx and len(prompt) > info.n_ctx:
        raise PatchscopeError(
            f"{field_name}.prompt: {len(prompt)} tokens exceed {info.name}'s context of {info.n_ctx} tokens"
        )
    if len(prompt) + max(n, len(answer)) > info.n_ctx:
        raise PatchscopeError(
            f"{field_name}.max_new_tokens: {len(prompt)} prompt tokens + {max(n, len(answer))} more exceed "
            f"{info.name}'s context of {info.n_ctx} tokens"
        )
    resolved = []
    for i, iv in enumerate(run.interventions):
        where = f"{field_name}.interventions[{i}]"
        if not isinstance(iv.kind, Kind):
            raise PatchscopeError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {iv.kind!r}")
        site = resolve_site(iv.site, info, f"{where}.site")
        if (site.side == "attention") != iv.kind.edits_attention:
            raise PatchscopeError(
                f"{where}.site: {iv.kind.name} acts on "
                + (
                    "blocks.{l}.attn (attention edges)"
                    if iv.kind.edits_attention
                    else f"a value, not on {iv.site.hook}; only knockout acts on blocks.{{l}}.attn"
                )
            )
        if iv.kind.edits_attention:
            if iv.positions != Positions(prompt=True, generated=True):
                raise PatchscopeError(
                    f"{where}.positions: a knockout's queries are its `from` field; leave positions unset"
                )
            iv.kind.check(site, info, iv.positions, f"{where}.{iv.kind.name}")
            from .knockout import check_attention, resolve_edges  # the knockout's machinery builds on this module

            edges = resolve_edges(iv.kind, info, run.prompt, len(prompt), iv.site.layer, f"{where}.{iv.kind.name}")
            check_attention(info, edges.layers, f"{where}.site")
            resolved.append(ResolvedIntervention(iv, site, edges.queries, edges))
            continue
        positions = iv.positions.resolve(len(prompt), f"{where}.positions")
        iv.kind.check(site, info, positions, f"{where}.{iv.kind.name}")
        resolved.append(ResolvedIntervention(iv, site, positions))
    return ResolvedRun(run, prompt, answer, tuple(resolved), n)


def kind_fields(name: str) -> list[str]:
    """The typed fields of a registered kind (for the CLI and the sweep config)."""
    from dataclasses import fields

    return [_key(f) for f in fields(KINDS[name])]


def _key(f) -> str:
    """A field's config key (`from` for Knockout.from_, a Python keyword)."""
    return f.metadata.get("key", f.name)


def make_kind(name: str, values: dict[str, Any], field_name: str = "kind") -> Kind:
    """A registered kind from plain data (what travels to a sweep's workers): vectors as lists of
    numbers, prompt sets as lists of strings; fields the kind does not take are refused."""
    from dataclasses import fields

    if name not in KINDS:
        raise PatchscopeError(f"{field_name}: unknown kind {name!r} (allowed: {', '.join(KINDS)})")
    takes = set(kind_fields(name))
    extra = sorted(set(values) - takes)
    if extra:
        raise PatchscopeError(
            f"{field_name}: {name} takes {', '.join(sorted(takes)) or 'no fields'}, not {', '.join(extra)}"
        )
    typed = {}
    for key, value in values.items():
        if key == "vector" and value is not None and not isinstance(value, torch.Tensor):
            value = torch.tensor(value, dtype=torch.float32)
        elif key in ("reference", "positive", "negative", "from", "to", "heads") and value is not None:
            value = tuple(value)
        typed[key] = value
    attrs = {_key(f): f.name for f in fields(KINDS[name])}
    return KINDS[name](**{attrs[k]: v for k, v in typed.items()})


def kind_values(kind: Kind) -> dict[str, Any]:
    """The plain data of a kind, the inverse of `make_kind` (vectors as lists)."""
    from dataclasses import fields

    out = {}
    for f in fields(kind):
        value = getattr(kind, f.name)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        elif isinstance(value, tuple):
            value = list(value)
        out[_key(f)] = value
    return out


def run_to_dict(run: InterventionRun) -> dict[str, Any]:
    """Plain data of a run (what travels to a sweep's workers)."""
    return {
        "prompt": run.prompt,
        "answer": run.answer,
        "max_new_tokens": run.max_new_tokens,
        "interventions": [
            {
                "site": iv.site.hook,
                "head": list(iv.site.head),
                "neuron": list(iv.site.neuron),
                "kind": iv.kind.name,
                "values": kind_values(iv.kind),
                "positions": {
                    "indices": list(iv.positions.indices),
                    "prompt": iv.positions.prompt,
                    "generated": iv.positions.generated,
                },
            }
            for iv in run.interventions
        ],
    }


def run_from_dict(data: dict[str, Any]) -> InterventionRun:
    ivs = [
        Intervention(
            Site(d["site"], head=tuple(d["head"]), neuron=tuple(d["neuron"])),
            make_kind(d["kind"], d["values"]),
            Positions(tuple(d["positions"]["indices"]), d["positions"]["prompt"], d["positions"]["generated"]),
        )
        for d in data["interventions"]
    ]
    return InterventionRun(data["prompt"], tuple(ivs), data["answer"], data["max_new_tokens"])


__all__ = [
    "ACTIVATION_KINDS",
    "Action",
    "Add",
    "Intervention",
    "InterventionRun",
    "KINDS",
    "Kind",
    "Knockout",
    "Mean",
    "Noise",
    "Positions",
    "Replace",
    "Resample",
    "ResolvedIntervention",
    "ResolvedRun",
    "Scale",
    "Zero",
    "noise_at",
    "resolve_run",
    "site_vector",
]
