"""Tables and pictures from a sweep's stored results (`patchscope report DIR`).

Reads only the Parquet store, so it works on a finished sweep, a stopped one, or one copied
from a cluster. Writes into DIR:
- `results.csv`: one row per cell (parameters, generated text, first-token log-probability,
  reference matches);
- `heatmap_<model>_prompt_x_layer.png`: source prompt x source layer, each cell annotated with
  the start of what the target generated;
- `heatmap_<model>_source_x_target_layer.png`: source layer x target layer (when the sweep
  has several target layers per source layer).
Colour: the share of cells whose generated text contains the row's reference value (when the
source file has reference columns), else the first generated token's log-probability.
"""

from __future__ import annotations

import re
import textwrap
import sys
from pathlib import Path
from typing import Any

from .records import SCHEMAS, TABLE_COLUMNS, TOKEN_COLUMNS, enrich, kind_of, token_text
from .report_recipes import recipe_report, recipe_summary
from .report_studies import intervention_report, trace_report
from .store import ResultStore


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _ordered(df):
    """Rows in input order (source.prompts / source.file), then layers and positions."""
    keys = ["model", "row"] if "row" in df.columns else ["model"]
    keys += ["source_prompt", "source_layer", "source_position", "target_layer", "target_position"]
    return df.sort_values(keys, kind="stable")


def metric_of(df) -> tuple[str, str]:
    matches = [c for c in df.columns if c.startswith("match_")]
    if matches:
        return matches[0], f"share of generations containing the row's {matches[0][6:]}"
    return "top1_logprob", "log-probability of the first generated token"


def _short(text: str, n: int = 22) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _note(text: str, width: int = 16, lines: int = 3) -> str:
    """The start of a generation, wrapped to fit a heatmap square."""
    wrapped = textwrap.wrap(" ".join(str(text).split()), width, max_lines=lines, placeholder="…")
    return "\n".join(wrapped)


def _heatmap(matrix, rows: list[str], cols: list[Any], title: str, xlabel: str, ylabel: str, cbar: str,
             path: Path, notes=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    # Prompts and generations are literal text: a "$" must not start matplotlib's math mode.
    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_heatmap(matrix, rows, cols, title, xlabel, ylabel, cbar, path, notes)


def _draw_heatmap(matrix, rows, cols, title, xlabel, ylabel, cbar, path, notes) -> Path:
    import matplotlib.pyplot as plt

    width = min(40, 2.5 + 1.25 * len(cols) if notes is not None else 2.5 + 0.55 * len(cols))
    height = min(40, 1.8 + (0.75 if notes is not None else 0.45) * len(rows))
    fig, ax = plt.subplots(figsize=(max(width, 5), max(height, 2.6)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_short(r, 40) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=10)
    if notes is not None:
        lo, hi = im.get_clim()
        for i in range(len(rows)):
            for j in range(len(cols)):
                if notes[i][j]:
                    dark = (matrix[i][j] - lo) / ((hi - lo) or 1) < 0.5
                    ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=6.5,
                            color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, df=None) -> dict[str, Path]:
    """results.csv and the heatmaps; returns {name: path} (the table under 'table')."""
    out_dir = Path(out_dir)
    if df is None:
        df = ResultStore(out_dir).read()
    if df.empty:
        return {}
    df = enrich(df)
    kind = kind_of(df.columns)
    if kind != "patchscope":
        return _study_report(out_dir, df, kind)
    df = _ordered(df)
    columns = list(TABLE_COLUMNS) + [c for c in df.columns if c.startswith(("ref_", "match_"))]
    columns += [c for c in TOKEN_COLUMNS if c not in columns]
    out: dict[str, Path] = {"table": out_dir / "results.csv"}
    table = df[columns].copy()
    for c in TOKEN_COLUMNS:
        table[c] = [token_text(v) for v in table[c]]
    table.to_csv(out["table"], index=False)

    metric, label = metric_of(df)
    for model, mdf in df.groupby("model", sort=False):
        # source prompt x source layer; annotated when each square holds exactly one cell
        pivot = mdf.pivot_table(index="source_prompt", columns="source_layer", values=metric, aggfunc="mean")
        prompts = list(dict.fromkeys(mdf["source_prompt"]))
        pivot = pivot.reindex(prompts)
        one_each = not mdf.duplicated(["source_prompt", "source_layer"]).any()
        notes = None
        if one_each:
            text = mdf.set_index(["source_prompt", "source_layer"])["generated_text"]
            notes = [[_note(text.get((p, l), "")) for l in pivot.columns] for p in pivot.index]
        key = f"{_safe(model)}_prompt_x_layer"
        out[key] = _heatmap(
            pivot.to_numpy(dtype=float), list(pivot.index), list(pivot.columns),
            f"{model}: {label}" + ("" if one_each else " (mean over positions / target layers)"),
            "source layer", "source prompt", metric, out_dir / f"heatmap_{key}.png", notes,
        )
        if mdf.groupby("source_layer")["target_layer"].nunique().max() > 1:
            st = mdf.pivot_table(index="source_layer", columns="target_layer", values=metric, aggfunc="mean")
            key = f"{_safe(model)}_source_x_target_layer"
            out[key] = _heatmap(
                st.to_numpy(dtype=float), [str(i) for i in st.index], list(st.columns),
                f"{model}: {label} (mean over prompts)", "target layer", "source layer", metric,
                out_dir / f"heatmap_{key}.png",
            )
    return out


def _study_report(out_dir: Path, df, kind: str) -> dict[str, Path]:
    """results.csv with the kind's table columns, then its pictures (sweeps/report_studies.py)."""
    schema = SCHEMAS[kind]
    keys = [c for c in ("model", "row", "site", "layer", "head", "neuron", "kind", "alpha", "position", "role",
                        "source_layer", "target_layer") if c in df.columns]
    df = df.sort_values(keys, kind="stable")
    columns = [c for c in schema.table if c in df.columns] + [c for c in df.columns if c.startswith(("ref_", "match_"))]
    table = df[columns].copy()
    for c in schema.tokens:
        table[c] = [token_text(v) for v in table[c]]
    out: dict[str, Path] = {"table": out_dir / "results.csv"}
    table.to_csv(out["table"], index=False)
    draw = {"intervention": intervention_report, "causal_trace": trace_report, "recipe": recipe_report}[kind]
    out.update(draw(out_dir, df))
    return out


def study_summary(df, kind: str, max_rows: int = 15) -> str:
    """What to read first in the terminal: the strongest cells."""
    if kind == "recipe":
        return recipe_summary(df)
    if kind == "intervention":
        g = df.groupby(["model", "site", "head", "kind"], dropna=False)["delta_logprob"].mean().reset_index()
        g = g.sort_values("delta_logprob", key=abs, ascending=False).head(max_rows)
        lines = ["== the interventions that change the answer's log-probability most (mean over prompts)"]
        lines += [f"  {r.model} {r.site}{'' if r.head != r.head else f' head {int(r.head)}'} {r.kind}: "
                  f"{r.delta_logprob:+.3f}" for r in g.itertuples()]
        return "\n".join(lines)
    lines = ["== causal traces: per fact, p(answer) clean / corrupted and the strongest restoration per site"]
    for (model, row), f in df.groupby(["model", "row"], sort=True):
        first = f.iloc[0]
        best = ", ".join(f"{s}: layer {int(b.layer)} pos {int(b.position)} ({b.indirect_effect:+.3f})"
                         for s, sf in f.groupby("site") for b in [sf.loc[sf["indirect_effect"].idxmax()]])
        lines.append(f"  {model} {first['prompt'][:50]!r} -> {first['answer']!r}: {first['p_clean']:.3f} / "
                     f"{first['p_corrupt']:.3f}; {best}")
        if len(lines) > max_rows:
            break
    return "\n".join(lines)


def text_table(df, width: int = 28, max_rows: int = 40) -> str:
    """Generated text per source prompt (rows) and source layer (columns), for the terminal."""
    kind = kind_of(df.columns)
    if kind != "patchscope":
        return study_summary(df, kind)
    df = _ordered(enrich(df))
    lines = []
    for model, mdf in df.groupby("model", sort=False):
        first = mdf.sort_values(["target_layer", "source_position", "target_position"]).drop_duplicates(
            ["source_prompt", "source_layer"]
        )
        pivot = first.pivot(index="source_prompt", columns="source_layer", values="generated_text")
        pivot = pivot.reindex(list(dict.fromkeys(mdf["source_prompt"])))
        layers = list(pivot.columns)
        lines.append(f"== {model}: generated text by source prompt (rows) and source layer (columns)")
        for prompt in list(pivot.index)[:max_rows]:
            lines.append(f"{_short(prompt, 24)}")
            for layer in layers:
                lines.append(f"    layer {layer:>3}: {_short(pivot.loc[prompt, layer] or '', 70)!r}")
        if len(pivot.index) > max_rows:
            lines.append(f"... {len(pivot.index) - max_rows} more prompts in results.csv")
    return "\n".join(lines)


def main(args) -> int:
    out_dir = Path(args.dir)
    store = ResultStore(out_dir)
    if not store.results_dir.is_dir():
        print(f"error: dir: {out_dir} holds no sweep results (no {store.results_dir})", file=sys.stderr)
        return 2
    df = store.read()
    if df.empty:
        print(f"error: dir: {store.results_dir} holds no result files yet", file=sys.stderr)
        return 2
    manifest = store.manifest() or {}
    total = manifest.get("cells_total")
    print(text_table(df))
    paths = write_report(out_dir, df)
    done = df["cell_id"].nunique()
    print(f"\n{done} cells stored" + (f" of {total}" if total else "") + f" ({len(store.files())} files in {store.results_dir})")
    print(f"table:    {paths['table']}")
    for key, path in paths.items():
        if key != "table":
            print(f"picture:  {path}")
    return 0
