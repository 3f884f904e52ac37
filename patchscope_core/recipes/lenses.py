"""Lenses and affine maps: the paper's next-token baselines and the maps of cross-model patching.

- logit lens: the model's own output head (final norm, then unembedding) applied to a residual
  vector h; at the last layer it is the model's own next-token distribution;
- tuned lens, affine form (the paper's "affine mapping" baseline, as its code fits it): h -> W h + b
  fitted by least squares from layer l to the last layer, then the logit lens;
- cross-model map (§4.5): W h + b from a source model's layer l to a target model's layer l*.
Both maps come from one least-squares fit on paired hidden states, the states that the two
layers hold for the same tokens of the same fit texts (every token but a prepended BOS).
`fit_affine_maps` accumulates the normal equations [X 1]^T [X 1] and [X 1]^T Y in float64
over batches of texts, one pass over the texts for every pair of layers at once, so the fit
never holds the texts' vectors; X^T X is kept once per source layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base.errors import PatchscopeError
from ..forward.readings import SiteReader
from ..methods.mapping import Affine
from ..models.sites import Site, resid_post, resolve_site
from ..models.tokens import tokenize


@torch.no_grad()
def final_logprobs(bridge, h: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, vocab] of the model's output head (the bridge's own `ln_final` and
    `unembed`) applied to residual vectors h [n, d_model]."""
    p = next(bridge.unembed.parameters())
    x = h.to(device=p.device, dtype=p.dtype)[None]  # [1, n, d]: the components take [batch, pos, d]
    logits = bridge.unembed(bridge.ln_final(x))[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


class _Sums:
    """[X 1]^T [X 1] for one source layer and [X 1]^T Y for each target layer, in float64."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.xty: dict[int, torch.Tensor] = {}
        self.n = 0

    def add(self, X: torch.Tensor, targets: dict[int, torch.Tensor]) -> None:
        A = torch.cat([X.double().cpu(), torch.ones(len(X), 1, dtype=torch.float64)], dim=1)
        self.xtx = A.T @ A if self.xtx is None else self.xtx + A.T @ A
        for layer, Y in targets.items():
            c = A.T @ Y.double().cpu()
            self.xty[layer] = c if layer not in self.xty else self.xty[layer] + c
        self.n += len(X)


def solve(xtx: torch.Tensor, xty: torch.Tensor, name: str = "affine") -> Affine:
    """The least-squares map from the normal equations (the minimum-norm solution when they are
    singular): beta [d_in + 1, d_out] = (W^T; b)."""
    beta = torch.linalg.lstsq(xtx, xty, driver="gelsd").solution
    return Affine(W=beta[:-1].T.float().contiguous(), b=beta[-1].float().contiguous(), name=name)


def fit_affine(X: torch.Tensor, Y: torch.Tensor) -> Affine:
    """Least squares Y ~ X W^T + b for X [n, d_in], Y [n, d_out]."""
    sums = _Sums()
    sums.add(X, {0: Y})
    return solve(sums.xtx, sums.xty[0])


def aligned_tokens(src_info, tgt_info, texts: Sequence[str], field_name: str) -> tuple[list, list]:
    """Each text's token ids for both models; the tokens after a prepended BOS must agree."""
    src_rows, tgt_rows = [], []
    for i, text in enumerate(texts):
        s, t = tokenize(src_info, text, f"{field_name}[{i}]"), tokenize(tgt_info, text, f"{field_name}[{i}]")
        if s[int(src_info.prepend_bos) :] != t[int(tgt_info.prepend_bos) :]:
            raise PatchscopeError(
                f"{field_name}[{i}]: {src_info.name} and {tgt_info.name} tokenize {text[:40]!r} "
                "differently; paired hidden states need a shared tokenizer"
            )
        src_rows.append(s)
        tgt_rows.append(t)
    return src_rows, tgt_rows


@torch.no_grad()
def fit_affine_maps(
    source: SiteReader,
    target: SiteReader,
    texts: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    batch_size: int = 16,
    field_name: str = "fit_texts",
) -> dict[tuple[int, int], Affine]:
    """Least-squares affine maps from the source model's layer l to the target model's layer l*
    for every (l, l*) in `pairs`, fitted on the hidden states of every token (but BOS) of `texts`.
    `source` and `target` are the two models' readers (the same reader for one model)."""
    pairs = list(dict.fromkeys(pairs))
    if not pairs or not texts:
        return {}
    src_rows, tgt_rows = aligned_tokens(source.info, target.info, texts, field_name)
    src_sites = {l: resolve_site(Site(resid_post(l)), source.info, f"{field_name}.layer") for l, _ in pairs}
    tgt_sites = {l: resolve_site(Site(resid_post(l)), target.info, f"{field_name}.layer") for _, l in pairs}
    wanted: dict[int, set[int]] = {}
    for l, lt in pairs:
        wanted.setdefault(l, set()).add(lt)
    sums = {l: _Sums() for l in wanted}
    sb, tb = int(source.info.prepend_bos), int(target.info.prepend_bos)
    for start in range(0, len(texts), batch_size):
        s_rows, t_rows = src_rows[start : start + batch_size], tgt_rows[start : start + batch_size]
        if target is source:  # one model: every layer in the same passes
            s_vals = t_vals = source.read(list({**src_sites, **tgt_sites}.values()), s_rows, purpose="fit", keep=False)
        else:
            s_vals = source.read(list(src_sites.values()), s_rows, purpose="fit", keep=False)
            t_vals = target.read(list(tgt_sites.values()), t_rows, purpose="fit", keep=False)
        for l, targets in wanted.items():
            X = torch.cat([s_vals[(resid_post(l), r)][sb:] for r in s_rows])
            Ys = {lt: torch.cat([t_vals[(resid_post(lt), r)][tb:] for r in t_rows]) for lt in targets}
            sums[l].add(X, Ys)
    n = next(iter(sums.values())).n
    return {
        (l, lt): solve(
            sums[l].xtx, sums[l].xty[lt], name=f"lstsq {source.info.name}:{l}->{target.info.name}:{lt} ({n} vectors)"
        )
        for l, lt in pairs
    }
