"""Independent reference computations the engine is checked against.

- `uncached_patched_generation`: greedy decoding that re-runs the whole sequence at every step
  and re-writes the vector at the target positions in every forward pass (no KV cache, no
  cache-position tracking, one row, no padding).
- `source_vector`: h from TransformerLens' own `run_with_cache`.
- `compare_tokens`: token-for-token equality, where a divergence at a step whose top-2
  reference logits are within TIE_TOLERANCE counts as a floating-point tie (and is reported).
"""

from __future__ import annotations

import torch

TIE_TOLERANCE = 1e-4
TIES = {"compared": 0, "ties": []}


def source_vector(model, token_ids, layer: int, position: int) -> torch.Tensor:
    name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([list(token_ids)]), names_filter=[name])
    return cache[name][0, position].float()


@torch.no_grad()
def uncached_patched_generation(model, token_ids, layer, positions, vector, n_new: int):
    """Greedy tokens and per-step logits; the vector is written at `positions` of `layer` in
    every full forward pass (positions=[] or vector=None: no patch)."""
    tokens = list(token_ids)
    name = f"blocks.{layer}.hook_resid_post"

    def write(x, hook=None):
        x = x.clone()
        x[0, list(positions)] = vector.to(x.dtype)
        return x

    hooks = [(name, write)] if vector is not None and positions else []
    generated, logits = [], []
    for _ in range(n_new):
        with model.hooks(fwd_hooks=hooks):
            out = model.original_model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()
        nxt = int(out.argmax())
        generated.append(nxt)
        logits.append(out)
        tokens.append(nxt)
    return generated, logits


def compare_tokens(got: list[int], want: list[int], want_logits: list[torch.Tensor], label: str) -> None:
    """Assert got == want token for token, allowing a divergence only at a floating-point tie."""
    TIES["compared"] += 1
    assert len(got) == len(want), f"{label}: {len(got)} tokens, reference has {len(want)}"
    for step, (g, w) in enumerate(zip(got, want)):
        if g != w:
            gap = float(want_logits[step].max() - want_logits[step][g])
            assert gap < TIE_TOLERANCE, (
                f"{label}: token {step} differs ({g} vs reference {w}) and the reference scores them "
                f"{gap:.2e} apart, not a tie.\n got  {got}\n want {want}"
            )
            TIES["ties"].append(f"{label}@{step}")
            return
