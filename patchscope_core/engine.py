"""Batched Patchscopes: source extraction once, then patched, KV-cached generation.

The hard point (see DESIGN.md): with the KV cache on, the prefill sees the whole target
prompt and every later step sees one new token. The patch belongs at absolute positions
i* that exist only in the prefill; it is written there once and every later token reads it
through the cached keys and values. Hooks learn the absolute position of the chunk they
see from the running cache length (a pre-forward hook reads it), never from the chunk's
length, so position 0 and one-token prompts work, and so does uncached generation (no
cache: every step starts at position 0 and re-patches i*).

Reads and writes happen at the residual stream after block l (`sites.py`), on the bridge's
Hugging Face modules without its wrappers, so generation runs at plain Hugging Face speed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .errors import PatchscopeError
from .models import ModelInfo
from .sites import block, on_output, plain_modules, resid_post  # noqa: F401 (resid_post: re-exported)
from .spec import Patchscope, ResolvedPatchscope, resolve_all


@dataclass(frozen=True)
class Decoding:
    """How the target generates. Greedy by default, so results are deterministic."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # with do_sample: seeds each batch's generation
    stop_at_eos: bool = True
    use_cache: bool = True  # False re-runs the whole sequence at every step (for checks and benchmarks)

    def __post_init__(self) -> None:
        if self.do_sample and self.seed is None:
            raise PatchscopeError("decoding.seed: sampling needs an explicit seed so results can be reproduced")
        if self.temperature <= 0:
            raise PatchscopeError(f"decoding.temperature: must be > 0, got {self.temperature}")


@dataclass
class PatchscopeResult:
    patchscope: Patchscope
    source_token_ids: list[int]
    target_token_ids: list[int]
    source_position: int
    target_positions: list[int]
    generated_token_ids: list[int]
    generated_text: str
    top_token_ids: list[int]  # the first generated token's top-k under the patched target
    top_logprobs: list[float]
    timings: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """A flat, JSON- and Parquet-friendly dict."""
        s, t = self.patchscope.source, self.patchscope.target
        record = {
            "source_model": s.model,
            "source_prompt": s.prompt,
            "source_layer": s.layer,
            "source_position": self.source_position,
            "target_model": t.model,
            "target_prompt": t.prompt,
            "target_layer": t.layer,
            "target_positions": self.target_positions,
            "mapping": getattr(self.patchscope.mapping, "name", repr(self.patchscope.mapping)),
            "max_new_tokens": self.patchscope.max_new_tokens,
        }
        record.update({k: v for k, v in asdict(self).items() if k not in ("patchscope", "source_position", "target_positions", "timings")})
        record.update({f"time_{k}": v for k, v in self.timings.items()})
        return record


def info_of(model, name: str | None = None) -> ModelInfo:
    """ModelInfo of a loaded bridge."""
    return ModelInfo(
        name=name or getattr(model.cfg, "model_name", "model"),
        n_layers=int(model.cfg.n_layers),
        d_model=int(model.cfg.d_model),
        tokenizer=model.tokenizer,
        prepend_bos=bool(getattr(model.cfg, "default_prepend_bos", True)),
    )


def input_device(model) -> torch.device:
    return model.original_model.get_input_embeddings().weight.device


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """[batch, m] token ids and attention mask, left padded; and each row's pad count."""
    m = max(len(r) for r in rows)
    ids = torch.full((len(rows), m), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), m), dtype=torch.long)
    pads = []
    for b, row in enumerate(rows):
        pads.append(m - len(row))
        ids[b, m - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, m - len(row):] = 1
    return ids.to(device), mask.to(device), pads


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's index within its row (pads get 0), as Hugging Face generate derives them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _CachePosition:
    """Absolute position of the first token of the chunk the model sees now.

    A pre-forward hook on the Hugging Face model reads the running KV-cache length: 0 in the
    prefill (and at every step without a cache), the number of cached tokens afterwards.
    """

    def __init__(self) -> None:
        self.start = 0

    def __call__(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        self.start = int(cache.get_seq_length()) if cache is not None else 0


@contextmanager
def tracking_cache_position(modules: torch.nn.Module) -> Iterator[_CachePosition]:
    tracker = _CachePosition()
    handle = modules.register_forward_pre_hook(tracker, with_kwargs=True)
    try:
        yield tracker
    finally:
        handle.remove()


def patch_hook(tracker: _CachePosition, rows: list[int], cols: list[int], vectors: torch.Tensor):
    """A hook writing vectors[k] at (rows[k], absolute padded position cols[k]) of its layer.

    It writes only when the chunk it sees covers the position (the prefill, or every step when
    the cache is off) and leaves every other row and position alone.
    """
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    first, last = min(cols), max(cols)
    placed: dict[torch.device, tuple] = {}

    def hook(x: torch.Tensor) -> torch.Tensor | None:  # x: [batch, chunk, d_model]
        start, n = tracker.start, x.shape[1]
        if start > last or start + n <= first:
            return None  # every decoding step after the prefill: leave the output untouched
        if x.device not in placed:
            placed[x.device] = (rows_t.to(x.device), cols_t.to(x.device), vectors.to(x.device, x.dtype))
        r, c, v = placed[x.device]
        inside = (c >= start) & (c < start + n)
        x = x.clone()
        x[r[inside], c[inside] - start] = v[inside]
        return x

    return hook


class _Stop(Exception):
    pass


class PatchscopeEngine:
    """Runs lists of Patchscopes on loaded models, in batches.

    model: the target model M* (a TransformerBridge); source_model: M (default: the same).
    Patchscopes whose `source.model` / `target.model` is None are recorded with these names.
    """

    def __init__(
        self,
        model,
        source_model=None,
        *,
        name: str | None = None,
        source_name: str | None = None,
        decoding: Decoding = Decoding(),
        top_k: int = 10,
    ) -> None:
        self.target_model = model
        self.source_model = source_model if source_model is not None else model
        self._target_modules = plain_modules(self.target_model)
        self._source_modules = plain_modules(self.source_model) if source_model is not None else self._target_modules
        self.target_info = info_of(model, name)
        self.source_info = info_of(self.source_model, source_name or (name if source_model is None else None))
        self.decoding = decoding
        self.top_k = top_k

    # ------------------------------------------------------------------ public

    def resolve(self, patchscopes: Sequence[Patchscope]) -> list[ResolvedPatchscope]:
        return resolve_all(patchscopes, self.source_info, self.target_info)

    def run(self, patchscopes: Sequence[Patchscope], batch_size: int = 32) -> list[PatchscopeResult]:
        """One result per Patchscope, in input order. Validates everything before any forward pass."""
        if batch_size < 1:
            raise PatchscopeError(f"batch_size: expected an integer >= 1, got {batch_size}")
        resolved = self.resolve(patchscopes)
        if not resolved:
            return []
        t0 = time.perf_counter()
        sources = self.extract_sources(resolved, batch_size)
        extract_s = time.perf_counter() - t0
        # Similar target lengths share a batch (less padding); results go back in input order.
        order = sorted(range(len(resolved)), key=lambda i: len(resolved[i].target_token_ids))
        results: list[PatchscopeResult | None] = [None] * len(resolved)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = [resolved[i] for i in idx]
            vectors = [sources[(r.source_token_ids, r.spec.source.layer, r.source_position)] for r in batch]
            for i, res in zip(idx, self.generate(batch, vectors)):
                res.timings["extract_s"] = extract_s
                results[i] = res
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ sources

    @torch.no_grad()
    def extract_sources(
        self, resolved: Sequence[ResolvedPatchscope], batch_size: int = 32
    ) -> dict[tuple, torch.Tensor]:
        """h for every distinct (source prompt, layer, position): one batched forward pass per
        chunk of distinct source prompts, capturing only the layers and positions asked for and
        stopping after the deepest layer needed."""
        wanted: dict[tuple[int, ...], set[tuple[int, int]]] = defaultdict(set)
        for r in resolved:
            wanted[r.source_token_ids].add((r.spec.source.layer, r.source_position))
        prompts = list(wanted)
        model = self.source_model
        pad_id = model.tokenizer.pad_token_id
        out: dict[tuple, torch.Tensor] = {}
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask, pads = left_pad(chunk, pad_id, input_device(model))
            by_layer: dict[int, list[tuple[int, int]]] = defaultdict(list)  # layer -> (row, position)
            for b, prompt in enumerate(chunk):
                for layer, pos in wanted[prompt]:
                    by_layer[layer].append((b, pos))
            deepest = max(by_layer)

            def capture(layer: int):
                def hook(x: torch.Tensor) -> None:  # x: [batch, m, d_model]
                    for b, pos in by_layer[layer]:
                        out[(chunk[b], layer, pos)] = x[b, pads[b] + pos].detach().float().clone()
                    if layer == deepest:
                        raise _Stop

                return hook

            modules = self._source_modules
            with ExitStack() as hooks:
                for layer in by_layer:
                    hooks.callback(on_output(block(modules, model, layer), capture(layer)).remove)
                try:
                    modules(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
                except _Stop:
                    pass
        return out

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, batch: Sequence[ResolvedPatchscope], vectors: Sequence[torch.Tensor]) -> list[PatchscopeResult]:
        """Patched generation for one heterogeneous batch: rows may differ in target prompt,
        layer, positions, source vector and max_new_tokens."""
        from transformers import GenerationConfig

        model, tok, dec = self.target_model, self.target_model.tokenizer, self.decoding
        pad_id = tok.pad_token_id
        ids, mask, pads = left_pad([r.target_token_ids for r in batch], pad_id, input_device(model))
        m = ids.shape[1]
        writes: dict[int, tuple[list[int], list[int], list[torch.Tensor]]] = defaultdict(lambda: ([], [], []))
        for b, (r, h) in enumerate(zip(batch, vectors)):
            mapped = r.spec.mapping(h)  # f(h): [d_model of the target]
            rows, cols, vecs = writes[r.spec.target.layer]
            for p in r.target_positions:
                rows.append(b)
                cols.append(pads[b] + p)
                vecs.append(mapped)
        max_new = max(r.spec.max_new_tokens for r in batch)
        sampling = dict(temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p) if dec.do_sample else {}
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=dec.do_sample,
            use_cache=dec.use_cache,
            pad_token_id=pad_id,
            eos_token_id=tok.eos_token_id if dec.stop_at_eos else None,
            return_dict_in_generate=True,
            output_logits=True,
            **sampling,
        )
        t0 = time.perf_counter()
        modules = self._target_modules
        with tracking_cache_position(modules) as tracker, ExitStack() as hooks:
            for layer, (rows, cols, vecs) in writes.items():
                hook = patch_hook(tracker, rows, cols, torch.stack(vecs))
                hooks.callback(on_output(block(modules, model, layer), hook).remove)
            if dec.seed is not None:
                torch.manual_seed(dec.seed)
            out = modules.generate(ids, attention_mask=mask, generation_config=config)
        generate_s = time.perf_counter() - t0
        first = torch.log_softmax(out.logits[0].float(), dim=-1)  # [batch, vocab]
        top = first.topk(min(self.top_k, first.shape[-1]), dim=-1)
        results = []
        for b, r in enumerate(batch):
            gen = out.sequences[b, m:m + r.spec.max_new_tokens].tolist()
            if dec.stop_at_eos and tok.eos_token_id in gen:
                gen = gen[: gen.index(tok.eos_token_id) + 1]
            results.append(
                PatchscopeResult(
                    patchscope=self._named(r.spec),
                    source_token_ids=list(r.source_token_ids),
                    target_token_ids=list(r.target_token_ids),
                    source_position=r.source_position,
                    target_positions=list(r.target_positions),
                    generated_token_ids=gen,
                    generated_text=tok.decode(gen, skip_special_tokens=True),
                    top_token_ids=top.indices[b].tolist(),
                    top_logprobs=top.values[b].tolist(),
                    timings={"batch_generate_s": generate_s, "batch_size": float(len(batch))},
                )
            )
        return results

    def _named(self, spec: Patchscope) -> Patchscope:
        """The spec with its model names filled in from the engine."""
        from dataclasses import replace

        if spec.source.model is None:
            spec = replace(spec, source=replace(spec.source, model=self.source_info.name))
        if spec.target.model is None:
            spec = replace(spec, target=replace(spec.target, model=self.target_info.name))
        return spec


def run_patchscopes(model, patchscopes: Sequence[Patchscope], batch_size: int = 32, **engine_kwargs) -> list[PatchscopeResult]:
    """Shortcut: PatchscopeEngine(model, **engine_kwargs).run(patchscopes, batch_size)."""
    return PatchscopeEngine(model, **engine_kwargs).run(patchscopes, batch_size)
