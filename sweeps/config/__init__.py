"""The config stage every sweep kind shares, before any weights load (no kind is named here):

- `fields`: the field types (layers, positions, axes) and the strict section base;
- `shared`: the sections every sweep has (generation, execution, output with W&B);
- `loader`: the YAML file (UTF-8, no base-60 numbers, no key given twice) and `read_text`;
- `files`: the data files a config names (tables, prompt lists, `locate`);
- `models`: each model's config and tokenizer (`ModelPlan`, `checked_layers`);
- `errors`: `ConfigError` and pydantic's errors with the field first;
- `sweep`: the whole sweep config, the shared sections plus each registered kind's
  (`sweeps.kinds`), and `load_config`; it comes after the kinds in the flow.
"""

from .errors import ConfigError
from .fields import Layers, Positions, Strict, TargetLayers, TargetPositions, axis, expand_layers
from .loader import read_text, read_yaml
from .shared import ExecutionConfig, GenerationConfig, OutputConfig, ReportConfig, WandbConfig

__all__ = [
    "ConfigError",
    "ExecutionConfig",
    "GenerationConfig",
    "Layers",
    "OutputConfig",
    "ReportConfig",
    "Positions",
    "Strict",
    "TargetLayers",
    "TargetPositions",
    "WandbConfig",
    "axis",
    "expand_layers",
    "read_text",
    "read_yaml",
]
