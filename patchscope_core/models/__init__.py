"""Layer 1, models: what a model is before and after its weights load. May import `base` only.

- `loading`: names and aliases (SmolLM2 from its GGUF, tiny random models, local directories,
  hub names), `load_model` (a TransformerLens `TransformerBridge`), `model_info` (without
  weights), fingerprints of the weights a sweep's stored rows came from.
- `info`: `ModelInfo`, built in one place (`describe`) from TransformerLens' config and
  architecture adapter, so validation and the engine agree.
- `components`: where a TransformerLens hook name lives among the Hugging Face modules (the
  adapter's component mapping).
- `sites`: `Site` (a hook name, heads, neurons) resolved to a module boundary and shape; the
  plain modules the engine runs on; layer numbers and windows.
- `tokens`: token ids as the model sees them (BOS included) and positions within them.
"""

from .components import module_boundary
from .info import ModelInfo, adapter_for, batch_rows_for, bytes_per_row, describe, info_of, mlp_width
from .loading import (
    ACCEPTED,
    ALIASES,
    SMOLLM2_GGUF,
    SMOLLM2_HUB_NAME,
    SMOLLM2_PACKAGE,
    TINY,
    TINY_SEED,
    WEIGHT_FILES,
    cache_dir,
    check_device,
    default_device,
    load_model,
    model_fingerprint,
    model_info,
    smollm2_dir,
)
from .sites import (
    ATTENTION,
    QKV_SITES,
    SITES,
    ResolvedSite,
    Site,
    block,
    boundary_module,
    check_layer,
    plain_modules,
    resid_post,
    resolve_site,
    valid_sites,
    window_layers,
)
from .tokens import check_context, context_problem, resolve_position, subject_span, tokenize, tokenize_many

__all__ = [
    "ACCEPTED",
    "ALIASES",
    "ATTENTION",
    "ModelInfo",
    "QKV_SITES",
    "ResolvedSite",
    "SITES",
    "SMOLLM2_GGUF",
    "SMOLLM2_HUB_NAME",
    "SMOLLM2_PACKAGE",
    "Site",
    "TINY",
    "TINY_SEED",
    "WEIGHT_FILES",
    "adapter_for",
    "batch_rows_for",
    "block",
    "bytes_per_row",
    "boundary_module",
    "cache_dir",
    "check_context",
    "check_device",
    "check_layer",
    "context_problem",
    "default_device",
    "describe",
    "info_of",
    "load_model",
    "mlp_width",
    "model_fingerprint",
    "model_info",
    "module_boundary",
    "plain_modules",
    "resid_post",
    "resolve_position",
    "resolve_site",
    "smollm2_dir",
    "subject_span",
    "tokenize",
    "tokenize_many",
    "valid_sites",
    "window_layers",
]
