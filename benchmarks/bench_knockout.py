"""Speed of attention knockout on SmolLM2-135M, measured side by side in one run.

Cached generation with a knockout in every row (rows differ in prompt, so the batch is left
padded, and in edges: last and every generated token -> subject / non_subject / last, windows of
9 layers at different places, some rows on 3 heads only) / plain Hugging Face `generate` of the
same batch, no hooks, on its default attention (sdpa) and on eager (the bridge's); batch 1 and
32; target <= 1.2. Every generation makes exactly --new-tokens tokens (no EOS stop). Timings
alternate between the compared configurations; medians are reported.

    .venv/bin/python benchmarks/bench_knockout.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import copy

import torch
from common import side_by_side, smollm2_and_plain_hf

from patchscope_core import Decoding, Engine, Intervention, InterventionRun
from patchscope_core.forward.hooks import left_pad
from patchscope_core.interventions import Knockout

FACTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("Leonardo DiCaprio is an actor born in the United", "Leonardo DiCaprio"),
    ("Samsung is a company from", "Samsung"),
    ("The Colosseum, an amphitheatre of the Roman Empire, stands in the city of", "The Colosseum"),
]


def knockouts(n: int, n_new: int) -> list[InterventionRun]:
    runs = []
    for k in range(n):
        prompt, subject = FACTS[k % len(FACTS)]
        kind = Knockout(
            from_=("last", "generated"),
            to=("subject", "non_subject", "last")[k % 3],
            subject=subject,
            heads=(0, 4, 8) if k % 2 else (),
            window=9,
        )
        runs.append(
            InterventionRun(prompt, [Intervention(f"blocks.{4 + (3 * k) % 22}.attn", kind)], max_new_tokens=n_new)
        )
    return runs


def main() -> None:
    args, bridge, plain, device = smollm2_and_plain_hf(__doc__)
    eager = copy.deepcopy(plain)
    eager.config._attn_implementation = "eager"
    n_new = args.new_tokens
    engine = Engine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    print("\nknockout in every row, cached generation / plain HF generate, same batch (target <= 1.2)")
    for batch in (1, 32):
        runs = knockouts(batch, n_new)
        ids, mask, _ = left_pad(
            [engine.resolve([r])[0].prompt_ids for r in runs], bridge.tokenizer.pad_token_id, device
        )

        def hf(model):
            def go():
                with torch.no_grad():
                    out = model.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=n_new,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=bridge.tokenizer.pad_token_id,
                    )
                assert out.shape[1] == ids.shape[1] + n_new

            return go

        def ours():
            results = engine.run(runs, batch_size=batch, clean=False)
            assert all(len(r.generated_token_ids) == n_new for r in results)

        t = side_by_side({"sdpa": hf(plain), "eager": hf(eager), "ours": ours}, args.repeats)
        print(
            f"  batch {batch:2d}: plain HF sdpa {t['sdpa']:.3f} s, plain HF eager {t['eager']:.3f} s, knockout "
            f"{t['ours']:.3f} s -> ratio {t['ours'] / t['sdpa']:.2f} (sdpa), {t['ours'] / t['eager']:.2f} (eager)"
        )


if __name__ == "__main__":
    main()
