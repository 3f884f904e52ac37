"""The IOI activation-patching sweep read by role, for RESULTS.md (reads a finished run directory).

The IOI templates differ in length (15 or 16 tokens), so absolute positions do not line up
across pairs. Here each pair's positions get their IOI role: S2 is the one position where clean
and corrupted differ (found from the stored rows: patching `hook_resid_pre` there at layer 0
recovers 1), END the last position. Prints mean `recovered` (denoising, logit difference) by
role and layer for the residual stream and attention / MLP outputs, and the heads of
`attn.hook_z` that matter most at END and at S2, with 95% bootstrap intervals over pairs.

    .venv/bin/python benchmarks/results_ioi_patching.py runs/ioi-patching
"""

from __future__ import annotations

import argparse
import glob

import numpy as np
import pandas as pd


def roles(df: pd.DataFrame) -> pd.DataFrame:
    rp = df[(df["site"] == "hook_resid_pre") & (df["layer"] == 0)]
    s2 = rp.loc[rp.groupby("row")["recovered"].idxmax(), ["row", "position"]].set_index("row")["position"]
    end = df.groupby("row")["position"].max()
    out = df.copy()
    out["role"] = np.where(
        out["position"] == out["row"].map(end), "END", np.where(out["position"] == out["row"].map(s2), "S2", "other")
    )
    return out


def ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    boot = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--layers", default="0,5,10,15,18,20,21,22,23,24,26,29")
    args = ap.parse_args()
    df = pd.concat((pd.read_parquet(f) for f in glob.glob(f"{args.run_dir}/results/*.parquet")), ignore_index=True)
    df = roles(df[(df["direction"] == "denoising") & (df["metric"] == "logit_diff")])
    print(f"{df['row'].nunique()} pairs, {len(df)} cells")
    layers = [int(x) for x in args.layers.split(",")]
    for site in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out"):
        g = df[(df["site"] == site) & (df["role"] != "other")]
        table = g.groupby(["role", "layer"])["recovered"].mean().unstack("layer")
        print(f"\n{site}: mean recovered by role x layer")
        print(table[[l for l in layers if l in table.columns]].round(2).to_string())
        other = df[(df["site"] == site) & (df["role"] == "other")]["recovered"].abs().max()
        print(f"  largest |recovered| at any other position: {other:.3f}")
    heads = df[df["site"] == "attn.hook_z"]
    for role in ("END", "S2"):
        g = heads[heads["role"] == role]
        per = g.groupby(["layer", "head"])["recovered"]
        top = per.mean().sort_values(key=abs, ascending=False).head(10)
        print(f"\nattn.hook_z at {role}: the heads that matter most (mean recovered, 95% CI over pairs)")
        for (layer, head), mean in top.items():
            lo, hi = ci(per.get_group((layer, head)).to_numpy(dtype=float))
            print(f"  L{int(layer)}H{int(head)} {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]")


if __name__ == "__main__":
    main()
