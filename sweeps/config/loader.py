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
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                  |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_text(path: Path, field_name: str, encoding: str = "utf-8") -> str:
    """A text file as UTF-8 (`patchscope_core.base.textfiles.read_text`, the one reader of text
    files); other bytes or a binary file are a ConfigError naming the field, the file and the line."""
    from patchscope_core import PatchscopeError
    from patchscope_core.base.textfiles import read_text as core_read_text

    try:
        return core_read_text(path, field_name, encoding)
    except PatchscopeError as exc:
        raise ConfigError(str(exc)) from None


MAX_NODES = 1_000_000  # a config expanding to more YAML values than this (aliases counted each time used) is refused


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values the node stands for with every alias expanded, counted once per node
    (a few hundred bytes of nested aliases can stand for billions)."""
    todo, open_ = [(node, False)], set()
    while todo:
        n, children_done = todo.pop()
        if id(n) in sizes:
            continue
        if not children_done and id(n) in open_:  # an alias inside its own anchor
            raise ConfigError(f"config: the alias on line {n.start_mark.line + 1} refers to a value that contains it")
        open_.add(id(n))
        kids = (
            [k for pair in n.value for k in pair]
            if isinstance(n, yaml.MappingNode)
            else list(n.value)
            if isinstance(n, yaml.SequenceNode)
            else []
        )
        if children_done or not kids:
            sizes[id(n)] = min(1 + sum(sizes[id(k)] for k in kids), 10 * MAX_NODES)
        else:
            todo.append((n, True))
            todo += [(k, False) for k in kids if id(k) not in sizes]
    return sizes[id(node)]


def _refuse_duplicate_keys(node: yaml.Node, path: str = "", seen_nodes: set[int] | None = None) -> None:
    """A key given twice in one mapping (YAML keeps the last one silently) is an error. Each
    node is checked once, however many aliases point at it."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
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
            _refuse_duplicate_keys(value_node, name, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", seen_nodes)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """YAML's error in one short phrase with its line and column (PyYAML's own text spans
    several lines and quotes the file)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" on line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f", {context}" if context else "")


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML config file (refusing duplicate keys and alias bombs); a ConfigError
    names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    text = read_text(path, "config")
    loader = _YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_NODES:
            raise ConfigError(
                f"config: {path} expands to more than {MAX_NODES:,} values through its aliases (&name, "
                "*name); write the values out, or use fewer nested aliases"
            )
        _refuse_duplicate_keys(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML ({_yaml_problem(exc)})") from None
    except RecursionError:
        raise ConfigError(f"config: {path} is nested too deeply to read") from None
    finally:
        loader.dispose()
