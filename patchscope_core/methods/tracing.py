"""Causal tracing (Meng et al., ROME, 2022): corrupt the subject, restore one clean state.

For a fact (prompt, subject, answer): the clean run gives p_clean, the probability of the
answer's first token at the last prompt position. The corrupted runs add Gaussian noise
(`noise` x the std of the token embeddings over reference prompts) to the subject's token
embeddings, one run per noise sample: p_corrupt. Each cell (site, layer, position) restores the
clean value of that site at that position, at layer l for `resid_post` and at a window of
`window` layers centred on l for `mlp_out` / `attn_out`, in every noise sample: p_restored, and
the indirect effect p_restored - p_corrupt. Every run is an intervention of this engine:
`Noise` at `hook_embed` on the subject's positions, and the clean value written back at the
restored sites (what `Resample` of the same prompt does).

Work every cell of a fact would repeat is done once (docs/causal_tracing.md):
- the clean run and the corrupted runs (all samples in one batch), counted in `engine.counts`;
- positions before the subject are never corrupted, so restoring them changes nothing: their
  p_restored is p_corrupt, computed, not run;
- a row restoring from layer L0 at position p equals its sample's corrupted run below L0 and
  before p: it starts from that run's stored input to block L0, with the keys and values of
  positions before p from that run's KV cache, and computes only positions p.. of layers L0..
  A self-check against the full forward pass guards this shortcut on each model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..base.errors import PatchscopeError
from ..forward.dispatch import dispatch
from ..forward.hooks import hooked, position_ids_from_mask
from ..forward.partial import batches_by_position, forward_from
from ..forward.readings import input_device
from ..interventions.kinds import Action, Noise, Positions, Resample
from ..interventions.runs import Intervention, ResolvedIntervention
from ..models.info import ModelInfo
from ..models.sites import ResolvedSite, Site, resolve_site, window_layers
from ..models.tokens import subject_span, tokenize

TRACE_SITES = {
    "resid_post": "blocks.{l}.hook_resid_post",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "attn_out": "blocks.{l}.hook_attn_out",
}


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str  # a substring of the prompt: its tokens are corrupted
    answer: str  # the continuation whose first token's probability is traced


@dataclass(frozen=True)
class TraceSettings:
    sites: tuple[str, ...] = ("resid_post", "mlp_out", "attn_out")
    window: int = 10  # mlp_out / attn_out: restore this many layers centred on l, as ROME does
    noise: float = 3.0  # x the std of the token embeddings over the reference prompts
    samples: int = 10  # noise samples averaged per cell
    seed: int = 0  # sample s uses seed + s

    def check(self, field_name: str = "trace") -> None:
        unknown = [s for s in self.sites if s not in TRACE_SITES]
        if unknown or not self.sites:
            raise PatchscopeError(
                f"{field_name}.sites: expected some of {', '.join(TRACE_SITES)}, got {list(self.sites)}"
            )
        for name, value, low in (("window", self.window, 1), ("samples", self.samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PatchscopeError(f"{field_name}.{name}: expected an integer >= {low}, got {value!r}")
        if not isinstance(self.noise, (int, float)) or self.noise < 0:
            raise PatchscopeError(f"{field_name}.noise: expected a number >= 0, got {self.noise!r}")


@dataclass
class TraceResult:
    fact: Fact
    token_ids: list[int]
    subject: tuple[int, int]  # [start, end) token positions
    answer_token: int
    p_clean: float
    p_corrupt: float
    p_restored: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (site, layer, position) -> mean

    def indirect_effect(self, site: str, layer: int, position: int) -> float:
        return self.p_restored[(site, layer, position)] - self.p_corrupt


@dataclass
class _Row:
    sample: int
    position: int
    start: int  # the first layer it restores
    writes: list[tuple[ResolvedSite, torch.Tensor]]  # (site, clean value at `position`)
    cell: tuple[str, int, int]


class Tracer:
    """Causal traces on one engine (its model, reader and counters)."""

    def __init__(self, engine, batch_size: int = 64) -> None:
        self.engine = engine
        self.info: ModelInfo = engine.info
        self.batch_size = batch_size
        self.max_spread = 2
        self._shortcut_ok: bool | None = None

    # ------------------------------------------------------------------ public

    def check(self, fact: Fact, field_name: str = "fact") -> tuple[tuple[int, ...], tuple[int, int], int]:
        """Token ids, subject span and answer token of a fact; raises PatchscopeError."""
        ids = tokenize(self.info, fact.prompt, f"{field_name}.prompt")
        span = subject_span(self.info, fact.prompt, fact.subject, f"{field_name}.subject")
        if not isinstance(fact.answer, str) or not fact.answer:
            raise PatchscopeError(f"{field_name}.answer: empty answer")
        answer = self.info.tokenizer(fact.answer, add_special_tokens=False)["input_ids"]
        if not answer:
            raise PatchscopeError(f"{field_name}.answer: {fact.answer!r} has no tokens")
        return ids, span, answer[0]

    @torch.no_grad()
    def trace(
        self,
        fact: Fact,
        settings: TraceSettings,
        reference: Sequence[str],
        cells: Sequence[tuple[str, int, int]] | None = None,
        shortcuts: bool = True,
    ) -> TraceResult:
        """p_clean, p_corrupt and p_restored of every cell (site, layer, position); default: every
        site of `settings` x every layer x every prompt position. `reference`: the prompts whose
        token embeddings give the noise's std. `shortcuts=False` runs every row as a full forward
        pass, the positions before the subject too (the naive computation: tests, benchmarks)."""
        settings.check()
        ids, (s0, s1), answer = self.check(fact)
        n_layers, m = self.info.n_layers, len(ids)
        if cells is None:
            cells = [(s, l, p) for s in settings.sites for l in range(n_layers) for p in range(m)]
        embed = resolve_site(Site("hook_embed"), self.info)
        sigma = settings.noise * self.engine.reader.std(embed, tuple(reference))
        sites = {
            (s, l): resolve_site(Site(TRACE_SITES[s].format(l=l)), self.info)
            for s in settings.sites
            for l in range(n_layers)
        }
        clean_values, p_clean = self._clean(ids, list(sites.values()), answer)
        noise = [(embed, Action(sigma=sigma, seed=settings.seed + k)) for k in range(settings.samples)]
        corrupt = self._corrupt(ids, (s0, s1), noise, answer)
        result = TraceResult(fact, list(ids), (s0, s1), answer, p_clean, float(corrupt["p"].mean()))
        rows, runs = [], defaultdict(list)
        for cell in cells:
            site, layer, p = cell
            if shortcuts and p < s0:  # never corrupted: restoring it changes nothing
                result.p_restored[cell] = result.p_corrupt
                continue
            layers = window_layers(site, layer, settings.window, n_layers)
            writes = [(sites[(site, l)], clean_values[sites[(site, l)].site.hook][p]) for l in layers]
            for k in range(settings.samples):
                rows.append(_Row(k, p, min(layers), writes, cell))
        probs = self._restored(ids, rows, corrupt, answer, (s0, s1), noise, shortcuts)
        for row, prob in zip(rows, probs):
            runs[row.cell].append(prob)
        for cell, ps in runs.items():
            result.p_restored[cell] = sum(ps) / len(ps)
        return result

    # ------------------------------------------------------------------ the runs of a fact

    def _forward(self, ids: torch.Tensor, hooks, prompt_len: int, **kwargs):
        mask = torch.ones_like(ids)
        with hooked(self.engine.modules, self.engine.model, hooks, [0] * ids.shape[0], [prompt_len] * ids.shape[0]):
            return self.engine.modules(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                logits_to_keep=1,
                **kwargs,
            )

    def _clean(self, ids, sites: list[ResolvedSite], answer: int) -> tuple[dict[str, torch.Tensor], float]:
        """One clean forward pass: every site's value at every position, and p_clean."""
        values: dict[str, torch.Tensor] = {}

        def capture(site):
            def fn(x, ctx):
                values[site.site.hook] = x.reshape(x.shape[0], x.shape[1], site.width)[0].detach().float().clone()

            return fn

        t = torch.tensor([list(ids)], device=input_device(self.engine.model))
        out = self._forward(t, [(s, capture(s)) for s in sites], len(ids), use_cache=False)
        self.engine.counts["trace_clean"] += 1
        return values, float(torch.softmax(out.logits[0, -1].float(), -1)[answer])

    def _corrupt(self, ids, span, noise, answer) -> dict:
        """All noise samples in one batch: p per sample, each block's input and the KV cache."""
        n = len(noise)
        subject = Positions(indices=tuple(range(*span)))
        entries = [
            (k, ResolvedIntervention(Intervention(Site("hook_embed"), Noise(), subject), site, subject), action)
            for k, (site, action) in enumerate(noise)
        ]
        inputs: dict[int, torch.Tensor] = {}
        block_sites = {
            l: resolve_site(Site(f"blocks.{l}.hook_resid_pre"), self.info) for l in range(self.info.n_layers)
        }

        def keep(layer):
            def fn(x, ctx):
                inputs[layer] = x.detach().clone()

            return fn

        hooks = [(entries[0][1].site, dispatch(entries))] + [(s, keep(l)) for l, s in block_sites.items()]
        t = torch.tensor([list(ids)] * n, device=input_device(self.engine.model))
        out = self._forward(t, hooks, len(ids), use_cache=True)
        self.engine.counts["trace_corrupt"] += 1
        p = torch.softmax(out.logits[:, -1].float(), -1)[:, answer]
        return {"p": p, "inputs": inputs, "cache": out.past_key_values}

    def _restored(self, ids, rows: list[_Row], corrupt, answer, span, noise, shortcuts: bool) -> list[float]:
        """p of the answer for every row, in batches of rows with the same restored position,
        each starting from the lowest layer its rows restore."""
        if shortcuts and self._shortcut_ok is None:
            self._shortcut_ok = self._check_shortcut(ids, corrupt, answer)
        fast = shortcuts and self._shortcut_ok
        out: dict[int, float] = {}
        for batch in self._batches(rows, len(ids), fast):
            group = [rows[i] for i in batch]
            p, start = min(r.position for r in group), min(r.start for r in group)
            probs = (
                self._run_from(ids, group, corrupt, answer, p, start)
                if fast
                else self._run_full(ids, group, answer, span, noise)
            )
            self.engine.counts["trace_rows"] += len(group)
            out.update(zip(batch, probs))
        return [out[i] for i in range(len(rows))]

    def _batches(self, rows: list[_Row], m: int, fast: bool) -> list[list[int]]:
        if not fast:
            idx = list(range(len(rows)))
            return [idx[b : b + self.batch_size] for b in range(0, len(idx), self.batch_size)]
        return batches_by_position(rows, m, self.batch_size, self.max_spread)

    def _writes(self, batch: list[_Row]) -> list:
        entries = defaultdict(list)
        for r, row in enumerate(batch):
            at = Positions(indices=(row.position,))
            for site, value in row.writes:
                iv = ResolvedIntervention(Intervention(site.site, Resample(), at), site, at)
                entries[site.site.hook].append((r, iv, Action(scale=0.0, shift=value)))
        return [(e[0][1].site, dispatch(e)) for e in entries.values()]

    def _run_full(self, ids, batch: list[_Row], answer, span, noise) -> list[float]:
        """The plain way: every row runs the whole prompt through every layer, noised and restored."""
        subject = Positions(indices=tuple(range(*span)))
        entries = [
            (
                r,
                ResolvedIntervention(Intervention(Site("hook_embed"), Noise(), subject), noise[row.sample][0], subject),
                noise[row.sample][1],
            )
            for r, row in enumerate(batch)
        ]
        hooks = [(noise[0][0], dispatch(entries))] + self._writes(batch)
        t = torch.tensor([list(ids)] * len(batch), device=input_device(self.engine.model))
        out = self._forward(t, hooks, len(ids), use_cache=False)
        return torch.softmax(out.logits[:, -1].float(), -1)[:, answer].tolist()

    def _run_from(self, ids, batch: list[_Row], corrupt, answer, p: int, start: int) -> list[float]:
        """Rows restoring at position p from layer `start` on: positions p.. of layers start..,
        from the corrupted runs' block input and KV cache of their samples."""
        samples = torch.tensor([row.sample for row in batch], device=corrupt["p"].device)
        logits = forward_from(
            self.engine, ids, self._writes(batch), corrupt["inputs"], corrupt["cache"], samples, p, start
        )
        return torch.softmax(logits[:, -1].float(), -1)[:, answer].tolist()

    def _check_shortcut(self, ids, corrupt, answer) -> bool:
        """Starting mid-stack from stored inputs and a cropped cache must reproduce the corrupted
        run's own probabilities; if the architecture does not allow it, trace the plain way."""
        m, n = len(ids), self.info.n_layers
        probe = [_Row(0, p, start, [], ("check", start, p)) for p, start in ((m - 1, n // 2), (max(1, m // 2), 1))]
        try:
            got = [self._run_from(ids, [row], corrupt, answer, row.position, row.start)[0] for row in probe]
        except Exception:  # noqa: BLE001 - any failure means: not on this architecture
            return False
        want = float(corrupt["p"][0])
        return all(abs(g - want) < 1e-4 for g in got)
