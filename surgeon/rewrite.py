"""The adapter pass: rewrite region graphs so each targeted layer's node is followed by its adapters'
subgraphs, then run the rewritten graphs in place of the regions' forwards.

Adapter parameters live in the adapter store, not in the graphs: a rewrite only builds a new
graph and a `GraphModule` that refers to the same parameter objects.
"""

from __future__ import annotations

import copy
import operator
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.trace import Region, leaf_graph

ActiveLayers = Mapping[int, Sequence[tuple[str, AdapterLayer]]]
"""id(base layer) -> [(adapter name, adapter layer)] in the order they apply."""


class BaseForward(nn.Module):
    """Calls a layer's class forward, bypassing the rewritten forward installed on that layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.layer).forward(self.layer, *args, **kwargs)


def region_module(model: nn.Module, region: Region) -> nn.Module:
    return model.get_submodule(region.path) if region.path else model


def escape(path: str) -> str:
    return path.replace(".", "_") or "root"


def rewrite_region(
    model: nn.Module, region: Region, active: ActiveLayers
) -> tuple[fx.Graph, dict[str, Any]]:
    """A copy of the region's base graph with adapter subgraphs after each targeted layer node."""
    module = region_module(model, region)
    graph = copy.deepcopy(region.base)
    root: dict[str, Any] = {}
    region.adapted = {}
    for node in list(graph.nodes):
        if node.op not in ("call_module", "get_attr"):
            continue
        if region.leaf:
            root[node.target] = BaseForward(module)
            layer = module
        else:
            root[node.target] = operator.attrgetter(node.target)(module)
            layer = root[node.target]
        if node.op == "call_module" and id(layer) in active:
            _emit_adapters(graph, root, node, layer, active[id(layer)], region)
    graph.lint()
    return graph, root


def _emit_adapters(
    graph: fx.Graph,
    root: dict[str, Any],
    node: fx.Node,
    layer: nn.Module,
    adapters: Sequence[tuple[str, AdapterLayer]],
    region: Region,
) -> None:
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    local = region.path.rsplit(".", 1)[-1] if region.leaf else str(node.target)
    inserted: set[fx.Node] = set()
    out = node
    with graph.inserting_before(node.next):
        for name, adapter in adapters:
            ctx = EmitContext(graph, root, f"adapters.{name}.{escape(local)}", name, adapter.method)
            out = adapter.emit(ctx, x, out)
            inserted.update(ctx.inserted)
            region.adapted.setdefault(_full_path(region, str(node.target)), []).append(name)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)


def _full_path(region: Region, target: str) -> str:
    if region.leaf:
        return region.path
    return f"{region.path}.{target}" if region.path else target


def reached_layers(model: nn.Module, regions: Sequence[Region]) -> set[int]:
    """ids of the layers that some region's graph calls."""
    seen: set[int] = set()
    for region in regions:
        module = region_module(model, region)
        for node in region.base.nodes:
            if node.op == "call_module":
                seen.add(id(module) if region.leaf else id(module.get_submodule(node.target)))
    return seen


def leaf_region(model: nn.Module, path: str) -> Region:
    layer = model.get_submodule(path)
    return Region(path, type(layer).__name__, leaf_graph(layer, path), leaf=True)


def install(model: nn.Module, region: Region, graph: fx.Graph | None, root: dict[str, Any]) -> None:
    """Run ``graph`` as the region module's forward (or restore its own forward when None)."""
    module = region_module(model, region)
    module.__dict__.pop("forward", None)
    region.graph, region.gm = None, None
    if graph is None:
        return
    gm = fx.GraphModule(root, graph, class_name=f"{region.module_type}Rewritten")
    region.graph, region.gm = graph, gm
    module.forward = gm.forward
    _maybe_dump(region)


def _maybe_dump(region: Region) -> None:
    """SURGEON_DUMP=1 prints each rewritten region's code (debugging the adapter pass)."""
    if os.environ.get("SURGEON_DUMP"):
        print(f"# region {region.path or '<root>'} ({region.module_type})", file=sys.stderr)
        print(region.gm.code, file=sys.stderr)
