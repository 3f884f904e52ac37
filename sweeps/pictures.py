"""Drawing helpers every kind's report shares (matplotlib without a display, text as it is):
`plt`, `safe_name` (a model or variant name in a file name), `literal` (no math text),
`short`/`note` (text that fits a tick or a square) and `heatmap` (an annotated matrix)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any


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
