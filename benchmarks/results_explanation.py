"""Self-explanation of directions on SmolLM2-135M, for RESULTS.md (issue 27), at a reduced size.

(a) Planted directions: the layer-l residual of single-token words (the list below, then the
    single-token objects and subjects of the LRE data: cities, sports, colours, tools, ...) at the
    end of a neutral context, used as vectors and written at the token-identity template's placeholder at three
    scales: the share of explanations that name the word, per layer and scale, beside the
    paper's token-identity Patchscope on the same words (h written as it is at the target's last
    position, same layer) and beside the norm-matched random control.
(b) MLP neurons: the neurons of largest output norm (|W_out row|) at three depths, explained with
    SelfIE's template on the auto ladder: how often the chosen explanation names one of the
    neuron's logit-lens top tokens, what `auto` chose, and examples.

Prints Markdown.

    PYTHONPATH=$PWD python benchmarks/results_explanation.py --words 200 --layers 3 9 --neurons 64
"""

from __future__ import annotations

import argparse
import collections
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LRE = [ROOT.parent / "shared" / "data" / "lre-attribute-extraction", ROOT / "sweeps" / "examples" / "lre"]

IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\nX ->"
IDENTITY_TARGET = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
SELFIE = 'What is the meaning of the word "X"? The meaning of the word "X" is "'
CONTEXT = "Here is one word:"
WORDS = (
    "dog house water king music river money table school paper friend city light night horse garden "
    "window doctor family winter summer doll apple bread chair green ocean mountain teacher forest "
    "coffee island bridge guitar rabbit silver letter flower mirror castle planet engine pencil "
    "camera tiger orange village hospital sugar butter"
).split()


def lre_words() -> list[str]:
    """The LRE data's objects and subjects (`load_lre`, every relation) that are one plain word
    (letters only, 3 or more), in a seeded order."""
    from patchscope_core.recipes import load_lre

    root = next(p for p in LRE if p.is_dir())
    rows = load_lre(root, sorted({p.stem for p in root.glob("*/*.tsv")}), contexts=10**9)
    found = {w: None for r in rows for w in (r["object"].strip(), r["subject"].strip())}
    words = sorted(w for w in found if w.isalpha() and w.isascii() and len(w) >= 3)
    random.Random(0).shuffle(words)
    return words


def names(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}s?\b", text, flags=re.IGNORECASE) is not None


def main() -> None:
    from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target, load_model
    from patchscope_core.methods import directions as D
    from patchscope_core.models import Site, resolve_site, tokenize

    ap = argparse.ArgumentParser()
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 9])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--neurons", type=int, default=8)
    ap.add_argument("--neuron-layers", type=int, nargs="+", default=[6, 15, 24])
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--skip-planted", action="store_true", help="(b) only")
    ap.add_argument(
        "--neuron-scales", type=float, nargs="+", default=None, help="(b)'s rungs (default: the auto ladder)"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = PatchscopeEngine(load_model("smollm2-135m", device="cpu"), name="smollm2-135m", decoding=Decoding())
    info = engine.info
    ctx_len = len(tokenize(info, CONTEXT))
    candidates = list(dict.fromkeys([*WORDS, *lre_words()]))
    words = [w for w in candidates if len(tokenize(info, f"{CONTEXT} {w}")) == ctx_len + 1][: args.words]

    if not args.skip_planted:  # (a) planted directions
        rows = [tokenize(info, f"{CONTEXT} {w}") for w in words]
        sites = {l: resolve_site(Site(f"blocks.{l}.hook_resid_post"), info) for l in args.layers}
        values = engine.reader.read(list(sites.values()), rows, purpose="planted", keep=False)
        vectors = {(w, l): values[(sites[l].site.hook, r)][-1] for w, r in zip(words, rows) for l in args.layers}
        torch_vectors = {f"{w}@{l}": v for (w, l), v in vectors.items()}
        cells = [
            {"source": "vector", "feature": f"{w}@{l}", "site": sites[l].site.hook, "template": 0, "scale": s}
            for l in args.layers
            for w in words
            for s in args.scales
        ]
        cells += [
            {"source": "control", "feature": "random", "site": sites[l].site.hook, "template": 0, "scale": s}
            for l in args.layers
            for s in args.scales
        ]
        from safetensors.torch import save_file

        file = Path(tempfile.mkdtemp()) / "planted.safetensors"
        save_file({k: v.contiguous() for k, v in torch_vectors.items()}, str(file))
        payload = {"source": {"source": "vector", "file": str(file), "seed": 0}, "templates": [IDENTITY]}
        payload.update(write="replace", max_new_tokens=args.new_tokens, logit_lens_k=5, cells=cells)
        records = D.explain_cells(engine, payload, batch_size=32)
        share = collections.defaultdict(list)
        control = {}
        for c, r in zip(cells, records):
            layer = int(c["site"].split(".")[1])
            if c["source"] == "control":
                control[(layer, c["scale"])] = r["generated_text"]
                continue
            share[(layer, c["scale"])].append(names(r["generated_text"], c["feature"].split("@")[0]))
        scopes = [
            Patchscope(
                Source(f"{CONTEXT} {w}", l, -1), Target(IDENTITY_TARGET, l, (-1,)), max_new_tokens=args.new_tokens
            )
            for l in args.layers
            for w in words
        ]
        ps = engine.run(scopes, batch_size=32)
        ps_share = collections.defaultdict(list)
        for s, r in zip(scopes, ps):
            ps_share[s.source.layer].append(names(r.generated_text, s.source.prompt.split()[-1]))
        control_hits = {k: any(names(t, w) for w in words) for k, t in control.items()}
        print(f"### (a) Planted directions: {len(words)} words, layers {args.layers}, scales {args.scales}\n")
        print(
            "| layer | "
            + " | ".join(f"explanation, scale {s:g}" for s in args.scales)
            + " | token-identity Patchscope | the vector's logit-lens top-5 |"
        )
        print("|---" * (len(args.scales) + 3) + "|")
        lens = collections.defaultdict(list)  # the logit lens of the written direction names the word
        for c, r in zip(cells, records):
            if c["source"] == "vector" and c["scale"] == args.scales[0]:
                word = c["feature"].split("@")[0]
                lens[int(c["site"].split(".")[1])].append(any(names(t, word) for t in r["logit_lens_tokens"]))
        for l in args.layers:
            cols = [f"{sum(share[(l, s)])}/{len(share[(l, s)])}" for s in args.scales]
            print(
                f"| {l} | "
                + " | ".join(cols)
                + f" | {sum(ps_share[l])}/{len(ps_share[l])} | {sum(lens[l])}/{len(lens[l])} |"
            )
        print(
            "\nRandom control (norm-matched, same template and scales): "
            + "; ".join(
                f"layer {l} scale {s:g}: {control[(l, s)]!r}" + (" (names a word)" if control_hits[(l, s)] else "")
                for l in args.layers
                for s in args.scales
            )
        )
        agree = [
            (a == b)
            for l in args.layers
            for a, b in zip(
                [
                    names(r["generated_text"], c["feature"].split("@")[0])
                    for c, r in zip(cells, records)
                    if c["source"] == "vector" and c["scale"] == 1.0 and c["site"] == sites[l].site.hook
                ],
                [
                    names(r.generated_text, s.source.prompt.split()[-1])
                    for s, r in zip(scopes, ps)
                    if s.source.layer == l
                ],
            )
        ]
        print(
            f"\nPer word at scale 1, explanation and Patchscope agree (both name it or both miss) on {sum(agree)}/{len(agree)}."
        )
        examples = [(c, r) for c, r in zip(cells, records) if c["source"] == "vector" and c["scale"] == 1.0][:6]
        print("\nExamples (scale 1): " + "; ".join(f"`{c['feature']}` -> {r['generated_text']!r}" for c, r in examples))

    # (b) neurons
    ncells = []
    ladder = tuple(args.neuron_scales or D.AUTO_LADDER)
    for l in args.neuron_layers:
        w_out = D.neuron_directions(engine, l)
        top = w_out.norm(dim=-1).topk(args.neurons).indices.tolist()
        ncells += [
            {
                "source": "neuron",
                "feature": i,
                "feature_layer": l,
                "site": f"blocks.{l}.hook_resid_post",
                "template": 0,
                "scale": s,
            }
            for i in top
            for s in ladder
        ]
    npayload = {"source": {"source": "neuron"}, "templates": [SELFIE], "write": "replace", "max_new_tokens": 8}
    nrec = D.explain_cells(engine, {**npayload, "logit_lens_k": 5, "cells": ncells}, batch_size=32)
    chosen = [(c, r) for c, r in zip(ncells, nrec) if r["chosen"]]
    any_rung = collections.defaultdict(bool)
    for c, r in zip(ncells, nrec):
        any_rung[(c["feature_layer"], c["feature"])] |= r["matches_logit_lens"]
    print(
        f"\n### (b) MLP neurons: the {args.neurons} of largest |W_out row| at layers {args.neuron_layers}, SelfIE template, "
        f"{'the auto ladder ' if ladder == D.AUTO_LADDER else ''}{', '.join(f'{x:g}' for x in ladder)}\n"
    )
    print("| layer | chosen explanation names a logit-lens top-5 token | any rung does | chosen scales |")
    print("|---|---|---|---|")
    for l in args.neuron_layers:
        mine = [(c, r) for c, r in chosen if c["feature_layer"] == l]
        hits = sum(r["matches_logit_lens"] for _, r in mine)
        anyr = sum(v for (ll, _), v in any_rung.items() if ll == l)
        scales = collections.Counter(c["scale"] for c, _ in mine)
        print(
            f"| {l} | {hits}/{len(mine)} | {anyr}/{len(mine)} | "
            + ", ".join(f"{s:g}: {n}" for s, n in sorted(scales.items()))
            + " |"
        )
    print("\n| neuron | chosen scale | self-sim | entropy | relevancy | explanation | logit-lens top-5 |")
    print("|---|---|---|---|---|---|---|")
    named = [(c, r) for c, r in chosen if r["matches_logit_lens"]][:5]
    rest = [x for x in chosen if not x[1]["matches_logit_lens"]]
    for c, r in named + rest[:: max(1, len(rest) // (10 - len(named)))][: 10 - len(named)]:
        toks = ", ".join(repr(t) for t in r["logit_lens_tokens"])
        text = r["generated_text"].replace("|", "/").replace("\n", " ")
        print(
            f"| L{c['feature_layer']}N{c['feature']} | {c['scale']:g} | {r['self_similarity']:.2f} | {r['entropy']:.2f} | "
            f"{r['relevancy']:.2f} | {text!r} | {toks} |"
        )
    print(f"\n(computed in {time.perf_counter() - t0:.0f} s on the CPU)")


if __name__ == "__main__":
    main()
