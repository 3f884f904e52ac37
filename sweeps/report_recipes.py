"""Pictures and tables of recipe sweeps (`kind: recipe`), from the stored results alone
(`patchscope report DIR` and the end of a sweep; `report.write_report` calls `recipe_report`).

Per model and recipe (`recipe_<model>_<recipe>.png`, `recipe_<model>_<recipe>.csv`):
- token_identity: precision@1 and surprisal by layer, Patchscope against the logit lens and the
  tuned lens (paper figure 2);
- cross_model: precision@1 by source layer x target layer;
- attribute_extraction: per relation, accuracy by (l, l*) beside the shuffled-label control;
  the table gives per relation the facts the model answers plainly, the best cell, the best
  source and target layer, accuracy at any (l, l*) on known and unknown facts, and the control;
- entity_description: RougeL by layer (mean over entities) beside the control, and each entity's
  description by layer;
- multi_hop: CoT Patchscope accuracy by (l, l*) on the chains the model gets right hop by hop,
  beside the control; the table gives hop1, hop2, vanilla, any-(l, l*) and best-cell accuracy.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from patchscope_core.recipes import description_of

from .report_studies import _literal

METHOD_STYLE = {"patchscope": ("Patchscope (token identity)", "C0"), "logit_lens": ("logit lens", "C1"),
                "tuned_lens": ("tuned lens (affine, least squares)", "C2")}


def _safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "x"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _heat(ax, pivot: pd.DataFrame, title: str, vmax: float = 1.0, annotate: bool = True) -> None:
    """A (source layer x target layer) panel: l across, l* up, as the paper draws it."""
    m = pivot.to_numpy(dtype=float).T  # rows: target layers
    im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xticks(range(pivot.shape[0]), [str(int(x)) for x in pivot.index], fontsize=7)
    ax.set_yticks(range(pivot.shape[1]), [str(int(x)) for x in pivot.columns], fontsize=7)
    ax.set_xlabel("source layer l")
    ax.set_ylabel("target layer l*")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=8)
    if annotate and m.size <= 144:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=5.5,
                            color="white" if m[i, j] < 0.5 * vmax else "black")
    ax.figure.colorbar(im, ax=ax, fraction=0.046)


def _grid(df: pd.DataFrame, value: str = "score") -> pd.DataFrame:
    return df.pivot_table(index="source_layer", columns="target_layer", values=value, aggfunc="mean")


def _any(df: pd.DataFrame, value: str = "score") -> float:
    """Share of rows right at some cell."""
    return float(df.groupby("row")[value].max().mean()) if len(df) else float("nan")


# ---------------------------------------------------------------- next-token decoding


def token_identity(df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
    table = df.groupby(["method", "source_layer"]).agg(precision_at_1=("score", "mean"), surprisal=("surprisal", "mean"),
                                                       positions=("score", "size")).reset_index()
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, g in table.groupby("method", sort=False):
        label, colour = METHOD_STYLE.get(method, (method, None))
        axes[0].plot(g["source_layer"], g["precision_at_1"], marker="o", ms=3, label=label, color=colour)
        axes[1].plot(g["source_layer"], g["surprisal"], marker="o", ms=3, label=label, color=colour)
    n = int(table["positions"].max())
    axes[0].set(xlabel="layer l (l* = l)", ylabel="precision@1", ylim=(-0.02, 1.02),
                title=f"{model}: next-token decoding, {n} positions")
    axes[1].set(xlabel="layer l (l* = l)", ylabel="surprisal (nats)", title="surprisal of the top token")
    axes[0].legend(fontsize=7)
    key = f"recipe_{_safe(model)}_token_identity"
    table.to_csv(out / f"{key}.csv", index=False)
    return {key: _save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}


def cross_model(df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
    source = df["source_model"].iloc[0]
    table = df.groupby(["source_layer", "target_layer"]).agg(precision_at_1=("score", "mean"),
                                                             surprisal=("surprisal", "mean")).reset_index()
    fig, ax = _plt().subplots(figsize=(6.5, 5))
    _heat(ax, _grid(df), f"{source} -> {model}: precision@1 through least-squares affine maps, "
                         f"{df.groupby(['row', 'source_position']).ngroups} positions")
    key = f"recipe_{_safe(model)}_cross_model"
    table.to_csv(out / f"{key}.csv", index=False)
    return {key: _save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}


# ---------------------------------------------------------------- attribute extraction


def attribute_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per relation: facts, known share, best cell, best source and target layer, any-(l, l*)
    accuracy on known and unknown facts, and the shuffled-label control."""
    out = []
    for relation, r in df.groupby("relation", sort=False):
        asked = r[r["role"] == "question"].set_index("subject")["score"]
        grid = r[r["role"] == "patchscope"]
        known = grid["subject"].map(asked).fillna(0) > 0
        cells = _grid(grid)
        (bl, bt), best = cells.stack().idxmax(), float(cells.stack().max())
        by_source = grid.groupby(["source_layer", "row"])["score"].max().groupby("source_layer").mean()
        by_target = grid.groupby(["target_layer", "row"])["score"].max().groupby("target_layer").mean()
        control = _grid(grid, "control_score")
        out.append({"relation": relation, "facts": grid["row"].nunique(), "subjects": grid["subject"].nunique(),
                    "known_subjects": float(asked.mean()), "best_l": int(bl), "best_l_star": int(bt), "best_cell": best,
                    "best_source_layer": int(by_source.idxmax()), "best_source_layer_any_l_star": float(by_source.max()),
                    "best_target_layer": int(by_target.idxmax()), "best_target_layer_any_l": float(by_target.max()),
                    "any_cell": _any(grid), "any_cell_known": _any(grid[known]), "any_cell_unknown": _any(grid[~known]),
                    "known_facts": int(grid[known]["row"].nunique()),
                    "control_best_cell": float(control.stack().max()), "control_any_cell": _any(grid, "control_score"),
                    "question_control": float(r[r["role"] == "question"]["control_score"].mean())})
    return pd.DataFrame(out)


def attribute_extraction(df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
    summary = attribute_summary(df)
    plt = _plt()
    rel = list(summary["relation"])
    fig, axes = plt.subplots(len(rel), 2, figsize=(10, 3.8 * len(rel)), squeeze=False)
    for (ax1, ax2), s in zip(axes, summary.itertuples()):
        grid = df[(df["relation"] == s.relation) & (df["role"] == "patchscope")]
        _heat(ax1, _grid(grid), f"{s.relation}: accuracy ({s.facts} facts; any (l, l*): {s.any_cell:.2f}, "
                                f"known {s.any_cell_known:.2f}, unknown {s.any_cell_unknown:.2f}; plain question "
                                f"{s.known_subjects:.2f})")
        _heat(ax2, _grid(grid, "control_score"), f"{s.relation}: shuffled-label control (another subject's object; "
                                                 f"any (l, l*): {s.control_any_cell:.2f})")
    fig.suptitle(f"{model}: attribute extraction", fontsize=10)
    key = f"recipe_{_safe(model)}_attribute_extraction"
    summary.to_csv(out / f"{key}.csv", index=False)
    return {key: _save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}


# ---------------------------------------------------------------- entity description


def entity_description(df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
    key = f"recipe_{_safe(model)}_entity_description"
    table = df.groupby(["source_layer", "target_layer"]).agg(rouge_l=("score", "mean"),
                                                             control_rouge_l=("control_score", "mean"),
                                                             entities=("score", "size")).reset_index()
    table.to_csv(out / f"{key}.csv", index=False)
    if (df["target_layer"] != df["source_layer"]).any():  # a grid of (l, l*)
        fig, ax = _plt().subplots(figsize=(6.5, 5))
        _heat(ax, _grid(df), f"{model}: entity description RougeL", vmax=float(df["score"].max() or 1))
        return {key: _save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}
    plt = _plt()
    entities = list(dict.fromkeys(df.sort_values("row")["subject"]))
    layers = sorted(df["source_layer"].unique())
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(min(16, max(8, 0.55 * len(layers))), 3 + 0.3 * len(entities)),
                                   gridspec_kw={"height_ratios": [1, max(1.5, len(entities) / 6)]})
    ax1.plot(table["source_layer"], table["rouge_l"], marker="o", ms=3, label="Patchscope description vs reference")
    ax1.plot(table["source_layer"], table["control_rouge_l"], marker="o", ms=3, ls="--",
             label="control: vs another entity's reference")
    ax1.set(xlabel="layer l (l* = l)", ylabel="RougeL", ylim=(0, max(0.05, float(table[["rouge_l", "control_rouge_l"]].max().max())) * 1.15),
            title=f"{model}: entity description, {len(entities)} entities")
    ax1.legend(fontsize=7)
    pivot = df.pivot_table(index="subject", columns="source_layer", values="score", aggfunc="mean").reindex(entities)
    ax2.imshow(pivot.to_numpy(dtype=float), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    text = df.set_index(["subject", "source_layer"])["generated_text"]
    for i, e in enumerate(entities):
        for j, l in enumerate(layers):
            note = textwrap.shorten(description_of(text.get((e, l), "")), 22, placeholder="…")
            ax2.text(j, i, _literal(note), ha="center", va="center", fontsize=3.6, color="white")
    ax2.set_xticks(range(len(layers)), [str(int(l)) for l in layers], fontsize=7)
    ax2.set_yticks(range(len(entities)), [_literal(e) for e in entities], fontsize=7)
    ax2.set_xlabel("layer l (l* = l); colour: RougeL, text: the description generated")
    return {key: _save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}


# ---------------------------------------------------------------- multi-hop


def multihop_summary(df: pd.DataFrame) -> tuple[pd.DataFrame, set]:
    hop = {role: df[df["role"] == role].set_index("row")["score"] for role in ("hop1", "hop2", "vanilla")}
    rows = sorted(df["row"].unique())
    right = {r for r in rows if hop["hop1"].get(r, 0) > 0 and hop["hop2"].get(r, 0) > 0}
    grid, control = df[df["role"] == "patchscope"], df[df["role"] == "control"]
    on = lambda d: d[d["row"].isin(right)]  # noqa: E731
    best = _grid(on(grid)).stack() if right else pd.Series(dtype=float)
    control_best = _grid(on(control)).stack() if right and len(control) else pd.Series(dtype=float)
    summary = pd.DataFrame([{
        "chains": len(rows), "hop1_right": int((hop["hop1"] > 0).sum()), "hop2_right": int((hop["hop2"] > 0).sum()),
        "right_hop_by_hop": len(right), "vanilla_all": float(hop["vanilla"].mean()),
        "vanilla_on_right": float(hop["vanilla"][list(right)].mean()) if right else float("nan"),
        "patchscope_any_cell_on_right": _any(on(grid)), "patchscope_any_cell_all": _any(grid),
        "patchscope_best_cell_on_right": float(best.max()) if len(best) else float("nan"),
        "best_l": int(best.idxmax()[0]) if len(best) else None, "best_l_star": int(best.idxmax()[1]) if len(best) else None,
        "control_any_cell_on_right": _any(on(control)), "control_any_cell_all": _any(control),
        "control_best_cell_on_right": float(control_best.max()) if len(control_best) else float("nan"),
    }])
    return summary, right


def multi_hop(df: pd.DataFrame, model: str, out: Path) -> dict[str, Path]:
    summary, right = multihop_summary(df)
    s = summary.iloc[0]
    on = df[df["row"].isin(right)] if right else df
    which = "chains right hop by hop" if right else "all chains (none is right hop by hop)"
    fig, axes = _plt().subplots(1, 2, figsize=(11, 4.6))
    _heat(axes[0], _grid(on[on["role"] == "patchscope"]),
          f"CoT Patchscope accuracy on {on['row'].nunique()} {which} (vanilla {s.vanilla_on_right:.2f}; "
          f"any (l, l*) {s.patchscope_any_cell_on_right:.2f}; best cell {s.patchscope_best_cell_on_right:.2f})")
    control = on[on["role"] == "control"]
    if len(control):
        _heat(axes[1], _grid(control), f"control: another chain's question patched in (any (l, l*) "
                                       f"{s.control_any_cell_on_right:.2f}; best cell {s.control_best_cell_on_right:.2f})")
    fig.suptitle(f"{model}: multi-hop, {int(s.chains)} chains, {int(s.right_hop_by_hop)} right hop by hop", fontsize=10)
    key = f"recipe_{_safe(model)}_multi_hop"
    summary.to_csv(out / f"{key}.csv", index=False)
    return {key: _save(fig, out / f"{key}.png"), f"{key}_table": out / f"{key}.csv"}


DRAW = {"token_identity": token_identity, "cross_model": cross_model, "attribute_extraction": attribute_extraction,
        "entity_description": entity_description, "multi_hop": multi_hop}


def recipe_report(out_dir: Path, df: pd.DataFrame) -> dict[str, Path]:
    """Every recipe's picture and table, per model."""
    import matplotlib

    paths: dict[str, Path] = {}
    with matplotlib.rc_context({"text.parse_math": False}):
        for (model, recipe), g in df.groupby(["model", "recipe"], sort=False):
            paths.update(DRAW[recipe](g, model, Path(out_dir)))
    return paths


def recipe_summary(df: pd.DataFrame) -> str:
    """What to read first in the terminal."""
    lines = []
    for (model, recipe), g in df.groupby(["model", "recipe"], sort=False):
        lines.append(f"== {model} {recipe}")
        if recipe == "token_identity":
            t = g.groupby(["source_layer", "method"])["score"].mean().unstack()
            lines += [f"  layer {int(l):>3}: " + ", ".join(f"{m} {v:.2f}" for m, v in row.items()) for l, row in t.iterrows()]
        elif recipe == "attribute_extraction":
            for s in attribute_summary(g).itertuples():
                lines.append(f"  {s.relation}: best (l={s.best_l}, l*={s.best_l_star}) {s.best_cell:.2f}; any (l, l*) "
                             f"{s.any_cell:.2f} (known {s.any_cell_known:.2f}, unknown {s.any_cell_unknown:.2f}); "
                             f"plain question {s.known_subjects:.2f}; control any {s.control_any_cell:.2f}")
        elif recipe == "multi_hop":
            s = multihop_summary(g)[0].iloc[0]
            lines.append(f"  {int(s.right_hop_by_hop)} of {int(s.chains)} chains right hop by hop; vanilla {s.vanilla_on_right:.2f}; "
                         f"CoT Patchscope any (l, l*) {s.patchscope_any_cell_on_right:.2f}, best cell "
                         f"{s.patchscope_best_cell_on_right:.2f}; control any {s.control_any_cell_on_right:.2f}, best cell "
                         f"{s.control_best_cell_on_right:.2f}")
        else:
            t = g.groupby(["source_layer", "target_layer"])["score"].mean()
            lines += [f"  l={int(l)} l*={int(lt)}: {v:.3f}" for (l, lt), v in t.items()][:40]
    return "\n".join(lines)
