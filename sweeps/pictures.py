"""Drawing helpers every kind's report shares (matplotlib without a display, text as it is):
`plt`, `safe_name` (a model or variant name in a file name), `literal` (no math text),
`short`/`note` (text that fits a tick or a square) and `heatmap` (an annotated matrix).

The readable size, one rule for every kind: a picture draws one line per input row (a prompt,
an entity) only while there are at most `READABLE_ROWS` of them (`readable`). Past it a report
draws aggregates instead: per layer (and position) the mean over rows with a 95% interval
(`means_by`, `draw_means`: a normal approximation, mean ± 1.96 standard errors), the
`TOP_ROWS` rows of highest mean (`top_rows`), and writes a seeded sample of `SAMPLE_ROWS`
generations as CSV (`sample`). Kinds that draw one picture per row (causal_trace's facts) draw
at most `TOP_ROWS` of them.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

READABLE_ROWS = 60  # input rows a picture shows one by one; past it, aggregates (see the module docstring)
TOP_ROWS = 20  # rows of highest mean drawn past READABLE_ROWS; per-row pictures at most
SAMPLE_ROWS = 200  # generations in a report's seeded sample (CSV) past READABLE_ROWS
SAMPLE_SEED = 0  # the seed of that sample
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: mean ± Z95 standard errors


def plt():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def safe_name(name: Any, empty: str = "x") -> str:
    """`name` as a file name's part. A model given as a local directory (a path: /..., ./...,
    ../..., ~/..., or more than one `/`, which no hub name has) is named by the directory itself
    (`./models/tiny-qwen2` -> `tiny-qwen2`); a hub name keeps its owner (`owner_model`)."""
    text = str(name)
    if text.startswith(("/", "./", "../", "~")) or text.count("/") > 1:
        text = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or empty


def literal(text: Any) -> str:
    """Text shown as it is: no matplotlib math text (a `$` in a prompt would start it)."""
    return str(text).replace("$", r"\$")


def short(text: str, n: int = 22) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def note(text: str, width: int = 16, lines: int = 3) -> str:
    """The start of a generation, wrapped to fit a heatmap square."""
    wrapped = textwrap.wrap(" ".join(str(text).split()), width, max_lines=lines, placeholder="…")
    return "\n".join(wrapped)


def heatmap(
    matrix, rows: list[str], cols: list[Any], title: str, xlabel: str, ylabel: str, cbar: str, path: Path, notes=None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    # Prompts and generations are literal text: a "$" must not start matplotlib's math mode.
    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_heatmap(matrix, rows, cols, title, xlabel, ylabel, cbar, path, notes)


def _draw_heatmap(matrix, rows, cols, title, xlabel, ylabel, cbar, path, notes) -> Path:
    pyplot = plt()
    width = min(40, 2.5 + 1.25 * len(cols) if notes is not None else 2.5 + 0.55 * len(cols))
    height = min(40, 1.8 + (0.75 if notes is not None else 0.45) * len(rows))
    fig, ax = pyplot.subplots(figsize=(max(width, 5), max(height, 2.6)))
    im = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [short(r, 40) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=10)
    if notes is not None:
        lo, hi = im.get_clim()
        for i in range(len(rows)):
            for j in range(len(cols)):
                if notes[i][j]:
                    dark = (matrix[i][j] - lo) / ((hi - lo) or 1) < 0.5
                    ax.text(
                        j, i, notes[i][j], ha="center", va="center", fontsize=6.5, color="white" if dark else "black"
                    )
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return path


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)
    return path


# ---------------------------------------------------------------- past the readable size


def readable(n_rows: int) -> bool:
    """Whether a picture may show `n_rows` input rows one by one (at most READABLE_ROWS)."""
    return n_rows <= READABLE_ROWS


def means_by(df, by: list[str], unit: str, value: str):
    """Per group of `by`: the mean of `value` over units (each `unit`, e.g. a prompt, counts
    once: its values in the group are averaged first), its 95% interval by the normal
    approximation (mean ± Z95 · s / sqrt(n), s the units' standard deviation with n - 1; one
    unit: the mean itself), and n, the units with a value. Columns: *by, mean, low, high, n."""
    import numpy as np

    per_unit = df[df[value].notna()].groupby([*by, unit], sort=True, dropna=False)[value].mean()
    g = per_unit.astype(float).groupby(level=list(range(len(by))), sort=True, dropna=False)
    out = g.agg(mean="mean", sd="std", n="count").reset_index()
    half = Z95 * out["sd"].fillna(0.0) / np.sqrt(out["n"])
    out["low"], out["high"] = out["mean"] - half, out["mean"] + half
    return out[[*by, "mean", "low", "high", "n"]]


def top_rows(df, unit: str, value: str, k: int = TOP_ROWS) -> list:
    """The `k` units of highest mean `value` over their cells, highest first (ties: first seen)."""
    means = df.groupby(unit, sort=False)[value].mean().astype(float)
    return list(means.sort_values(ascending=False, kind="stable").index[:k])


def sample(df, n: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED):
    """A seeded random sample of `n` rows of `df` (all of them when fewer), in df's order (its
    positions, whatever its index)."""
    import numpy as np

    if len(df) <= n:
        return df
    return df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), size=n, replace=False))]


def draw_means(means, x: str, line: str | None, ylabel: str, title: str, path: Path) -> Path:
    """`means` (from `means_by`) as lines against `x`, one per value of `line`, each with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context({"text.parse_math": False}):
        pyplot = plt()
        fig, ax = pyplot.subplots(figsize=(7, 3.8))
        groups = means.groupby(line, sort=True) if line else [(None, means)]
        for key, g in groups:
            g = g.sort_values(x)
            label = None if key is None else f"{line} {key}"
            ax.plot(g[x], g["mean"], marker="o", ms=3, label=label)
            ax.fill_between(g[x], g["low"], g["high"], alpha=0.2)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(short(ylabel, 48))
        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=9)
        if line and means[line].nunique() > 1:
            ax.legend(fontsize=7, ncol=2)
        return save(fig, path)
