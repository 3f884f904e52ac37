"""`kind: attribution_patching` (issue 17): AtP and AtP* estimates of every node's effect between
clean and corrupted prompt pairs, checked against exact activation patching in the same sweep;
sections `prompts` (the pairs, as `activation_patching`: both build on `sweeps.kinds.pairs`) and
`attribution`.

An `AttributionCell` is one row of the results: model x pair x site x layer x position (or the sum
over positions: position null) x head or neuron x method. A task holds every cell of up to
`attribution.batch_pairs` pairs of one token length (fewer while the pairs would make under two
tasks per worker, `_batches`): the worker (`workers.actor`, operation
`attribution_patching`) attributes them in one batch (`patchscope_core.methods.attribution.Attributor`:
one clean forward, one corrupted forward and backward, AtP*'s GradDrop backwards), then, with
`verify`, patches each pair's top-k and random nodes exactly (`attribution_verify.verify`, on the
activation-patching engine) and fills `exact`. Every setting is checked against each model's
config and tokenizer before any weights load. The report draws per head site a layer x head
heatmap of the mean estimate beside the exact effect, per site the estimate-vs-exact scatter with
Pearson's r in the title, and writes the summary table per (site, method): correlations, sign
agreement, recall@k, the false-negative bound (`attribution_verify.summary_table`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from patchscope_core import PatchscopeError
from patchscope_core.methods.attribution import METHODS, SITE_NOTES, check_attribution, units
from patchscope_core.methods.patching import METRICS, PATCH_SITES, site_name

from ..config import ConfigError, Strict
from ..config.models import ModelPlan
from .base import Schema, digest, run_columns
from .pairs import PAIR_PARAMS, PairCell, PairKind, PairRow, PairSites, check_pair_row, choices
from .prompts import PromptsConfig


class VerifyConfig(Strict):
    """Exact patching of each pair's top_k nodes by each method's score and `random` others."""

    top_k: int = Field(20, ge=0)
    random: int = Field(20, ge=0, description="nodes drawn uniformly from the rest (seeded per pair)")
    positions: str = Field("each", description="verify the by-position nodes (each) or the summed ones (all)")
    seed: int = Field(0, ge=0, lt=2**31)

    @field_validator("positions")
    @classmethod
    def _positions(cls, v):
        if v not in ("each", "all"):
            raise ValueError(f"expected each or all, got {v!r}")
        return v


Methods = choices(METHODS)


class AttributionConfig(PairSites):
    """Attribution patching: sites x layers x methods, one metric, an optional exact check."""

    SECTION: ClassVar[str] = "attribution"
    method: Methods = "atp"
    metric: str = "logit_diff"
    verify: VerifyConfig | None = None
    batch_pairs: int = Field(
        8, ge=1, description="at most this many pairs attributed in one batch (one task); fewer below 2 tasks a worker"
    )

    @field_validator("metric")
    @classmethod
    def _metric(cls, v):
        if v not in METRICS:
            raise ValueError(f"expected one of {', '.join(METRICS)}, got {v!r}")
        return v


ATTRIBUTION_COLUMNS = (*PAIR_PARAMS, "head", "neuron", "method", "metric")
ATTRIBUTION_RESULTS = ("estimate", "exact", "score", "verified", "clean_value", "corrupted_value")


@dataclass(frozen=True)
class AttributionCell(PairCell):
    """A `PairCell` (position None: summed over the prompt's positions) with its unit, method,
    metric, settings and batch."""

    unit: int  # the head (head sites), the neuron (mlp.hook_post), 0 for the d_model sites
    method: str
    metric: str
    settings: str  # digest of what else decides `exact`: the layers, the methods, verify
    batch: str  # the task group: the pairs attributed together
    KIND = "attribution_patching"
    ID_FIELDS = ("unit", "method", "metric", "settings")

    @property
    def group(self) -> str:
        return self.batch

    def params(self) -> dict[str, Any]:
        kind = PATCH_SITES[self.site]
        out = {k: getattr(self, k) for k in ATTRIBUTION_COLUMNS if k not in ("cell_id", "token", "head", "neuron")}
        return {
            "cell_id": self.cell_id,
            **out,
            "head": self.unit if kind in ("query", "key/value") else None,
            "neuron": self.unit if kind == "neuron" else None,
        }


def _settings(config, plan: ModelPlan) -> str:
    at = config.attribution
    return digest(
        {
            "layers": plan.source_layers,
            "methods": at.method,
            "verify": None if at.verify is None else at.verify.model_dump(mode="json"),
        }
    )


def _batches(config, plan: ModelPlan, rows: list[PairRow]) -> list[list[PairRow]]:
    """The pairs attributed together (a task each): of one clean token length, in row order, at
    most batch_pairs, and fewer (halved, down to one pair) while the pairs would make fewer than
    two tasks per worker, so that a sweep of a few pairs reports progress as each task ends.
    Batching pairs saves forward passes and changes no result: each pair's verify sample has its
    own seed (`pair_seed`), and neither a cell's id nor the config hash holds its batch."""
    by_length: dict[int, list[PairRow]] = {}
    for row in rows:
        by_length.setdefault(plan.n_tokens[row.clean], []).append(row)

    def cut(n: int) -> list[list[PairRow]]:
        return [group[i : i + n] for group in by_length.values() for i in range(0, len(group), n)]

    n = config.attribution.batch_pairs
    while n > 1 and len(cut(n)) < 2 * config.execution.workers:
        n = (n + 1) // 2
    return cut(n)


def pair_seed(seed: int, cell) -> int:
    """A pair's seed for verify's random sample: the same whatever pairs share its task."""
    return (seed + int(digest(cell.texts()), 16)) % 2**31


def site_grid(config, info) -> list[tuple[str, str, list[int] | str]]:
    """(PATCH_SITES name, positions, heads) of every site, checked: positions `each` (every
    position and their sum) or `all` (their sum only), heads `all` or a list (head sites); a plain
    site is (each, all)."""
    at = config.attribution
    check_attribution(info, at.site_names(), [0], at.method, at.metric)
    out, seen = [], set()
    for i, spec in enumerate(at.sites):
        name = site_name(spec if isinstance(spec, str) else spec.site, f"attribution.sites[{i}]")
        if name in seen:  # a plain site named twice (a mapping's is refused): once, as before
            continue
        seen.add(name)
        positions = "each" if isinstance(spec, str) or spec.positions is None else spec.positions
        heads = "all" if isinstance(spec, str) or spec.heads is None else spec.heads
        if positions not in ("each", "all"):
            raise ConfigError(
                f"attribution.sites[{i}].positions: expected each (every position and their sum) or all "
                f"(their sum only), got {positions!r}"
            )
        if heads != "all":
            count = units(name, info)
            if PATCH_SITES[name] not in ("query", "key/value"):
                raise ConfigError(f"attribution.sites[{i}].heads: {name} has no heads")
            bad = [h for h in heads if not 0 <= h < count]
            if bad:
                raise ConfigError(
                    f"attribution.sites[{i}].heads: {bad[0]} is out of range 0 .. {count - 1} for {info.name}'s {name}"
                )
        out.append((name, positions, heads))
    return out


def _site_units(site: str, heads, info) -> list[int]:
    return list(range(units(site, info))) if heads == "all" else list(heads)


def _per_pair(config, plan: ModelPlan, row: PairRow) -> int:
    at, info = config.attribution, plan.info
    m = plan.n_tokens[row.clean]
    per_site = sum(
        (m + 1 if positions == "each" else 1) * len(_site_units(site, heads, info))
        for site, positions, heads in site_grid(config, info)
    )
    return len(at.method) * len(plan.source_layers) * per_site


# ---------------------------------------------------------------- the report


def _summary_frame(mdf):
    """The verified grid of each (site, method) as `attribution_verify.summary_table` reads it."""
    verified = mdf[mdf["exact"].notna()]
    frames = []
    for (site, method), g in mdf.groupby(["site", "method"], sort=False):
        v = verified[(verified["site"] == site) & (verified["method"] == method)]
        if v.empty:
            continue
        summed = v["position"].isna().all()  # verify.positions: all -> the summed nodes
        frames.append(g[g["position"].isna() == summed])
    if not frames:
        return None
    import pandas as pd

    return pd.concat(frames).rename(columns={"row": "pair"})


def attribution_summary(df) -> Any:
    """One row per (model, site, method) of the verified nodes: the statistics of
    `attribution_verify.summary_table` and the site's caveat (`note`); None without `exact`."""
    import pandas as pd

    from patchscope_core.methods.attribution_verify import summary_table

    out = []
    for model, mdf in df.groupby("model", sort=True):
        frame = _summary_frame(mdf)
        if frame is not None:
            out += [
                {"model": model, **row, "note": SITE_NOTES.get(row["site"], "")}
                for row in summary_table(frame, top_k=_top_k(frame), ks=(10, 20))
            ]
    return pd.DataFrame(out) if out else None


def _top_k(frame) -> int:
    """verify.top_k as the stored rows show it: the fewest nodes marked top for one pair and site
    (20 when every node was patched, none marked)."""
    top = frame[frame["verified"] == "top"]
    return int(top.groupby(["pair", "site", "method"]).size().min()) if len(top) else 20


def attribution_report(out_dir: Path, df) -> dict[str, Path]:
    """Per model: the summary table; per head site the layer x head heatmaps (summed over positions)
    of each method's mean estimate beside the exact effect where it was patched; per site the
    estimate-vs-exact scatter, one panel per method, r in the title."""
    import torch
    from matplotlib.figure import Figure

    from patchscope_core.methods import patching_summary as ps
    from patchscope_core.methods.attribution_verify import pearson

    from .. import pictures

    out: dict[str, Path] = {}
    df = df.astype({"position": "float", "head": "float", "neuron": "float", "exact": "float"})
    summary = attribution_summary(df)
    for model, mdf in df.groupby("model", sort=True):
        stem = pictures.safe_name(model)
        if summary is not None:
            path = out_dir / f"attribution_{stem}_summary.csv"
            summary[summary["model"] == model].to_csv(path, index=False)
            out[f"attribution_{stem}_summary"] = path
        methods = list(dict.fromkeys(mdf["method"]))
        for site in dict.fromkeys(mdf["site"]):
            sdf = mdf[mdf["site"] == site]
            name = f"attribution_{stem}_{pictures.safe_name(site)}"
            summed = sdf[sdf["position"].isna()]
            if sdf["head"].notna().any():
                exact = summed[summed["method"] == methods[0]]
                panels = [(m, summed[summed["method"] == m], "estimate") for m in methods]
                if len(exact) and exact["exact"].notna().all():
                    panels.append(("exact", exact, "exact"))
                fig = Figure(figsize=(1.5 + 3.2 * len(panels), 1.5 + 0.18 * sdf["layer"].nunique()))
                for i, (label, frame, value) in enumerate(panels):
                    ax = fig.add_subplot(1, len(panels), i + 1)
                    ps.draw_heatmap(
                        ax,
                        ps.layer_head(frame, site, value=value),
                        f"{site}: {label}, all positions (mean over pairs)",
                        xname="head",
                    )
                out[f"{name}_layer_head"] = pictures.save(fig, out_dir / f"{name}_layer_head.png")
            checked = sdf[sdf["exact"].notna()]
            if len(checked):
                fig = Figure(figsize=(4 * len(methods), 3.8))
                for i, m in enumerate(methods):
                    ax = fig.add_subplot(1, len(methods), i + 1)
                    c = checked[checked["method"] == m]
                    r = pearson(torch.tensor(c["estimate"].to_numpy()), torch.tensor(c["exact"].to_numpy()))
                    ax.scatter(c["exact"], c["estimate"], s=6, alpha=0.5)
                    lo, hi = (
                        float(min(c["exact"].min(), c["estimate"].min())),
                        float(max(c["exact"].max(), c["estimate"].max())),
                    )
                    ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
                    ax.set_xlabel("exact (patched - corrupted)")
                    ax.set_ylabel(f"{m} estimate")
                    ax.set_title(f"{site} {m}: r = {r:.3f}, {len(c)} nodes", fontsize=9)
                out[f"{name}_scatter"] = pictures.save(fig, out_dir / f"{name}_scatter.png")
    return out


class AttributionPatchingKind(PairKind):
    name = "attribution_patching"
    section = "attribution"
    sections = {"prompts": PromptsConfig, "attribution": AttributionConfig}
    operation = "attribution_patching"
    schema = Schema(
        ATTRIBUTION_COLUMNS,
        ATTRIBUTION_RESULTS,
        ATTRIBUTION_COLUMNS + ATTRIBUTION_RESULTS,
        (),
        ("row", "layer", "position", "head", "neuron", "estimate", "exact", "clean_value", "corrupted_value"),
        ("method", "site"),  # what the report and summary read besides
        ("clean", "corrupted", "answer", "wrong_answer", "token", "metric", "score", "verified"),
    )
    marks = frozenset({"estimate", "exact"})
    order = ("model", "row", "method", "site", "layer", "position", "head", "neuron")
    # one_task (PairKind): the pairs of a task are attributed in one batch

    def metrics(self, config) -> list[str]:
        return [config.attribution.metric]

    def check_model(self, config, name: str, plan: ModelPlan, rows: list[PairRow]) -> None:
        at = config.attribution
        try:
            check_attribution(plan.info, at.site_names(), plan.source_layers, at.method, at.metric)
            site_grid(config, plan.info)
        except (PatchscopeError, ConfigError) as exc:
            raise ConfigError(f"{exc} (on {name})") from None
        for row in rows:
            check_pair_row(plan, row, [at.metric])

    def science(self, science, config, rows, context):
        science["attribution"].pop("batch_pairs", None)  # how pairs are batched: not what the rows hold
        return super().science(science, config, rows, context)

    def _batch_cells(self, config, plan: ModelPlan, model: str, batch: list[PairRow]) -> Iterator[AttributionCell]:
        at, info = config.attribution, plan.info
        grid = site_grid(config, info)
        settings = _settings(config, plan)
        key = json.dumps([model, [r.index for r in batch]])
        for row in batch:
            m = plan.n_tokens[row.clean]
            for method in at.method:
                for site, positions, heads in grid:
                    for layer in plan.source_layers:
                        for position in [*range(m), None] if positions == "each" else [None]:
                            for unit in _site_units(site, heads, info):
                                yield AttributionCell.at(
                                    model, row, site, layer, position, unit, method, at.metric, settings, key
                                )

    def group_sizes(self, config, rows, plans, context) -> Iterator[tuple[str, int]]:
        for model in config.models:
            for batch in _batches(config, plans[model], rows):
                yield model, sum(_per_pair(config, plans[model], r) for r in batch)

    def cells(self, config, rows, plans, context) -> Iterator[AttributionCell]:
        for model in config.models:
            for batch in _batches(config, plans[model], rows):
                yield from self._batch_cells(config, plans[model], model, batch)

    def context(self, config, rows, base) -> dict[str, Any]:
        """What every task shares: the verify settings."""
        verify = config.attribution.verify
        return {"verify": None if verify is None else verify.model_dump(mode="json")}

    def payload(self, task) -> dict[str, Any]:
        verify = task.context["verify"]
        pairs = {}
        for c in task.cells:
            if c.row not in pairs:
                seed = None if verify is None else pair_seed(verify["seed"], c)
                pairs[c.row] = {"row": c.row, **c.pair_payload(), "seed": seed}
        return {
            "kind": self.operation,
            "pairs": list(pairs.values()),
            "sites": list(dict.fromkeys(c.site for c in task.cells)),
            "layers": sorted({c.layer for c in task.cells}),
            "methods": list(dict.fromkeys(c.method for c in task.cells)),
            "metric": task.cells[0].metric,
            "verify": verify,
        }

    def to_rows(self, task, output: dict[str, Any]) -> list[dict[str, Any]]:
        by_row = {rec["row"]: rec for rec in output["records"]}
        rows = []
        for cell in task.cells:
            rec = by_row[cell.row]
            li = rec["layers"].index(cell.layer)
            n_units, m = rec["units"][cell.site], len(rec["tokens"])
            by_pos, summed = rec["estimates"][f"{cell.method}|{cell.site}"]
            s_pos, s_sum = rec["scores"][f"{cell.method}|{cell.site}"]
            if cell.position is None:
                flat = li * n_units + cell.unit
                estimate, score = summed[flat], s_sum[flat]
            else:
                flat = (li * m + cell.position) * n_units + cell.unit
                estimate, score = by_pos[flat], s_pos[flat]
            exact, verified = None, None
            check = rec["exact"].get(cell.site)
            if check is not None and (check["positions"] == "all") == (cell.position is None):
                at = check["index"].get(flat)
                if at is not None:
                    exact = check["exact"][at]
                    verified = "all" if check["full"] else ("random" if flat in check["sampled"] else "top")
            row = cell.params()
            row.update(
                token=cell.token_in(rec),
                estimate=estimate,
                exact=exact,
                score=score,
                verified=verified,
                clean_value=rec["clean_value"],
                corrupted_value=rec["corrupted_value"],
                **run_columns(output, rec),
            )
            rows.append(row)
        return rows

    def describe(self, config, plan: ModelPlan, context) -> str:
        at = config.attribution
        grid = site_grid(config, plan.info)
        sites = [
            name if (positions, heads) == ("each", "all") else f"{name} (positions {positions}, heads {heads})"
            for name, positions, heads in grid
        ]
        verify = (
            "no exact check"
            if at.verify is None
            else (
                f"verify top {at.verify.top_k} + {at.verify.random} random nodes per pair and site ({at.verify.positions})"
            )
        )
        return (
            f"sites {list(sites)} x layers {plan.source_layers} x (every position + their sum) x heads/neurons "
            f"x methods {at.method}, metric {at.metric}; {verify}"
        )

    def report(self, out_dir: Path, df, settings: dict | None = None) -> dict[str, Path]:
        return attribution_report(out_dir, df)

    def summary(self, df, max_rows: int = 15) -> str:
        import pandas as pd

        lines = ["== attribution patching: estimate vs exact per site and method"]
        table = attribution_summary(df.astype({"position": "float", "exact": "float"}))
        if table is None:
            lines.append("  (no exact patching: add attribution.verify to check the estimates)")
        else:
            for r in table.head(max_rows).to_dict("records"):
                recall = "".join(f", {k} {v:.2f}" for k, v in r.items() if k.startswith("recall@") and pd.notna(v))
                lines.append(
                    f"  {r['model']} {r['site']} {r['method']}: {r['nodes']} nodes, pearson {r['pearson']:.3f}, "
                    f"spearman {r['spearman']:.3f}, sign {r['sign_agreement']:.2f}{recall}"
                    + (f" ({r['note']})" if r["note"] else "")
                )
        top = df.loc[df["position"].isna()]
        for (model, method, site), f in top.groupby(["model", "method", "site"], sort=True):
            best = f.groupby(["layer", "head", "neuron"], dropna=False)["estimate"].mean().abs().nlargest(5)
            lines.append(
                f"  {model} {method} {site}: largest mean |estimate| (summed over positions): "
                + ", ".join(
                    f"L{int(l)}" + ("" if h != h else f"H{int(h)}") + ("" if n != n else f"N{int(n)}") + f" {v:.3g}"
                    for (l, h, n), v in best.items()
                )
            )
        return "\n".join(lines)

    def summary_figures(self, df) -> dict[str, Any]:
        """Per site and method: where verified, the estimate's `pearson` and `spearman` with the
        exact effect over the verified nodes (the summary table's); always the node of largest
        mean |estimate| over pairs, summed over positions (`top_node`, `top_node_estimate`)."""
        out: dict[str, Any] = {}
        table = attribution_summary(df.astype({"position": "float", "exact": "float"}))
        for r in [] if table is None else table.to_dict("records"):
            for stat in ("pearson", "spearman"):
                out[f"{r['site']}/{r['method']}/{stat}"] = float(r[stat])
        summed = df[df["position"].isna()]
        for (site, method), g in summed.groupby(["site", "method"], sort=True):
            means = g.groupby(["layer", "head", "neuron"], dropna=False)["estimate"].mean().dropna()
            if means.empty:
                continue
            i = int(means.abs().to_numpy().argmax())  # by position: the index holds NaN (no head, no neuron)
            (layer, head, neuron), value = means.index[i], means.iloc[i]
            out[f"{site}/{method}/top_node"] = (
                f"L{int(layer)}"
                + (f"H{int(head)}" if head is not None and head == head else "")
                + (f"N{int(neuron)}" if neuron is not None and neuron == neuron else "")
            )
            out[f"{site}/{method}/top_node_estimate"] = float(value)
        return out


KIND = AttributionPatchingKind()
