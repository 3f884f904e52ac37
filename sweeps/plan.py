"""The config stage after the types (`sweeps.config.sweep`), through the sweep's kind
(`sweeps.kinds.KINDS`), all before any weights load:

- `load_rows`: the kind's input rows, from the config or the files it names (a relative file is
  read from the current directory, or else beside the config);
- `check_against_models`: every setting against each model's config and tokenizer (one
  `ModelPlan` per model: layers, token counts);
- `study_context`: what every task shares (a table of kinds, a trace's settings, a recipe's);
- `config_hash`: the hash of everything that decides the results;
- `model_keys`: what identifies each model's weights, and those of the other models the kind
  reads (stored beside each cell: a changed model reuses none of its stored cells);
- `Plan`: what planning hands the run, in one frozen object (the driver builds it,
  `sweeps.run.driver.plan`, adding the grid's count; `Plan.at` settles where it runs).
Every error is a `ConfigError` whose message starts with the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config.models import ModelPlan
from .kinds import KINDS
from .kinds.base import SweepKind


def load_rows(config, base: Path | None = None) -> list:
    return KINDS[config.kind].load_rows(config, base)


def check_against_models(config, rows: list, base: Path | None = None) -> dict[str, ModelPlan]:
    """Every setting against each model's config and tokenizer; never weights."""
    return KINDS[config.kind].check(config, rows, base)


def study_context(config, rows: list, base: Path | None = None) -> Any:
    return KINDS[config.kind].context(config, rows, base)


def config_hash(config, rows: list, context: Any = None) -> str:
    """Hash of everything that decides the results (models, rows, the kind's sections and
    context, generation); execution and output settings may change between resumed runs."""
    kind = KINDS[config.kind]
    sections = set(kind.sections) | {"kind", "models", "generation"}
    science = kind.science(
        config.model_dump(mode="json", include=sections, exclude_defaults=False), config, rows, context
    )
    blob = json.dumps(science, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_keys(config) -> dict[str, str]:
    """{model: weights key} of every model a sweep runs (`patchscope_core.models.model_fingerprint`);
    a kind that reads other models' states (`SweepKind.other_models`: cross_model's source model)
    adds their keys."""
    from patchscope_core.models import model_fingerprint

    extra = "".join(f"+{model_fingerprint(m)}" for m in KINDS[config.kind].other_models(config))
    return {name: model_fingerprint(name) + extra for name in config.models}


@dataclass(frozen=True)
class Plan:
    """A sweep as planned, before any weights load: what the dry run describes and the run
    computes, handed over whole (the rows and the model plans are read, never changed)."""

    config: Any  # the validated sweep config (`sweeps.config.sweep`)
    rows: list  # the kind's input rows (`load_rows`)
    models: dict[str, ModelPlan]  # each model's plan: layers, token counts (`check_against_models`)
    context: Any  # what every task shares (`study_context`)
    n_cells: int  # the whole grid, counted without building it (within execution.max_cells)
    config_hash: str  # everything that decides the results (`config_hash`)
    address: str | None = None  # the Ray cluster the run joins; None: this machine

    @property
    def kind(self) -> SweepKind:
        return KINDS[self.config.kind]

    def at(self, address: str | None) -> Plan:
        """This plan run at `address` (None: on this machine), its execution settings resolved
        for it (`ExecutionConfig.resolved`: a ConfigError for a local backend given an address)."""
        execution = self.config.execution.resolved(local=not address)
        return dataclasses.replace(
            self, config=self.config.model_copy(update={"execution": execution}), address=address
        )
