"""Layer 3, forward passes: hooks under the KV cache and the machinery every method shares.
May import `base`, `models` and `interventions`.

- `hooks`: `fn(activation, ctx)` on a site, with absolute positions from the running cache
  length (the hard point of patching under the KV cache: docs/interventions.md).
- `dispatch`: one vectorised hook per site serving every row of a heterogeneous batch.
- `readings`: activations and statistics read once per engine (`SiteReader`).
- `knockout`: the attention function that blocks a knockout's edges.
- `partial`: a forward pass from a layer and position on (patching, tracing and attribution
  share it), and batching rows by position.
- `clean_start`: scoring rows that start at the first layer they touch.
"""
