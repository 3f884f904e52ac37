"""Layer 5, the methods: each a study built on the engine. May import every layer below
(`base`, `models`, `interventions`, `forward`, `engine`), never `recipes`.

- `patchscope` (+ `mapping`): Patchscopes, the paper's spec and `PatchscopeEngine`.
- `directions`: explaining directions (SAE latents, MLP neurons, vectors) by writing them at an
  explanation prompt's placeholders (SelfIE; Kharlapenko et al.), with their measures.
- `tracing`: causal tracing (ROME).
- `patching` (+ `patcher`, `patching_summary`): activation patching, as TransformerLens'
  `patching` module computes it, with pair checks and summaries.
- `attribution` (+ `attribution_verify`): attribution patching (AtP, AtP*), checked against
  exact patching.
Attention knockout is an intervention kind (`interventions/knockout.py`, `forward/knockout.py`)
that runs on the engine's path like the others.
"""
