"""Attribution patching: AtP and AtP* (Nanda 2023; Kramar et al. 2024), over the pairs and sites
of activation patching (`patching.py`).

Place in the flow: the same `Pair`s and site names as `patching.py`; `Attributor(engine)` runs,
per batch of pairs of one token length (rows of a batch are different pairs), one clean forward
(no gradient) and one corrupted forward + one backward (gradients only at the sites asked for,
float32 products), and estimates every node at once in the denoising form

    effect(node) = (a_clean - a_corrupted) . d metric / d a      (on the corrupted run)

per position and summed over positions (`all_positions`, the linear estimate of patching every
prompt position at once). Nodes: `attn.hook_z` / `hook_q` per query head, `hook_k` / `hook_v`
per key/value head, `mlp.hook_post` per neuron, the d_model sites one per position.
`hook_resid_pre` is where AtP is known to be poor (`SITE_NOTES`).

`atp_star` adds (Kramar et al. 2024, section 3.1):
- the QK fix for `hook_q` / `hook_k` nodes: the attention pattern is recomputed exactly (the
  model's own eager attention function) with the node's clean query or key, and only the
  pattern is linearised: estimate = sum (A_new - A_corrupted) . d metric / d A;
- GradDrop: for each layer l the backward is repeated with the gradient through layer l's
  residual contribution (attention and MLP output) dropped; below l that is a backward from
  block l's input seeded with the gradient at its output (the skip path), so the L extra
  backwards cost about L/2 full ones. score = mean over l of |estimate_l|.
Exact patching of chosen nodes and the comparison: `attribution_verify.py`.
"""

from __future__ import annotations

import copy
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..base.errors import PatchscopeError
from ..forward.hooks import hooked
from ..forward.readings import input_device
from ..models.info import ModelInfo
from ..models.sites import Site, resolve_site
from .patching import METRICS, PATCH_SITES, CheckedPair, Pair, check_pair, metric_values, site_name

METHODS = ("atp", "atp_star")


QK_SITES = ("attn.hook_q", "attn.hook_k")


SITE_NOTES = {
    "hook_resid_pre": "AtP is poor on the residual stream (a large, non-local change: Kramar et al. 2024); "
    "verify these estimates by exact patching"
}


NAME = "patchscope_attribution"  # the attention function's name in transformers' AttentionInterface


@dataclass
class PairAttribution:
    """One pair's estimates. estimates[(method, site)] = (by_position [layers, prompt positions,
    units], all_positions [layers, units]); for atp_star the signed QK-fixed estimate. scores: the
    ranking score, |estimate| for atp, the GradDrop score for atp_star (same shapes)."""

    checked: CheckedPair
    metric: str
    layers: tuple[int, ...]
    clean_value: float
    corrupted_value: float
    estimates: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scores: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def check_attribution(
    info: ModelInfo,
    sites: Sequence[str],
    layers: Any = "all",
    method: Any = "atp",
    metric: str = "logit_diff",
    field_name: str = "attribution",
) -> tuple:
    """(site names, layers, methods, metric), refused before any weights load, field first."""
    if isinstance(sites, str):
        sites = [sites]
    if not sites:
        raise PatchscopeError(f"{field_name}.sites: expected some of {', '.join(PATCH_SITES)}")
    names = []
    for i, s in enumerate(sites):
        name = site_name(s, f"{field_name}.sites[{i}]")
        if name == "hook_resid_post":
            raise PatchscopeError(
                f"{field_name}.sites[{i}]: hook_resid_post is hook_resid_pre of the next layer; "
                "attribute blocks.{layer}.hook_resid_pre"
            )
        resolve_site(Site(f"blocks.0.{name}"), info, f"{field_name}.sites[{i}]", qkv=True)
        names.append(name)
    layers = list(range(info.n_layers)) if layers == "all" else ([layers] if isinstance(layers, int) else list(layers))
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < info.n_layers:
            raise PatchscopeError(f"{field_name}.layers: {l!r} is out of range 0 .. {info.n_layers - 1}")
    methods = (method,) if isinstance(method, str) else tuple(method)
    if not methods or any(m not in METHODS for m in methods):
        raise PatchscopeError(f"{field_name}.method: expected some of {', '.join(METHODS)}, got {list(methods)}")
    if metric not in METRICS:
        raise PatchscopeError(f"{field_name}.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    return tuple(dict.fromkeys(names)), tuple(sorted(set(layers))), methods, metric


def units(site: str, info: ModelInfo) -> int:
    kind = PATCH_SITES[site]
    if kind == "query":
        return info.n_heads
    if kind == "key/value":
        return info.n_kv_heads or info.n_heads
    return info.d_mlp if kind == "neuron" else 1


def contract(site: str, delta: torch.Tensor, grad: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """[batch, positions, units] float32: (delta . grad) summed over each unit's features."""
    prod = delta.float() * grad.float()
    b, n = prod.shape[:2]
    return prod.reshape(b, n, units(site, info), -1).sum(-1)


def _additive(mask, query: torch.Tensor, k_len: int) -> torch.Tensor:
    low = torch.finfo(query.dtype).min
    if mask is None:  # sdpa's causal shortcut: no cache in these runs
        allowed = (
            torch.arange(k_len, device=query.device)[None, :]
            <= torch.arange(query.shape[2], device=query.device)[:, None]
        )
        return torch.where(allowed, 0.0, low).to(query.dtype)[None, None]
    mask = mask[..., :k_len]
    return torch.where(mask, 0.0, low).to(query.dtype) if mask.dtype == torch.bool else mask.to(query.dtype)


def _eager(module):
    return sys.modules[type(module).__module__].eager_attention_forward


def attribution_attention(module, query, key, value, attention_mask, **kwargs):
    """The module's own eager attention, its pattern kept (in the graph) and its output recomputed
    from the pattern, so that d metric / d pattern exists; records what the QK fix needs."""
    store = module.config.__dict__["_patchscope_attribution"]
    mask = _additive(attention_mask, query, key.shape[2])
    _, weights = _eager(module)(module, query, key, value, mask, **kwargs)
    rep = query.shape[1] // value.shape[1]
    v = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    store.append(
        {
            "module": module,
            "query": query.detach(),
            "key": key.detach(),
            "value": value.detach(),
            "mask": mask.detach(),
            "kwargs": kwargs,
            "pattern": weights,
        }
    )
    return out, weights


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attribution_attention)


_register()


class _Patterns:
    """Installs `attribution_attention` on the attention modules of some layers (a config copy each,
    as knockout.py does); records[l] lists what each call recorded."""

    def __init__(self, modules, info: ModelInfo, layers: Sequence[int]) -> None:
        self.records: dict[int, list] = {l: [] for l in layers}
        self.undo = []
        for l in layers:
            module = modules.get_submodule(resolve_site(Site(f"blocks.{l}.attn"), info).module)
            while isinstance(module._modules.get("_original_component"), torch.nn.Module):
                module = module._modules["_original_component"]
            shared = module.config
            config = copy.copy(shared)
            config.__dict__["_attn_implementation_internal"] = NAME
            config.__dict__["_patchscope_attribution"] = self.records[l]
            module.__dict__["config"] = config
            self.undo.append((module, shared))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for module, shared in self.undo:
            module.__dict__["config"] = shared


def pattern_with(rec: dict, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[copies x batch, heads, q, k] float32: the recorded attention call's pattern with another
    query and key (a batch of copies of the recorded batch)."""
    n = query.shape[0] // rec["query"].shape[0]
    mask = rec["mask"].repeat(n, 1, 1, 1) if rec["mask"].shape[0] > 1 else rec["mask"]
    with torch.no_grad():
        return _eager(rec["module"])(rec["module"], query, key, rec["value"].repeat(n, 1, 1, 1), mask, **rec["kwargs"])[
            1
        ].float()


def qk_deltas(rec: dict, clean: dict, m: int, all_positions: bool = True) -> dict[str, torch.Tensor]:
    """Exact pattern changes A_new - A_corrupted [.., batch, heads, q, k] of the QK fix: `q` (every
    query row's own clean query: rows are independent), `k` [m, ...] (key position j's clean key,
    one copy per j), `k_all` (every prompt key clean)."""
    A = rec["pattern"].detach().float()
    q_c, k_c, q, k = clean["query"], clean["key"], rec["query"], rec["key"]
    out = {"q": pattern_with(rec, q_c, k) - A}
    keys = k.repeat(m, 1, 1, 1).reshape(m, *k.shape).clone()
    for j in range(m):
        keys[j, :, :, j] = k_c[:, :, j]
    out["k"] = (pattern_with(rec, q.repeat(m, 1, 1, 1), keys.reshape(-1, *k.shape[1:])) - A.repeat(m, 1, 1, 1)).reshape(
        m, *A.shape
    )
    if all_positions:
        k_all = k.clone()
        k_all[:, :, :m] = k_c[:, :, :m]
        out["k_all"] = pattern_with(rec, q, k_all) - A
    return out


def qk_estimates(deltas: dict, grad: torch.Tensor, m: int, n_kv: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """QK-fixed estimates from the pattern gradient [batch, heads, q, k]: hook_q (by position
    [batch, m, heads], all positions [batch, heads]) and hook_k (per key/value head)."""
    g = grad.float()
    b, h = g.shape[:2]
    q = (deltas["q"] * g).sum(-1)[:, :, :m].transpose(1, 2)  # [b, m, heads]
    k = (deltas["k"] * g).sum((-1, -2)).reshape(m, b, n_kv, h // n_kv).sum(-1).permute(1, 0, 2)  # [b, m, kv]
    k_all = (deltas["k_all"] * g).sum((-1, -2)).reshape(b, n_kv, h // n_kv).sum(-1)
    return {"attn.hook_q": (q, q.sum(1)), "attn.hook_k": (k, k_all)}


class Attributor:
    """AtP and AtP* on one engine (its plain modules and counters)."""

    def __init__(self, engine, batch_size: int = 32) -> None:
        self.engine, self.info, self.batch_size = engine, engine.info, batch_size

    def attribute(
        self,
        pairs: Sequence[Pair],
        sites: Sequence[str],
        layers: Any = "all",
        method: Any = "atp",
        metric: str = "logit_diff",
        field_name: str = "pairs",
    ) -> list[PairAttribution]:
        """Every pair's estimates (in the order of `pairs`), pairs of one length batched."""
        sites, layers, methods, metric = check_attribution(self.info, sites, layers, method, metric)
        checked = [check_pair(p, self.info, (metric,), f"{field_name}[{i}]") for i, p in enumerate(pairs)]
        groups = defaultdict(list)
        for i, c in enumerate(checked):
            tail = len(c.answer_ids) - 1 if metric == "logprob" else 0
            groups[(len(c.clean_ids), tail)].append(i)
        out: dict[int, PairAttribution] = {}
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                for i, r in zip(chunk, self._batch([checked[i] for i in chunk], sites, layers, methods, metric)):
                    out[i] = r
        return [out[i] for i in range(len(pairs))]

    def _forward(self, rows: list[list[int]], hooks: list[str], keep: int, pattern_layers, grad: bool):
        """One forward of the batch; values[hook] = the activation as TransformerLens shapes it
        ([batch, tokens, ...], in the graph when grad), the attention records and the logits."""
        values: dict[str, torch.Tensor] = {}

        def capture(name):
            def fn(x, ctx):
                values[name] = x if grad else x.detach().clone()
                return x if grad else None

            return fn

        t = torch.tensor(rows, device=input_device(self.engine.model))
        mask = torch.ones_like(t)
        reads = [(resolve_site(Site(h), self.info, qkv=True), capture(h)) for h in hooks]
        handle = None
        if grad:  # the graph starts at the embeddings: no weight gradients, every site reachable
            handle = self.engine.modules.get_input_embeddings().register_forward_hook(
                lambda mod, args, out: out.detach().requires_grad_(True)
            )
        try:
            with (
                torch.set_grad_enabled(grad),
                _Patterns(self.engine.modules, self.info, pattern_layers) as pats,
                hooked(self.engine.modules, self.engine.model, reads, [0] * len(rows), [len(r) for r in rows]),
            ):
                logits = self.engine.modules(
                    input_ids=t,
                    attention_mask=mask,
                    use_cache=False,
                    position_ids=torch.arange(t.shape[1], device=t.device)[None].expand(len(rows), -1),
                    logits_to_keep=keep,
                ).logits
        finally:
            if handle is not None:
                handle.remove()
        self.engine.counts["attribution_backward" if grad else "attribution_clean"] += 1
        return values, {l: recs[-1] for l, recs in pats.records.items()}, logits

    def _metrics(self, logits, checked: list[CheckedPair], metric: str, clean_lp) -> torch.Tensor:
        return torch.cat(
            [
                metric_values(logits[r : r + 1], c, (metric,), None if clean_lp is None else clean_lp[r])[metric]
                for r, c in enumerate(checked)
            ]
        )

    def _batch(self, checked: list[CheckedPair], sites, layers, methods, metric) -> list[PairAttribution]:
        info, n_layers = self.info, self.info.n_layers
        m = len(checked[0].clean_ids)
        tails = [c.answer_ids[:-1] if metric == "logprob" else () for c in checked]
        keep = len(tails[0]) + 1
        star = "atp_star" in methods
        site_hooks = [f"blocks.{l}.{s}" for s in sites for l in layers]
        blocks = [f"blocks.{l}.hook_{w}" for l in range(n_layers) for w in ("resid_pre", "resid_post")] if star else []
        hooks = list(dict.fromkeys(site_hooks + blocks))
        qk_layers = sorted({l for l in layers if star and any(s in QK_SITES for s in sites)})
        clean_vals, clean_recs, clean_logits = self._forward(
            [list(c.clean_ids) + list(t) for c, t in zip(checked, tails)], site_hooks, keep, qk_layers, grad=False
        )
        clean_lp = torch.log_softmax(clean_logits[:, 0].float(), -1)
        clean_m = self._metrics(clean_logits.detach().float(), checked, metric, clean_lp)
        vals, recs, logits = self._forward(
            [list(c.corrupted_ids) + list(t) for c, t in zip(checked, tails)], hooks, keep, qk_layers, grad=True
        )
        corr_m = self._metrics(logits.float(), checked, metric, clean_lp)
        inputs = hooks + [f"pattern.{l}" for l in qk_layers]
        tensors = {**vals, **{f"pattern.{l}": recs[l]["pattern"] for l in qk_layers}}
        grads = dict(
            zip(
                inputs,
                torch.autograd.grad(corr_m.sum(), [tensors[k] for k in inputs], retain_graph=star, allow_unused=True),
            )
        )
        deltas = {h: clean_vals[h] - vals[h].detach() for h in site_hooks}

        def estimate(site, l, g):  # by position [b, m, u], all positions [b, u]
            h = f"blocks.{l}.{site}"
            if g is None:
                z = torch.zeros(len(checked), m, units(site, info))
                return z, z.sum(1)
            e = contract(site, deltas[h], g, info)[:, :m]
            return e, e.sum(1)

        qk = {l: qk_deltas(recs[l], clean_recs[l], m) for l in qk_layers}

        def fixed(site, l, grad_of):  # the QK fix where it applies, else plain AtP
            if site in QK_SITES and l in qk:
                g = grad_of(f"pattern.{l}")
                if g is None:
                    z = torch.zeros(len(checked), m, units(site, info))
                    return z, z.sum(1)
                return qk_estimates(qk[l], g, m, info.n_kv_heads or info.n_heads)[site]
            return estimate(site, l, grad_of(f"blocks.{l}.{site}"))

        results = {}
        for method in methods:
            for site in sites:
                per = [
                    fixed(site, l, grads.get)
                    if method == "atp_star"
                    else estimate(site, l, grads.get(f"blocks.{l}.{site}"))
                    for l in layers
                ]
                results[(method, site)] = (torch.stack([p[0] for p in per], 1), torch.stack([p[1] for p in per], 1))
        scores = {k: (v[0].abs(), v[1].abs()) for k, v in results.items() if k[0] == "atp"}
        if star:
            scores.update(self._graddrop(sites, layers, tensors, grads, fixed, m, len(checked)))
        out = []
        for r, c in enumerate(checked):
            out.append(
                PairAttribution(
                    c,
                    metric,
                    tuple(layers),
                    float(clean_m[r]),
                    float(corr_m[r].detach()),
                    {k: (v[0][r], v[1][r]) for k, v in results.items()},
                    {k: (v[0][r], v[1][r]) for k, v in scores.items()},
                    {s: SITE_NOTES[s] for s in sites if s in SITE_NOTES},
                )
            )
        return out

    def _graddrop(self, sites, layers, tensors, grads, fixed, m, b) -> dict:
        """GradDrop scores: mean over dropped layers l of |estimate_l|. A node above l keeps its
        plain gradient; a node inside layer l has none (hook_resid_pre keeps the skip: the gradient
        at block l's output); a node below l gets a backward from block l's input seeded with the
        gradient at block l's output."""
        n_layers = self.info.n_layers
        L = len(layers)
        total = {s: [torch.zeros(b, L, m, units(s, self.info)), torch.zeros(b, L, units(s, self.info))] for s in sites}
        for drop in range(n_layers):
            below = [
                h for h in tensors if _layer(h) < drop and (h.startswith("pattern.") or h.split(".", 2)[2] in sites)
            ]
            seed = grads[f"blocks.{drop}.hook_resid_post"]
            got = {}
            if below:
                got = dict(
                    zip(
                        below,
                        torch.autograd.grad(
                            tensors[f"blocks.{drop}.hook_resid_pre"],
                            [tensors[h] for h in below],
                            grad_outputs=seed,
                            retain_graph=True,
                            allow_unused=True,
                        ),
                    )
                )
            got[f"blocks.{drop}.hook_resid_pre"] = seed
            self.engine.counts["attribution_graddrop"] += 1

            def grad_of(h, drop=drop, got=got):
                layer = _layer(h)
                if layer > drop:
                    return grads.get(h)
                if layer < drop or h == f"blocks.{drop}.hook_resid_pre":
                    return got.get(h)
                return None

            for site in sites:
                for i, l in enumerate(layers):
                    e, e_all = fixed(site, l, grad_of)
                    total[site][0][:, i] += e.abs()
                    total[site][1][:, i] += e_all.abs()
        return {("atp_star", s): (v[0] / n_layers, v[1] / n_layers) for s, v in total.items()}


def _layer(hook: str) -> int:
    return int(hook.split(".")[1])
