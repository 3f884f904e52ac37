"""patchscope_core: the science of Patchscopes and interventions, with no Ray and no W&B in it."""

from .engine import (
    Decoding,
    Engine,
    InterventionResult,
    PatchscopeEngine,
    PatchscopeResult,
    resid_post,
    run_patchscopes,
)
from .errors import InputError, PatchscopeError, UnknownModelError
from .hooks import HookContext
from .interventions import (
    KINDS,
    Add,
    Intervention,
    InterventionRun,
    Mean,
    Noise,
    Positions,
    Replace,
    Resample,
    Scale,
    Zero,
)
from .mapping import Affine, Identity
from .models import ALIASES, ModelInfo, cache_dir, info_of, load_model, model_info
from .sites import SITES, Site
from .spec import Patchscope, Source, Target, resolve, tokenize

__all__ = [
    "ALIASES",
    "Add",
    "Affine",
    "Decoding",
    "Engine",
    "HookContext",
    "Identity",
    "InputError",
    "Intervention",
    "InterventionResult",
    "InterventionRun",
    "KINDS",
    "Mean",
    "ModelInfo",
    "Noise",
    "Patchscope",
    "PatchscopeEngine",
    "PatchscopeError",
    "PatchscopeResult",
    "Positions",
    "Replace",
    "Resample",
    "SITES",
    "Scale",
    "Site",
    "Source",
    "Target",
    "UnknownModelError",
    "Zero",
    "cache_dir",
    "info_of",
    "load_model",
    "model_info",
    "resid_post",
    "resolve",
    "run_patchscopes",
    "tokenize",
]
