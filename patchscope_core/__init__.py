"""patchscope_core: the science of Patchscopes, with no Ray and no W&B in it."""

from .engine import Decoding, PatchscopeEngine, PatchscopeResult, resid_post, run_patchscopes
from .errors import PatchscopeError, UnknownModelError
from .mapping import Affine, Identity
from .models import ALIASES, ModelInfo, cache_dir, load_model, model_info
from .spec import Patchscope, Source, Target, resolve, tokenize

__all__ = [
    "ALIASES", "Affine", "Decoding", "Identity", "ModelInfo", "Patchscope", "PatchscopeEngine",
    "PatchscopeError", "PatchscopeResult", "Source", "Target", "UnknownModelError", "cache_dir",
    "load_model", "model_info", "resid_post", "resolve", "run_patchscopes", "tokenize",
]
