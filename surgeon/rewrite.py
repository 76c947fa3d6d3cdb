"""The adapter pass: rewrite region graphs so each targeted layer's node is followed by its adapters'
subgraphs, then run the rewritten graphs in place of the regions' forwards.

Adapter parameters live in the adapter store, not in the graphs: a rewrite only builds a new
graph and a `GraphModule` that refers to the same parameter objects.
"""

from __future__ import annotations

import copy
import linecache
import operator
import os
import sys
import types
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
    inserted: set[fx.Node] = set()
    out = node
    for name, adapter in adapters:
        with graph.inserting_before(node):
            ctx = EmitContext(graph, root, _prefix(region, node, name), name, adapter.method)
            new_x = adapter.emit_input(ctx, x)
        if new_x is not None and node.args:
            node.args = (new_x, *node.args[1:])
        elif new_x is not None:
            node.kwargs = {**node.kwargs, next(iter(node.kwargs)): new_x}
    with graph.inserting_before(node.next):
        for name, adapter in adapters:
            ctx = EmitContext(graph, root, _prefix(region, node, name), name, adapter.method)
            out = adapter.emit(ctx, x, out)
            inserted.update(ctx.inserted)
            region.adapted.setdefault(_full_path(region, str(node.target)), []).append(name)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)


def _prefix(region: Region, node: fx.Node, adapter: str) -> str:
    # leaf regions all read "self.adapters.<name>": one compiled forward serves them all
    if region.leaf:
        return f"adapters.{adapter}"
    return f"adapters.{adapter}.{escape(str(node.target))}"


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
    return Region(path, type(layer).__name__, leaf_graph(layer), leaf=True)


def install(model: nn.Module, region: Region, graph: fx.Graph | None, root: dict[str, Any]) -> None:
    """Run ``graph`` as the region module's forward (or restore its own forward when None)."""
    module = region_module(model, region)
    module.__dict__.pop("forward", None)
    region.graph, region.gm = None, None
    if graph is None:
        return
    holder = RegionModule(root, graph, f"{region.module_type}Rewritten")
    region.graph, region.gm = graph, holder
    module.forward = types.MethodType(holder.run, holder)
    _maybe_dump(region)


class RegionModule(nn.Module):
    """What a rewritten region's code refers to (``self.<target>``), plus that code.

    Regions with the same rewritten graph (all the q_proj leaves of a model, say) share one
    compiled function: generating and compiling Python per region would dominate compile time.
    """

    def __init__(self, root: dict[str, Any], graph: fx.Graph, class_name: str) -> None:
        super().__init__()
        for target, value in root.items():
            _place(self, target, value)
        self.class_name = class_name
        self.run, self.code = _compiled_forward(graph)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self, *args, **kwargs)


def _place(holder: nn.Module, target: str, value: Any) -> None:
    *parents, leaf = target.split(".")
    for name in parents:
        child = getattr(holder, name, None)
        if child is None:
            child = nn.Module()
            holder.add_module(name, child)
        holder = child
    setattr(holder, leaf, value)


_FORWARDS: dict[tuple, tuple[Any, str]] = {}


def _compiled_forward(graph: fx.Graph) -> tuple[Any, str]:
    key = tuple(
        (n.op, n.name, str(n.target), repr(n.args), repr(n.kwargs), repr(n.type))
        for n in graph.nodes
    )
    hit = _FORWARDS.get(key)
    if hit is None:
        code = graph.python_code("self")
        filename = f"<surgeon region {len(_FORWARDS)}>"
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)
        hit = _FORWARDS[key] = (namespace["forward"], code.src)
    return hit


def _maybe_dump(region: Region) -> None:
    """SURGEON_DUMP=1 prints each rewritten region's code (debugging the adapter pass)."""
    if os.environ.get("SURGEON_DUMP"):
        print(f"# region {region.path or '<root>'} ({region.module_type})", file=sys.stderr)
        print(region.gm.code, file=sys.stderr)
