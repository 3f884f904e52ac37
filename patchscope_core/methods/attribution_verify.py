"""Checking attribution estimates against exact activation patching (AtP*'s verification step).

Place in the flow: after `attribution.Attributor` (estimates per pair, site, method); the exact
values come from the activation-patching engine (`patcher.Patcher`, denoising, batched the same
way). `verify(patcher, results, top_k, random)` patches exactly, per pair and site, the `top_k`
nodes of each method by its score (|estimate| for atp, the GradDrop score for atp_star) and
`random` other nodes drawn uniformly (seeded); where that covers the whole grid, every node.
`summarise` reports per (site, method):
- `pearson`, `spearman`: signed estimate (atp_star: its QK-fixed estimate) vs exact effect
  (patched - corrupted metric), over every verified node of every pair;
- `sign_agreement`: the fraction of verified nodes whose estimate has the exact effect's sign;
- `recall@k` (only when the whole grid was patched exactly): the mean over pairs of the fraction
  of the exact top-k (by |exact|) inside the method's top-k (by score);
- the false-negative bound (Kramar et al. 2024, section 3.2): in the random sample, the nodes
  outside the method's top-k whose |exact| reaches the exact k-th largest of the pair's verified
  nodes (`false_negatives`), and a 95% upper bound on that rate (Clopper-Pearson) times the
  number of unverified nodes (`false_negative_bound`).
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base.errors import PatchscopeError
from .attribution import PairAttribution
from .patching import PATCH_SITES, Cell


@dataclass
class Verified:
    """One pair x site: the verified nodes (flat grid indices), their exact effects, and which of
    them came from the random sample."""

    pair: int
    site: str
    nodes: list[int]
    exact: torch.Tensor
    sampled: set[int]
    full: bool


def _cell(site: str, layer: int, position: int | None, unit: int) -> Cell:
    kind = PATCH_SITES[site]
    return Cell(
        site,
        layer,
        position,
        head=unit if kind in ("query", "key/value") else None,
        neuron=unit if kind == "neuron" else None,
    )


def _grid(res: PairAttribution, site: str, method: str, positions: str, kind: str) -> torch.Tensor:
    by_pos, all_pos = (res.scores if kind == "score" else res.estimates)[(method, site)]
    return (by_pos if positions == "each" else all_pos).flatten()


def verify(
    patcher,
    pairs,
    results: Sequence[PairAttribution],
    top_k: int = 20,
    random: int = 20,
    positions: str = "each",
    seed: int = 0,
) -> list[Verified]:
    """Exact denoising effects of each pair's top-k and random nodes per site (see the docstring)."""
    for name, v in (("verify.top_k", top_k), ("verify.random", random)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PatchscopeError(f"{name}: expected an integer >= 0, got {v!r}")
    if positions not in ("each", "all"):
        raise PatchscopeError(f"verify.positions: expected 'each' or 'all', got {positions!r}")
    rng = _random.Random(seed)
    out = []
    for i, (pair, res) in enumerate(zip(pairs, results)):
        sites = sorted({s for _, s in res.estimates}, key=list(PATCH_SITES).index)
        methods = sorted({m for m, _ in res.estimates})
        for site in sites:
            by_pos, all_pos = res.estimates[(methods[0], site)]
            shape = tuple(by_pos.shape if positions == "each" else all_pos.shape)
            total = math.prod(shape)
            top = set()
            for m in methods:
                top |= set(
                    torch.argsort(_grid(res, site, m, positions, "score").abs(), descending=True)[:top_k].tolist()
                )
            rest = [n for n in range(total) if n not in top]
            sampled = set(rng.sample(rest, min(random, len(rest))))
            nodes = sorted(top | sampled)
            full = len(nodes) == total
            cells = []
            for n in nodes:
                idx = list(torch.unravel_index(torch.tensor(n), shape))
                li, unit = int(idx[0]), int(idx[-1])
                cells.append(_cell(site, res.layers[li], int(idx[1]) if positions == "each" else None, unit))
            patched = patcher.patch(pair, cells, ("denoising",), (res.metric,))
            exact = torch.tensor([c.patched - c.corrupted_value for c in patched.cells])
            out.append(Verified(i, site, nodes, exact, sampled - top if not full else set(), full))
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):  # ties: their mean rank
        at = x == v
        if at.sum() > 1:
            r[at] = r[at].mean()
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den else math.nan


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a.double()), _ranks(b.double()))


def upper_rate(k: int, n: int, confidence: float = 0.95) -> float:
    """Clopper-Pearson upper bound of a binomial rate after k hits in n draws (bisection)."""
    if n == 0:
        return 1.0
    if k >= n:
        return 1.0

    def cdf(p):  # P(X <= k) under Binomial(n, p)
        return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))

    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > 1 - confidence else (lo, mid)
    return hi


def node_table(results: Sequence[PairAttribution], verified: Sequence[Verified], positions: str = "each"):
    """One row per (pair, site, method, node) of the grids that were verified: `estimate` (signed),
    `score` (the ranking score), `exact` (NaN where not patched) and `verified` ('top', 'random',
    'all' when the whole grid was patched, None)."""
    import pandas as pd

    frames = []
    for v in verified:
        res = results[v.pair]
        for method in sorted({m for m, _ in res.estimates}):
            est = _grid(res, v.site, method, positions, "estimate")
            exact = torch.full_like(est, math.nan, dtype=torch.float64)
            exact[v.nodes] = v.exact.double()
            label = ["all" if v.full else None] * len(est)
            if not v.full:
                for n in v.nodes:
                    label[n] = "random" if n in v.sampled else "top"
            frames.append(
                pd.DataFrame(
                    {
                        "pair": v.pair,
                        "site": v.site,
                        "method": method,
                        "node": range(len(est)),
                        "estimate": est.double().numpy(),
                        "score": _grid(res, v.site, method, positions, "score").double().numpy(),
                        "exact": exact.numpy(),
                        "verified": label,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _top(values, k: int) -> set:
    """The indices of the k largest values (ties: the first)."""
    import numpy as np

    return set(np.argsort(-np.asarray(values), kind="stable")[:k].tolist())


def summary_table(df, top_k: int = 20, ks: Sequence[int] = (), group: Sequence[str] = ("site", "method")) -> list[dict]:
    """The statistics of the module docstring, one row per `group` (with `pair`, `estimate`,
    `score`, `exact`, `verified` columns, one row per node of each pair's grid, as `node_table`)."""
    import numpy as np

    rows = []
    order = {s: i for i, s in enumerate(PATCH_SITES)}
    for key, g in sorted(df.groupby(list(group), sort=False), key=lambda kv: [order.get(x, x) for x in kv[0]]):
        v = g[g["exact"].notna()]
        est_t, ex_t = torch.tensor(v["estimate"].to_numpy()), torch.tensor(v["exact"].to_numpy())
        recall, fn, n_sample, unverified = {k: [] for k in (*ks, top_k)}, 0, 0, 0
        for _, p in g.groupby("pair", sort=True):
            score, exact = p["score"].abs().to_numpy(), p["exact"].abs().to_numpy()
            done = ~np.isnan(exact)
            if done.all():
                for k in recall:
                    want = _top(exact, k)
                    recall[k].append(len(want & _top(score, k)) / max(len(want), 1))
            top = _top(score, top_k)
            theta = np.sort(exact[done])[::-1][min(top_k, int(done.sum())) - 1] if done.any() else math.inf
            sample = [i for i in np.flatnonzero((p["verified"] == "random").to_numpy()) if i not in top]
            n_sample += len(sample)
            fn += int(sum(exact[i] >= theta for i in sample))
            unverified += int((~done).sum())
        row = {
            **dict(zip(group, key)),
            "nodes": len(v),
            "pearson": pearson(est_t, ex_t),
            "spearman": spearman(est_t, ex_t),
            "sign_agreement": float((torch.sign(est_t) == torch.sign(ex_t)).double().mean()) if len(v) else math.nan,
            "false_negatives": fn if n_sample else None,
            "sampled": n_sample,
            "false_negative_bound": upper_rate(fn, n_sample) * unverified if n_sample else None,
        }
        for k, vals in recall.items():
            row[f"recall@{k}"] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return rows


def summarise(
    results: Sequence[PairAttribution],
    verified: Sequence[Verified],
    positions: str = "each",
    top_k: int = 20,
    ks: Sequence[int] = (),
) -> list[dict]:
    """One row per (site, method): the statistics of the module docstring."""
    return summary_table(node_table(results, verified, positions), top_k, ks)
