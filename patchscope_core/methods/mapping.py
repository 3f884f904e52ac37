"""Mapping functions f: the source representation h becomes f(h) before it is written into the target.

Identity by default; `Affine` is f(h) = W h + b (the paper's cross-model Patchscopes learn one).
A mapping knows the widths it accepts and returns, checked against both models' d_model
before any generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..base.errors import PatchscopeError
from ..base.values import check_finite, quiet_torch_load


class Identity:
    """f(h) = h."""

    name = "identity"
    d_in = None  # any width; the target must have the same one
    d_out = None

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def check(self, d_source: int, d_target: int) -> None:
        if d_source != d_target:
            raise PatchscopeError(
                f"mapping: identity needs equal widths, but the source model's d_model is {d_source} "
                f"and the target model's is {d_target}; give an affine mapping"
            )

    def __repr__(self) -> str:
        return "Identity()"

    def __eq__(self, other) -> bool:
        return isinstance(other, Identity)

    def __hash__(self) -> int:
        return hash("identity")


@dataclass(eq=False)
class Affine:
    """f(h) = W h + b with W: [d_target, d_source], b: [d_target]."""

    W: torch.Tensor
    b: torch.Tensor | None = None
    name: str = "affine"

    def __post_init__(self) -> None:
        if self.W.ndim != 2:
            raise PatchscopeError(
                f"mapping.W: expected a 2-D [d_target, d_source] matrix, got shape {tuple(self.W.shape)}"
            )
        if self.b is not None and tuple(self.b.shape) != (self.W.shape[0],):
            raise PatchscopeError(
                f"mapping.b: expected shape ({self.W.shape[0]},) to match W, got {tuple(self.b.shape)}"
            )

    @property
    def d_in(self) -> int:
        return int(self.W.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W.shape[0])

    @classmethod
    def from_file(cls, path: str | Path) -> Affine:
        """Read W (and optionally b) from a .safetensors file or a torch.save'd dict {"W": ..., "b": ...}.
        A .pt file is read with weights_only (no code is ever unpickled); anything else that is
        not such a dict of floating-point tensors is a PatchscopeError naming the field."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise PatchscopeError(f"mapping.path: no such file {str(path)!r}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors = load_file(str(path))
            else:
                tensors = quiet_torch_load(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input; torch's own advice is not passed on
            raise PatchscopeError(
                f"mapping.path: cannot read {path} as tensors ({type(exc).__name__}); expected a .safetensors file "
                "or a torch.save'd dict {'W': tensor, 'b': tensor}"
            ) from None
        if not isinstance(tensors, dict):
            raise PatchscopeError(
                f"mapping.path: {path} holds a {type(tensors).__name__}, not a dict with 'W' (and 'b')"
            )
        if "W" not in tensors:
            raise PatchscopeError(
                f"mapping.path: {str(path)!r} holds no tensor named 'W' (found {sorted(map(str, tensors))})"
            )
        for key in ("W", "b"):
            value = tensors.get(key)
            if value is not None and not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                raise PatchscopeError(
                    f"mapping.{key}: {path} holds a {type(value).__name__} as {key!r}, not a floating-point tensor"
                )
            if value is not None:
                check_finite(value, f"mapping.{key}", str(path))
        return cls(W=tensors["W"], b=tensors.get("b"), name=f"affine:{path.name}")

    def check(self, d_source: int, d_target: int) -> None:
        if (self.d_in, self.d_out) != (d_source, d_target):
            raise PatchscopeError(
                f"mapping: W has shape {tuple(self.W.shape)} but must be [d_target, d_source] = "
                f"[{d_target}, {d_source}] for these models"
            )

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        W = self.W.to(device=h.device, dtype=h.dtype)
        out = h @ W.T
        return out if self.b is None else out + self.b.to(device=h.device, dtype=h.dtype)

    def __repr__(self) -> str:
        return f"Affine({self.name}, {self.d_in}->{self.d_out})"


Mapping = Identity | Affine
