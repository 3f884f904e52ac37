"""The sweep config: the shared sections (`sweeps.config.shared`) plus the sections of every
registered sweep kind (`sweeps.kinds.KINDS`), validated with pydantic before anything runs.

`kind` says what the sweep runs (`sweeps.kinds.DEFAULT`, patchscope, when left out); a kind's
sections are required for it and refused for the others. Three stages, all before any weights
load: here `load_config` (UTF-8, YAML syntax, types: unknown keys rejected, layer specs parsed);
the kind's rows; its checks against each model's config and tokenizer (`sweeps.plan`). Every
error is a `ConfigError` whose message starts with the field, e.g.
`source.layers: 31 is out of range 0 .. 29 for smollm2-135m (...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ..kinds import DEFAULT, KINDS
from .errors import ConfigError, format_errors
from .loader import read_yaml
from .models import beside_config
from .shared import ExecutionConfig, GenerationConfig, OutputConfig, ReportConfig


class _Sweep(BaseModel):
    """The checks every sweep config gets, whatever its kinds' sections."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _sections(self):
        kind = KINDS[self.kind]
        needed = tuple(kind.sections)
        for section in needed:
            if getattr(self, section) is None:
                raise ValueError(f"{section}: a {self.kind} sweep needs a {section} section")
        for section in [s for s in _all_sections() if s not in needed]:
            if getattr(self, section) is not None:
                raise ValueError(
                    f"{section}: not used by a {self.kind} sweep (kind: {self.kind} takes {', '.join(needed)})"
                )
        kind.check_config(self)
        metrics = kind.report_metrics
        if self.report.metric is not None and self.report.metric not in metrics:
            raise ValueError(
                f"report.metric: {self.report.metric!r} is not a measure of {self.kind} sweeps"
                + (f" (allowed: {', '.join(metrics)})" if metrics else " (it takes no report section)")
            )
        if self.report.contrast is not None and not metrics:
            raise ValueError(f"report.contrast: a {self.kind} sweep takes no report section")
        twice = sorted({m for m in self.models if self.models.count(m) > 1})
        if twice:
            raise ValueError(f"models: {', '.join(twice)} listed twice")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}").expanduser()


def _all_sections() -> dict[str, Any]:
    """Every registered kind's sections, in registration order (a section two kinds share once)."""
    out: dict[str, Any] = {}
    for kind in KINDS.values():
        for key, model in kind.sections.items():
            if out.setdefault(key, model) is not model:
                raise TypeError(f"sweep kinds disagree on the {key!r} section")
    return out


_MODELS: dict[tuple, type] = {}


def sweep_config_model() -> type:
    """The pydantic model of a sweep config for the kinds registered now."""
    names = tuple(KINDS)
    if names not in _MODELS:
        fields: dict[str, Any] = {
            "name": (str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")),
            "kind": (Literal[names], DEFAULT),
            "models": (list[str], Field(min_length=1)),
        }
        fields.update({key: (model | None, None) for key, model in _all_sections().items()})
        fields.update(
            generation=(GenerationConfig, GenerationConfig()),
            execution=(ExecutionConfig, ExecutionConfig()),
            output=(OutputConfig, OutputConfig()),
            report=(ReportConfig, ReportConfig()),
        )
        _MODELS[names] = create_model("SweepConfig", __base__=_Sweep, **fields)
    return _MODELS[names]


SweepConfig = sweep_config_model()  # for the built-in kinds (annotations, documentation)


def parse_config(data: Any, where: str = "config"):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys (name, models, source, target, ...)")
    model = sweep_config_model()
    tagged = {s: t for kind in KINDS.values() for s, t in kind.tagged.items()}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model, tagged)) from None


def load_config(path: str | Path):
    """The config in the file at `path`; a model named by a relative path is found as the files
    it names are, from the current directory or else beside the config (`beside_config`)."""
    config = parse_config(read_yaml(path), str(Path(path)))
    models = [beside_config(m, Path(path).parent) for m in config.models]
    return config if models == config.models else config.model_copy(update={"models": models})
