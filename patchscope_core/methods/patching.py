"""Activation patching between a clean and a corrupted prompt (Wang et al. 2022, the IOI paper;
Zhang & Nanda 2024; Heimersheim & Nanda 2024).

A `Pair` is a clean prompt, a corrupted prompt of the same token length that differs in one key
detail, the answer and (for `logit_diff`) the wrong answer. A `Cell` patches one site (a
TransformerLens hook name inside a block, `sites.py` resolves it) at layer l (or a `window` of
layers centred on l, as ROME restores), at one prompt position or every prompt position at once
(`position=None`, TransformerLens's `_all_pos`), optionally one head (query heads for `attn.hook_z`
/ `hook_q`, key/value heads for `hook_k` / `hook_v`) or one neuron (`mlp.hook_post`).
`denoising` writes the clean run's values into the corrupted run (sufficiency); `noising` the
corrupted run's into the clean run (necessity). Metrics, at the last prompt position:
`logit_diff` (answer's first-token logit minus the wrong answer's), `logprob` (the answer's,
teacher-forced, summed), `prob` (its first token), `kl` (KL from the clean run's next-token
distribution). Every cell reports patched, clean and corrupted values and
`recovered = (patched - corrupted) / (clean - corrupted)`, the same formula in both directions.

Work is shared (`Patcher`): the clean and the corrupted run happen once per pair (counted in
`engine.counts`: patch_clean, patch_corrupted), keeping every patched site's values, each block's
input and the KV cache. A row patching from layer l at position p starts from the base run's
stored state (`tracing.forward_from`: positions p.. of layers l..), rows go in batches of one
position (`tracing.batches_by_position`), and a row whose written values equal the base run's
(positions before the first token where the prompts differ) is not run: its patched value is the
base run's (counted: patch_unchanged). With `max_new_tokens > 0` each patched run also generates
through the engine's KV-cached path, the patch written once in the prefill (`Resample`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..base.errors import PatchscopeError
from ..models.info import ModelInfo
from ..models.sites import Site, resolve_site, window_layers
from ..models.tokens import resolve_position, tokenize

# Sites a cell may patch (the hook name inside block l) and what their `head` indexes.
PATCH_SITES = {
    "hook_resid_pre": None,
    "hook_resid_post": None,
    "hook_attn_out": None,
    "hook_mlp_out": None,
    "attn.hook_z": "query",
    "attn.hook_q": "query",
    "attn.hook_k": "key/value",
    "attn.hook_v": "key/value",
    "mlp.hook_post": "neuron",
}


DIRECTIONS = ("denoising", "noising")


METRICS = ("logit_diff", "logprob", "prob", "kl")


@dataclass(frozen=True)
class Pair:
    clean: str
    corrupted: str  # the same number of tokens as `clean`
    answer: str
    wrong_answer: str | None = None  # needed by logit_diff


@dataclass(frozen=True)
class Cell:
    site: str  # a PATCH_SITES name, e.g. "attn.hook_z"
    layer: int
    position: int | None  # absolute, BOS counted; None: every prompt position at once
    head: int | None = None
    neuron: int | None = None
    window: int = 1  # layers centred on `layer`

    def layers(self, n_layers: int) -> list[int]:
        return window_layers(self.site, self.layer, self.window, n_layers)

    def hook(self, layer: int | None = None) -> str:
        return f"blocks.{self.layer if layer is None else layer}.{self.site}"


@dataclass(frozen=True)
class CheckedPair:
    pair: Pair
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    wrong_id: int | None


@dataclass
class CellResult:
    cell: Cell
    direction: str
    metric: str
    patched: float
    clean_value: float
    corrupted_value: float
    generated_text: str | None = None

    @property
    def recovered(self) -> float:
        den = self.clean_value - self.corrupted_value
        return (self.patched - self.corrupted_value) / den if den else math.nan

    def to_record(self) -> dict[str, Any]:
        return {
            **asdict(self.cell),
            "direction": self.direction,
            "metric": self.metric,
            "patched": self.patched,
            "clean_value": self.clean_value,
            "corrupted_value": self.corrupted_value,
            "recovered": self.recovered,
            "generated_text": self.generated_text,
        }


@dataclass
class PairResult:
    checked: CheckedPair
    clean_values: dict[str, float]  # metric -> value of the clean run
    corrupted_values: dict[str, float]
    cells: list[CellResult] = field(default_factory=list)


def site_name(site: str, field_name: str) -> str:
    """The PATCH_SITES name of `site`, given bare or as a template (blocks.{layer}.attn.hook_z)."""
    name = site
    for prefix in ("blocks.{layer}.", "blocks.{l}."):
        if isinstance(site, str) and site.startswith(prefix):
            name = site[len(prefix) :]
    if name not in PATCH_SITES:
        valid = ", ".join(f"blocks.{{layer}}.{s}" for s in PATCH_SITES)
        raise PatchscopeError(f"{field_name}: unknown site {site!r}; valid sites: {valid}")
    return name


def _answer_ids(info: ModelInfo, text, field_name: str) -> tuple[int, ...]:
    if not isinstance(text, str) or not text:
        raise PatchscopeError(f"{field_name}: empty answer")
    ids = tuple(info.tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise PatchscopeError(f"{field_name}: {text!r} has no tokens")
    return ids


def check_metrics(metrics: Sequence[str], field_name: str = "metric") -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise PatchscopeError(f"{field_name}: expected some of {', '.join(METRICS)}, got {list(metrics)}")
    return metrics


def check_directions(directions: Sequence[str], field_name: str = "direction") -> tuple[str, ...]:
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad or not directions:
        raise PatchscopeError(f"{field_name}: expected some of {', '.join(DIRECTIONS)}, got {list(directions)}")
    return directions


def check_pair(
    pair: Pair, info: ModelInfo, metrics: Sequence[str] = ("logit_diff",), field_name: str = "pair"
) -> CheckedPair:
    """Token ids of a pair; refuses different token lengths (naming both token lists), an empty
    or identical answer, and logit_diff without a wrong answer."""
    metrics = check_metrics(metrics)
    clean = tokenize(info, pair.clean, f"{field_name}.clean")
    corrupted = tokenize(info, pair.corrupted, f"{field_name}.corrupted")
    if len(clean) != len(corrupted):
        words = lambda ids: [info.tokenizer.decode([t]) for t in ids]  # noqa: E731
        raise PatchscopeError(
            f"{field_name}: clean and corrupted prompts must have the same number of tokens, got {len(clean)} vs "
            f"{len(corrupted)}: clean {words(clean)} vs corrupted {words(corrupted)}"
        )
    answer = _answer_ids(info, pair.answer, f"{field_name}.answer")
    wrong = None
    if pair.wrong_answer is not None:
        if pair.wrong_answer == pair.answer:
            raise PatchscopeError(f"{field_name}.wrong_answer: equals the answer {pair.answer!r}")
        wrong = _answer_ids(info, pair.wrong_answer, f"{field_name}.wrong_answer")[0]
        if wrong == answer[0]:
            raise PatchscopeError(
                f"{field_name}.wrong_answer: {pair.wrong_answer!r} starts with the answer "
                f"{pair.answer!r}'s first token {info.tokenizer.decode([wrong])!r}"
            )
    elif "logit_diff" in metrics:
        raise PatchscopeError(f"{field_name}.wrong_answer: metric logit_diff needs a wrong answer")
    return CheckedPair(pair, clean, corrupted, answer, wrong)


def head_count(site: str, info: ModelInfo) -> int:
    return (info.n_kv_heads or info.n_heads) if PATCH_SITES[site] == "key/value" else info.n_heads


def check_cell(cell: Cell, info: ModelInfo, n_tokens: int, field_name: str = "cell") -> None:
    """Refuse a cell the model or the pair cannot take, naming the field."""
    site = site_name(cell.site, f"{field_name}.site")
    if site != cell.site:
        raise PatchscopeError(f"{field_name}.site: a cell names the hook inside the block, {site!r}, not {cell.site!r}")
    if isinstance(cell.layer, bool) or not isinstance(cell.layer, int) or not 0 <= cell.layer < info.n_layers:
        raise PatchscopeError(f"{field_name}.layer: {cell.layer!r} is out of range 0 .. {info.n_layers - 1}")
    if cell.position is not None and not (isinstance(cell.position, int) and 0 <= cell.position < n_tokens):
        raise PatchscopeError(
            f"{field_name}.position: {cell.position!r} is out of range 0 .. {n_tokens - 1} "
            f"for a pair of {n_tokens} tokens"
        )
    if isinstance(cell.window, bool) or not isinstance(cell.window, int) or cell.window < 1:
        raise PatchscopeError(f"{field_name}.window: expected an integer >= 1, got {cell.window!r}")
    if cell.head is not None:
        kind = PATCH_SITES[site]
        if kind not in ("query", "key/value"):
            raise PatchscopeError(f"{field_name}.head: {site} has no heads")
        count = head_count(site, info)
        if isinstance(cell.head, bool) or not isinstance(cell.head, int) or not 0 <= cell.head < count:
            raise PatchscopeError(
                f"{field_name}.head: {cell.head!r} is out of range 0 .. {count - 1}: {site} has "
                f"{count} {kind} heads on {info.name}"
            )
    if cell.neuron is not None and PATCH_SITES[site] != "neuron":
        raise PatchscopeError(f"{field_name}.neuron: {site} has no neurons")
    resolve_site(
        Site(
            cell.hook(),
            head=cell.head if cell.head is not None else (),
            neuron=cell.neuron if cell.neuron is not None else (),
        ),
        info,
        f"{field_name}.site",
        qkv=True,
    )


def make_cells(
    info: ModelInfo,
    n_tokens: int,
    sites: Sequence[str],
    layers: Any = "all",
    positions: Any = "each",
    heads: Any = "all",
    window: int = 1,
    field_name: str = "patching",
    neurons: Sequence[int] | None = None,
) -> list[Cell]:
    """The grid of cells: sites x layers ('all' or a list) x positions ('each', 'all', or a list:
    BOS counted, negatives from the end) x heads ('all' or a list; head sites only) x neurons
    (mlp.hook_post only: a list; None patches every neuron of the site at once)."""
    if isinstance(sites, str):
        sites = [sites]
    names = [site_name(s, f"{field_name}.sites[{i}]") for i, s in enumerate(sites)]
    if layers == "all":
        layers = list(range(info.n_layers))
    layers = [layers] if isinstance(layers, int) else list(layers)
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < info.n_layers:
            raise PatchscopeError(f"{field_name}.layers: {l!r} is out of range 0 .. {info.n_layers - 1}")
    if positions == "each":
        at: list[int | None] = list(range(n_tokens))
    elif positions == "all":
        at = [None]
    else:
        values = [positions] if isinstance(positions, int) else list(positions)
        at = [resolve_position(p, n_tokens, f"{field_name}.positions") for p in values]
    cells = []
    for site in names:
        unit_heads = [None]
        if PATCH_SITES[site] in ("query", "key/value"):
            count = head_count(site, info)
            unit_heads = list(range(count)) if heads == "all" else ([heads] if isinstance(heads, int) else list(heads))
            for h in unit_heads:
                if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < count:
                    raise PatchscopeError(
                        f"{field_name}.heads: {h!r} is out of range 0 .. {count - 1}: {site} has "
                        f"{count} {PATCH_SITES[site]} heads on {info.name}"
                    )
        units = [None] if PATCH_SITES[site] != "neuron" or neurons is None else list(neurons)
        for u in units:
            if u is not None and (isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < info.d_mlp):
                raise PatchscopeError(f"{field_name}.neurons: {u!r} is out of range 0 .. {info.d_mlp - 1}")
        cells += [Cell(site, l, p, h, u, window) for l in layers for p in at for h in unit_heads for u in units]
    seen: set[str] = set()
    for i, cell in enumerate(cells):  # each site's boundary once (a site GPT-2 has no module for, ...)
        if cell.site not in seen:
            seen.add(cell.site)
            check_cell(cell, info, n_tokens, f"{field_name}.cells[{i}]")
    return cells


def metric_values(
    logits: torch.Tensor, checked: CheckedPair, metrics: Sequence[str], clean_logprobs: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """[rows] per metric from logits [rows, keep, vocab] whose column 0 is the last prompt position
    (and columns j the positions that predict answer token j when keep = answer length)."""
    last = logits[:, 0].float()
    lp = torch.log_softmax(last, -1)
    a = checked.answer_ids
    out = {}
    for m in metrics:
        if m == "logit_diff":
            out[m] = last[:, a[0]] - last[:, checked.wrong_id]
        elif m == "prob":
            out[m] = lp[:, a[0]].exp()
        elif m == "logprob":
            full = torch.log_softmax(logits[:, : len(a)].float(), -1)
            out[m] = full.gather(2, torch.tensor(a, device=full.device)[None, :, None].expand(len(full), -1, 1)).sum(
                (1, 2)
            )
        else:  # kl: KL(clean || patched) of the next-token distribution
            ref = lp if clean_logprobs is None else clean_logprobs.to(lp.device)
            out[m] = (ref.exp() * (ref - lp)).sum(-1)
    return out
