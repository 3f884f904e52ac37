"""Explaining SAE latents on SmolLM2: cells/s of `explain_cells` (batched, with every measure)
against one plain Hugging Face `generate` per cell (a forward hook writing the same vector at the
placeholder in the prefill, no measures).

An SAE of `--latents` latents for layers.12 is built with sparsify's own classes (random decoder
rows: throughput does not depend on what they mean), saved with `save_to_disk` and loaded by
path as a sweep's worker would. Cells: latents x 3 scales x the token-identity template, 16 new
tokens, no stop at EOS (both sides generate every token). The baseline runs `--baseline-cells`
of the same cells one at a time and its rate is per cell, so the two rates compare directly.

    PYTHONPATH=$PWD python benchmarks/bench_explanation.py --latents 1024 --baseline-cells 48
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import smollm2_and_plain_hf  # noqa: E402

TEMPLATE = "cat -> cat\n1135 -> 1135\nhello -> hello\nX ->"
SCALES = (1.0, 4.0, 16.0)


def main() -> None:
    from sparsify import SaeConfig, SparseCoder

    from patchscope_core import Decoding, PatchscopeEngine
    from patchscope_core.methods import directions as D

    def extra(ap):
        ap.add_argument("--latents", type=int, default=1024)
        ap.add_argument("--baseline-cells", type=int, default=48)
        ap.add_argument("--batch-size", type=int, default=32)

    args, bridge, plain, device = smollm2_and_plain_hf(__doc__, extra)
    engine = PatchscopeEngine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    torch.manual_seed(0)
    sae = SparseCoder(576, SaeConfig(num_latents=max(args.latents, 1024), k=32))
    sae.W_dec.data = torch.randn_like(sae.W_dec)
    folder = Path(tempfile.mkdtemp()) / "layers.12"
    sae.save_to_disk(folder)
    site = "blocks.12.hook_resid_post"
    cells = [
        {"source": "sae", "feature": i, "feature_site": site, "site": site, "template": 0, "scale": s}
        for i in range(args.latents)
        for s in SCALES
    ]
    payload = {
        "source": {"source": "sae", "sae": {"path": str(folder), "hookpoint": "layers.12"}},
        "templates": [TEMPLATE],
        "write": "replace",
        "max_new_tokens": args.new_tokens,
        "logit_lens_k": 5,
    }
    D.explain_cells(engine, {**payload, "cells": cells[:4]}, args.batch_size)  # warm-up, loads the SAE
    t0 = time.perf_counter()
    records = D.explain_cells(engine, {**payload, "cells": cells}, args.batch_size)
    ours = time.perf_counter() - t0
    assert len(records) == len(cells)

    ids, positions = D.placeholders(engine.info, TEMPLATE, "template")
    norm = records[0]["site_norm"]
    w = sae.W_dec.detach()
    x = torch.tensor([ids], device=device)

    def one(cell) -> list[int]:
        v = (w[cell["feature"]] / w[cell["feature"]].norm() * cell["scale"] * norm).to(device)
        calls = []

        def write(mod, a, out):
            calls.append(1)
            if len(calls) > 1:
                return out
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, list(positions)] = v
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

        handle = plain.model.layers[12].register_forward_hook(write)
        try:
            seq = plain.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=bridge.tokenizer.pad_token_id,
            )
        finally:
            handle.remove()
        return seq[0, len(ids) :].tolist()

    baseline = cells[: args.baseline_cells]
    one(baseline[0])  # warm-up
    t0 = time.perf_counter()
    same = sum(one(c) == r["generated_token_ids"] for c, r in zip(baseline, records))
    base_s = time.perf_counter() - t0
    rate, base_rate = len(cells) / ours, len(baseline) / base_s
    print(
        f"{args.latents} latents x {len(SCALES)} scales = {len(cells)} cells, batch {args.batch_size}: "
        f"{ours:.1f} s, {rate:.2f} cells/s with self-similarity, entropy, relevancy and the logit lens"
    )
    print(
        f"one plain HF generate per cell ({len(baseline)} cells, generation only): {base_s:.1f} s, "
        f"{base_rate:.2f} cells/s; ratio {rate / base_rate:.2f}x; "
        f"{same} of {len(baseline)} generations token-for-token equal"
    )


if __name__ == "__main__":
    main()
