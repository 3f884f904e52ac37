"""`kind: causal_trace`: ROME's causal tracing, sections `prompts` (with a subject and an answer
column) and `trace`.

A `TraceCell` is one point of model x fact x site x layer x position: corrupt the subject's
embeddings, restore one clean state; a task holds every cell of one fact, so the clean and
corrupted runs of a fact are done once. The context is the trace's settings and the prompts that
set its noise. The report draws, per fact and averaged over facts (ROME's position groups),
layer x position heatmaps of the indirect effect for each site.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from patchscope_core import PatchscopeError
from patchscope_core.base.values import MAX_SEED
from patchscope_core.models.tokens import resolve_position

from .. import pictures
from ..config import ConfigError, Layers, Positions, Strict
from ..config.models import ModelPlan
from .answers import check_prompt_answers
from .base import Curve, KindDefaults, Schema, digest, run_columns
from .prompts import (
    PromptRow,
    PromptsConfig,
    count_tokens,
    fact_key,
    load_prompt_rows,
    model_plans,
    prompt_rows_science,
    study_groups,
)


class TraceConfig(Strict):
    """Causal tracing (ROME): corrupt the subject's embeddings, restore one clean state per cell."""

    sites: list[Literal["resid_post", "mlp_out", "attn_out"]] = Field(
        ["resid_post", "mlp_out", "attn_out"], min_length=1
    )
    layers: Layers = "all"
    positions: Positions = Field("all", description="prompt positions to restore, or 'all'")
    window: int = Field(10, ge=1, description="mlp_out / attn_out: restore a window of layers centred on l")
    noise: float = Field(
        3.0, ge=0, allow_inf_nan=False, description="x the std of the token embeddings over the sweep's prompts"
    )
    samples: int = Field(10, ge=1, description="noise samples averaged per cell")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="sample s uses seed + s")


TRACE_COLUMNS = ("cell_id", "model", "row", "prompt", "subject", "answer", "site", "layer", "position")
TRACE_RESULTS = ("token", "is_subject", "p_clean", "p_corrupt", "p_restored", "indirect_effect", "samples")


@dataclass(frozen=True)
class TraceCell:
    model: str
    prompt: str
    subject: str
    answer: str
    site: str  # resid_post, mlp_out or attn_out
    layer: int
    position: int  # absolute prompt position (BOS counted)
    row: int = 0
    refs: tuple[tuple[str, Any], ...] = ()
    trace_key: str = ""  # digest of the trace settings and the noise's reference prompts
    KIND = "causal_trace"

    @property
    def cell_id(self) -> str:
        return digest(
            [
                "causal_trace",
                self.model,
                self.prompt,
                self.subject,
                self.answer,
                self.site,
                self.layer,
                self.position,
                [list(r) for r in self.refs],
                self.trace_key,
            ]
        )

    @property
    def group(self) -> str:
        return fact_key(self.prompt, self.subject, self.answer)

    def params(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in TRACE_COLUMNS[1:]}
        out["cell_id"] = self.cell_id
        out.update({f"ref_{k}": v for k, v in self.refs})
        return out


def _check_facts(config, plan: ModelPlan, rows: list[PromptRow]) -> None:
    """Every subject in its prompt, every answer with tokens, positions and sites, on one model."""
    from patchscope_core import Site
    from patchscope_core.methods.tracing import TRACE_SITES
    from patchscope_core.models.sites import resolve_site
    from patchscope_core.models.tokens import subject_span

    info, tr = plan.info, config.trace
    for row in rows:
        subject_span(info, row.prompt, row.subject, f"prompts.subject_column ({row.where})")
        if not info.tokenizer(row.answer, add_special_tokens=False)["input_ids"]:
            raise ConfigError(f"prompts.answer_column: {row.where} has an answer without tokens")
        if tr.positions != "all":
            for p in tr.positions:
                resolve_position(p, plan.n_tokens[row.prompt], f"trace.positions ({row.where})")
    for site in tr.sites:
        resolve_site(Site(TRACE_SITES[site].format(l=plan.source_layers[0])), info, "trace.sites")


def _positions(config, plan: ModelPlan, row: PromptRow) -> list[int]:
    n = plan.n_tokens[row.prompt]
    return list(range(n)) if config.trace.positions == "all" else sorted({p % n for p in config.trace.positions})


# ---------------------------------------------------------------- the report

SITE_TITLES = {
    "resid_post": "restoring the residual stream",
    "mlp_out": "restoring MLP outputs (window)",
    "attn_out": "restoring attention outputs (window)",
}
ROME_GROUPS = [
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
]


def rome_group(position: int, start: int, end: int, n: int) -> str | None:
    """ROME's position groups: first / middle / last subject token, first subsequent token,
    further tokens, last token; None before the subject."""
    if position == n - 1:
        return "last token"
    if start <= position < end:
        if position == end - 1:
            return "last subject token"
        return "first subject token" if position == start else "middle subject tokens"
    if position == end:
        return "first subsequent token"
    return "further tokens" if position > end else None


def _trace_panels(plt, matrices, row_labels, title, path: Path, sites) -> Path:
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 1.4 + 0.32 * len(row_labels)), squeeze=False)
    for ax, site in zip(axes[0], sites):
        m = matrices[site]
        lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
        im = ax.imshow(
            m,
            aspect="auto",
            cmap="Purples" if site == "resid_post" else ("Greens" if site == "mlp_out" else "Reds"),
            vmin=0,
            vmax=max(lim, 1e-6),
        )
        ax.set_yticks(range(len(row_labels)), [pictures.literal(r) for r in row_labels], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(SITE_TITLES[site], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05, label="indirect effect")
    fig.suptitle(pictures.literal(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fact(fdf, sites, layers, grouped) -> tuple[dict, list[str]]:
    """One fact's layer x position matrices per site (adding its rows to ROME's groups), and its labels."""
    tokens = fdf.drop_duplicates("position").sort_values("position")
    positions = list(tokens["position"])
    subject = sorted(fdf.loc[fdf["is_subject"], "position"].unique())
    start, end, n = (subject[0], subject[-1] + 1, int(positions[-1]) + 1) if subject else (0, 0, 0)
    labels = [f"{t!r}{'*' if s else ''}" for t, s in zip(tokens["token"], tokens["is_subject"])]
    matrices = {}
    for site in sites:
        pivot = fdf[fdf["site"] == site].pivot_table(index="position", columns="layer", values="indirect_effect")
        matrices[site] = pivot.reindex(index=positions, columns=layers).to_numpy(dtype=float)
        for p, values in zip(positions, matrices[site]):
            group = rome_group(int(p), start, end, n)
            if group is not None:
                grouped[site][group].append(values)
    return matrices, labels


def trace_report(out_dir: Path, df, max_facts: int = pictures.TOP_ROWS) -> dict[str, Path]:
    """Per fact (the first `max_facts` rows: one picture each) and averaged over every fact (by
    ROME's position groups), layer x position heatmaps of the indirect effect for each site."""
    plt = pictures.plt()
    out: dict[str, Path] = {}
    for model, mdf in df.groupby("model", sort=False):
        sites = [s for s in ("resid_post", "mlp_out", "attn_out") if s in set(mdf["site"])]
        layers = sorted(mdf["layer"].unique())
        grouped = {s: {g: [] for g in ROME_GROUPS} for s in sites}
        for k, (row, fdf) in enumerate(mdf.groupby("row", sort=True)):
            matrices, labels = _fact(fdf, sites, layers, grouped)
            if k < max_facts:
                first = fdf.iloc[0]
                key = f"{pictures.safe_name(model)}_trace_row{int(row)}"
                title = (
                    f"{model}: {first['prompt']!r} -> {first['answer']!r}  (p clean {first['p_clean']:.3f}, "
                    f"corrupted {first['p_corrupt']:.3f}; * subject tokens)"
                )
                out[key] = _trace_panels(plt, matrices, labels, title, out_dir / f"trace_{key}.png", sites)
        present = [g for g in ROME_GROUPS if any(grouped[s][g] for s in sites)]
        averaged = {
            site: np.array(
                [
                    np.nanmean(np.stack(grouped[site][g]), axis=0) if grouped[site][g] else np.full(len(layers), np.nan)
                    for g in present
                ]
            )
            for site in sites
        }
        key = f"{pictures.safe_name(model)}_trace_average"
        out[key] = _trace_panels(
            plt,
            averaged,
            present,
            f"{model}: average indirect effect over {mdf['row'].nunique()} facts",
            out_dir / f"trace_{key}.png",
            sites,
        )
    return out


class CausalTraceKind(KindDefaults):
    name = "causal_trace"
    sections = {"prompts": PromptsConfig, "trace": TraceConfig}
    operation = "causal_trace"
    schema = Schema(
        TRACE_COLUMNS,
        TRACE_RESULTS,
        TRACE_COLUMNS + TRACE_RESULTS,
        (),
        ("row", "layer", "position", "p_clean", "p_corrupt", "p_restored", "indirect_effect"),
        ("prompt", "answer", "site", "token", "is_subject"),
    )
    marks = frozenset({"indirect_effect"})
    one_task = True  # a fact's cells share its clean and corrupted runs

    def check_config(self, config) -> None:
        for col in ("subject_column", "answer_column"):
            if getattr(config.prompts, col) is None:
                raise ValueError(f"prompts.{col}: a causal_trace sweep needs it")

    def load_rows(self, config, base: Path | None) -> list[PromptRow]:
        return load_prompt_rows(config, base)

    def check(self, config, rows: list[PromptRow], base: Path | None) -> dict[str, ModelPlan]:
        plans = {}
        tr = config.trace
        facts = sum(len(g) for m, g in study_groups(config, rows, by_fact=True) if m == config.models[0])
        at_least = 0
        for name, plan in model_plans(config, rows, "trace"):
            # count first where the grid does not depend on token counts (each prompt has >= 1 position)
            at_least += (
                facts * len(tr.sites) * len(plan.source_layers) * (1 if tr.positions == "all" else len(tr.positions))
            )
            config.execution.check_cells(at_least)
            plans[name] = plan
        counted = 0  # positions 'all': the grid grows as the prompts are tokenised; refused as soon as it is too large
        for name, plan in plans.items():
            try:
                if tr.positions == "all":
                    distinct: set = set()  # the rows study_groups keeps
                    for row in rows:
                        count_tokens(plan, [row])
                        key = (fact_key(row.prompt, row.subject, row.answer), row.answer, row.subject, row.refs)
                        if key not in distinct:
                            distinct.add(key)
                            counted += len(tr.sites) * len(plan.source_layers) * plan.n_tokens[row.prompt]
                            config.execution.check_cells(counted)
                else:
                    count_tokens(plan, rows)
                _check_facts(config, plan, rows)
            except PatchscopeError as exc:
                raise ConfigError(f"{exc} (on {name})") from None
            plans[name] = plan
        check_prompt_answers(
            config, plans, rows, "p_clean, p_corrupt and p_restored are the probability of the answer's first token"
        )
        return plans

    def context(self, config, rows: list[PromptRow], base: Path | None) -> dict[str, Any]:
        tr = config.trace
        settings = {
            "sites": list(tr.sites),
            "window": tr.window,
            "noise": tr.noise,
            "samples": tr.samples,
            "seed": tr.seed,
        }
        reference = list(dict.fromkeys(r.prompt for r in rows))
        return {"settings": settings, "reference": reference, "key": digest([settings, reference])}

    def science(self, science, config, rows, context):
        return prompt_rows_science(science, rows, context)

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        for model, group in study_groups(config, rows, by_fact=True):
            plan = plans[model]
            yield (
                model,
                sum(
                    len(config.trace.sites) * len(plan.source_layers) * len(_positions(config, plan, row))
                    for row in group
                ),
            )

    def cells(self, config, rows, plans, context) -> Iterator[TraceCell]:
        for model, group in study_groups(config, rows, by_fact=True):
            plan = plans[model]
            for row in group:
                for site in config.trace.sites:
                    for layer in plan.source_layers:
                        for pos in _positions(config, plan, row):
                            yield TraceCell(
                                model,
                                row.prompt,
                                row.subject,
                                row.answer,
                                site,
                                layer,
                                pos,
                                row.index,
                                row.refs,
                                context["key"],
                            )

    def payload(self, task) -> dict[str, Any]:
        c = task.cells[0]
        return {
            "kind": self.operation,
            "fact": {"prompt": c.prompt, "subject": c.subject, "answer": c.answer},
            "settings": task.context["settings"],
            "reference": task.context["reference"],
            "cells": [[x.site, x.layer, x.position] for x in task.cells],
        }

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        (rec,) = output["records"]
        start, end = rec["subject"]
        samples = task.context["settings"]["samples"]
        rows = []
        for cell, p in zip(task.cells, rec["p_restored"], strict=True):
            row = cell.params()
            row.update(
                token=rec["tokens"][cell.position],
                is_subject=start <= cell.position < end,
                p_clean=rec["p_clean"],
                p_corrupt=rec["p_corrupt"],
                p_restored=p,
                indirect_effect=p - rec["p_corrupt"],
                samples=samples,
                **run_columns(output, rec),
            )
            rows.append(row)
        return rows

    def describe(self, config, plan: ModelPlan, context) -> str:
        tr = config.trace
        return (
            f"layers {plan.source_layers} x sites {tr.sites} x positions {tr.positions}; {tr.samples} noise samples "
            f"of {tr.noise:g} x the embeddings' std, window {tr.window}"
        )

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        return trace_report(out_dir, df)

    def summary(self, df, max_rows: int = 15) -> str:
        lines = ["== causal traces: per fact, p(answer) clean / corrupted and the strongest restoration per site"]
        for (model, _row), f in df.groupby(["model", "row"], sort=True):
            first = f.iloc[0]
            best = ", ".join(
                f"{s}: layer {int(b.layer)} pos {int(b.position)} ({b.indirect_effect:+.3f})"
                for s, sf in f.groupby("site")
                for b in [sf.loc[sf["indirect_effect"].idxmax()]]
            )
            lines.append(
                f"  {model} {first['prompt'][:50]!r} -> {first['answer']!r}: {first['p_clean']:.3f} / "
                f"{first['p_corrupt']:.3f}; {best}"
            )
            if len(lines) > max_rows:
                break
        return "\n".join(lines)

    def summary_figures(self, df) -> dict[str, Any]:
        """The mean p(answer) clean and corrupted over facts; per site the largest mean indirect
        effect over facts at each fact's last subject token (`last_subject_peak`, its `_layer`)
        and over every ROME group and layer (`peak`, its `_layer` and `_group`)."""
        facts = df.drop_duplicates("row")
        out: dict[str, Any] = {"p_clean": float(facts["p_clean"].mean()), "p_corrupt": float(facts["p_corrupt"].mean())}
        for site, g in rome_means(df).groupby("site", sort=True):
            best = g.loc[g["indirect_effect"].idxmax()]
            out[f"{site}/peak"] = float(best["indirect_effect"])
            out[f"{site}/peak_layer"] = int(best["layer"])
            out[f"{site}/peak_group"] = best["group"]
            last = g[g["group"] == "last subject token"]
            if len(last):
                best = last.loc[last["indirect_effect"].idxmax()]
                out[f"{site}/last_subject_peak"] = float(best["indirect_effect"])
                out[f"{site}/last_subject_peak_layer"] = int(best["layer"])
        return out

    def curves(self, df) -> dict[str, Curve]:
        """Per site, ROME's lines: the mean indirect effect over facts by layer, one line per group."""
        return {
            f"trace_{pictures.safe_name(site)}": Curve(
                g, "layer", "indirect_effect", "group", f"{site}: mean indirect effect over facts, by ROME group"
            )
            for site, g in rome_means(df).groupby("site", sort=True)
        }


def rome_means(df):
    """Per site, ROME group and layer the mean indirect effect over the (fact, position) rows of
    the group, as the report's averaged picture draws them (columns site, group, layer,
    indirect_effect)."""
    import pandas as pd

    frames = []
    for _row, f in df.groupby("row", sort=True):
        positions = sorted(f["position"].unique())
        subject = sorted(f.loc[f["is_subject"].astype(bool), "position"].unique())
        start, end, n = (subject[0], subject[-1] + 1, int(positions[-1]) + 1) if subject else (0, 0, 0)
        groups = {p: rome_group(int(p), start, end, n) for p in positions}
        frames.append(f.assign(group=f["position"].map(groups)))
    rows = pd.concat(frames) if frames else df.assign(group=None)
    rows = rows[rows["group"].notna()]
    means = rows.groupby(["site", "group", "layer"], sort=False)["indirect_effect"].mean().reset_index()
    order = {g: i for i, g in enumerate(ROME_GROUPS)}
    return means.sort_values(["site", "group", "layer"], key=lambda c: c.map(order) if c.name == "group" else c)


KIND = CausalTraceKind()
