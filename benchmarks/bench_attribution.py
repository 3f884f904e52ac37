"""Speed of attribution patching on SmolLM2-135M and the IOI pairs, side by side in one run.

- forward: one batched no-grad forward of all pairs' corrupted prompts (the unit of
  "forward-pass equivalents");
- AtP: `Attributor.attribute` over every node of every site (attn.hook_z/q/k/v, hook_attn_out,
  hook_mlp_out, mlp.hook_post, hook_resid_pre; every layer, every position), pairs batched;
- AtP*: the same with method atp_star (QK fix + GradDrop);
- exact: `Patcher.patch` of the attn.hook_z head x position grid, on --exact pairs;
- TransformerLens `attribution_patch` (node granularity: hook_z and mlp_out), one pair at a time,
  on --tl pairs.
Medians of --repeats (exact and TL: once, per pair).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_attribution.py
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

from patchscope_core import Engine, load_model
from patchscope_core.methods.attribution import Attributor
from patchscope_core.methods.patcher import Patcher
from patchscope_core.methods.patching import Pair, check_pair, make_cells

SITES = [
    "attn.hook_z",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "hook_attn_out",
    "hook_mlp_out",
    "mlp.hook_post",
    "hook_resid_pre",
]
PAIRS = Path(__file__).resolve().parents[1] / "sweeps" / "examples" / "ioi_pairs.csv"


def pairs() -> list[Pair]:
    with open(PAIRS) as f:
        return [Pair(r["clean"], r["corrupted"], r["answer"], r["wrong_answer"]) for r in csv.DictReader(f)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--exact", type=int, default=2)
    ap.add_argument("--tl", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bridge = load_model("smollm2-135m", device="cpu")
    engine = Engine(bridge, name="smollm2-135m")
    ps = pairs()
    n = len(ps)
    att = Attributor(engine, batch_size=64)
    checked = [check_pair(p, engine.info) for p in ps]
    by_len: dict[int, list] = {}
    for c in checked:
        by_len.setdefault(len(c.corrupted_ids), []).append(list(c.corrupted_ids))

    def forward():
        with torch.no_grad():
            for rows in by_len.values():
                engine.modules(input_ids=torch.tensor(rows), use_cache=False, logits_to_keep=1)

    att.attribute(ps[:2], SITES)  # warm-up
    fwd = timed(forward, args.repeats)
    atp = timed(lambda: att.attribute(ps, SITES), args.repeats)
    star = timed(lambda: att.attribute(ps, SITES, method="atp_star"), args.repeats)
    exact = []
    for p, c in zip(ps[: args.exact], checked):
        cells = make_cells(engine.info, len(c.clean_ids), ["attn.hook_z"], positions="each")
        exact.append(timed(lambda: Patcher(engine, batch_size=64).patch(p, cells), 1))
    tl = []
    for c in checked[: args.tl]:

        def metric(logits, c=c):
            return logits[0, -1, c.answer_ids[0]] - logits[0, -1, c.wrong_id]

        tl.append(
            timed(
                lambda: attribution_patch(bridge, torch.tensor([c.clean_ids]), torch.tensor([c.corrupted_ids]), metric),
                1,
            )
        )
    per = lambda t: t / n  # noqa: E731
    print(
        f"SmolLM2-135M, cpu, {args.threads} thread(s), torch {torch.__version__}; {n} IOI pairs "
        f"({len(by_len)} token lengths); medians of {args.repeats}"
    )
    print("| what | s per pair | forward-pass equivalents | ratio |")
    print("|---|---|---|---|")
    print(f"| forward (batched, no grad) | {per(fwd):.4f} | 1 | |")
    print(f"| AtP, every node of {len(SITES)} sites | {per(atp):.4f} | {atp / fwd:.1f} | |")
    print(
        f"| AtP* (QK fix + GradDrop), same nodes | {per(star):.4f} | {star / fwd:.1f} | (layers + 4 = {engine.info.n_layers + 4}) |"
    )
    ex = statistics.median(exact)
    print(
        f"| exact patching, attn.hook_z x position grid ({args.exact} pairs) | {ex:.3f} | {ex / per(fwd):.0f} | "
        f"AtP {ex / per(atp):.0f}x less time, AtP* {ex / per(star):.1f}x |"
    )
    t = statistics.median(tl)
    print(
        f"| TransformerLens attribution_patch, one pair at a time ({args.tl} pairs) | {t:.3f} | {t / per(fwd):.1f} | "
        f"AtP {t / per(atp):.1f}x less time |"
    )


if __name__ == "__main__":
    main()
