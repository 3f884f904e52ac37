"""Running activation patching on one engine: the pair's two runs once, cells in shared batches.

`Patcher(engine).patch(pair, cells, directions, metrics)` (the data and checks: `patching.py`):
1. check everything (before any forward pass);
2. the clean run and the corrupted run, once each (engine.counts: patch_clean, patch_corrupted):
   every patched site's values at every position, each block's input, the KV cache, the metrics;
3. per direction, one row per cell: the base run (corrupted for denoising, clean for noising)
   with the source run's values written at the cell's sites, positions and head/neuron. A row
   whose written values equal the base run's is not run (patch_unchanged); the others go in
   batches of one first position p, each row computing positions p.. of layers l.. from the
   base run's stored block input and KV cache (`tracing.forward_from`; patch_rows counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..base.errors import PatchscopeError
from ..forward.dispatch import dispatch
from ..forward.hooks import hooked, position_ids_from_mask
from ..forward.partial import batches_by_position, forward_from
from ..forward.readings import input_device
from ..interventions.kinds import Action, Positions, Resample
from ..interventions.runs import Intervention, InterventionRun, ResolvedIntervention
from ..models.sites import ResolvedSite, Site, resolve_site
from .patching import (
    Cell,
    CellResult,
    CheckedPair,
    Pair,
    PairResult,
    check_cell,
    check_directions,
    check_metrics,
    check_pair,
    metric_values,
)


@dataclass
class _Row:
    position: int  # the first position it writes
    start: int  # the first layer it writes
    writes: list[tuple[ResolvedSite, tuple[int, ...], torch.Tensor]]  # (site, positions, source table)
    key: tuple[int, str]  # (cell index, direction)


class Patcher:
    """Activation patching on one engine (its model, plain modules and counters)."""

    def __init__(self, engine, batch_size: int = 64) -> None:
        self.engine = engine
        self.info = engine.info
        self.batch_size = batch_size
        self.max_spread = 2
        self._sites: dict[tuple, ResolvedSite] = {}

    def check(
        self,
        pair: Pair,
        cells: Sequence[Cell],
        directions=("denoising",),
        metrics=("logit_diff",),
        field_name: str = "pair",
    ) -> CheckedPair:
        checked = check_pair(pair, self.info, metrics, field_name)
        check_directions(directions)
        for i, cell in enumerate(cells):
            check_cell(cell, self.info, len(checked.clean_ids), f"cells[{i}]")
        return checked

    @torch.no_grad()
    def patch(
        self,
        pair: Pair,
        cells: Sequence[Cell],
        directions: Sequence[str] = ("denoising",),
        metrics: Sequence[str] = ("logit_diff",),
        max_new_tokens: int = 0,
        field_name: str = "pair",
    ) -> PairResult:
        """Every cell x direction x metric of one pair (CellResult in that order)."""
        metrics, directions = check_metrics(metrics), check_directions(directions)
        checked = self.check(pair, cells, directions, metrics, field_name)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise PatchscopeError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
        if max_new_tokens and any(c.site in ("attn.hook_q", "attn.hook_k", "attn.hook_v") for c in cells):
            raise PatchscopeError(
                "max_new_tokens: generation takes the intervention sites; attn.hook_q, hook_k and "
                "hook_v are patched without generating (max_new_tokens 0)"
            )
        keep = len(checked.answer_ids) if "logprob" in metrics else 1
        tail = checked.answer_ids[:-1] if keep > 1 else ()
        hooks = sorted({cell.hook(l) for cell in cells for l in cell.layers(self.info.n_layers)})
        runs = {
            name: self._base(ids + tail, hooks, keep, f"patch_{name}")
            for name, ids in (("clean", checked.clean_ids), ("corrupted", checked.corrupted_ids))
        }
        clean_lp = torch.log_softmax(runs["clean"]["logits"][:, 0].float(), -1)
        values = {
            name: {m: float(v[0]) for m, v in metric_values(run["logits"], checked, metrics, clean_lp).items()}
            for name, run in runs.items()
        }
        result = PairResult(checked, values["clean"], values["corrupted"])
        patched: dict[tuple[int, str], dict[str, float]] = {}
        for direction in directions:
            base, source = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
            rows = []
            for i, cell in enumerate(cells):
                row = self._row(cell, (i, direction), runs[base], runs[source], len(checked.clean_ids))
                if row is None:  # it writes what the base run holds: nothing changes
                    patched[(i, direction)] = values[base]
                    self.engine.counts["patch_unchanged"] += 1
                else:
                    rows.append(row)
            patched.update(self._run_rows(rows, runs[base], checked, metrics, clean_lp, keep))
        texts = self._generate(checked, cells, directions, max_new_tokens) if max_new_tokens else {}
        for i, cell in enumerate(cells):
            for direction in directions:
                for m in metrics:
                    result.cells.append(
                        CellResult(
                            cell,
                            direction,
                            m,
                            patched[(i, direction)][m],
                            values["clean"][m],
                            values["corrupted"][m],
                            texts.get((i, direction)),
                        )
                    )
        return result

    # ------------------------------------------------------------------ the two runs of a pair

    def _site(self, hook: str, head=None, neuron=None) -> ResolvedSite:
        key = (hook, head, neuron)
        if key not in self._sites:
            self._sites[key] = resolve_site(
                Site(hook, head=() if head is None else head, neuron=() if neuron is None else neuron),
                self.info,
                qkv=True,
            )
        return self._sites[key]

    def _base(self, ids: tuple[int, ...], hooks: list[str], keep: int, purpose: str) -> dict:
        """One forward pass: each hook's values [tokens, width], each block's input, the KV cache
        and the logits of the last `keep` columns."""
        values: dict[str, torch.Tensor] = {}
        inputs: dict[int, torch.Tensor] = {}

        def capture(into, key, batched: bool):
            def fn(x, ctx):
                flat = x.reshape(x.shape[0], x.shape[1], -1).detach().clone()  # [1, tokens, width]
                into[key] = flat if batched else flat[0]

            return fn

        blocks = [
            (self._site(f"blocks.{l}.hook_resid_pre"), capture(inputs, l, True)) for l in range(self.info.n_layers)
        ]
        reads = [(self._site(h), capture(values, h, False)) for h in hooks]
        t = torch.tensor([list(ids)], device=input_device(self.engine.model))
        mask = torch.ones_like(t)
        with hooked(self.engine.modules, self.engine.model, blocks + reads, [0], [len(ids)]):
            out = self.engine.modules(
                input_ids=t,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=True,
                logits_to_keep=keep,
            )
        self.engine.counts[purpose] += 1
        return {
            "ids": ids,
            "values": values,
            "inputs": inputs,
            "cache": out.past_key_values,
            "logits": out.logits.float(),
        }

    # ------------------------------------------------------------------ rows

    def _row(self, cell: Cell, key, base: dict, source: dict, n_prompt: int) -> _Row | None:
        positions = tuple(range(n_prompt)) if cell.position is None else (cell.position,)
        layers = cell.layers(self.info.n_layers)
        writes, changes = [], False
        for l in layers:
            site = self._site(cell.hook(l), cell.head, cell.neuron)
            table = source["values"][site.site.hook]
            mask = site.feature_mask().to(table.device)
            at = list(positions)
            changes |= not torch.equal(table[at][:, mask], base["values"][site.site.hook][at][:, mask])
            writes.append((site, positions, table))
        return _Row(min(positions), min(layers), writes, key) if changes else None

    def _hooks(self, batch: list[_Row]) -> list:
        entries: dict[str, list] = {}
        for r, row in enumerate(batch):
            for site, positions, table in row.writes:
                at = Positions(indices=positions)
                iv = ResolvedIntervention(Intervention(site.site, Resample(), at), site, at)
                entries.setdefault(site.site.hook, []).append((r, iv, Action(scale=0.0, table=table)))
        return [(e[0][1].site, dispatch(e)) for e in entries.values()]

    def _run_rows(
        self, rows: list[_Row], base: dict, checked: CheckedPair, metrics, clean_lp, keep: int
    ) -> dict[tuple[int, str], dict[str, float]]:
        """Each row's metrics, in batches of one first position, from the base run's stored state."""
        ids, out = base["ids"], {}
        for batch_idx in batches_by_position(rows, len(ids), self.batch_size, self.max_spread):
            batch = [rows[i] for i in batch_idx]
            p, start = min(r.position for r in batch), min(r.start for r in batch)
            samples = torch.zeros(len(batch), dtype=torch.long, device=base["logits"].device)
            logits = forward_from(
                self.engine, ids, self._hooks(batch), base["inputs"], base["cache"], samples, p, start, keep
            )
            self.engine.counts["patch_rows"] += len(batch)
            vals = metric_values(logits, checked, metrics, clean_lp)
            for r, row in enumerate(batch):
                out[row.key] = {m: float(v[r]) for m, v in vals.items()}
        return out

    # ------------------------------------------------------------------ generation

    def _generate(self, checked: CheckedPair, cells, directions, max_new_tokens: int) -> dict:
        """Each patched run's greedy continuation through the engine's KV-cached path."""
        runs, keys = [], []
        for i, cell in enumerate(cells):
            at = Positions(prompt=True) if cell.position is None else Positions(indices=(cell.position,))
            for direction in directions:
                base, source = (
                    (checked.pair.corrupted, checked.pair.clean)
                    if direction == "denoising"
                    else (checked.pair.clean, checked.pair.corrupted)
                )
                ivs = tuple(
                    Intervention(
                        Site(
                            cell.hook(l),
                            head=() if cell.head is None else cell.head,
                            neuron=() if cell.neuron is None else cell.neuron,
                        ),
                        Resample(source),
                        at,
                    )
                    for l in cell.layers(self.info.n_layers)
                )
                runs.append(InterventionRun(base, ivs, None, max_new_tokens))
                keys.append((i, direction))
        results = self.engine.run_interventions(runs, self.batch_size, clean=False)
        return {k: r.generated_text for k, r in zip(keys, results)}
