"""Reading the sweep config file: UTF-8 only, YAML without base-60 numbers, a key given twice is
an error (`read_yaml`); `read_text` reads any text file a config names, as UTF-8."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers, so an unquoted `layers: 5:10` is the slice it looks
    like (PyYAML's SafeLoader would read the integer 310)."""


_BASE60 = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _BASE60]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_text(path: Path, field_name: str, encoding: str = "utf-8") -> str:
    """A text file as UTF-8; other bytes are a ConfigError naming the field, the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{field_name}: {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None


def _refuse_duplicate_keys(node: yaml.Node, path: str = "") -> None:
    """A key given twice in one mapping (YAML keeps the last one silently) is an error."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            name = f"{path}.{key}" if path else str(key)
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{name}: given twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            _refuse_duplicate_keys(value_node, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]")


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML config file (refusing duplicate keys); a ConfigError names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    text = read_text(path, "config")
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _refuse_duplicate_keys(node)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML ({exc})") from None
    finally:
        loader.dispose()
