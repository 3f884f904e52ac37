"""The `patchscope` command: models, inspect (one Patchscope), intervene (one run with an
intervention), patch (activation patching of one pair, `cli_patch.py`), sweep, report."""

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
    from patchscope_core import (
        Decoding,
        InputError,
        Patchscope,
        PatchscopeEngine,
        Source,
        Target,
        load_model,
        model_info,
        resolve,
    )
    from patchscope_core.base.values import check_seed, number_problem
    from patchscope_core.methods.mapping import Affine, Identity
    from patchscope_core.models import check_device

    if args.seed is not None:
        check_seed(args.seed, "--seed")
    problem = number_problem(args.temperature, positive=True)
    if problem:
        raise InputError(f"--temperature: {problem}")
    mapping = Affine.from_file(args.mapping) if args.mapping else Identity()
    spec = Patchscope(
        source=Source(args.source_prompt, args.source_layer, args.source_position, model=args.model),
        target=Target(args.target_prompt, args.target_layer, tuple(args.target_position), model=args.model),
        mapping=mapping,
        max_new_tokens=args.max_new_tokens,
    )
    info = model_info(args.model)
    resolve(spec, info, info)  # every input error surfaces here, before the weights load
    check_device(args.device, "--device")
    decoding = Decoding(
        do_sample=args.seed is not None,
        seed=args.seed,
        temperature=args.temperature,
        stop_at_eos=not args.no_stop_at_eos,
    )
    model = load_model(args.model, device=args.device)
    (result,) = PatchscopeEngine(model, name=args.model, decoding=decoding).run([spec])
    if args.json:
        print(json.dumps(result.to_record()))
    else:
        tok = model.tokenizer
        src = [tok.decode([t]) for t in result.source_token_ids]
        print(
            f"source  [{args.model}] layer {args.source_layer}, position {result.source_position} "
            f"({src[result.source_position]!r}) of {src}"
        )
        print(f"target  [{args.model}] layer {args.target_layer}, positions {result.target_positions}")
        print(
            f"first-token top-{len(result.top_token_ids)}: "
            + ", ".join(f"{tok.decode([t])!r} {lp:.2f}" for t, lp in zip(result.top_token_ids, result.top_logprobs))
        )
        print(f"generated: {result.generated_text!r}")
    return 0


def _read_prompts(path: str | None, field: str) -> tuple[str, ...]:
    from pathlib import Path

    from patchscope_core import InputError
    from patchscope_core.base.textfiles import read_lines

    if path is None:
        return ()
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{field}: no such file {path!r}")
    return tuple(read_lines(p, field))


def _kind(args: argparse.Namespace):
    """The intervention kind from the options; an option the kind does not take is an error."""
    from dataclasses import fields

    from patchscope_core import KINDS, InputError
    from patchscope_core.base.values import check_seed
    from patchscope_core.interventions import load_vector

    cls = KINDS[args.kind]
    given = {
        "vector": ("--vector", lambda: load_vector(args.vector, "--vector") if args.vector else None),
        "alpha": ("--alpha", lambda: args.alpha),
        "factor": ("--factor", lambda: args.factor),
        "source": ("--source-prompt", lambda: args.source_prompt),
        "source_position": ("--source-position", lambda: args.source_position),
        "reference": (
            "--reference-prompts",
            lambda: _read_prompts(args.reference_prompts, "--reference-prompts") or None,
        ),
        "positive": ("--positive-prompts", lambda: _read_prompts(args.positive_prompts, "--positive-prompts") or None),
        "negative": ("--negative-prompts", lambda: _read_prompts(args.negative_prompts, "--negative-prompts") or None),
        "scale": ("--noise-scale", lambda: args.noise_scale),
        "seed": ("--seed", lambda: None if args.seed is None else check_seed(args.seed, "--seed")),
        "from_": ("--from", lambda: _words(args.from_) if args.from_ else None),
        "to": ("--to", lambda: _words(args.to) if args.to else None),
        "subject": ("--subject", lambda: args.subject),
        # --head: the heads of a kind on attention edges; else the site's (`_site`)
        "heads": ("--head", lambda: tuple(args.head) if args.head and cls.edits_attention else None),
        "window": ("--layers", lambda: _layer_range(args.layers)[1] if args.layers else None),
    }
    takes = {f.name for f in fields(cls)}
    values = {}
    for name, (option, read) in given.items():
        value = read()
        if value is None:
            continue
        if name not in takes:
            raise InputError(
                f"{option}: not used by --kind {args.kind} (it takes {', '.join(sorted(takes)) or 'nothing'})"
            )
        values[name] = value
    return cls(**values)


def _cmd_intervene(args: argparse.Namespace) -> int:
    from patchscope_core import (
        KINDS,
        Decoding,
        Engine,
        Intervention,
        InterventionRun,
        Positions,
        load_model,
        model_info,
    )
    from patchscope_core.interventions import resolve_run
    from patchscope_core.models import check_device

    site = _site(args)
    words = args.positions
    positions = Positions.parse(
        words[0] if len(words) == 1 and not words[0].lstrip("-").isdigit() else _ints(words, "--positions"),
        "--positions",
    )
    run = InterventionRun(
        args.prompt,
        (Intervention(site, _kind(args), positions),),
        answer=args.answer,
        max_new_tokens=args.max_new_tokens,
    )
    resolve_run(run, model_info(args.model), "run")  # every input error surfaces here, before the weights load
    check_device(args.device, "--device")
    model = load_model(args.model, device=args.device)
    engine = Engine(model, name=args.model, decoding=Decoding(stop_at_eos=not args.no_stop_at_eos))
    (result,) = engine.run([run])
    if args.json:
        print(json.dumps(result.to_record()))
        return 0
    tok = model.tokenizer
    where = (
        f"from {' '.join(args.from_ or ['last'])} to {' '.join(args.to or [])} layers {args.layers}"
        if KINDS[args.kind].edits_attention
        else f"positions {positions}"
    )
    print(f"intervention  {args.kind} at {site} {where} on {args.model}")
    print(f"prompt        {[tok.decode([t]) for t in result.prompt_token_ids]}")
    print(f"generated     {result.generated_text!r}")
    print(f"clean         {result.clean_generated_text!r}")
    if result.answer_logprob is not None:
        print(
            f"answer        {args.answer!r}: log p = {result.answer_logprob:.3f} (clean {result.clean_answer_logprob:.3f}, "
            f"delta {result.answer_logprob - result.clean_answer_logprob:+.3f}); "
            f"p(first token) = {result.p_answer:.4f} (clean {result.p_answer_clean:.4f})"
        )
    return 0


def _site(args: argparse.Namespace):
    """--site, or for a kind that edits attention edges (`edits_attention`: knockout)
    blocks.{l}.attn at the centre of --layers (a..b or l)."""
    from patchscope_core import KINDS, InputError, Site

    if KINDS[args.kind].edits_attention:
        if args.site is not None or not args.layers:
            raise InputError(f"--layers: a {args.kind} takes --layers (a..b or l) instead of --site")
        return Site(f"blocks.{_layer_range(args.layers)[0]}.attn")
    if args.site is None:
        raise InputError("--site: required (a TransformerLens hook name)")
    if args.layers:
        takers = ", ".join(name for name, kind in KINDS.items() if kind.edits_attention)
        raise InputError(f"--layers: not used by --kind {args.kind} (only {takers} takes it)")
    return Site(args.site, head=tuple(args.head or ()), neuron=tuple(args.neuron or ()))


def _layer_range(text: str) -> tuple[int, int]:
    """(centre, window) of a layer range a..b (ROME's and Geva's window centred on the layer)."""
    from patchscope_core import InputError

    a, _, b = text.partition("..")
    try:
        first, last = int(a), int(b or a)
    except ValueError:
        raise InputError(f"--layers: expected a..b or one layer, got {text!r}") from None
    if last < first or first < 0:
        raise InputError(f"--layers: expected 0 <= a <= b, got {text!r}")
    window = last - first + 1
    return first + window // 2, window


def _words(words: list[str]) -> tuple:
    """Positions as words and integers: last, generated, subject, 3, -1, ..."""
    return tuple(int(w) if w.lstrip("-").isdigit() else w for w in words)


def _ints(words: list[str], field: str) -> list[int]:
    from patchscope_core import InputError

    try:
        return [int(w) for w in words]
    except ValueError:
        raise InputError(
            f"{field}: expected integers, or one of all, prompt, generated; got {' '.join(words)!r}"
        ) from None


def _cmd_sweep(args: argparse.Namespace) -> int:
    from sweeps.run import driver

    return driver.main(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from sweeps.sinks import report

    return report.main(args)


def _run_options(p: argparse.ArgumentParser) -> None:
    """What every command that runs a model takes last."""
    p.add_argument("--no-stop-at-eos", action="store_true", help="always generate max-new-tokens tokens")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_inspect(sub) -> None:
    """`patchscope inspect`: one Patchscope, printed."""
    i = sub.add_parser("inspect", help="run one Patchscope and print what the target generates")
    i.add_argument("--model", default="smollm2-135m")
    i.add_argument("--source-prompt", required=True)
    i.add_argument("--source-layer", type=int, required=True, help="layer l: residual stream after block l")
    i.add_argument(
        "--source-position", type=int, default=-1, help="token index, BOS included; negative counts from the end"
    )
    i.add_argument("--target-prompt", required=True)
    i.add_argument("--target-layer", type=int, required=True)
    i.add_argument("--target-position", type=int, nargs="+", default=[-1], help="one or more positions")
    i.add_argument("--max-new-tokens", type=int, default=20)
    i.add_argument("--mapping", help="affine map file (.safetensors or torch dict with W [d_target, d_source], b)")
    i.add_argument("--seed", type=int, help="sample with this seed (default: greedy)")
    i.add_argument("--temperature", type=float, default=1.0)
    _run_options(i)
    i.set_defaults(func=_cmd_inspect)


def _add_intervene(sub) -> None:
    """`patchscope intervene`: one intervention; --kind offers the core's KINDS."""
    from patchscope_core import KINDS as INTERVENTION_KINDS

    v = sub.add_parser("intervene", help="generate and score one prompt with an intervention at a TransformerLens site")
    v.add_argument("--model", default="smollm2-135m")
    v.add_argument("--prompt", required=True)
    v.add_argument("--site", help="a TransformerLens hook name, e.g. blocks.8.attn.hook_z")
    v.add_argument("--head", type=int, nargs="+", help="attn.hook_z, knockout: the heads to act on (default all)")
    v.add_argument("--neuron", type=int, nargs="+", help="mlp.hook_post: the neurons to act on (default all)")
    v.add_argument("--kind", required=True, choices=list(INTERVENTION_KINDS))
    v.add_argument(
        "--positions",
        nargs="+",
        default=["all"],
        help="prompt positions (BOS counted; negatives from the end), or all | prompt | generated (default all)",
    )
    v.add_argument("--vector", help="replace/add: a [d] tensor (.safetensors or .pt)")
    v.add_argument("--alpha", type=float, help="add: alpha x vector")
    v.add_argument("--factor", type=float, help="scale: the factor")
    v.add_argument("--source-prompt", help="replace/resample: read the same site in this prompt")
    v.add_argument("--source-position", type=int, help="replace: the source prompt's position (default -1)")
    v.add_argument("--reference-prompts", help="mean/noise: a file of prompts, one a line (the mean, the std)")
    v.add_argument("--positive-prompts", help="add: a file of prompts whose mean minus ...")
    v.add_argument("--negative-prompts", help="... these prompts' mean is the vector")
    v.add_argument("--noise-scale", type=float, help="noise: x the site's std over the reference prompts (default 3)")
    v.add_argument("--seed", type=int, help="noise: the seed (default 0)")
    v.add_argument(
        "--from", dest="from_", nargs="+", help="knockout: the queries: last, generated, positions (default last)"
    )
    v.add_argument("--to", nargs="+", help="knockout: the keys: positions, subject, non_subject, last, all_previous")
    v.add_argument("--layers", help="knockout: the layers, a..b (or one layer)")
    v.add_argument("--subject", help="knockout: the subject (a substring of the prompt) for --to subject / non_subject")
    v.add_argument(
        "--answer", help="score this continuation: teacher-forced log-probability, with and without the intervention"
    )
    v.add_argument("--max-new-tokens", type=int, default=20)
    _run_options(v)
    v.set_defaults(func=_cmd_intervene)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchscope", description="Patchscopes at scale (Ghandeharioun et al., ICML 2024)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list model aliases").set_defaults(func=_cmd_models)

    _add_inspect(sub)
    _add_intervene(sub)

    s = sub.add_parser("sweep", help="run a sweep config on a Ray cluster")
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="print grid size, tasks and workers; compute nothing")
    s.add_argument("--address", help="join an existing Ray cluster (e.g. auto)")
    s.add_argument("--restart", action="store_true", help="ignore stored results and start over (new W&B runs)")
    s.set_defaults(func=_cmd_sweep)

    r = sub.add_parser("report", help="tables and plots from a sweep's stored results")
    r.add_argument("dir")
    r.set_defaults(func=_cmd_report)

    from sweeps import cli_patch

    cli_patch.add_parser(sub)  # patch: activation patching of one pair
    return p


def main(argv: list[str] | None = None) -> int:
    from patchscope_core import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:  # bad input only: one line naming the field; anything else is a bug
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    """An error message on one line: a message that quotes another (the hub's, YAML's) may hold
    newlines; they become ' / ' and runs of spaces one space."""
    parts = [" ".join(line.split()) for line in message.splitlines()]
    return " / ".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
