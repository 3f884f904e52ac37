"""Where a TransformerLens hook name lives among the Hugging Face modules.

`module_boundary(components, name)` reads the bridge adapter's own component mapping and the
components' hook aliases (never a per-architecture table) and gives the Hugging Face module
path, whether the hook is that module's input or output, and a scale (1 except at a block's
scaled contribution, Granite's `hook_attn_out`). `models/info.py` reads module widths through
it and `models/sites.py` resolves every site with it.
"""

from __future__ import annotations

from typing import Literal


def module_boundary(components: dict, name: str) -> tuple[str, Literal["input", "output"], float]:
    """(Hugging Face module path, 'input' or 'output', scale) of a TransformerLens hook name, read
    from the bridge adapter's component mapping and the components' hook aliases. scale is 1
    except at a block's own contribution hook points (Granite: `hook_attn_out` is the attention
    output x the block's residual multiplier)."""
    from transformer_lens.model_bridge.bridge_core import BridgeCore

    return _walk(components, BridgeCore.hook_aliases, name.split("."), "", None)


def _walk(children: dict, aliases: dict, parts: list[str], path: str, component):
    head, rest = parts[0], parts[1:]
    if component is not None and head in ("hook_in", "hook_out") and not rest:
        if component.name is None:  # a container the bridge declares without a module of its own
            raise LookupError(head)
        return path, "input" if head == "hook_in" else "output", 1.0
    if head in aliases and not rest:  # an alias: a path relative to this component
        targets = aliases[head] if isinstance(aliases[head], list) else [aliases[head]]
        for target in targets:
            try:
                return _walk(children, aliases, target.split("."), path, component)
            except LookupError:
                continue
        raise LookupError(head)
    if not rest and component is not None and head not in children:
        return _contribution(children, component, head, path)
    child = children[head]
    if child.name is None:  # no container module: its parts are named relative to the parent
        if component is None or not rest:
            raise LookupError(head)
        child_path = path
    else:
        child_path = child.name if component is None else f"{path}.{child.name}"
    if getattr(child, "is_list_item", False):  # blocks: the next part is the layer index
        if not rest or not rest[0].isdigit():
            raise LookupError(head)
        child_path, rest = f"{child_path}.{rest[0]}", rest[1:]
    if not rest:
        raise LookupError(head)
    return _walk(child.submodules or {}, getattr(child, "hook_aliases", {}) or {}, rest, child_path, child)


def _contribution(children: dict, component, head: str, path: str):
    """A real hook point a block declares for a scaled sublayer output (TransformerLens'
    ScaledResidualBlockBridge: `hook_attn_out` / `hook_mlp_out` fire on the sublayer module's
    output x `residual_contribution_scale`)."""
    from transformer_lens.model_bridge.generalized_components.block import ScaledResidualBlockBridge

    if not isinstance(component, ScaledResidualBlockBridge):
        raise LookupError(head)
    sub = {"hook_attn_out": component.scaled_attn_submodule, "hook_mlp_out": component.scaled_mlp_submodule}.get(head)
    if sub is None or sub not in children or children[sub].name is None:
        raise LookupError(head)
    return f"{path}.{children[sub].name}", "output", float(component.residual_contribution_scale)
