"""Speed of activation patching on SmolLM2-135M: ours in-process against transformer_lens.patching,
on the same bridge and machine, side by side in one run.

Two full grids of one IOI pair ("When Mary and John went to the store, John gave a drink to" vs
"..., Mary gave a drink to"; logit difference " Mary" - " John"), denoising:
- attn.hook_z by position: 30 layers x 9 heads x every position
  (TransformerLens: `get_act_patch_attn_head_out_by_pos`);
- hook_resid_pre: 30 layers x every position (`get_act_patch_resid_pre`).
Ours: `Patcher.patch` over the whole grid, the clean and corrupted runs included, median of
--repeats after one warm-up. TransformerLens runs one batch-1 forward per cell through the
bridge's hooks: it is timed on a seeded random sample of --sample cells of each grid (through
`index_df`) and its cells/s is the sample's; its clean cache is made once, outside the timing.
The sampled cells must agree (largest difference printed).

    .venv/bin/python benchmarks/bench_patching.py [--threads 1] [--sample 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import pandas as pd
import torch
import transformer_lens.patching as tlp

from patchscope_core import Engine, load_model
from patchscope_core.methods.patcher import Patcher
from patchscope_core.methods.patching import Pair, check_pair, make_cells

PAIR = Pair(
    "When Mary and John went to the store, John gave a drink to",
    "When Mary and John went to the store, Mary gave a drink to",
    " Mary",
    " John",
)
GRIDS = {
    "attn.hook_z by position": ("attn.hook_z", tlp.get_act_patch_attn_head_out_by_pos, ["layer", "pos", "head"]),
    "hook_resid_pre": ("hook_resid_pre", tlp.get_act_patch_resid_pre, ["layer", "pos"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bridge = load_model("smollm2-135m", device=args.device)
    engine = Engine(bridge, name="smollm2-135m")
    checked = check_pair(PAIR, engine.info)
    m = len(checked.clean_ids)
    clean = torch.tensor([checked.clean_ids], device=args.device)
    corrupted = torch.tensor([checked.corrupted_ids], device=args.device)

    def metric(logits):
        return logits[0, -1, checked.answer_ids[0]] - logits[0, -1, checked.wrong_id]

    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
    print(
        f"SmolLM2-135M on {args.device} ({platform.processor() or platform.machine()}, {args.threads} threads), "
        f"torch {torch.__version__}; IOI pair of {m} tokens; ours: median of {args.repeats}; "
        f"TransformerLens: {args.sample} sampled cells per grid"
    )
    print("| grid | cells | ours s | ours cells/s | TL cells/s (sample) | ratio | rows run / unchanged | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    rng = random.Random(0)
    for title, (site, fn, axes) in GRIDS.items():
        cells = make_cells(engine.info, m, [site], positions="each")
        patcher = Patcher(engine, batch_size=64)
        result = patcher.patch(PAIR, cells)  # warm-up; also the values compared below
        before = dict(engine.counts)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            patcher.patch(PAIR, cells)
            times.append(time.perf_counter() - t0)
        rows = (engine.counts["patch_rows"] - before.get("patch_rows", 0)) // args.repeats
        unchanged = (engine.counts["patch_unchanged"] - before.get("patch_unchanged", 0)) // args.repeats
        ours = statistics.median(times)
        pick = sorted(rng.sample(range(len(cells)), args.sample))
        index = [[c.layer, c.position] + ([c.head] if c.head is not None else []) for c in (cells[i] for i in pick)]
        df = pd.DataFrame(index, columns=axes)
        with torch.no_grad():
            t0 = time.perf_counter()
            want = fn(bridge, corrupted, clean_cache, metric, index_axis_names=None, index_df=df)
            tl = time.perf_counter() - t0
        diff = max(abs(result.cells[i].patched - float(w)) for i, w in zip(pick, want))
        ours_rate, tl_rate = len(cells) / ours, args.sample / tl
        print(
            f"| {title} | {len(cells)} | {ours:.2f} | {ours_rate:.0f} | {tl_rate:.1f} | {ours_rate / tl_rate:.1f}x | "
            f"{rows} / {unchanged} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
