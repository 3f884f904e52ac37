"""RESULTS: AtP vs AtP* vs exact patching on SmolLM2-135M and the IOI pairs (issue 17).

Grids, each patched exactly in full (so recall and false negatives are exact):
- attn.hook_z per head, all positions at once (30 x 9 = 270 nodes per pair), on --pairs pairs;
- hook_mlp_out by position (30 x positions), on --mlp-pairs pairs;
- attn.hook_z per head by position (30 x 9 x positions), on --each-pairs pairs.
Prints one markdown table per grid (correlations, sign agreement, recall@10/@20, false negatives
@20) and the wall time of AtP, AtP* and exact patching.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/results_attribution.py
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_attribution import pairs
from patchscope_core import Engine, load_model
from patchscope_core.methods.attribution import Attributor
from patchscope_core.methods.attribution_verify import summarise, verify
from patchscope_core.methods.patcher import Patcher


def grid(engine, ps, site, positions, nodes):
    t0 = time.perf_counter()
    atp = Attributor(engine, batch_size=64).attribute(ps, [site])
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    star = Attributor(engine, batch_size=64).attribute(ps, [site], method="atp_star")
    t_star = time.perf_counter() - t0
    for a, s in zip(atp, star):  # one result per pair holding both methods
        a.estimates.update(s.estimates)
        a.scores.update(s.scores)
    t0 = time.perf_counter()
    verified = verify(Patcher(engine, batch_size=64), ps, atp, top_k=20, random=nodes, positions=positions)
    t_exact = time.perf_counter() - t0
    rows = summarise(atp, verified, positions=positions, top_k=20, ks=(10, 20))
    print(f"\n### {site}, positions {positions}: {len(ps)} pairs, {nodes} nodes per pair, all patched exactly")
    print(f"wall time: AtP {t_atp:.2f} s, AtP* {t_star:.2f} s, exact {t_exact:.1f} s")
    print(
        "| method | Pearson | Spearman | sign agreement | recall@10 | recall@20 | false negatives @20 (mean per pair) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fn20 = 20 * (1 - r["recall@20"])
        print(
            f"| {r['method']} | {r['pearson']:.3f} | {r['spearman']:.3f} | {r['sign_agreement']:.3f} | "
            f"{r['recall@10']:.3f} | {r['recall@20']:.3f} | {fn20:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=22)
    ap.add_argument("--mlp-pairs", type=int, default=8)
    ap.add_argument("--each-pairs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = Engine(load_model("smollm2-135m", device="cpu"), name="smollm2-135m")
    ps = pairs()
    info = engine.info
    grid(engine, ps[: args.pairs], "attn.hook_z", "all", info.n_layers * info.n_heads)
    m = max(len(engine.info.tokenizer(p.clean)["input_ids"]) for p in ps) + 1
    grid(engine, ps[: args.mlp_pairs], "hook_mlp_out", "each", info.n_layers * m)
    grid(engine, ps[: args.each_pairs], "attn.hook_z", "each", info.n_layers * info.n_heads * m)


if __name__ == "__main__":
    main()
