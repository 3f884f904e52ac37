"""Recipe tasks on a worker (`kind: recipe`): probes in, scored results out.

A task brings its recipe's name and settings, the fit windows of its maps, the source model of
a cross-model recipe, and its probes as plain data (`sweeps.kinds.recipe.RecipeKind.payload`).
The worker keeps, per engine, a `patchscope_core.recipes.RecipeRunner` for each recipe it has
seen, so the tuned lens or the cross-model maps are fitted once per worker and reused by every
later task; a cross-model source model is loaded once, on the engine's device and dtype.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

from patchscope_core import PatchscopeEngine, load_model
from patchscope_core.recipes import RECIPES, Probe, RecipeRunner

_RUNNERS: weakref.WeakKeyDictionary[PatchscopeEngine, dict[str, RecipeRunner]] = weakref.WeakKeyDictionary()
KEEP = 2  # runners kept per engine (each may hold fitted maps)


def _engine_for(engine: PatchscopeEngine, source_model: str | None) -> PatchscopeEngine:
    """The engine itself, or one that reads `source_model` and writes into the engine's model."""
    if not source_model or source_model == engine.target_info.name:
        return engine
    p = next(engine.model.parameters())
    source = load_model(source_model, device=str(p.device), dtype=p.dtype)
    return PatchscopeEngine(
        engine.model,
        source_model=source,
        name=engine.target_info.name,
        source_name=source_model,
        decoding=engine.decoding,
        top_k=engine.top_k,
    )


def runner_for(engine: PatchscopeEngine, payload: dict[str, Any], batch_size: int) -> RecipeRunner:
    key = hashlib.sha256(
        json.dumps(
            [payload["recipe"], payload["settings"], payload["fit_texts"], payload["source_model"]], sort_keys=True
        ).encode()
    ).hexdigest()
    runners = _RUNNERS.setdefault(engine, {})
    if key not in runners:
        while len(runners) >= KEEP:
            runners.pop(next(iter(runners)))
        recipe = RECIPES[payload["recipe"]].from_settings(payload["settings"])
        target = _engine_for(engine, payload["source_model"])
        runners[key] = RecipeRunner(target, payload["fit_texts"], recipe.pairs(target.source_info.n_layers), batch_size)
    return runners[key]


def recipe_records(engine: PatchscopeEngine, payload: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Each probe's result and score, in order."""
    runner = runner_for(engine, payload, batch_size)
    metric = RECIPES[payload["recipe"]].metric
    return runner.run([Probe.from_dict(p) for p in payload["probes"]], metric)
