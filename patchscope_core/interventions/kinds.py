"""What an intervention does (its kind), where (a site) and when (positions).

Every kind is a frozen dataclass with typed fields, registered by name in `KINDS` (`registry.py`; the
sweep config and the CLI read it; pyvene's idea, with typed fields instead of `**kwargs`).
Adding a kind is one class here and its line in the registry: `check` refuses bad values before any weights load, `prepare` turns the
kind into an `Action` on the site's activation `x` (one position's features, flattened):

    x' = scale * x + shift + table[position] + sigma * noise(seed, position)

written only at the selected positions and features (a site's heads or neurons), and only on
real tokens, never on left padding. Values that need a forward pass (a mean over reference
prompts, a std, another prompt's activations) come from a reader that computes each once.

One kind writes no value: `Knockout` blocks attention edges (query -> key positions, per head,
over a window of layers) at the site `blocks.{l}.attn`, inside Hugging Face's attention
(`knockout.py` here, `forward/knockout.py`); `ACTIVATION_KINDS` are the others. A kind resolves
itself on a prompt (`Kind.resolve`), so a run never asks which kind it holds.

A Patchscope is `Replace(vector=f(h))` at `blocks.{l*}.hook_resid_post` and the target positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from ..base.errors import PatchscopeError
from ..base.values import check_finite, check_seed, quiet_torch_load
from ..models.info import ModelInfo
from ..models.sites import ResolvedSite
from ..models.tokens import resolve_position, tokenize


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

    def resolve(
        self,
        site: ResolvedSite,
        info: ModelInfo,
        prompt: str,
        n_prompt: int,
        positions: Positions,
        layer: int,
        where: str,
    ) -> tuple[Positions, Any]:
        """Check this kind at `site` on a prompt of n_prompt tokens (BOS counted) and give the
        absolute positions it acts at, with what else it needs there (None here; a knockout
        gives its blocked edges). `where` is the intervention's field, for messages."""
        resolved = positions.resolve(n_prompt, f"{where}.positions")
        self.check(site, info, resolved, f"{where}.{self.name}")
        return resolved, None

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
