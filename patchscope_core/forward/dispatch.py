"""Applying a batch's interventions: one hook per site for every row that acts there.

`dispatch(entries)` turns the (row, resolved intervention, `Action`) entries of one site into
one `fn(activation, ctx)` (hooks.py). Rows may differ in kind, heads or neurons, positions and
values: their scales, shifts, feature masks and position rules are stacked once per batch, and
each forward pass applies

    x' = scale * x + shift + table[position] + sigma * noise(seed, position)

to the selected positions and features of real tokens in a few tensor operations
(docs/interventions.md). A row with several interventions at one site gets them in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..interventions.kinds import Action, noise_at
from ..interventions.runs import ResolvedIntervention
from .hooks import HookContext, HookFn


class _Round:
    """Interventions of one module boundary in which each row appears at most once, vectorised."""

    def __init__(self, entries: list[tuple[int, ResolvedIntervention, Action]], width: int) -> None:
        self.rows = torch.tensor([r for r, _, _ in entries])
        self.scale = torch.tensor([a.scale for _, _, a in entries], dtype=torch.float32)
        self.shift = torch.stack(
            [a.shift.float() if a.shift is not None else torch.zeros(width) for _, _, a in entries]
        )
        self.features = torch.stack([iv.site.feature_mask() for _, iv, _ in entries])
        self.on_prompt = torch.tensor([iv.positions.prompt for _, iv, _ in entries])
        self.on_generated = torch.tensor([iv.positions.generated for _, iv, _ in entries])
        p_max = max([max(iv.positions.indices) + 1 for _, iv, _ in entries if iv.positions.indices] or [1])
        self.explicit = torch.zeros(len(entries), p_max, dtype=torch.bool)
        for k, (_, iv, _) in enumerate(entries):
            self.explicit[k, list(iv.positions.indices)] = True
        tables: dict[int, tuple[list[int], torch.Tensor]] = {}
        noises: dict[int, tuple[list[int], list[float]]] = {}
        for k, (_, _, a) in enumerate(entries):
            if a.table is not None:
                tables.setdefault(id(a.table), ([], a.table))[0].append(k)
            if a.sigma:
                ks, sigmas = noises.setdefault(a.seed, ([], []))
                ks.append(k)
                sigmas.append(a.sigma)
        self.tables = [(torch.tensor(ks), t.float()) for ks, t in tables.values()]
        self.noises = [(seed, torch.tensor(ks), torch.tensor(s)) for seed, (ks, s) in noises.items()]
        self.width = width
        self._placed: dict[tuple, tuple] = {}

    def _on(self, device, dtype):
        key = (device, dtype)
        if key not in self._placed:
            move = lambda t: t.to(device)  # noqa: E731
            self._placed[key] = (
                move(self.rows),
                self.scale.to(device, dtype),
                self.shift.to(device, dtype),
                move(self.features),
                move(self.on_prompt),
                move(self.on_generated),
                move(self.explicit),
                [(move(k), t.to(device, dtype)) for k, t in self.tables],
                [(seed, move(k), s.to(device, dtype)) for seed, k, s in self.noises],
            )
        return self._placed[key]

    def __call__(self, flat: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        rows, scale, shift, features, on_prompt, on_gen, explicit, tables, noises = self._on(flat.device, flat.dtype)
        pos = ctx.positions[rows]  # [R, n]
        in_prompt = ctx.real[rows] & (pos < ctx.prompt_lengths[rows][:, None])
        generated = pos >= ctx.prompt_lengths[rows][:, None]
        chosen = (in_prompt & on_prompt[:, None]) | (generated & on_gen[:, None])
        chosen |= in_prompt & explicit.gather(1, pos.clamp(0, explicit.shape[1] - 1)) & (pos < explicit.shape[1])
        if not bool(chosen.any()):
            return None
        x = flat[rows]  # [R, n, width]
        new = x * scale[:, None, None] + shift[:, None, :]
        for ks, table in tables:  # chosen positions lie inside the table (checked when resolved)
            new[ks] += table[pos[ks].clamp(0, table.shape[0] - 1)]
        for seed, ks, sigma in noises:
            p = pos[ks].clamp(min=0)
            uniq, inverse = torch.unique(p, return_inverse=True)
            draws = torch.stack([noise_at(seed, int(u), self.width) for u in uniq.tolist()]).to(flat.device, flat.dtype)
            new[ks] += sigma[:, None, None] * draws[inverse]
        out = flat.clone()
        out[rows] = torch.where(chosen[:, :, None] & features[:, None, :], new, x)
        return out


def dispatch(entries: Sequence[tuple[int, ResolvedIntervention, Action]]) -> HookFn:
    """One hook for every intervention of a batch at one site's module boundary: rows may differ
    in kind, indices, positions and values. A row with several interventions there gets them in
    order."""
    rounds: list[list] = []
    for entry in entries:
        for r in rounds:
            if all(e[0] != entry[0] for e in r):
                r.append(entry)
                break
        else:
            rounds.append([entry])
    width = entries[0][1].site.width
    compiled = [_Round(r, width) for r in rounds]

    def fn(x: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        b, n = x.shape[0], x.shape[1]
        flat, changed = x.reshape(b, n, width), False
        for r in compiled:
            new = r(flat, ctx)
            if new is not None:
                flat, changed = new, True
        return flat.view(x.shape) if changed else None

    return fn
