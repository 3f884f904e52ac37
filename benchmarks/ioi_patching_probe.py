"""The IOI patching grid on SmolLM2 in-process (patchscope_core.methods.patching, no Ray, no W&B): a probe
of what the `activation_patching` sweep kind's example will show, before the sweep kind exists.

For the first --pairs pairs of sweeps/examples/ioi_pairs.csv: blocks.{l}.hook_resid_pre,
hook_attn_out, hook_mlp_out and attn.hook_z (every query head) at every layer and every
position, plus attn.hook_z per head at every position at once (the layer x head map), denoising,
logit_diff. Writes the records (records.parquet), the summary with bootstrap intervals
(summary.csv) and the heatmaps (PNG) to --out, and prints the cells that recover most.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ioi_patching_probe.py --pairs 8 --out /tmp/ioi-probe

The templates differ in length, so absolute positions do not line up across pairs: `--roles`
(also alone, on the records of an earlier --out) prints the means by IOI role instead: S1, IO,
S2 (the first position where the prompts differ), S2+1, END (the last position), other.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from patchscope_core import load_model, model_info
from patchscope_core.engine import Engine
from patchscope_core.methods.patcher import Patcher
from patchscope_core.methods.patching import Pair, check_pair, make_cells
from patchscope_core.methods.patching_summary import draw_layer_head, draw_layer_position, summarize, top_heads
from patchscope_core.models.tokens import tokenize

PAIRS = Path(__file__).resolve().parent.parent / "sweeps" / "examples" / "ioi_pairs.csv"
SITES = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "attn.hook_z"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", default="/tmp/ioi-probe")
    ap.add_argument(
        "--roles", choices=("also", "only"), default="also", help="means by IOI role; only: from --out's records"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(PAIRS).head(args.pairs)
    if args.roles == "only":
        return by_role(pd.read_parquet(out / "records.parquet"), table)
    run(table, out)
    by_role(pd.read_parquet(out / "records.parquet"), table)


def roles_of(info, p) -> dict[int, str]:
    """position -> IOI role of one pair (BOS counted)."""
    clean, corrupted = tokenize(info, p.clean), tokenize(info, p.corrupted)
    io, s = (info.tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in (p.answer, p.wrong_answer))
    s2 = next(i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b)
    roles = {i: "other" for i in range(len(clean))}
    roles[clean.index(io)], roles[clean.index(s)] = "IO", "S1"
    roles.update({s2: "S2", s2 + 1: "S2+1", len(clean) - 1: "END"})
    return roles


def by_role(df: pd.DataFrame, table: pd.DataFrame) -> None:
    """Mean recovered over pairs by (site, layer, role): the best layers per role, and the heads."""
    info = model_info("smollm2-135m")
    roles = {row: roles_of(info, p) for row, p in table.iterrows()}
    df = df[df.position.notna()].copy()
    df["role"] = [roles[r][int(q)] for r, q in zip(df.row, df.position)]
    pd.set_option("display.width", 200)
    for site in SITES[:3]:
        m = df[df.site == site].groupby(["layer", "role"]).recovered.mean().unstack("role")
        print(f"\n{site}: mean recovered by layer and role (every 2nd layer)\n", m.iloc[::2].round(2).to_string())
    z = df[df.site == "attn.hook_z"].groupby(["role", "layer", "head"]).recovered.agg(["mean", "std", "count"])
    top = z.reindex(z["mean"].abs().sort_values(ascending=False).index).head(16)
    print(
        "\nattn.hook_z by role: top 16 (role, layer, head) by |mean recovered| (std over pairs)\n",
        top.round(3).to_string(),
    )


def run(table: pd.DataFrame, out: Path) -> None:
    model = load_model("smollm2-135m", device="cpu")
    engine = Engine(model, name="smollm2-135m")
    patcher = Patcher(engine, batch_size=64)
    info, tok = engine.info, model.tokenizer
    records, t0 = [], time.perf_counter()
    for row, p in table.iterrows():
        pair = Pair(p.clean, p.corrupted, p.answer, p.wrong_answer)
        checked = check_pair(pair, info, ("logit_diff",), f"pairs[{row}]")
        n = len(checked.clean_ids)
        cells = make_cells(info, n, SITES, "all", "each", "all") + make_cells(
            info, n, ["attn.hook_z"], "all", "all", "all"
        )
        result = patcher.patch(pair, cells, ("denoising",), ("logit_diff",))
        for c in result.cells:
            rec = c.to_record()
            rec.update(
                row=int(row),
                token=None if c.cell.position is None else tok.decode([checked.clean_ids[c.cell.position]]),
            )
            records.append(rec)
        print(
            f"pair {row}: clean {result.clean_values['logit_diff']:.2f}, corrupted "
            f"{result.corrupted_values['logit_diff']:.2f}, {len(cells)} cells, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    df = pd.DataFrame(records)
    df.to_parquet(out / "records.parquet")
    summary = summarize(df)
    summary.to_csv(out / "summary.csv", index=False)
    for site in SITES:
        draw_layer_position(df, site).savefig(out / f"{site}_layer_position.png", dpi=120)
    draw_layer_head(df, "attn.hook_z").savefig(out / "attn.hook_z_layer_head_all.png", dpi=120)
    draw_layer_head(df, "attn.hook_z", position=int(df.position.max())).savefig(
        out / "attn.hook_z_layer_head_last.png", dpi=120
    )
    pd.set_option("display.width", 200)
    cols = ["site", "layer", "position", "head", "mean", "ci_low", "ci_high"]
    for site in SITES[:3]:
        s = summary[(summary.site == site) & summary.position.notna()]
        print(
            f"\n{site}: top 8 cells by mean recovered\n",
            s.sort_values("mean", ascending=False)[cols].head(8).to_string(),
        )
    last = int(df.position.max())
    print("\nattn.hook_z, every position at once: top 12 heads by |mean|\n", top_heads(summary, 12)[cols].to_string())
    print(
        f"\nattn.hook_z at the last position {last}: top 12 heads\n",
        top_heads(summary, 12, position=last)[cols].to_string(),
    )
    z = summary[(summary.site == "attn.hook_z") & summary.position.notna()]
    print(
        "\nattn.hook_z by position: top 12 (layer, position, head)\n",
        z.reindex(z["mean"].abs().sort_values(ascending=False).index)[cols].head(12).to_string(),
    )
    print(f"\nwall {time.perf_counter() - t0:.0f} s for {len(table)} pairs, {len(df)} cells")


if __name__ == "__main__":
    main()
