"""Speed of interventions on SmolLM2-135M, measured side by side in one run.

(a) cached generation with a head zero-ablated at every position (prompt and generated) /
    plain Hugging Face `generate` of the same batch, no hooks (batch 1 and 32; target <= 1.15)
(b) ablating each of SmolLM2's 270 heads for one prompt and scoring the answer: one forward
    pass per head / all 270 rows batched (target >= 5x), each with every row through every
    layer (plain) / from its head's layer on (`clean_start.py`); all must give the same scores

Every generation makes exactly --new-tokens tokens (no EOS stop). Timings alternate between the
compared configurations; medians are reported.

    .venv/bin/python benchmarks/bench_interventions.py [--repeats 5] [--device cpu] [--only a|b]
"""

from __future__ import annotations

import torch
from common import side_by_side, smollm2_and_plain_hf

from patchscope_core import Decoding, Engine, Intervention, InterventionRun, Site, Zero
from patchscope_core.forward.hooks import left_pad

ENTITY = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
FACT = "The Eiffel Tower is located in the city of"


def ablations(n: int, n_new: int) -> list[InterventionRun]:
    """n rows of the entity prompt, each with another (layer, head) zeroed at every position."""
    return [
        InterventionRun(
            ENTITY,
            [Intervention(Site(f"blocks.{(3 * k) % 30}.attn.hook_z", head=k % 9), Zero(), "all")],
            max_new_tokens=n_new,
        )
        for k in range(n)
    ]


def main() -> None:
    args, bridge, plain, device = smollm2_and_plain_hf(
        __doc__, lambda ap: ap.add_argument("--only", choices=("a", "b"), help="run one section")
    )
    n_new = args.new_tokens
    engine = Engine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    if args.only != "b":
        generation(args, engine, bridge, plain, device, n_new)
    if args.only != "a":
        heads_grid(args, engine)


def generation(args, engine, bridge, plain, device, n_new: int) -> None:
    print(
        "\n(a) head zero-ablation at every position, cached generation / plain HF generate, same batch (target <= 1.15)"
    )
    for batch in (1, 32):
        runs = ablations(batch, n_new)
        ids, mask, _ = left_pad(
            [engine.resolve([r])[0].prompt_ids for r in runs], bridge.tokenizer.pad_token_id, device
        )

        def hf():
            with torch.no_grad():
                out = plain.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n_new,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=bridge.tokenizer.pad_token_id,
                )
            assert out.shape[1] == ids.shape[1] + n_new

        def ours():
            results = engine.run(runs, batch_size=batch, clean=False)
            assert all(len(r.generated_token_ids) == n_new for r in results)

        t = side_by_side({"hf": hf, "ours": ours}, args.repeats)
        print(
            f"  batch {batch:2d}: plain HF {t['hf']:.3f} s, ablated {t['ours']:.3f} s -> ratio {t['ours'] / t['hf']:.2f}"
        )


def heads_grid(args, engine) -> None:
    print(
        "\n(b) 270 head ablations of one prompt, answer scored: one forward per head / batched (target >= 5x),\n"
        "    every row through every layer (plain) / from its head's layer on (clean_start.py)"
    )
    info = engine.info
    heads = [
        InterventionRun(
            FACT,
            [Intervention(Site(f"blocks.{l}.attn.hook_z", head=h), Zero(), "all")],
            answer=" Paris",
            max_new_tokens=0,
        )
        for l in range(info.n_layers)
        for h in range(info.n_heads)
    ]
    got = {}

    def config(batch_size: int, shortcut: bool):
        def fn():
            engine.start_at_first_layer = shortcut
            key = f"{'batched' if batch_size > 1 else 'one'}_{'from_layer' if shortcut else 'plain'}"
            got[key] = [r.answer_logprob for r in engine.run(heads, batch_size=batch_size, clean=False)]

        return fn

    fns = {
        f"{b}_{s}": config(n, s == "from_layer")
        for b, n in (("one", 1), ("batched", len(heads)))
        for s in ("plain", "from_layer")
    }
    t = side_by_side(fns, max(1, args.repeats // 2))
    engine.start_at_first_layer = True
    worst = max(abs(a - b) for k in got for a, b in zip(got[k], got["one_plain"]))
    assert worst < 1e-3, f"scores differ by {worst}"
    print(
        f"  {len(heads)} rows, plain:      one at a time {t['one_plain']:.2f} s, batched {t['batched_plain']:.2f} s -> "
        f"speed-up {t['one_plain'] / t['batched_plain']:.2f}x"
    )
    print(
        f"  {len(heads)} rows, from layer: one at a time {t['one_from_layer']:.2f} s, batched {t['batched_from_layer']:.2f} s"
        f" -> speed-up {t['one_plain'] / t['batched_from_layer']:.2f}x over plain one at a time"
    )
    print(
        f"  from layer / plain: one at a time {t['one_plain'] / t['one_from_layer']:.2f}x, batched "
        f"{t['batched_plain'] / t['batched_from_layer']:.2f}x (largest score difference {worst:.1e}; "
        f"stored clean states: {engine.counts['clean_states']})"
    )


if __name__ == "__main__":
    main()
