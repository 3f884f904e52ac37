"""One engine: batched runs with interventions, KV-cached generation and answer scores.

`Engine.run(runs)` takes `InterventionRun`s (a prompt, interventions, an optional answer) and
returns, per run: the generated tokens, the first token's top-k, the answer's teacher-forced
log-probabilities, and the clean baseline of the same prompt (computed once per distinct
prompt). Rows of one batch may differ in prompt, site, kind, indices, positions and values:
one hook per (module, side) dispatches the rows (`forward/dispatch.py`).

The hard point (docs/interventions.md): with the KV cache on, the prefill sees the whole
left-padded prompt and every later step one new token. Hooks learn the absolute position of
each column from the running cache length (`forward/hooks.py`), so an intervention at prompt positions
is written once, in the prefill, and every later token reads it through the cached keys and
values; one at generated positions acts on each new token as it is decoded. Both equal
uncached generation that re-applies them at every step (the tests prove it).

Place in the core: the layer above `forward/` (hooks, dispatch, readings, clean starts) and below
`methods/`: `PatchscopeEngine` (`methods/patchscope.py`) runs Patchscopes on this same path, a
Patchscope being `Replace(vector=f(h))` at `blocks.{l*}.hook_resid_post` and the target
positions, h read from the source run.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .base.errors import PatchscopeError
from .base.values import check_seed
from .forward.clean_start import CleanStates, first_layer
from .forward.dispatch import dispatch
from .forward.hooks import HookFn, attached_hooks, cached_length, hooked, left_pad, position_ids_from_mask
from .forward.knockout import group_by_layer, knockout_hooks
from .forward.readings import SiteReader, input_device
from .interventions.kinds import Action, Add
from .interventions.runs import InterventionRun, ResolvedIntervention, ResolvedRun, resolve_run
from .models.info import ModelInfo, info_of
from .models.sites import ResolvedSite, Site, plain_modules, resolve_site
from .models.tokens import tokenize


@dataclass(frozen=True)
class Decoding:
    """How the target generates. Greedy by default, so results are deterministic."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # with do_sample: seeds each batch's generation
    stop_at_eos: bool = True  # False: every row generates exactly max_new_tokens tokens
    use_cache: bool = True  # False re-runs the whole sequence at every step (for checks and benchmarks)

    def __post_init__(self) -> None:
        if self.do_sample and self.seed is None:
            raise PatchscopeError("decoding.seed: sampling needs an explicit seed so results can be reproduced")
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise PatchscopeError(f"decoding.temperature: must be a finite number > 0, got {self.temperature}")
        if self.seed is not None:
            check_seed(self.seed, "decoding.seed")


@dataclass
class _Output:
    """What one row of a batch produced."""

    generated: list[int] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    answer_logprobs: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class InterventionResult:
    run: InterventionRun
    prompt_token_ids: list[int]
    generated_token_ids: list[int]
    generated_text: str
    top_token_ids: list[int]  # the first generated token's top-k under the interventions
    top_logprobs: list[float]
    answer_token_ids: list[int]
    answer_logprobs: list[float]  # per answer token, teacher-forced
    answer_logprob: float | None  # their sum
    p_answer: float | None  # probability of the answer's first token
    clean_generated_token_ids: list[int] | None = None  # the same prompt without interventions
    clean_generated_text: str | None = None
    clean_answer_logprobs: list[float] | None = None
    clean_answer_logprob: float | None = None
    p_answer_clean: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A flat, JSON- and Parquet-friendly dict."""
        # read directly: dataclasses.asdict would deep-copy the run (its kinds, their tables) first
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("run", "timings")}
        record["prompt"] = self.run.prompt
        record["answer"] = self.run.answer
        record["interventions"] = [
            {
                "site": iv.site.hook,
                "head": list(iv.site.head),
                "neuron": list(iv.site.neuron),
                "kind": iv.kind.name,
                "positions": str(iv.positions),
            }
            for iv in self.run.interventions
        ]
        record.update({f"time_{k}": v for k, v in self.timings.items()})
        return record


class _Recorder:
    """A Reader that only notes what `Kind.prepare` asks for, so reads can be batched."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.wanted_values: dict[str, tuple[ResolvedSite, set]] = {}
        self.wanted_stats: dict[tuple[str, ...], dict[str, ResolvedSite]] = {}

    def values(self, site, prompt):
        self.wanted_values.setdefault(site.site.hook, (site, set()))[1].add(prompt)
        return torch.zeros(len(tokenize(self.info, prompt)), site.width)  # the prompt's length: kinds index it

    def mean(self, site, prompts):
        self.wanted_stats.setdefault(tuple(prompts), {})[site.site.hook] = site
        return torch.zeros(site.width)

    def std(self, site, prompts):
        self.mean(site, prompts)
        return 0.0


def warn_attached_hooks(bridge, field_name: str) -> None:
    """Hooks added to the bridge itself do not act inside the engine's runs (docs/python-api.md): a bridge
    handed over with some attached gets a warning naming them."""
    names = attached_hooks(bridge)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        warnings.warn(
            f"{field_name}: the bridge has hooks attached ({shown}); hooks added to the bridge "
            "(bridge.add_hook, bridge.hooks(...)) do not act inside the engine's runs: give them to "
            "Engine.generate_with_hooks or Engine.run_with_hooks instead (bridge.reset_hooks() removes "
            "them)",
            UserWarning,
            stacklevel=3,
        )


class Engine:
    """Runs prompts with interventions on one loaded model (a TransformerBridge), in batches."""

    def __init__(self, model, *, name: str | None = None, decoding: Decoding = Decoding(), top_k: int = 10) -> None:
        warn_attached_hooks(model, "model")
        self.model = model
        self.modules = plain_modules(model)
        self.info: ModelInfo = info_of(model, name)
        self.target_info = self.info
        self.reader = SiteReader(model, self.modules, self.info)
        self.decoding = decoding
        self.top_k = top_k
        self.counts: Counter = Counter()  # runs per purpose ("clean": clean baselines, "trace_*": tracing)
        self._clean: dict[tuple, _Output] = {}  # clean baselines by (prompt, answer, max_new_tokens)
        self.share_prefixes = True  # rows of one prompt compute the prefix no intervention touches once
        self.batch_tokens: int | None = None  # a batch holds at most this many tokens (rows x longest sequence)
        self.start_at_first_layer = True  # scoring rows start at their first touched layer (forward/clean_start.py)
        self.start_spread = 2  # ... in batches whose first layers spread by at most this many layers
        self.states = CleanStates(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._describe()}>"

    def _describe(self) -> str:
        """The model, where it runs, how it decodes: what tells one engine from another."""
        i, d = self.info, self.decoding
        try:
            p = next(self.model.parameters())
            where = f"{p.device.type if p.device.index is None else p.device}, {str(p.dtype).removeprefix('torch.')}"
        except (StopIteration, AttributeError, TypeError):
            where = "no parameters"
        how = (
            (
                f"sampling (temperature {d.temperature:g}"
                + (f", top_p {d.top_p:g}" if d.top_p is not None else "")
                + f", seed {d.seed})"
            )
            if d.do_sample
            else "greedy"
        )
        return f"{i.name}: {i.n_layers} layers, d_model {i.d_model}, on {where}; {how}, top_k {self.top_k}" + (
            "" if d.stop_at_eos else ", no stop at EOS"
        )

    # ------------------------------------------------------------------ interventions

    def resolve(self, runs: Sequence[InterventionRun]) -> list[ResolvedRun]:
        """Validate every run; the error names the index of the first bad one."""
        return self.resolve_runs(runs)

    def resolve_runs(self, runs: Sequence[InterventionRun]) -> list[ResolvedRun]:
        return [resolve_run(r, self.info, f"runs[{i}]") for i, r in enumerate(runs)]

    def run(
        self, runs: Sequence[InterventionRun], batch_size: int = 32, clean: bool = True
    ) -> list[InterventionResult]:
        """One result per run, in input order (`run_interventions`)."""
        return self.run_interventions(runs, batch_size, clean)

    def run_interventions(
        self, runs: Sequence[InterventionRun], batch_size: int = 32, clean: bool = True
    ) -> list[InterventionResult]:
        """One result per run, in input order. Validates everything before any forward pass; with
        `clean`, each distinct prompt also runs without interventions, once per engine."""
        if batch_size < 1:
            raise PatchscopeError(f"batch_size: expected an integer >= 1, got {batch_size}")
        resolved = self.resolve_runs(runs)
        t0 = time.perf_counter()
        actions = self.prepare(resolved)
        prepare_s = time.perf_counter() - t0
        outputs = self.execute(resolved, actions, batch_size)
        clean_out = self._clean
        if clean:
            keys = [
                k for k in dict.fromkeys(_clean_key(r) for r in resolved if r.interventions) if k not in self._clean
            ]
            plain = [ResolvedRun(None, p, a, (), n) for p, a, n in keys]
            self.counts["clean"] += len(plain)
            if len(self._clean) + len(keys) > 4096:
                self._clean.clear()  # a bound on what the cache keeps; what this call needs is added back
                keys = list(dict.fromkeys(_clean_key(r) for r in resolved if r.interventions))
                plain = [ResolvedRun(None, p, a, (), n) for p, a, n in keys]
            self._clean.update(zip(keys, self.execute(plain, [[] for _ in plain], batch_size)))
        tok = self.model.tokenizer
        results = []
        for r, out in zip(resolved, outputs):
            c = clean_out.get(_clean_key(r), out if not r.interventions else None) if clean else None
            res = InterventionResult(
                run=r.run,
                prompt_token_ids=list(r.prompt_ids),
                generated_token_ids=out.generated,
                generated_text=tok.decode(out.generated, skip_special_tokens=True),
                top_token_ids=out.top_ids,
                top_logprobs=out.top_logprobs,
                answer_token_ids=list(r.answer_ids),
                answer_logprobs=out.answer_logprobs,
                answer_logprob=sum(out.answer_logprobs) if r.answer_ids else None,
                p_answer=_p_first(out) if r.answer_ids else None,
                timings={"prepare_s": prepare_s, **out.timings},
            )
            if c is not None:
                res.clean_generated_token_ids = c.generated
                res.clean_generated_text = tok.decode(c.generated, skip_special_tokens=True)
                if r.answer_ids:
                    res.clean_answer_logprobs = c.answer_logprobs
                    res.clean_answer_logprob = sum(c.answer_logprobs)
                    res.p_answer_clean = _p_first(c)
            results.append(res)
        return results

    def prepare(self, resolved: Sequence[ResolvedRun]) -> list[list[Action]]:
        """Each intervention's Action; the values they need are read first, in batched passes."""
        recorder = _Recorder(self.info)
        for r in resolved:
            for iv in r.interventions:
                iv.intervention.kind.prepare(iv.site, recorder)
        for site, prompts in recorder.wanted_values.values():
            self.reader.read([site], [tokenize(self.info, p) for p in prompts])
        for prompts, sites in recorder.wanted_stats.items():
            self.reader.statistics(list(sites.values()), prompts)
        return [[iv.intervention.kind.prepare(iv.site, self.reader) for iv in r.interventions] for r in resolved]

    def steering_norms(self, run: InterventionRun) -> dict[str, float] | None:
        """For a run that adds one direction (`Add`): `vector_norm` (|v|), `site_norm` (the
        site's mean activation norm over the prompt's tokens but BOS, without interventions) and
        `relative_strength` = |alpha| x |v| / site_norm, so strengths compare across layers and
        models. None for other runs."""
        if not any(isinstance(iv.kind, Add) for iv in run.interventions):
            return None  # most runs: nothing to resolve or read
        resolved = resolve_run(run, self.info)
        adds = [iv for iv in resolved.interventions if isinstance(iv.intervention.kind, Add)]
        if len(adds) != 1:
            return None
        (iv,) = adds
        kind = iv.intervention.kind
        v = replace(kind, alpha=1.0).prepare(iv.site, self.reader).shift.float()
        h = self.reader.values(iv.site, resolved.prompt_ids)[1 if self.info.prepend_bos else 0 :].float()
        site_norm = float(h.norm(dim=-1).mean())
        vector_norm = float(v.norm())
        return {
            "vector_norm": vector_norm,
            "site_norm": site_norm,
            "relative_strength": abs(float(kind.alpha)) * vector_norm / site_norm if site_norm else float("nan"),
        }

    # ------------------------------------------------------------------ your own hooks

    def _hooks(self, hooks: Sequence[tuple[str | Site, HookFn]]) -> list[tuple[ResolvedSite, HookFn]]:
        return [
            (resolve_site(s if isinstance(s, Site) else Site(s), self.info, f"hooks[{i}]"), fn)
            for i, (s, fn) in enumerate(hooks)
        ]

    def _ids(self, prompts: Sequence[str | Sequence[int]]) -> list[tuple[int, ...]]:
        return [
            tokenize(self.info, p, f"prompts[{i}]") if isinstance(p, str) else tuple(p) for i, p in enumerate(prompts)
        ]

    @torch.no_grad()
    def generate_with_hooks(
        self,
        prompts: Sequence[str | Sequence[int]],
        hooks: Sequence[tuple[str | Site, HookFn]],
        max_new_tokens: int = 20,
    ) -> list[list[int]]:
        """Generate from a left-padded batch with your own hooks: (TransformerLens hook name or
        Site, fn(activation, ctx)); `ctx` (hooks.HookContext) tells each column's absolute
        position per row, which columns are real tokens, and the step (0 = prefill)."""
        rows = self._ids(prompts)
        batch = [ResolvedRun(None, r, (), (), max_new_tokens) for r in rows]
        return [o.generated for o in self._generate(batch, self._hooks(hooks), share_prefix=False)]

    @torch.no_grad()
    def run_with_hooks(
        self, prompts: Sequence[str | Sequence[int]], hooks: Sequence[tuple[str | Site, HookFn]]
    ) -> list[torch.Tensor]:
        """One forward pass with your own hooks; each row's logits [tokens, vocab] (no padding)."""
        rows = self._ids(prompts)
        ids, mask, pads = left_pad(rows, self.model.tokenizer.pad_token_id, input_device(self.model))
        with hooked(self.modules, self.model, self._hooks(hooks), pads, [len(r) for r in rows]):
            logits = self.modules(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
            ).logits
        return [logits[b, pads[b] :].float() for b in range(len(rows))]

    # ------------------------------------------------------------------ batches

    def execute(
        self, resolved: Sequence[ResolvedRun], actions: Sequence[Sequence[Action]], batch_size: int
    ) -> list[_Output]:
        """Outputs of resolved runs, batched by prompt length (at most batch_size rows, and at most
        `batch_tokens` tokens when set); results in input order. A batch that runs out of memory
        is halved and the halves run instead. Rows that only score go in batches of nearby first
        layers (`start_spread`), each starting at its lowest row's layer (forward/clean_start.py)."""
        starts = [first_layer(r) if self.start_at_first_layer and not r.max_new_tokens else 0 for r in resolved]
        order = sorted(
            range(len(resolved)), key=lambda i: (len(resolved[i].prompt_ids) + len(resolved[i].answer_ids), starts[i])
        )
        outputs: list[_Output | None] = [None] * len(resolved)
        for idx in self._cut(order, resolved, batch_size, starts):
            for i, out in zip(idx, self._halving([resolved[i] for i in idx], [actions[i] for i in idx])):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _cut(
        self, order: list[int], resolved: Sequence[ResolvedRun], batch_size: int, starts: Sequence[int]
    ) -> list[list[int]]:
        """Batches of rows in `order`: batch_size rows at most, rows x their longest sequence
        (prompt + answer or generated tokens) within batch_tokens, first layers `starts` spread by
        at most start_spread."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest, low, high = 0, 0, 0
        for i in order:
            r = resolved[i]
            length = len(r.prompt_ids) + max(len(r.answer_ids), r.max_new_tokens)
            over = self.batch_tokens is not None and (len(current) + 1) * max(longest, length) > self.batch_tokens
            spread = max(high, starts[i]) - min(low, starts[i]) > self.start_spread
            if current and (len(current) >= batch_size or over or spread):
                batches.append(current)
                current, longest = [], 0
            low, high = (min(low, starts[i]), max(high, starts[i])) if current else (starts[i], starts[i])
            current.append(i)
            longest = max(longest, length)
        return batches + ([current] if current else [])

    def _halving(self, batch: Sequence[ResolvedRun], actions: Sequence[Sequence[Action]]) -> list[_Output]:
        try:
            return self._batch(batch, actions)
        except Exception as exc:  # noqa: BLE001 - only running out of memory is handled here
            if not _out_of_memory(exc) or len(batch) == 1:
                raise
        self.counts["oom_halved"] += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        return self._halving(batch[:half], actions[:half]) + self._halving(batch[half:], actions[half:])

    def _dispatch_hooks(
        self, batch: Sequence[ResolvedRun], actions: Sequence[Sequence[Action]]
    ) -> list[tuple[ResolvedSite, HookFn]]:
        by_site: dict[str, list[tuple[int, ResolvedIntervention, Action]]] = defaultdict(list)
        for b, (r, acts) in enumerate(zip(batch, actions)):
            for iv, act in zip(r.interventions, acts):
                if iv.edges is None:  # a knockout writes no value: its edges go to the attention (forward/knockout.py)
                    by_site[iv.site.site.hook].append((b, iv, act))
        knockouts = group_by_layer([[iv.edges for iv in r.interventions if iv.edges is not None] for r in batch])
        return [(entries[0][1].site, dispatch(entries)) for entries in by_site.values()] + knockout_hooks(
            knockouts, self.info
        )

    @torch.no_grad()
    def _batch(self, batch: Sequence[ResolvedRun], actions: Sequence[Sequence[Action]]) -> list[_Output]:
        hooks = self._dispatch_hooks(batch, actions)
        t0 = time.perf_counter()
        generating = max(r.max_new_tokens for r in batch) > 0
        outputs = self._generate(batch, hooks) if generating else [_Output() for _ in batch]
        t1 = time.perf_counter()
        if any(r.answer_ids for r in batch) or not generating:
            self._score(batch, hooks, outputs, top_k=not generating)
        t2 = time.perf_counter()
        for out in outputs:
            out.timings = {"batch_generate_s": t1 - t0, "batch_score_s": t2 - t1, "batch_size": float(len(batch))}
        return outputs

    def _shared_prefix(self, batch: Sequence[ResolvedRun], ids: torch.Tensor):
        """The KV cache of the prompt positions every row shares and no intervention touches, for
        the whole batch (or None): rows of one target prompt patched late compute their common
        prefix once (a Patchscope grid's rows mostly share the target prompt)."""
        first = batch[0].prompt_ids
        if (
            not self.share_prefixes
            or not self.decoding.use_cache
            or len(batch) < 2
            or any(r.prompt_ids != first for r in batch)
        ):
            return None
        k = len(first) - 1  # the last prompt token stays in the prefill: it gives the first token's logits
        for r in batch:
            for iv in r.interventions:
                p = iv.positions
                k = min(k, 0 if p.prompt else min(p.indices, default=k))
        if k < 1:
            return None
        cache = self.modules(input_ids=ids[:1, :k], use_cache=True, logits_to_keep=1).past_key_values
        if cached_length(cache) is None:  # the hooks could not tell where the prefix ends
            return None
        cache.batch_repeat_interleave(len(batch))
        self.counts["shared_prefix_tokens"] += k * (len(batch) - 1)
        return cache

    def _generate(self, batch: Sequence[ResolvedRun], hooks, share_prefix: bool = True) -> list[_Output]:
        from transformers import GenerationConfig

        tok, dec = self.model.tokenizer, self.decoding
        ids, mask, pads = left_pad([r.prompt_ids for r in batch], tok.pad_token_id, input_device(self.model))
        prefix = self._shared_prefix(batch, ids) if share_prefix else None
        m = ids.shape[1]
        max_new = max(r.max_new_tokens for r in batch)
        sampling = dict(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p) if dec.do_sample else {}
        eos = tok.eos_token_id if dec.stop_at_eos else None
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=dec.do_sample,
            use_cache=dec.use_cache,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
            **sampling,
        )
        first: dict[str, torch.Tensor] = {}
        modules = self.modules
        with hooked(modules, self.model, hooks, pads, [len(r.prompt_ids) for r in batch]) as tracker:

            def keep_first(module, args, out) -> None:  # the first token's logits, from the prefill
                if tracker.step == 0:
                    first["logits"] = out.logits[:, -1].float()

            handle = modules.register_forward_hook(keep_first)
            generation_config = modules.generation_config
            if not dec.stop_at_eos:  # otherwise generate falls back to the model's own EOS
                modules.generation_config = replace_eos(generation_config)
            try:
                if dec.seed is not None:
                    torch.manual_seed(dec.seed)
                sequences = modules.generate(
                    ids,
                    attention_mask=mask,
                    generation_config=config,
                    **({"past_key_values": prefix} if prefix is not None else {}),
                )
            finally:
                handle.remove()
                modules.generation_config = generation_config
        logprobs = torch.log_softmax(first["logits"], dim=-1)
        top = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        outputs = []
        for b, r in enumerate(batch):
            gen = sequences[b, m : m + r.max_new_tokens].tolist()
            if dec.stop_at_eos and tok.eos_token_id in gen:
                gen = gen[: gen.index(tok.eos_token_id) + 1]
            outputs.append(_Output(gen, top.indices[b].tolist(), top.values[b].tolist()))
        return outputs

    def _forward(self, batch: Sequence[ResolvedRun], hooks, keep: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """One forward pass over each row's prompt + answer (answer tokens count as generated
        positions); logits of the last `keep` columns (all when None) and each row's padding."""
        rows = [r.prompt_ids + r.answer_ids for r in batch]
        ids, mask, pads = left_pad(rows, self.model.tokenizer.pad_token_id, input_device(self.model))
        with hooked(self.modules, self.model, hooks, pads, [len(r.prompt_ids) for r in batch]):
            logits = self.modules(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
                logits_to_keep=keep or 0,
            ).logits
        return logits.float(), pads

    def _score(self, batch: Sequence[ResolvedRun], hooks, outputs: list[_Output], top_k: bool) -> None:
        """Teacher-forced log-probabilities of each row's answer; the first token's top-k too when
        nothing was generated."""
        keep = max(len(r.answer_ids) for r in batch) + 1
        logits = self.states.score_logits(batch, hooks, keep) if self.start_at_first_layer else None
        if logits is None:  # every layer
            logits, _ = self._forward(batch, hooks, keep)
        logprobs = torch.log_softmax(logits, dim=-1)  # [batch, keep, vocab]; column keep-1 is the last token
        for b, (r, out) in enumerate(zip(batch, outputs)):
            k = len(r.answer_ids)
            if k:
                predicted = logprobs[b, keep - k - 1 : keep - 1]  # the positions that predict each answer token
                out.answer_logprobs = predicted.gather(1, torch.tensor(r.answer_ids, device=logprobs.device)[:, None])[
                    :, 0
                ].tolist()
            if top_k:
                top = logprobs[b, keep - k - 1].topk(min(self.top_k, logprobs.shape[-1]))
                out.top_ids, out.top_logprobs = top.indices.tolist(), top.values.tolist()

    @torch.no_grad()
    def logits(self, runs: Sequence[InterventionRun], batch_size: int = 32) -> list[torch.Tensor]:
        """Each run's logits [prompt + answer tokens, vocab] under its interventions (answer tokens
        count as generated positions): `run_with_hooks` for interventions."""
        resolved = self.resolve_runs(runs)
        actions = self.prepare(resolved)
        out: list[torch.Tensor | None] = [None] * len(resolved)
        for start in range(0, len(resolved), batch_size):
            idx = list(range(start, min(start + batch_size, len(resolved))))
            batch = [resolved[i] for i in idx]
            logits, pads = self._forward(batch, self._dispatch_hooks(batch, [actions[i] for i in idx]))
            for b, i in enumerate(idx):
                out[i] = logits[b, pads[b] :]
        return out  # type: ignore[return-value]


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation failure of the accelerator or of the host."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def replace_eos(generation_config):
    """A copy of a model's generation config without EOS, so generate never stops early."""
    import copy

    config = copy.deepcopy(generation_config)
    config.eos_token_id = None
    return config


def _clean_key(r: ResolvedRun) -> tuple:
    return (r.prompt_ids, r.answer_ids, r.max_new_tokens)


def _p_first(out: _Output) -> float | None:
    return float(torch.tensor(out.answer_logprobs[0]).exp()) if out.answer_logprobs else None
