"""Throughput of Patchscope sweeps on SmolLM2-135M, against a plain loop, nnsight and the paper's
method, measured side by side in one run on one machine.

The grid: entity description (the paper's few-shot prompt ending in `x`, 31 tokens, patched at
its last token), sources x layers, 16 new tokens, no EOS stop, batches of 16 cells.
- plain HF loop: the ceiling of a hand-written loop that does no patching: sources once (one
  forward per source prompt), then HF `generate` on batches of 16 target prompts;
- ours, in-process: `PatchscopeEngine.run`, with shared target prefixes (the default) and without;
- nnsight (the `bench` extra): the same cells, sources read by one nnsight trace per source
  prompt, then batched invokes, each writing its vector at the last position under
  `tracer.iter[0]`, as nnsight's docs recommend;
- the paper's method: one hooked `generate` per cell (source forward pass, then a hook on layer
  l* that patches the chunk when it is longer than one token, the paper's rule), timed on a
  sample of cells and scaled;
- the sweep (`patchscope sweep`, local Ray, 1 and 2 workers): cells/s as the marginal rate
  between an N-cell and a 2N-cell sweep, so Ray's start and the model loads cancel out;
- peak memory of one worker process (engine, batch 1 .. 64), each in a fresh process.
Every competitor's generated tokens must equal ours, or the run stops.

    .venv/bin/python benchmarks/bench_throughput.py [--repeats 3] [--skip-sweep] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import side_by_side

from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target, load_model, tokenize
from patchscope_core.forward.readings import input_device

ENTITY = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
SOURCES = ["Leonardo DiCaprio", "Samsung", "Paris", "Python", "The Eiffel Tower", "Amazon", "Water", "Tokyo"]
N_NEW, BATCH = 16, 16
ROOT = Path(__file__).resolve().parent.parent


def cells(layers: range) -> list[Patchscope]:
    return [
        Patchscope(Source(s, l, -1), Target(ENTITY, l, (-1,)), max_new_tokens=N_NEW) for s in SOURCES for l in layers
    ]


def plain_loop(hf, info, specs, device) -> None:
    """Sources once, then HF generate on batches of target prompts; no patching."""
    with torch.no_grad():
        for s in dict.fromkeys(p.source.prompt for p in specs):
            hf(input_ids=torch.tensor([tokenize(info, s)], device=device), output_hidden_states=True)
        target = tokenize(info, ENTITY)
        for start in range(0, len(specs), BATCH):
            ids = torch.tensor([target] * len(specs[start : start + BATCH]), device=device)
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=N_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )


def paper_method(hf, info, spec, device) -> list[int]:
    """One Patchscope as the paper's code runs it: a source forward pass, then generate with a
    hook on layer l* that patches the last position whenever it sees more than one token."""
    with torch.no_grad():
        src = hf(input_ids=torch.tensor([tokenize(info, spec.source.prompt)], device=device), output_hidden_states=True)
        h = src.hidden_states[spec.source.layer + 1][0, -1]

        def hook(module, args, out):
            hidden = out[0] if isinstance(out, tuple) else out
            if hidden.shape[1] == 1:
                return None
            hidden = hidden.clone()
            hidden[0, -1] = h
            return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

        handle = hf.model.layers[spec.target.layer].register_forward_hook(hook)
        try:
            ids = torch.tensor([tokenize(info, ENTITY)], device=device)
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=N_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )
        finally:
            handle.remove()
    return out[0, ids.shape[1] :].tolist()


def nnsight_sources(lm, info, specs) -> dict:
    """Each source prompt once through nnsight (one trace per prompt, saving the last position of
    every layer its cells read), as the plain loop and ours read them."""
    out = {}
    for prompt in dict.fromkeys(s.source.prompt for s in specs):
        layers = sorted({s.source.layer for s in specs if s.source.prompt == prompt})
        saved = []
        with lm.trace(torch.tensor([tokenize(info, prompt)])):
            for layer in layers:
                saved.append(lm.model.layers[layer].output[0, -1].save())
        out.update({(prompt, l): v for l, v in zip(layers, saved)})
    return {s: out[(s.source.prompt, s.source.layer)] for s in specs}


def nnsight_batches(lm, info, specs) -> list[list[int]]:
    """The same cells through nnsight: the sources, then batched invokes, each writing its
    vector at the last position of layer l* in the first generation step (tracer.iter[0])."""
    sources = nnsight_sources(lm, info, specs)
    target = torch.tensor([tokenize(info, ENTITY)])
    out = []
    for start in range(0, len(specs), BATCH):
        batch = specs[start : start + BATCH]
        with lm.generate(max_new_tokens=N_NEW, do_sample=False, pad_token_id=2, eos_token_id=None) as tracer:
            for spec in batch:
                with tracer.invoke(target):
                    for _ in tracer.iter[0:1]:
                        lm.model.layers[spec.target.layer].output[:, -1, :] = sources[spec]
            with tracer.invoke():
                ids = tracer.result.save()
        out += ids[:, target.shape[1] :].tolist()
    return out


def sweep_seconds(n_layers: int, workers: int, tmp: Path) -> float:
    """Wall time of `patchscope sweep` on SOURCES x layers 0..n_layers-1 (local Ray, W&B off)."""
    cfg = {
        "name": f"bench-{workers}-{n_layers}",
        "models": ["smollm2-135m"],
        "source": {"prompts": SOURCES, "layers": f"0:{n_layers}", "positions": [-1]},
        "target": {"prompt": ENTITY, "layers": "same", "positions": [-1]},
        "generation": {"max_new_tokens": N_NEW, "stop_at_eos": False},
        "execution": {"workers": workers, "batch_size": BATCH},
        "output": {"dir": str(tmp / f"out-{workers}-{n_layers}"), "wandb": {"mode": "disabled"}},
    }
    path = tmp / f"sweep-{workers}-{n_layers}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    t0 = time.perf_counter()
    subprocess.run(
        [str(ROOT / ".venv/bin/patchscope"), "sweep", str(path)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


MEMORY_PROBE = """
import sys, torch
from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target, load_model
sys.path.insert(0, sys.argv[2])
from bench_throughput import cells
def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
engine = PatchscopeEngine(load_model("smollm2-135m", device="cpu"), decoding=Decoding(stop_at_eos=False))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from now: loading peaks higher
base = kib("VmRSS")
engine.run(cells(range(6, 6 + max(1, int(sys.argv[1]) // 8) + 1))[: int(sys.argv[1])], batch_size=int(sys.argv[1]))
print(base, kib("VmHWM"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6, help="layers per source in the in-process grid (8 sources each)")
    ap.add_argument("--paper-sample", type=int, default=8)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from patchscope_core.models import smollm2_dir

    bridge = load_model("smollm2-135m", device="cpu")
    device = input_device(bridge)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).to(device).eval()
    info = PatchscopeEngine(bridge).target_info
    specs = cells(range(0, 30, max(1, 30 // args.layers)))[: 8 * args.layers]
    shared = PatchscopeEngine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    full = PatchscopeEngine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    full.share_prefixes = False
    n = len(specs)
    print(
        f"SmolLM2-135M on {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; entity-description grid: {n} cells, {N_NEW} new tokens, batches of {BATCH}; "
        f"median of {args.repeats}"
    )

    ours = [r.generated_token_ids for r in shared.run(specs, batch_size=BATCH)]
    assert ours == [r.generated_token_ids for r in full.run(specs, batch_size=BATCH)], "shared prefixes changed tokens"
    fns = {
        "plain HF loop (no patching)": lambda: plain_loop(hf, info, specs, device),
        "ours, shared prefixes": lambda: shared.run(specs, batch_size=BATCH),
        "ours, full prompts": lambda: full.run(specs, batch_size=BATCH),
    }
    try:
        from nnsight import TransformersModel

        lm = TransformersModel(hf, tokenizer=bridge.tokenizer, task="text-generation")
        got = nnsight_batches(lm, info, specs)
        assert got == ours, "nnsight's tokens differ from ours: the comparison would be void"
        fns["nnsight, batched invokes"] = lambda: nnsight_batches(lm, info, specs)
    except ImportError:
        print("nnsight is not installed (pip install -e '.[bench]'): skipped")
    t = side_by_side(fns, args.repeats)
    base = n / t["plain HF loop (no patching)"]
    print("\n(a) in-process, cells/s and ratio to the plain loop")
    for k, v in t.items():
        print(f"  {k:32s} {n / v:6.2f} cells/s  {n / v / base:5.2f}x")
    if "nnsight, batched invokes" in t:
        print(f"  ours (shared prefixes) / nnsight: {t['nnsight, batched invokes'] / t['ours, shared prefixes']:.2f}x")

    sample = specs[:: max(1, n // args.paper_sample)][: args.paper_sample]
    for spec in sample:
        assert paper_method(hf, info, spec, device) == ours[specs.index(spec)], "the paper's method disagrees"
    t0 = time.perf_counter()
    for spec in sample:
        paper_method(hf, info, spec, device)
    paper = (time.perf_counter() - t0) / len(sample)
    print(
        f"\n(b) the paper's method, one hooked generate per cell: {1 / paper:.2f} cells/s (timed on {len(sample)} "
        f"cells, tokens equal ours); ours with shared prefixes is {paper * n / t['ours, shared prefixes']:.1f}x faster"
    )

    if not args.skip_sweep:
        with tempfile.TemporaryDirectory() as tmp:
            for workers in (1, 2):
                small = sweep_seconds(15, workers, Path(tmp))
                large = sweep_seconds(30, workers, Path(tmp))
                rate = 8 * 15 / (large - small)
                print(
                    f"\n(c) patchscope sweep, {workers} worker(s): {small:.1f} s for 120 cells, {large:.1f} s for 240 "
                    f"-> {rate:.2f} cells/s marginal; {rate / base:.2f}x the plain loop, "
                    f"{rate * t['ours, shared prefixes'] / n:.2f}x ours in-process"
                )

    if not args.skip_memory:
        print(
            "\n(d) peak resident memory of one process running the engine, after the model is loaded "
            "(fresh process per batch size; Linux)"
        )
        for b in (1, 8, 32, 64, 128):
            out = subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, str(b), str(Path(__file__).parent)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            base_kb, peak_kb = int(out[-2]), int(out[-1])
            print(
                f"  batch {b:3d}: {peak_kb / 1024:7.0f} MiB peak ({(peak_kb - base_kb) / 1024:6.0f} MiB above the loaded model)"
            )


if __name__ == "__main__":
    main()
