"""Tables and pictures of intervention and causal-trace sweeps (`patchscope report DIR` and the
end of a sweep; `report.write_report` calls these by the kind of the stored rows).

Intervention sweeps:
- `heatmap_<model>_layer_x_head[_<variant>].png`: mean `delta_logprob` over the prompts per
  (layer, head), for attention-head sites; other sites get layer x site;
- `top_heads.csv`: the (layer, head) cells that change the answer most;
- `steering_<model>.csv`: for `kind: add`, the generated text per prompt and layer (rows) and
  alpha (columns).
Causal traces (ROME, figure 1): per fact and averaged over facts, layer x position heatmaps of
the indirect effect (p_restored - p_corrupt) for each site; the average groups positions as ROME
does (first, middle and last subject token, first subsequent token, further tokens, last token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SITE_TITLES = {"resid_post": "restoring the residual stream", "mlp_out": "restoring MLP outputs (window)",
               "attn_out": "restoring attention outputs (window)"}
ROME_GROUPS = ["first subject token", "middle subject tokens", "last subject token", "first subsequent token",
               "further tokens", "last token"]


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "x"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _literal(text: Any) -> str:
    """Text shown as it is: no matplotlib math text (a `$` in a prompt would start it)."""
    return str(text).replace("$", r"\$")


# ---------------------------------------------------------------- interventions


def _variant(df) -> list[str]:
    """A label per row for what was done: kind and strength (alpha, factor, noise scale, seed)."""
    labels = []
    for r in df.itertuples():
        extra = [f"{k}={getattr(r, k):g}" for k in ("alpha", "factor", "noise_scale") if _given(getattr(r, k, None))]
        if _given(getattr(r, "seed", None)) and r.kind == "noise":
            extra.append(f"seed={int(r.seed)}")
        labels.append(" ".join([r.kind] + extra))
    return labels


def _given(v) -> bool:
    return v is not None and not (isinstance(v, float) and np.isnan(v))


def intervention_report(out_dir: Path, df) -> dict[str, Path]:
    plt = _plt()
    out: dict[str, Path] = {}
    df = df.copy()
    df["variant"] = _variant(df)
    scored = df[df["delta_logprob"].notna()]  # rows with an answer to score
    heads = scored[scored["head"].notna()]
    top = []
    for (model, variant), g in heads.groupby(["model", "variant"], sort=False):
        pivot = g.pivot_table(index="layer", columns="head", values="delta_logprob", aggfunc="mean")
        key = f"{_safe(model)}_layer_x_head" + ("" if heads["variant"].nunique() == 1 else f"_{_safe(variant)}")
        fig, ax = plt.subplots(figsize=(2.5 + 0.5 * pivot.shape[1], 1.5 + 0.25 * pivot.shape[0]))
        lim = float(np.nanmax(np.abs(pivot.to_numpy()))) or 1.0
        im = ax.imshow(pivot.to_numpy(dtype=float), aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, origin="lower")
        ax.set_xticks(range(pivot.shape[1]), [str(int(h)) for h in pivot.columns])
        ax.set_yticks(range(pivot.shape[0]), [str(int(l)) for l in pivot.index])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(_literal(f"{model}: {variant} of each head, mean change in the answer's log-probability "
                              f"over {g['prompt'].nunique()} prompts"), fontsize=9, wrap=True)
        fig.colorbar(im, ax=ax, label="delta log p(answer)", fraction=0.05)
        fig.tight_layout()
        out[key] = out_dir / f"heatmap_{key}.png"
        fig.savefig(out[key], dpi=110)
        plt.close(fig)
        means = g.groupby(["layer", "head"])["delta_logprob"].agg(["mean", "std", "count"]).reset_index()
        means.insert(0, "variant", variant)
        means.insert(0, "model", model)
        top.append(means)
    if top:
        import pandas as pd

        table = pd.concat(top, ignore_index=True).sort_values("mean", key=abs, ascending=False).head(30)
        table = table.rename(columns={"mean": "mean_delta_logprob", "std": "std_delta_logprob", "count": "prompts"})
        out["top_heads"] = out_dir / "top_heads.csv"
        table.to_csv(out["top_heads"], index=False)
    others = scored[scored["head"].isna()]
    for model, g in others.groupby("model", sort=False):
        if g.empty or g["layer"].isna().all():
            continue
        g = g.assign(what=[f"{s.split('.')[-1]} {v}" for s, v in zip(g["site"], g["variant"])])
        pivot = g.pivot_table(index="layer", columns="what", values="delta_logprob", aggfunc="mean")
        key = f"{_safe(model)}_layer_x_site"
        fig, ax = plt.subplots(figsize=(3 + 1.2 * pivot.shape[1], 1.5 + 0.25 * pivot.shape[0]))
        lim = float(np.nanmax(np.abs(pivot.to_numpy()))) or 1.0
        im = ax.imshow(pivot.to_numpy(dtype=float), aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, origin="lower")
        ax.set_xticks(range(pivot.shape[1]), [_literal(c) for c in pivot.columns], rotation=30, ha="right")
        ax.set_yticks(range(pivot.shape[0]), [str(int(l)) for l in pivot.index])
        ax.set_ylabel("layer")
        ax.set_title(_literal(f"{model}: mean change in the answer's log-probability"), fontsize=9)
        fig.colorbar(im, ax=ax, label="delta log p(answer)", fraction=0.05)
        fig.tight_layout()
        out[key] = out_dir / f"heatmap_{key}.png"
        fig.savefig(out[key], dpi=110)
        plt.close(fig)
    steer = df[df["kind"] == "add"]
    for model, g in steer.groupby("model", sort=False):
        table = g.pivot_table(index=["prompt", "layer"], columns="alpha", values="generated_text", aggfunc="first")
        clean = g.groupby(["prompt", "layer"])["clean_generated_text"].first()
        table.insert(0, "clean", clean)
        table.columns = [c if c == "clean" else f"alpha={c:g}" for c in table.columns]
        out[f"steering_{_safe(model)}"] = out_dir / f"steering_{_safe(model)}.csv"
        table.to_csv(out[f"steering_{_safe(model)}"])
    return out


# ---------------------------------------------------------------- causal traces


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
        im = ax.imshow(m, aspect="auto", cmap="Purples" if site == "resid_post" else ("Greens" if site == "mlp_out" else "Reds"),
                       vmin=0, vmax=max(lim, 1e-6))
        ax.set_yticks(range(len(row_labels)), [_literal(r) for r in row_labels], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(SITE_TITLES[site], fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05, label="indirect effect")
    fig.suptitle(_literal(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trace_report(out_dir: Path, df, max_facts: int = 20) -> dict[str, Path]:
    """Per fact and averaged, layer x position heatmaps of the indirect effect for each site."""
    plt = _plt()
    out: dict[str, Path] = {}
    for model, mdf in df.groupby("model", sort=False):
        sites = [s for s in ("resid_post", "mlp_out", "attn_out") if s in set(mdf["site"])]
        layers = sorted(mdf["layer"].unique())
        grouped = {s: {g: [] for g in ROME_GROUPS} for s in sites}
        for k, (row, fdf) in enumerate(mdf.groupby("row", sort=True)):
            tokens = fdf.drop_duplicates("position").sort_values("position")
            positions = list(tokens["position"])
            subject = sorted(fdf.loc[fdf["is_subject"], "position"].unique())
            start, end, n = (subject[0], subject[-1] + 1, int(positions[-1]) + 1) if subject else (0, 0, 0)
            labels = [f"{t!r}{'*' if s else ''}" for t, s in zip(tokens["token"], tokens["is_subject"])]
            matrices = {}
            for site in sites:
                pivot = fdf[fdf["site"] == site].pivot_table(index="position", columns="layer", values="indirect_effect")
                pivot = pivot.reindex(index=positions, columns=layers)
                matrices[site] = pivot.to_numpy(dtype=float)
                for p, values in zip(positions, matrices[site]):
                    group = rome_group(int(p), start, end, n)
                    if group is not None:
                        grouped[site][group].append(values)
            if k < max_facts:
                first = fdf.iloc[0]
                key = f"{_safe(model)}_trace_row{int(row)}"
                title = (f"{model}: {first['prompt']!r} -> {first['answer']!r}  (p clean {first['p_clean']:.3f}, "
                         f"corrupted {first['p_corrupt']:.3f}; * subject tokens)")
                out[key] = _trace_panels(plt, matrices, labels, title, out_dir / f"trace_{key}.png", sites)
        averaged = {}
        present = [g for g in ROME_GROUPS if any(grouped[s][g] for s in sites)]
        for site in sites:
            averaged[site] = np.array([np.nanmean(np.stack(grouped[site][g]), axis=0) if grouped[site][g]
                                       else np.full(len(layers), np.nan) for g in present])
        facts = mdf["row"].nunique()
        key = f"{_safe(model)}_trace_average"
        out[key] = _trace_panels(plt, averaged, present, f"{model}: average indirect effect over {facts} facts",
                                 out_dir / f"trace_{key}.png", sites)
    return out
