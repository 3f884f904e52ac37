"""Summaries of patching records (patchscope_core/patching_summary.py) on small synthetic frames,
against hand computations: per-pair values, means and percentile-bootstrap intervals against a
direct numpy loop over the same resamples, heatmap matrices against pandas groupby means, the
first pair's tokens, and the heads that matter most."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from patchscope_core.methods.patching_summary import (
    bootstrap_draws,
    draw_layer_head,
    draw_layer_position,
    layer_head,
    layer_position,
    per_pair,
    position_labels,
    summarize,
    top_heads,
)

N_PAIRS, N_LAYERS, N_POS, N_HEADS = 5, 3, 4, 2


def records(seed: int = 0, drop: bool = False) -> pd.DataFrame:
    """resid_pre cells at each position and at all (position null), hook_z cells per head at all
    positions and at position 3; random `recovered` per pair; pair r's tokens 'w{p}r{r}'."""
    g = np.random.default_rng(seed)
    rows = []
    for r in range(N_PAIRS):
        for l in range(N_LAYERS):
            for p in [*range(N_POS), None]:
                rows.append(
                    dict(
                        row=r,
                        site="hook_resid_pre",
                        layer=l,
                        position=p,
                        head=None,
                        token=None if p is None else f"w{p}r{r}",
                    )
                )
            for h in range(N_HEADS):
                for p in (None, 3):
                    rows.append(
                        dict(
                            row=r,
                            site="attn.hook_z",
                            layer=l,
                            position=p,
                            head=h,
                            token=None if p is None else f"w{p}r{r}",
                        )
                    )
    df = pd.DataFrame(rows)
    df["direction"], df["metric"] = "denoising", "logit_diff"
    df["clean_value"], df["corrupted_value"] = 2.0, -1.0
    df["recovered"] = g.normal(size=len(df)) + df["layer"] * 0.5
    df["patched"] = df["corrupted_value"] + df["recovered"] * 3.0
    if drop:  # one pair lacks one cell
        df = df.drop(
            index=df[(df.row == 2) & (df.site == "hook_resid_pre") & (df.layer == 1) & (df.position == 0)].index
        )
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)  # order must not matter


def cell_values(df, site, layer, position, head) -> dict[int, float]:
    sel = df[(df.site == site) & (df.layer == layer)]
    sel = sel[sel.position.isna()] if position is None else sel[sel.position == position]
    sel = sel[sel["head"].isna()] if head is None else sel[sel["head"] == head]
    return dict(zip(sel.row, sel.recovered))


def key_of(position, head):
    return (None if pd.isna(position) else int(position), None if pd.isna(head) else int(head))


@pytest.mark.parametrize("drop", [False, True])
def test_per_pair_means_and_bootstrap_equal_a_direct_loop(drop):
    df = records(drop=drop)
    n_boot, seed = 200, 7
    got = summarize(df, n_boot=n_boot, seed=seed)
    wide = per_pair(df)
    assert len(got) == len(wide) == N_LAYERS * (N_POS + 1) + N_LAYERS * N_HEADS * 2
    rng = np.random.default_rng(seed)  # the documented resampling: one draw of pairs for every cell
    draws = rng.integers(0, N_PAIRS, size=(n_boot, N_PAIRS))
    assert np.array_equal(draws, bootstrap_draws(N_PAIRS, n_boot, seed))
    for _, row in got.iterrows():
        position, head = key_of(row.position, row["head"])
        values = cell_values(df, row.site, row.layer, position, head)
        assert wide.loc[
            (row.site, row.layer, row.position, row["head"], "denoising", "logit_diff")
        ].dropna().to_dict() == pytest.approx(values)
        assert row.n_pairs == len(values) and row["mean"] == pytest.approx(np.mean(list(values.values())))
        means = []
        for b in range(n_boot):
            picked = [values[r] for r in draws[b] if r in values]
            means.append(sum(picked) / len(picked))
        low, high = np.percentile(means, [2.5, 97.5])
        assert (row.ci_low, row.ci_high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
        assert row.ci_low <= row["mean"] <= row.ci_high


def test_the_interval_narrows_with_more_pairs_and_is_seeded():
    df = records()
    a, b = summarize(df, seed=3), summarize(df, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not summarize(df, seed=4)[["ci_low"]].equals(a[["ci_low"]])
    constant = df.assign(recovered=1.25)
    c = summarize(constant)
    assert np.allclose(c[["mean", "ci_low", "ci_high"]].to_numpy(), 1.25)
    with pytest.raises(ValueError, match="ci"):
        summarize(df, ci=95)


def test_layer_position_heatmap_equals_groupby_means_and_shows_the_first_pairs_tokens():
    df = records()
    table = layer_position(df, "hook_resid_pre")
    want = df[(df.site == "hook_resid_pre") & df.position.notna()].groupby(["layer", "position"]).recovered.mean()
    assert table.shape == (N_LAYERS, N_POS)
    for (l, p), v in want.items():
        assert table.loc[l, int(p)] == pytest.approx(v)
    assert position_labels(df) == {p: f"{p}: w{p}r0" for p in range(N_POS)}
    # a head site's by-position map averages over heads
    z = layer_position(df, "attn.hook_z")
    assert list(z.columns) == [3]
    for l in range(N_LAYERS):
        sel = df[(df.site == "attn.hook_z") & (df.layer == l) & (df.position == 3)]
        assert z.loc[l, 3] == pytest.approx(sel.recovered.mean())
    fig = draw_layer_position(df, "hook_resid_pre")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{p}: w{p}r0" for p in range(N_POS)]
    assert np.allclose(ax.images[0].get_array(), table.to_numpy())


def test_layer_head_heatmap_and_top_heads():
    df = records()
    table = layer_head(df, "attn.hook_z")
    assert table.shape == (N_LAYERS, N_HEADS)
    for l in range(N_LAYERS):
        for h in range(N_HEADS):
            assert table.loc[l, h] == pytest.approx(np.mean(list(cell_values(df, "attn.hook_z", l, None, h).values())))
    at3 = layer_head(df, "attn.hook_z", position=3)
    assert at3.loc[1, 0] == pytest.approx(np.mean(list(cell_values(df, "attn.hook_z", 1, 3, 0).values())))
    summary = summarize(df, n_boot=100)
    top = top_heads(summary, k=3)
    everyone = sorted(((abs(table.loc[l, h]), l, h) for l in range(N_LAYERS) for h in range(N_HEADS)), reverse=True)
    assert [(r.layer, int(r["head"])) for _, r in top.iterrows()] == [(l, h) for _, l, h in everyone[:3]]
    assert top[["ci_low", "ci_high", "n_pairs"]].notna().all().all() and (top.n_pairs == N_PAIRS).all()
    fig = draw_layer_head(df, "attn.hook_z")
    assert np.allclose(fig.axes[0].images[0].get_array(), table.to_numpy())


def test_several_directions_must_be_named():
    df = records()
    both = pd.concat([df, df.assign(direction="noising", recovered=-df.recovered)])
    with pytest.raises(ValueError, match="direction"):
        layer_position(both, "hook_resid_pre")
    noising = layer_position(both, "hook_resid_pre", direction="noising")
    assert np.allclose(noising.to_numpy(), -layer_position(df, "hook_resid_pre").to_numpy())
    with pytest.raises(ValueError, match="missing columns"):
        summarize(df.drop(columns=["head"]))
