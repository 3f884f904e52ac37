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


# ---------------------------------------------------------------- interventions on the bridge's own hook points


def site_values(model, token_ids, name: str) -> torch.Tensor:
    """[tokens, *TransformerLens shape] float32: the bridge's own hook point `name` over one
    prompt (one row, no padding), from `run_with_cache`."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([list(token_ids)]), names_filter=[name])
    return cache[name][0].float().clone()


def non_bos_values(model, prompts, name: str) -> torch.Tensor:
    """The site's values over every token of `prompts` except the prepended BOS, stacked
    [tokens, *shape] (prompts tokenised by the bridge itself)."""
    rows = []
    for p in prompts:
        ids = model.to_tokens(p)[0].tolist()
        assert ids[0] == model.tokenizer.bos_token_id, "these references assume a prepended BOS"
        rows.append(site_values(model, ids, name)[1:])
    return torch.cat(rows)


class ReferenceIntervention:
    """One `Intervention` written by hand as a TransformerLens hook `fn(x, hook)` on the bridge's
    own hook point of the same name, for one row without padding.

    The hook sees the whole sequence (x: [1, tokens, *shape]; attn.hook_z is [1, tokens,
    n_heads, d_head]) and writes every selected position of it, so the same hook serves a
    scoring pass over prompt + answer (answer tokens are generated positions) and every full
    re-run of uncached generation (where it re-applies at every step). Values that need a
    forward pass are computed here with `run_with_cache`, one prompt at a time. `shape`: one
    position's activation (default from the bridge's config; pass the shape the bridge's hook
    point shows where the config's d_mlp is not the MLP's width).
    """

    def __init__(self, model, intervention, n_prompt: int, shape: tuple[int, ...] | None = None) -> None:
        from patchscope_core.interventions import Add, Mean, Noise, Replace, Resample, Scale, Zero

        site, kind, where = intervention.site, intervention.kind, intervention.positions
        self.name = site.hook
        self.kind = kind
        self.n_prompt = n_prompt
        self.explicit = {p % n_prompt for p in where.indices}
        assert all(-n_prompt <= p < n_prompt for p in where.indices)
        self.on_prompt, self.on_generated = where.prompt, where.generated
        cfg = model.cfg
        self.shape = shape or (
            (cfg.n_heads, cfg.d_head)
            if self.name.endswith("attn.hook_z")
            else (cfg.d_mlp,)
            if self.name.endswith("mlp.hook_post")
            else (cfg.d_model,)
        )
        self.mask = torch.ones(self.shape, dtype=torch.bool)
        if site.head:
            self.mask = torch.zeros(self.shape, dtype=torch.bool)
            self.mask[list(site.head)] = True  # shape (n_heads, d_head)
        if site.neuron:
            self.mask = torch.zeros(self.shape, dtype=torch.bool)
            self.mask[list(site.neuron)] = True  # shape (d_mlp,)

        def fit(v: torch.Tensor) -> torch.Tensor:
            v = v.float()
            if len(self.shape) == 2 and tuple(v.shape) == self.shape[1:]:
                return v.expand(self.shape)  # one head's vector, for every head
            return v.reshape(self.shape)

        def mean(prompts):
            return non_bos_values(model, prompts, self.name).double().mean(0).float()

        self.value = None  # what the kind needs, [*shape] or [tokens, *shape]
        if isinstance(kind, Add):
            self.value = kind.alpha * (
                fit(kind.vector) if kind.vector is not None else mean(kind.positive) - mean(kind.negative)
            )
        elif isinstance(kind, Mean):
            self.value = mean(kind.reference)
        elif isinstance(kind, Replace):
            self.value = (
                fit(kind.vector)
                if kind.vector is not None
                else site_values(model, model.to_tokens(kind.source)[0].tolist(), self.name)[kind.source_position]
            )
        elif isinstance(kind, Resample):
            self.value = site_values(model, model.to_tokens(kind.source)[0].tolist(), self.name)
        elif isinstance(kind, Noise):
            std = (
                kind.std
                if kind.std is not None
                else float(non_bos_values(model, kind.reference, self.name).double().std())
            )
            self.sigma = kind.scale * std
        else:
            assert isinstance(kind, (Scale, Zero)), kind

    def selected(self, n_tokens: int) -> list[int]:
        return [
            p
            for p in range(n_tokens)
            if p in self.explicit
            or (self.on_prompt and p < self.n_prompt)
            or (self.on_generated and p >= self.n_prompt)
        ]

    def new_value(self, x: torch.Tensor, p: int) -> torch.Tensor:
        from patchscope_core.interventions import Add, Mean, Noise, Replace, Resample, Scale, Zero, noise_at

        k = self.kind
        if isinstance(k, Zero):
            return torch.zeros_like(x)
        if isinstance(k, Scale):
            return x * k.factor
        if isinstance(k, Add):
            return x + self.value.to(x.dtype)
        if isinstance(k, (Mean, Replace)):
            return self.value.to(x.dtype)
        if isinstance(k, Resample):
            return self.value[p].to(x.dtype)
        if isinstance(k, Noise):
            width = int(torch.tensor(self.shape).prod())
            return x + (self.sigma * noise_at(k.seed, p, width)).reshape(self.shape).to(x.dtype)
        raise AssertionError(k)

    def __call__(self, x: torch.Tensor, hook=None) -> torch.Tensor:
        assert x.shape[0] == 1 and tuple(x.shape[2:]) == self.shape, (self.name, tuple(x.shape))
        x = x.clone()
        for p in self.selected(x.shape[1]):
            x[0, p] = torch.where(self.mask, self.new_value(x[0, p], p), x[0, p])
        return x

    def hook(self) -> tuple[str, ReferenceIntervention]:
        return (self.name, self)


def reference_hooks(model, run) -> tuple[list[int], list[int], list]:
    """(prompt ids, answer ids, TransformerLens hooks) of an `InterventionRun`, tokenised by the
    bridge and its tokenizer; the hooks in the run's order."""
    prompt = model.to_tokens(run.prompt)[0].tolist()
    answer = model.tokenizer(run.answer, add_special_tokens=False)["input_ids"] if run.answer else []
    return prompt, list(answer), [ReferenceIntervention(model, iv, len(prompt)).hook() for iv in run.interventions]


@torch.no_grad()
def hooked_logits(model, token_ids, fwd_hooks) -> torch.Tensor:
    """[tokens, vocab] float32 logits of one row through the bridge with its own hook points."""
    return model.run_with_hooks(torch.tensor([list(token_ids)]), fwd_hooks=list(fwd_hooks))[0].float()


@torch.no_grad()
def uncached_generation(model, token_ids, fwd_hooks, n_new: int):
    """Greedy tokens and per-step logits; every step re-runs the whole sequence through the
    bridge with `fwd_hooks` (TransformerLens hooks that see the whole sequence), no KV cache,
    one row, no padding."""
    tokens = list(token_ids)
    generated, logits = [], []
    for _ in range(n_new):
        out = hooked_logits(model, tokens, fwd_hooks)[-1]
        nxt = int(out.argmax())
        generated.append(nxt)
        logits.append(out)
        tokens.append(nxt)
    return generated, logits
