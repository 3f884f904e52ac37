"""What the config stage knows of each model, from its config and tokenizer (never its weights):
`model_info_for` (the core's `model_info`, its error naming the config field), `checked_layers`
(a layer spec against the model) and `ModelPlan`, what one model runs (layers, token counts),
which the grid is built from; `beside_config`, where a model named by a relative path is."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchscope_core import ALIASES, ModelInfo, PatchscopeError, model_info
from patchscope_core.models.sites import check_layer

from .errors import ConfigError
from .fields import expand_layers


@dataclass
class ModelPlan:
    """What one model runs: its layers and the token count of every prompt."""

    info: ModelInfo
    source_layers: list[int]
    target_layers: list[int] | None  # None: same as the source layer
    n_tokens: dict[str, int] = field(default_factory=dict)


def model_info_for(name: str, field_name: str) -> ModelInfo:
    """The model's config and tokenizer; an unknown model is a ConfigError naming `field_name`."""
    try:
        return model_info(name)
    except PatchscopeError as exc:
        raise ConfigError(f"{field_name}: {str(exc).removeprefix('model: ')}") from None


def checked_layers(spec: Any, info: ModelInfo, field_name: str) -> list[int]:
    try:
        layers = expand_layers(spec, info.n_layers)
    except ValueError as exc:
        raise ConfigError(f"{field_name}: {exc}") from None
    for layer in layers:
        check_layer(layer, info, field_name)
    return layers


def beside_config(name: str, base: Path | None) -> str:
    """A model named by a relative path resolves as the files a config names do
    (`files.locate`): a model directory (one with a config.json) from the current directory, or
    else beside the config. One found beside the config is named by that path, written so that
    it reads as a path (`./runs/cfg/my-model`, not a hub name); other names are left as they are."""
    if base is None or name in ALIASES or not isinstance(name, str):
        return name
    path = Path(name).expanduser()
    if path.is_absolute() or (path / "config.json").is_file() or not (base / path / "config.json").is_file():
        return name
    found = os.path.normpath(base / path)
    return found if os.path.isabs(found) or found.startswith(".") else f".{os.sep}{found}"
