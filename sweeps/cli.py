"""The `patchscope` command: models, inspect (one Patchscope), sweep, report."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from patchscope_core.models import ACCEPTED, ALIASES

    for alias, what in ALIASES.items():
        print(f"{alias:14s} {what}")
    print(f"\nAlso accepted: {ACCEPTED}.")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target, load_model, model_info, resolve
    from patchscope_core.mapping import Affine, Identity

    mapping = Affine.from_file(args.mapping) if args.mapping else Identity()
    spec = Patchscope(
        source=Source(args.source_prompt, args.source_layer, args.source_position, model=args.model),
        target=Target(args.target_prompt, args.target_layer, tuple(args.target_position), model=args.model),
        mapping=mapping,
        max_new_tokens=args.max_new_tokens,
    )
    info = model_info(args.model)
    resolve(spec, info, info)  # every input error surfaces here, before the weights load
    decoding = Decoding(
        do_sample=args.seed is not None, seed=args.seed, temperature=args.temperature, stop_at_eos=not args.no_stop_at_eos
    )
    model = load_model(args.model, device=args.device)
    (result,) = PatchscopeEngine(model, name=args.model, decoding=decoding).run([spec])
    if args.json:
        print(json.dumps(result.to_record()))
    else:
        tok = model.tokenizer
        src = [tok.decode([t]) for t in result.source_token_ids]
        print(f"source  [{args.model}] layer {args.source_layer}, position {result.source_position} "
              f"({src[result.source_position]!r}) of {src}")
        print(f"target  [{args.model}] layer {args.target_layer}, positions {result.target_positions}")
        print(f"first-token top-{len(result.top_token_ids)}: "
              + ", ".join(f"{tok.decode([t])!r} {lp:.2f}" for t, lp in zip(result.top_token_ids[:5], result.top_logprobs[:5])))
        print(f"generated: {result.generated_text!r}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from sweeps import driver

    return driver.main(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from sweeps import report

    return report.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchscope", description="Patchscopes at scale (Ghandeharioun et al., ICML 2024)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list model aliases").set_defaults(func=_cmd_models)

    i = sub.add_parser("inspect", help="run one Patchscope and print what the target generates")
    i.add_argument("--model", default="smollm2-135m")
    i.add_argument("--source-prompt", required=True)
    i.add_argument("--source-layer", type=int, required=True, help="layer l: residual stream after block l")
    i.add_argument("--source-position", type=int, default=-1, help="token index, BOS included; negative counts from the end")
    i.add_argument("--target-prompt", required=True)
    i.add_argument("--target-layer", type=int, required=True)
    i.add_argument("--target-position", type=int, nargs="+", default=[-1], help="one or more positions")
    i.add_argument("--max-new-tokens", type=int, default=20)
    i.add_argument("--mapping", help="affine map file (.safetensors or torch dict with W [d_target, d_source], b)")
    i.add_argument("--seed", type=int, help="sample with this seed (default: greedy)")
    i.add_argument("--temperature", type=float, default=1.0)
    i.add_argument("--no-stop-at-eos", action="store_true", help="always generate max-new-tokens tokens")
    i.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("sweep", help="run a sweep config on a Ray cluster")
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="print grid size, tasks and workers; compute nothing")
    s.add_argument("--address", help="join an existing Ray cluster (e.g. auto)")
    s.add_argument("--restart", action="store_true", help="ignore stored results and start over")
    s.set_defaults(func=_cmd_sweep)

    r = sub.add_parser("report", help="tables and plots from a sweep's stored results")
    r.add_argument("dir")
    r.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from patchscope_core import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:  # bad input only: one line naming the field; anything else is a bug
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
