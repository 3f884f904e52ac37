"""`kind: activation_patching` (issue 16): TransformerLens's patching grids between clean and
corrupted prompt pairs, sections `prompts` (a file of pairs) and `patching`. What it shares with
`attribution_patching` (the pairs and their checks, the cells' first fields and id, the kind
object's common part) is in `sweeps.kinds.pairs`.

A `PatchCell` is one point of model x pair x site x layer x position x head x direction x metric
(each list in `patching` is a grid axis; a site given as a mapping has its own positions and
heads, `PatchingConfig.site_settings`). A task holds every cell of one pair, so the pair's clean
and corrupted runs happen once; the worker (`workers.actor`, operation `activation_patching`) runs
them on `patchscope_core.methods.patcher.Patcher` in batches of `execution.batch_size` rows. Every setting
is checked against each model's config and tokenizer before any weights load
(`patchscope_core.methods.patching`: pairs, sites, heads, positions). The report
(`patchscope_core.methods.patching_summary`) draws per site a layer x position heatmap of the mean
`recovered` over pairs, for head sites a layer x head heatmap and a top-heads table, and writes
the per-pair values and the bootstrap 95% intervals over pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from patchscope_core import PatchscopeError
from patchscope_core.methods.patching import DIRECTIONS, METRICS, PATCH_SITES, make_cells, site_name

from ..config import ConfigError
from ..config.models import ModelPlan
from .base import Schema, run_columns
from .pairs import (
    PAIR_PARAMS,
    PairCell,
    PairKind,
    PairRow,
    PairSites,
    check_pair_row,
    choices,
    heads_value,
    positions_value,
)
from .prompts import PromptsConfig


def _has_heads(site: str) -> bool:
    """Whether a site is patched per head (attn.hook_z, hook_q, hook_k, hook_v)."""
    return PATCH_SITES[site_name(site, "patching.sites")] in ("query", "key/value")


def axis(value: Any) -> list:
    """A `patching` setting given as one value or a list, as a grid axis."""
    return [value] if isinstance(value, str) else list(value)


Directions = choices(DIRECTIONS)
Metrics = choices(METRICS)


class PatchingConfig(PairSites):
    """Activation patching: sites x layers x positions x heads x directions x metrics (a site given
    as a mapping has its own positions and heads)."""

    SECTION: ClassVar[str] = "patching"
    positions: Any = Field("each", description="each | all | a list (BOS counted, negatives from the end)")
    heads: Any = Field("all", description="head sites: all or a list of heads")
    direction: Directions = "denoising"
    metric: Metrics = "logit_diff"
    window: int = Field(1, ge=1, description="patch a window of layers centred on the layer")

    @field_validator("positions")
    @classmethod
    def _positions(cls, v):
        return positions_value(v)

    @field_validator("heads")
    @classmethod
    def _heads(cls, v):
        return heads_value(v)

    def site_settings(self) -> list[tuple[str, Any, Any, str]]:
        """(site, positions, heads, the field its errors name) of every site, in order: a plain
        site takes the section's positions and heads, a mapping its own where it gives them."""
        out = []
        for i, s in enumerate(self.sites):
            if isinstance(s, str):
                out.append((s, self.positions, self.heads, "patching"))
            else:
                positions = self.positions if s.positions is None else s.positions
                out.append((s.site, positions, self.heads if s.heads is None else s.heads, f"patching.sites[{i}]"))
        return out


PATCH_COLUMNS = (*PAIR_PARAMS, "head", "direction", "metric")
PATCH_RESULTS = ("patched", "clean_value", "corrupted_value", "recovered")


@dataclass(frozen=True)
class PatchCell(PairCell):
    """A `PairCell` (position None: every position at once) with its head, direction, metric, window."""

    head: int | None
    direction: str
    metric: str
    window: int = 1
    KIND = "activation_patching"
    ID_FIELDS = ("head", "direction", "metric", "window")

    def params(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in PATCH_COLUMNS if k != "token"}
        out["cell_id"] = self.cell_id
        return out


def _grid(config, plan: ModelPlan, row: PairRow) -> list:
    """The core's cells of one pair on one model (sites, layers, positions, heads; checked)."""
    pt = config.patching
    n = plan.n_tokens[row.clean]
    if all(isinstance(s, str) for s in pt.sites):  # every site with the section's positions and heads
        return make_cells(plan.info, n, pt.sites, plan.source_layers, pt.positions, pt.heads, pt.window, "patching")
    cells = []
    for site, positions, heads, field_name in pt.site_settings():
        cells += make_cells(plan.info, n, [site], plan.source_layers, positions, heads, pt.window, field_name)
    return cells


# ---------------------------------------------------------------- the report


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _last_position(df):
    """Head rows at each pair's last position, as if patching every position (for layer x head)."""
    last = df.groupby("row")["position"].transform("max")
    return df[df["position"] == last].assign(position=None)


# per_pair.csv: one line per cell and pair, the pair's text beside each named value
PER_PAIR = (
    "site",
    "layer",
    "position",
    "head",
    "row",
    "clean",
    "corrupted",
    "answer",
    "wrong_answer",
    "token",
    "recovered",
    "patched",
    "clean_value",
    "corrupted_value",
)


def per_pair_table(df):
    """Each cell's values for each pair, the pair's clean and corrupted prompts (and answers) on
    its line: what `patching_summary.summarize` averages over pairs, sorted by cell then pair."""
    table = df[[c for c in PER_PAIR if c in df.columns]]
    table = table.astype({c: "Int64" for c in ("layer", "position", "head", "row") if c in table.columns})
    keys = [c for c in ("site", "layer", "position", "head", "row") if c in table.columns]
    return table.sort_values(keys, kind="stable", na_position="first")


def patching_report(out_dir: Path, df) -> dict[str, Path]:
    """Per model, direction, metric and site: the layer x position heatmap of mean recovered (first
        pair's tokens), for head sites the layer x head heatmap and top heads; per-pair values and
        bootstrap 95% intervals over pairs as CSV (`per_pair_table`: the pairs' texts and the values
    named). Every picture is a mean over pairs, whatever their
        number: none draws one line per pair."""
    from patchscope_core.methods import patching_summary as ps

    from .. import pictures

    out: dict[str, Path] = {}
    df = df.astype({"position": "float", "head": "float"})
    for (model, direction, metric), mdf in df.groupby(["model", "direction", "metric"], sort=True):
        stem = f"{pictures.safe_name(model)}_{direction}_{metric}"
        summary = ps.summarize(mdf)  # the aggregate over pairs (every table here is also a W&B table)
        out[f"patching_{stem}_summary"] = out_dir / f"patching_{stem}_summary.csv"
        summary.to_csv(out[f"patching_{stem}_summary"], index=False)
        out[f"patching_{stem}_per_pair"] = out_dir / f"patching_{stem}_per_pair.csv"
        per_pair_table(mdf).to_csv(out[f"patching_{stem}_per_pair"], index=False)
        for site in dict.fromkeys(mdf["site"]):
            sdf = mdf[mdf["site"] == site]
            name = f"{stem}_{pictures.safe_name(site)}"
            if sdf["position"].notna().any():
                out[f"{name}_layer_position"] = _save(
                    ps.draw_layer_position(sdf, site), out_dir / f"patching_{name}_layer_position.png"
                )
            if sdf["head"].notna().any():
                every = sdf["position"].isna().any()
                heads = sdf if every else _last_position(sdf)
                where = None if every else "each pair's last position"
                out[f"{name}_layer_head"] = _save(
                    ps.draw_layer_head(heads, site, where=where), out_dir / f"patching_{name}_layer_head.png"
                )
                out[f"{name}_top_heads"] = out_dir / f"patching_{name}_top_heads.csv"
                ps.top_heads(ps.summarize(heads), k=10, site=site).to_csv(out[f"{name}_top_heads"], index=False)
    return out


class ActivationPatchingKind(PairKind):
    name = "activation_patching"
    section = "patching"
    sections = {"prompts": PromptsConfig, "patching": PatchingConfig}
    operation = "activation_patching"
    schema = Schema(
        PATCH_COLUMNS,
        PATCH_RESULTS,
        PATCH_COLUMNS + PATCH_RESULTS,
        (),
        ("row", "layer", "position", "head", *PATCH_RESULTS),
        ("direction", "metric", "site", "token"),  # what the report and summary read besides
        ("clean", "corrupted", "answer", "wrong_answer"),  # the per-pair table's texts
    )
    marks = frozenset({"recovered", "corrupted_value"})
    order = ("model", "row", "direction", "metric", "site", "layer", "position", "head")

    def check_config(self, config) -> None:
        super().check_config(config)
        for i, site in enumerate(config.patching.site_names()):
            try:
                site_name(site, f"patching.sites[{i}]")
            except PatchscopeError as exc:
                raise ValueError(str(exc)) from None

    def metrics(self, config) -> list[str]:
        return axis(config.patching.metric)

    def check_model(self, config, name: str, plan: ModelPlan, rows: list[PairRow]) -> None:
        for row in rows:
            check_pair_row(plan, row, axis(config.patching.metric))
            try:
                _grid(config, plan, row)
            except PatchscopeError as exc:
                raise ConfigError(f"{exc} ({row.where}, on {name})") from None

    def _pair_cells(self, config, plan, model: str, row: PairRow) -> Iterator[PatchCell]:
        pt = config.patching
        for c in _grid(config, plan, row):
            for direction in axis(pt.direction):
                for metric in axis(pt.metric):
                    yield PatchCell.at(model, row, c.site, c.layer, c.position, c.head, direction, metric, c.window)

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        per = len(axis(config.patching.direction)) * len(axis(config.patching.metric))
        for model in config.models:
            for row in rows:
                yield model, per * len(_grid(config, plans[model], row))

    def cells(self, config, rows, plans, context) -> Iterator[PatchCell]:
        for model in config.models:
            for row in rows:
                yield from self._pair_cells(config, plans[model], model, row)

    def payload(self, task) -> dict[str, Any]:
        c = task.cells[0]
        return {
            "kind": self.operation,
            "pair": c.pair_payload(),
            "cells": [[x.site, x.layer, x.position, x.head, x.window, x.direction, x.metric] for x in task.cells],
        }

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        (rec,) = output["records"]
        rows = []
        for cell, patched in zip(task.cells, rec["patched"], strict=True):
            row = cell.params()
            clean, corrupted = rec["clean_value"][cell.metric], rec["corrupted_value"][cell.metric]
            den = clean - corrupted
            row.update(
                token=cell.token_in(rec),
                patched=patched,
                clean_value=clean,
                corrupted_value=corrupted,
                recovered=(patched - corrupted) / den if den else float("nan"),
                **run_columns(output, rec),
            )
            rows.append(row)
        return rows

    def describe(self, config, plan: ModelPlan, context) -> str:
        pt = config.patching
        tail = f"directions {axis(pt.direction)} x metrics {axis(pt.metric)}, window {pt.window}"
        if all(isinstance(s, str) for s in pt.sites):
            return (
                f"sites {[site_name(s, 'patching.sites') for s in pt.sites]} x layers {plan.source_layers} x positions "
                f"{pt.positions} x heads {pt.heads} (head sites) x {tail}"
            )
        each = "; ".join(
            f"{site_name(s, 'patching.sites')} positions {p}" + (f" heads {h}" if _has_heads(s) else "")
            for s, p, h, _ in pt.site_settings()
        )
        return f"sites [{each}] x layers {plan.source_layers} x {tail}"

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        return patching_report(out_dir, df)

    def summary(self, df, max_rows: int = 15) -> str:
        lines = ["== activation patching: per pair, clean / corrupted metric and the cell recovering most per site"]
        for (model, row, direction, metric), f in df.groupby(["model", "row", "direction", "metric"], sort=True):
            first = f.iloc[0]
            best = ", ".join(
                f"{s}: layer {int(b.layer)} pos {b.position} head {b.head} ({b.recovered:+.2f})"
                for s, sf in f.groupby("site")
                for b in [sf.loc[sf["recovered"].abs().idxmax()]]
            )
            lines.append(
                f"  {model} row {int(row)} {direction} {metric}: {first['clean_value']:.3f} / "
                f"{first['corrupted_value']:.3f}; {best}"
            )
            if len(lines) > max_rows:
                break
        return "\n".join(lines)

    def summary_figures(self, df) -> dict[str, Any]:
        """Per site (prefixed with direction/metric when the sweep has several): the cell whose mean
        `recovered` over pairs is largest (`max_recovered`, its `_layer`, `_position`, `_head`)
        and, on a head site, that head as `top_head` (L<layer>H<head>)."""
        several = df.groupby(["direction", "metric"]).ngroups > 1
        out: dict[str, Any] = {}
        for (direction, metric, site), g in df.groupby(["direction", "metric", "site"], sort=True):
            means = g.groupby(["layer", "position", "head"], dropna=False)["recovered"].mean().dropna()
            if means.empty:
                continue
            (layer, position, head), best = means.idxmax(), float(means.max())
            p = f"{direction}/{metric}/{site}" if several else site
            out[f"{p}/max_recovered"] = best
            out[f"{p}/max_recovered_layer"] = int(layer)
            if position == position and position is not None:
                out[f"{p}/max_recovered_position"] = int(position)
            if head == head and head is not None:
                out[f"{p}/max_recovered_head"] = int(head)
                out[f"{p}/top_head"] = f"L{int(layer)}H{int(head)}"
        return out


KIND = ActivationPatchingKind()
