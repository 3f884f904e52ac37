"""`patchscope patch`: activation patching of one clean/corrupted pair, the grid as one JSON object.

Everything is checked against the model's config and tokenizer (`patchscope_core.methods.patching`)
before the weights load; the grid then runs on `patchscope_core.methods.patcher.Patcher`.
"""

from __future__ import annotations

import argparse
import json
import math


def add_parser(sub) -> None:
    """Register `patch` on the `patchscope` command's subparsers."""
    a = sub.add_parser("patch", help="activation patching of one clean/corrupted prompt pair at a TransformerLens site")
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--clean", required=True, help="the clean prompt")
    a.add_argument("--corrupted", required=True, help="the corrupted prompt (the same number of tokens)")
    a.add_argument("--answer", required=True, help="the clean run's answer (e.g. ' Mary')")
    a.add_argument("--wrong-answer", help="the corrupted run's answer (needed by logit_diff)")
    a.add_argument(
        "--site",
        required=True,
        nargs="+",
        help="hook names inside a block: hook_resid_pre, attn.hook_z, ... or blocks.{layer}.attn.hook_z",
    )
    a.add_argument("--layer", nargs="+", default=["all"], help="layers (default all)")
    a.add_argument(
        "--position",
        nargs="+",
        default=["each"],
        help="each (a cell per position), all (every position at once), or positions (BOS counted)",
    )
    a.add_argument("--head", nargs="+", default=["all"], help="head sites: heads (default all)")
    a.add_argument("--window", type=int, default=1, help="patch this many layers centred on the layer")
    a.add_argument("--direction", nargs="+", default=["denoising"], choices=["denoising", "noising"])
    a.add_argument("--metric", nargs="+", default=["logit_diff"], choices=["logit_diff", "logprob", "prob", "kl"])
    a.add_argument("--max-new-tokens", type=int, default=0, help="also generate this many tokens under each patch")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(func=run)


def _words(words: list[str], field: str, named: tuple[str, ...]):
    from patchscope_core import InputError

    if len(words) == 1 and words[0] in named:
        return words[0]
    try:
        return [int(w) for w in words]
    except ValueError:
        raise InputError(f"{field}: expected integers or one of {', '.join(named)}; got {' '.join(words)!r}") from None


def run(args: argparse.Namespace) -> int:
    from patchscope_core import Engine, InputError, load_model, model_info
    from patchscope_core.methods.patcher import Patcher
    from patchscope_core.methods.patching import Pair, check_directions, check_metrics, check_pair, make_cells
    from patchscope_core.models import check_device

    pair = Pair(args.clean, args.corrupted, args.answer, args.wrong_answer)
    info = model_info(args.model)
    metrics = check_metrics(args.metric, "--metric")
    directions = check_directions(args.direction, "--direction")
    checked = check_pair(pair, info, metrics, "pair")
    if args.window < 1:
        raise InputError(f"--window: expected an integer >= 1, got {args.window}")
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens: expected an integer >= 0, got {args.max_new_tokens}")
    cells = make_cells(
        info,
        len(checked.clean_ids),
        args.site,
        _words(args.layer, "--layer", ("all",)),
        _words(args.position, "--position", ("each", "all")),
        _words(args.head, "--head", ("all",)),
        args.window,
        field_name="patching",
    )
    check_device(args.device, "--device")
    model = load_model(args.model, device=args.device)
    engine = Engine(model, name=args.model)
    result = Patcher(engine, batch_size=args.batch_size).patch(pair, cells, directions, metrics, args.max_new_tokens)
    tok = model.tokenizer
    words = [tok.decode([t]) for t in checked.clean_ids]
    out = {
        "model": args.model,
        "clean": pair.clean,
        "corrupted": pair.corrupted,
        "answer": pair.answer,
        "wrong_answer": pair.wrong_answer,
        "clean_tokens": words,
        "corrupted_tokens": [tok.decode([t]) for t in checked.corrupted_ids],
        "clean_value": result.clean_values,
        "corrupted_value": result.corrupted_values,
        "cells": [
            {
                "site": c.cell.hook(),
                "layer": c.cell.layer,
                "position": c.cell.position,
                "token": None if c.cell.position is None else words[c.cell.position],
                "head": c.cell.head,
                "window": c.cell.window,
                "direction": c.direction,
                "metric": c.metric,
                "patched": c.patched,
                "clean_value": c.clean_value,
                "corrupted_value": c.corrupted_value,
                "recovered": None if math.isnan(c.recovered) else c.recovered,
                **({"generated_text": c.generated_text} if args.max_new_tokens else {}),
            }
            for c in result.cells
        ],
        "counts": {k: v for k, v in engine.counts.items() if k.startswith("patch_")},
    }
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"pair     clean {words}\n         corrupted {out['corrupted_tokens']}")
    for m in metrics:
        print(f"{m:11s}clean {result.clean_values[m]:.4f}  corrupted {result.corrupted_values[m]:.4f}")
    top = sorted(out["cells"], key=lambda c: -abs(c["recovered"] or 0))[:15]
    print("cells with the largest |recovered|:")
    for c in top:
        head = "" if c["head"] is None else f" head {c['head']}"
        where = "all positions" if c["position"] is None else f"position {c['position']} ({c['token']!r})"
        print(
            f"  {c['direction']:9s} {c['metric']:10s} {c['site']}{head} {where}: patched {c['patched']:.4f}, "
            f"recovered {c['recovered']:.3f}"
            if c["recovered"] is not None
            else ""
        )
    return 0
