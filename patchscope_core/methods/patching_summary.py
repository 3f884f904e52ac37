"""Summaries of activation-patching records over pairs: what the sweep kind's report draws.

Input: a DataFrame with one row per cell and pair, the records' columns `row, site, layer,
position, token, head, direction, metric, patched, clean_value, corrupted_value, recovered`
(`position` absolute, BOS counted, null for `all`; `head` null for head-less sites; `row` names
the pair). Pure pandas / numpy; the drawing functions import matplotlib lazily and take an Axes
or return a Figure (no pyplot, no backend), as TransformerLens's patching demo draws them:

- `per_pair`: each cell's value per pair (cells x pairs), the per-example values;
- `summarize`: per cell (site, layer, position, head, direction, metric) the number of pairs,
  the mean over pairs and a seeded percentile-bootstrap interval over pairs;
- `layer_position` / `draw_layer_position`: per site the layer x position heatmap of the mean,
  labelled with the tokens of the first pair (`position_labels`);
- `layer_head` / `draw_layer_head`: for head sites the layer x head heatmap (rows patching every
  position at once by default), and `top_heads`: the heads that matter most, by |mean|, with
  their intervals.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

CELL = ["site", "layer", "position", "head", "direction", "metric"]


COLUMNS = ["row", *CELL, "token", "patched", "clean_value", "corrupted_value", "recovered"]


def check_frame(df: pd.DataFrame, value: str = "recovered") -> None:
    missing = [c for c in [*CELL, "row", value] if c not in df.columns]
    if missing:
        raise ValueError(f"records: missing columns {missing}; expected {COLUMNS}")


def per_pair(df: pd.DataFrame, value: str = "recovered") -> pd.DataFrame:
    """Cells x pairs: each cell's `value` for each pair (NaN where a pair lacks the cell); the
    index is the cell key (null positions and heads kept), the columns the pairs' `row`s."""
    check_frame(df, value)
    absent = {"position": df["position"].isna(), "head": df["head"].isna()}  # null keys: -1 while grouping
    keyed = df.assign(**{c: df[c].fillna(-1).astype(int) for c in absent})
    wide = keyed.groupby(CELL + ["row"])[value].mean().unstack("row").sort_index()
    keys = wide.index.to_frame(index=False)
    for c in absent:
        keys[c] = keys[c].where(keys[c] >= 0)
    wide.index = pd.MultiIndex.from_frame(keys)
    return wide


def bootstrap_draws(pairs: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, pairs] indices of the pairs each bootstrap sample draws (with replacement)."""
    return np.random.default_rng(seed).integers(0, pairs, size=(n_boot, pairs))


def summarize(
    df: pd.DataFrame, value: str = "recovered", n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Per cell: n_pairs, mean over pairs, and the `ci` percentile-bootstrap interval over pairs
    (ci_low, ci_high). Every cell uses the same `n_boot` resamples of the pairs
    (`bootstrap_draws(pairs, n_boot, seed)`), so intervals of different cells are comparable; a
    pair without a value for a cell (NaN) is left out of that cell's means."""
    if not 0 < ci < 1:
        raise ValueError(f"ci: expected a number between 0 and 1, got {ci!r}")
    wide = per_pair(df, value)
    values = wide.to_numpy(dtype=float)  # [cells, pairs]
    draws = bootstrap_draws(values.shape[1], n_boot, seed)
    counts = np.zeros((n_boot, values.shape[1]))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)  # how often each pair is drawn
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (np.where(present, values, 0.0) @ counts.T) / (present.astype(float) @ counts.T)  # [cells, n_boot]
        low, high = np.nanpercentile(boot, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2], axis=1)
        mean = np.nanmean(values, axis=1)
    out = wide.index.to_frame(index=False)
    out["n_pairs"] = present.sum(1)
    out["mean"], out["ci_low"], out["ci_high"] = mean, low, high
    return out


def _select(df: pd.DataFrame, site: str, direction: str | None, metric: str | None) -> pd.DataFrame:
    sel = df[df["site"] == site]
    for column, want in (("direction", direction), ("metric", metric)):
        if column not in sel:  # attribution rows have no direction
            continue
        if want is None:
            found = sel[column].unique()
            if len(found) > 1:
                raise ValueError(f"{column}: the records of {site} hold several ({list(found)}); name one")
        else:
            sel = sel[sel[column] == want]
    return sel


def position_labels(df: pd.DataFrame) -> dict[int, str]:
    """position -> 'position: token' from the first pair (the smallest `row`)."""
    known = df.dropna(subset=["position"])
    if known.empty:
        return {}
    first = known[known["row"] == known["row"].min()]
    tokens = first.drop_duplicates("position").set_index("position")["token"]
    return {int(p): f"{int(p)}: {t}" for p, t in tokens.sort_index().items()}


def layer_position(
    df: pd.DataFrame, site: str, direction: str | None = None, metric: str | None = None, value: str = "recovered"
) -> pd.DataFrame:
    """Layers x positions: the mean of `value` over pairs (and over heads, for a head site) of
    the site's single-position cells."""
    sel = _select(df, site, direction, metric).dropna(subset=["position"])
    table = sel.groupby(["layer", "position"])[value].mean().unstack("position")
    table.columns = table.columns.astype(int)
    return table.sort_index()


def layer_head(
    df: pd.DataFrame,
    site: str,
    direction: str | None = None,
    metric: str | None = None,
    value: str = "recovered",
    position: int | None = None,
) -> pd.DataFrame:
    """Layers x heads: the mean of `value` over pairs of the site's head cells that patch every
    position at once (position null), or the cells at `position`."""
    sel = _select(df, site, direction, metric).dropna(subset=["head"])
    sel = sel[sel["position"].isna()] if position is None else sel[sel["position"] == position]
    table = sel.groupby(["layer", "head"])[value].mean().unstack("head")
    table.columns = table.columns.astype(int)
    return table.sort_index()


def top_heads(summary: pd.DataFrame, k: int = 10, site: str | None = None, position: int | None = None) -> pd.DataFrame:
    """The k head cells of `summarize`'s output with the largest |mean| (those patching every
    position at once, or those at `position`), with their intervals, largest first."""
    sel = summary.dropna(subset=["head"])
    sel = sel[sel["position"].isna()] if position is None else sel[sel["position"] == position]
    if site is not None:
        sel = sel[sel["site"] == site]
    order = sel["mean"].abs().sort_values(ascending=False, kind="stable").index
    return sel.loc[order].head(k).reset_index(drop=True)


def draw_heatmap(ax, table: pd.DataFrame, title: str, xlabels: list[str] | None = None, xname: str = "position"):
    """A diverging heatmap of `table` (layers down, columns across) centred on 0 on `ax`."""
    data = table.to_numpy(dtype=float)
    bound = float(np.nanmax(np.abs(data))) if data.size and not np.all(np.isnan(data)) else 1.0
    image = ax.imshow(data, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(data.shape[1]))
    ax.set_xticklabels(xlabels if xlabels is not None else [str(c) for c in table.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(data.shape[0]))
    ax.set_yticklabels([str(i) for i in table.index], fontsize=7)
    ax.set_xlabel(xname)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax)
    return image


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazily: the summaries need no matplotlib

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot(1, 1, 1)


def draw_layer_position(
    df: pd.DataFrame,
    site: str,
    ax=None,
    direction: str | None = None,
    metric: str | None = None,
    value: str = "recovered",
):
    """The layer x position heatmap of `site` on `ax` (a new Figure when None: returned)."""
    table = layer_position(df, site, direction, metric, value)
    labels = position_labels(df)
    fig, ax = (
        _figure(1.2 + 0.45 * max(1, table.shape[1]), 1.5 + 0.18 * max(1, len(table))) if ax is None else (ax.figure, ax)
    )
    draw_heatmap(ax, table, f"{site}: mean {value} over pairs", [labels.get(p, str(p)) for p in table.columns])
    fig.tight_layout()
    return fig


def draw_layer_head(
    df: pd.DataFrame,
    site: str,
    ax=None,
    direction: str | None = None,
    metric: str | None = None,
    value: str = "recovered",
    position: int | None = None,
    where: str | None = None,
):
    """The layer x head heatmap of `site` on `ax` (a new Figure when None: returned); `where` says
    which positions the rows patched (default: from `position`)."""
    table = layer_head(df, site, direction, metric, value, position)
    fig, ax = (
        _figure(1.5 + 0.4 * max(1, table.shape[1]), 1.5 + 0.18 * max(1, len(table))) if ax is None else (ax.figure, ax)
    )
    where = where or ("every position at once" if position is None else f"position {position}")
    draw_heatmap(ax, table, f"{site} ({where}): mean {value} over pairs", xname="head")
    fig.tight_layout()
    return fig
