"""patchscope_core: the science of Patchscopes and interventions, with no Ray and no W&B in it."""

from .base.errors import InputError, PatchscopeError, UnknownModelError
from .engine import Decoding, Engine, InterventionResult
from .forward.hooks import HookContext
from .interventions.kinds import Add, Mean, Noise, Positions, Replace, Resample, Scale, Zero
from .interventions.registry import KINDS
from .interventions.runs import Intervention, InterventionRun
from .methods.mapping import Affine, Identity
from .methods.patchscope import Patchscope, PatchscopeEngine, PatchscopeResult, Source, Target, resolve, run_patchscopes
from .models.info import ModelInfo, info_of
from .models.loading import ALIASES, cache_dir, load_model, model_info
from .models.sites import SITES, Site, resid_post
from .models.tokens import tokenize

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
