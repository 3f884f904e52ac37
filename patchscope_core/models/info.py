"""`ModelInfo`: what validation and the engine know of a model, built in one place.

`describe` builds it from TransformerLens' own bridge config and architecture adapter (made
from the Hugging Face config alone by `adapter_for`, without weights, or read from a loaded
bridge by `info_of`), so validation and the engine never disagree, e.g. on whether a BOS token
is prepended (TransformerLens turns it off for Qwen2, Phi, GPT-NeoX and others) or on widths
the bridge's config misreads (`mlp_width`, and the modules' own widths in `info_of`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .components import module_boundary


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about a model, read without its weights."""

    name: str
    n_layers: int
    d_model: int
    tokenizer: Any
    prepend_bos: bool = True
    n_heads: int = 0
    n_kv_heads: int = 0  # key/value heads (fewer than n_heads under grouped-query attention)
    d_head: int = 0
    d_mlp: int = 0
    n_ctx: int = 0  # the longest sequence (prompt + generated tokens) the model takes
    components: Any = None  # the bridge adapter's component mapping: where each hook name lives
    hf_config: Any = field(
        default=None, compare=False, repr=False
    )  # Hugging Face's config (interventions/knockout.py reads its classes)

    @property
    def d_attn(self) -> int:
        """Width of `attn.hook_z` flattened: n_heads x d_head."""
        return self.n_heads * self.d_head

    def __repr__(self) -> str:
        """One line: the shapes, and the tokenizer by its class (not the tokenizer's own repr, its
        whole vocabulary's configuration, nor the component mapping)."""
        heads = f"{self.n_heads} heads" + (
            f" ({self.n_kv_heads} kv)" if self.n_kv_heads and self.n_kv_heads != self.n_heads else ""
        )
        return (
            f"ModelInfo({self.name!r}: {self.n_layers} layers, d_model {self.d_model}, {heads} x d_head "
            f"{self.d_head}, d_mlp {self.d_mlp}, n_ctx {self.n_ctx}, {type(self.tokenizer).__name__}"
            f"{', BOS prepended' if self.prepend_bos else ''})"
        )


def bytes_per_row(info: ModelInfo, n_tokens: int, bytes_per_value: int) -> int:
    """Memory one batch row of n_tokens takes beyond the weights: its KV cache (keys and values of
    every layer: 2 x n_layers x n_kv_heads x d_head per token), the residual stream and the MLP's
    hidden activations of the widest layer, and the logits over the vocabulary; an estimate that
    sizes batches, not an exact count (the engine halves a batch that runs out of memory)."""
    kv = 2 * info.n_layers * (info.n_kv_heads or info.n_heads) * info.d_head * n_tokens
    live = (4 * info.d_model + 2 * (info.d_mlp or 4 * info.d_model)) * n_tokens
    vocab = len(info.tokenizer) if info.tokenizer is not None else 0
    return (kv + live + vocab) * bytes_per_value


def batch_rows_for(
    info: ModelInfo, free_bytes: int, n_tokens: int, bytes_per_value: int, cap: int = 512, headroom: float = 0.8
) -> int:
    """Rows per forward pass that fit `free_bytes` (what the device has left after the weights), at
    most `cap`, a power of two, at least 1."""
    rows = int(headroom * free_bytes) // max(1, bytes_per_row(info, n_tokens, bytes_per_value))
    rows = max(1, min(cap, rows))
    return 1 << (rows.bit_length() - 1)


def mlp_width(cfg: Any, hf_config: Any = None) -> int:
    """Width of `mlp.hook_post`. TransformerLens reads the MLP width from `intermediate_size`-like
    fields and otherwise assumes 4 x d_model; OPT and XGLM name it `ffn_dim`, which it does not
    read (a tiny OPT with ffn_dim 128 shows d_mlp 256 while its fc2 takes 128)."""
    ffn_dim = getattr(hf_config, "ffn_dim", None) if hf_config is not None else None
    return int(ffn_dim) if isinstance(ffn_dim, int) and ffn_dim > 0 else int(cfg.d_mlp or 0)


def describe(name: str, cfg: Any, components: Any, tokenizer: Any, hf_config: Any = None) -> ModelInfo:
    """The one place a ModelInfo is built: from a TransformerLens bridge config and its adapter's
    component mapping (a loaded bridge's, or one made from the Hugging Face config alone), and
    the Hugging Face config where the bridge's config misreads it (`mlp_width`)."""
    return ModelInfo(
        name=name,
        n_layers=int(cfg.n_layers),
        d_model=int(cfg.d_model),
        tokenizer=tokenizer,
        prepend_bos=bool(getattr(cfg, "default_prepend_bos", True)),
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_head=int(cfg.d_head),
        d_mlp=mlp_width(cfg, hf_config),
        n_ctx=int(cfg.n_ctx),
        components=components,
        hf_config=hf_config,
    )


def info_of(bridge, name: str | None = None) -> ModelInfo:
    """ModelInfo of a loaded TransformerBridge. The widths of `mlp.hook_post` and `attn.hook_z`
    are read from the modules they feed where the bridge's config says otherwise (Lfm2 adjusts
    its MLP width at build time; multi-head latent attention's value heads are v_head_dim wide)."""
    import dataclasses

    info = describe(
        name or getattr(bridge.cfg, "model_name", "model"),
        bridge.cfg,
        bridge.adapter.component_mapping,
        bridge.tokenizer,
        getattr(bridge.original_model, "config", None),
    )
    changes = {}
    d_mlp = _input_width(bridge, info.components, "blocks.0.mlp.hook_post")
    if d_mlp and d_mlp != info.d_mlp:
        changes["d_mlp"] = d_mlp
    d_attn = _input_width(bridge, info.components, "blocks.0.attn.hook_z")
    if d_attn and info.n_heads and d_attn % info.n_heads == 0 and d_attn != info.d_attn:
        changes["d_head"] = d_attn // info.n_heads
    return dataclasses.replace(info, **changes) if changes else info


def _input_width(bridge, components, hook: str) -> int | None:
    """Input width of the Linear (or GPT-2 Conv1D) whose input is `hook`, if it is one."""
    try:
        path, side, _ = module_boundary(components, hook)
        module = bridge.original_model.get_submodule(path)
    except (LookupError, AttributeError):
        return None
    while module._modules.get("_original_component") is not None:  # under the bridge's wrapper
        module = module._modules["_original_component"]
    width = getattr(module, "in_features", None) or getattr(module, "nx", None)
    return int(width) if side == "input" and isinstance(width, int) else None


def adapter_for(hf_config):
    """TransformerLens' architecture adapter for a Hugging Face config, as `boot_transformers`
    makes it, without any weights."""
    import torch
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    architecture = determine_architecture_from_hf_config(hf_config)
    config = build_bridge_config_from_hf(hf_config, architecture, "info", torch.float32)
    return ArchitectureAdapterFactory.select_architecture_adapter(config)
