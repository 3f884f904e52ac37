"""Speed of patched cached generation on SmolLM2-135M, measured side by side in one run.

(a) patched cached generation / plain Hugging Face `generate` of the same batch, no hooks
    (batch 1 and 32; target <= 1.15)
(b) patched uncached (re-run the whole sequence every step) / patched cached
(c) 64 heterogeneous Patchscopes run one at a time / the same 64 in one batch (target >= 4x)

Every configuration generates exactly --new-tokens tokens (no EOS stop). Timings alternate
between the compared configurations and the medians are reported.

    .venv/bin/python benchmarks/bench_generation.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import torch
from common import side_by_side, smollm2_and_plain_hf

from patchscope_core import Decoding, Patchscope, PatchscopeEngine, Source, Target
from patchscope_core.forward.hooks import left_pad

ENTITY = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean "
    "multinational major appliance and consumer electronics corporation, x"
)
SOURCES = ["Leonardo DiCaprio", "Samsung", "Paris", "Python", "The Eiffel Tower", "Amazon", "Water", "Tokyo"]
TARGETS = [ENTITY, "The capital city of x is", "x x x", "Tell me about x:"]


def specs(n: int, n_new: int, heterogeneous: bool) -> list[Patchscope]:
    out = []
    for k in range(n):
        if heterogeneous:
            layer = (3 * k) % 30
            target = TARGETS[k % len(TARGETS)]
            positions = (-1,) if k % 3 else (-1, -2)
            out.append(
                Patchscope(
                    Source(SOURCES[k % len(SOURCES)], layer, -1),
                    Target(target, (layer + 2) % 30, positions),
                    max_new_tokens=n_new,
                )
            )
        else:
            out.append(
                Patchscope(Source(SOURCES[k % len(SOURCES)], 6, -1), Target(ENTITY, 6, (-1,)), max_new_tokens=n_new)
            )
    return out


def main() -> None:
    args, bridge, plain, device = smollm2_and_plain_hf(__doc__)
    n_new = args.new_tokens
    cached = PatchscopeEngine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False))
    uncached = PatchscopeEngine(bridge, name="smollm2-135m", decoding=Decoding(stop_at_eos=False, use_cache=False))

    print("\n(a) patched cached generation / plain HF generate, same batch, no hooks (target <= 1.15)")
    for batch in (1, 32):
        resolved = cached.resolve(specs(batch, n_new, heterogeneous=False))
        sources = cached.extract_sources(resolved)
        vectors = [sources[(r.source_token_ids, r.spec.source.layer, r.source_position)] for r in resolved]
        ids, mask, _ = left_pad([r.target_token_ids for r in resolved], bridge.tokenizer.pad_token_id, device)

        def hf(model):
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

        t = side_by_side(
            {
                "hf": lambda: hf(plain),
                "bridge": lambda: hf(bridge.original_model),
                "patched": lambda: cached.generate(resolved, vectors, batch_size=batch),
                "patched+extract": lambda: cached.run(specs(batch, n_new, heterogeneous=False), batch_size=batch),
            },
            args.repeats,
        )
        print(
            f"  batch {batch:2d}: plain HF {t['hf']:.3f} s, patched {t['patched']:.3f} s -> ratio {t['patched'] / t['hf']:.2f}"
            f"  (with source extraction: {t['patched+extract']:.3f} s -> {t['patched+extract'] / t['hf']:.2f}; "
            f"bridge without hooks: {t['bridge']:.3f} s -> {t['bridge'] / t['hf']:.2f})"
        )

    print("\n(b) patched uncached (re-run every step) / patched cached")
    for batch in (1, 32):
        s = specs(batch, n_new, heterogeneous=False)
        t = side_by_side(
            {"cached": lambda: cached.run(s, batch_size=batch), "uncached": lambda: uncached.run(s, batch_size=batch)},
            max(1, args.repeats // 2),
        )
        print(
            f"  batch {batch:2d}: cached {t['cached']:.3f} s, uncached {t['uncached']:.3f} s -> cache speed-up {t['uncached'] / t['cached']:.2f}x"
        )

    print("\n(c) 64 heterogeneous Patchscopes: one at a time / one batch of 64 (target >= 4x)")
    s = specs(64, n_new, heterogeneous=True)
    t = side_by_side(
        {
            "batched": lambda: cached.run(s, batch_size=64),
            "one_at_a_time": lambda: [cached.run([p], batch_size=1) for p in s],
        },
        max(1, args.repeats // 2),
    )
    print(
        f"  one batch {t['batched']:.2f} s, one at a time {t['one_at_a_time']:.2f} s -> batching speed-up "
        f"{t['one_at_a_time'] / t['batched']:.2f}x"
    )


if __name__ == "__main__":
    main()
