"""A small TopK SAE trained with sparsify on one layer of SmolLM2, its latents explained, for
RESULTS.md (issue 27 (c)), at the size the 2-core machine allows.

Corpus (offline): the distinct `prompt_source` snippets of the LRE attribute-extraction data
(`--corpus`: ../shared/data/lre-attribute-extraction where it exists, else the subset in
sweeps/examples/lre): short passages of web text naming people, places, companies and things,
packed into 64-token rows; `--corpus markdown` takes this repository's own Markdown instead. Activations: SmolLM2's `blocks.{layer}.hook_resid_post` (sparsify's `layers.{layer}`),
every token but BOS. The SAE is sparsify's `SparseCoder` trained on its own `forward` loss (FVU),
Adam, decoder rows kept at unit norm as sparsify does, saved with `save_to_disk` and explained
from that path by `explain_cells` (the sweep's worker operation) with the token-identity template
at the scales given (`chosen`: the rung the auto criterion picks). The latents explained are a
seeded random sample of the live ones (firing on at least 5 tokens), not the most active (those
are punctuation). Beside each latent: its top-activating tokens on the corpus, with their context.

    PYTHONPATH=$PWD python benchmarks/results_sae.py --layer 6 --tokens 120000 --latents 256
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LRE = [ROOT.parent / "shared" / "data" / "lre-attribute-extraction", ROOT / "sweeps" / "examples" / "lre"]
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\nX ->"


def main() -> None:
    from sparsify import SaeConfig, SparseCoder

    from patchscope_core import Decoding, PatchscopeEngine, load_model
    from patchscope_core.methods import directions as D
    from patchscope_core.models import Site, resolve_site

    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--corpus", default=None, help="an LRE data directory, or 'markdown'")
    ap.add_argument("--write", choices=["replace", "add"], default="replace")
    ap.add_argument("--show", type=int, default=24, help="latents shown in the table (those named first)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    engine = PatchscopeEngine(load_model("smollm2-135m", device="cpu"), name="smollm2-135m", decoding=Decoding())
    tok = engine.model.tokenizer
    text, corpus = corpus_text(args.corpus)
    ids = tok(text, add_special_tokens=False)["input_ids"][: args.tokens]
    bos = (tok.bos_token_id,) if engine.info.prepend_bos else ()
    rows = [bos + tuple(ids[i : i + 64]) for i in range(0, len(ids) - 63, 64)]
    site = resolve_site(Site(f"blocks.{args.layer}.hook_resid_post"), engine.info)
    values = engine.reader.read([site], rows, purpose="sae corpus", keep=False)
    x = torch.cat([values[(site.site.hook, r)][len(bos) :] for r in rows]).float()
    tokens = [t for r in rows for t in r[len(bos) :]]

    sae = SparseCoder(576, SaeConfig(num_latents=args.width, k=args.k))
    sae.b_dec.data = x.mean(0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(args.steps):
        batch = x[torch.randint(len(x), (1024,))]
        out = sae(batch)
        opt.zero_grad()
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        fvu = float(sae(x).fvu)
        enc = sae.encode(x)
    folder = Path(tempfile.mkdtemp()) / f"layers.{args.layer}"
    sae.save_to_disk(folder)

    acts = torch.zeros(len(x), args.width)
    acts.scatter_(1, enc.top_indices, enc.top_acts.float())
    fires = (acts > 0).sum(0)
    alive = [int(i) for i in range(args.width) if fires[i] >= 5]
    latents = sorted(random.Random(0).sample(alive, min(args.latents, len(alive))))
    top_tokens, contexts = {}, {}
    for i in latents:
        best = acts[:, i].topk(8).indices.tolist()
        top_tokens[i] = list(dict.fromkeys(tok.decode([tokens[j]]) for j in best))[:5]
        j = best[0]
        contexts[i] = tok.decode(tokens[max(0, j - 6) : j]) + "[" + tok.decode([tokens[j]]) + "]"

    payload = {
        "source": {"source": "sae", "sae": {"path": str(folder), "hookpoint": f"layers.{args.layer}"}},
        "templates": [IDENTITY],
        "write": args.write,
        "max_new_tokens": 6,
        "logit_lens_k": 5,
        "cells": [
            {"source": "sae", "feature": i, "site": site.site.hook, "template": 0, "scale": s}
            for i in latents
            for s in args.scales
        ],
    }
    records = D.explain_cells(engine, payload, batch_size=32)
    chosen = [(c, r) for c, r in zip(payload["cells"], records) if r["chosen"]]
    names_top = [D.mentions(r["generated_text"], top_tokens[c["feature"]], IDENTITY) for c, r in chosen]
    print(
        f"SAE: sparsify SparseCoder 576 -> {args.width}, k {args.k}, trained {args.steps} steps on {len(x)} tokens "
        f"of layer {args.layer} ({corpus}); FVU {fvu:.3f}; {len(alive)} latents alive (>= 5 tokens); {len(latents)} "
        f"of them, a seeded random sample, explained at scales {args.scales} (token-identity template, write: {args.write}, chosen per latent)\n"
    )
    print(
        f"Chosen explanation names one of the latent's top-activating tokens: {sum(names_top)}/{len(chosen)}; "
        f"names one of its logit-lens tokens: {sum(r['matches_logit_lens'] for _, r in chosen)}/{len(chosen)}\n"
    )
    by_scale = {}
    for c, _ in chosen:
        by_scale[c["scale"]] = by_scale.get(c["scale"], 0) + 1
    print(f"Chosen scales: {dict(sorted(by_scale.items()))}\n")
    print("| latent | fires on (tokens) | top-activating tokens | its top context | explanation | logit lens |")
    print("|---|---|---|---|---|---|")
    hits = [x for x in zip(chosen, names_top) if x[1]]
    shown = (hits + [x for x in zip(chosen, names_top) if not x[1]])[: args.show]
    for (c, r), hit in shown:
        text = re.sub(r"\s+", " ", r["generated_text"]).replace("|", "/")
        lens = ", ".join(repr(t) for t in r["logit_lens_tokens"][:3])
        top = ", ".join(repr(t) for t in top_tokens[c["feature"]])
        print(
            f"| {c['feature']} | {int(fires[c['feature']])} | {top} | {contexts[c['feature']]!r} | {text!r}{' (names one)' if hit else ''} | {lens} |"
        )
    print(f"\n(computed in {time.perf_counter() - t0:.0f} s on the CPU)")


def corpus_text(corpus: str | None) -> tuple[str, str]:
    """(the corpus as one text, what it is)."""
    if corpus == "markdown":
        paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
        return "\n".join(p.read_text() for p in paths), "this repository's Markdown"
    root = Path(corpus) if corpus else next(p for p in LRE if p.is_dir())
    snippets = {}
    for path in sorted(root.glob("*/*.tsv")):
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                snippets.setdefault(row["prompt_source"].strip(), None)
    return "\n".join(snippets), f"{len(snippets):,} distinct LRE source snippets from {root.name}"


if __name__ == "__main__":
    main()
