"""Sweep configs for the tests: a base config with changes, written as YAML."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml


def changed(base: dict, **changes) -> dict:
    """A deep copy of `base` with changes: 'section__key' sets a nested value (a missing section
    is created), a plain key a top-level one; None removes the key."""
    cfg = copy.deepcopy(base)
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def write_yaml(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
