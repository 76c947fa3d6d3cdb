"""The adapter pass: rewrite region graphs so each targeted layer's node is followed by its adapters'
subgraphs, then run the rewritten graphs in place of the regions' forwards.

Adapter parameters live in the adapter store, not in the graphs: a rewrite only builds a new
graph and a `GraphModule` that refers to the same parameter objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import linecache
import operator
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, CallAdapter, EmitContext, input_application_order
from surgeon.errors import SpecError
from surgeon.specialise import Dispatcher
from surgeon.trace import Region, adaptable_types, is_parameter_owner, leaf_graph

ActiveLayers = Mapping[int, Sequence[tuple[str, AdapterLayer]]]
"""id(base layer) -> [(adapter name, adapter layer)] in the order they apply."""

GraphPass = Callable[[fx.Graph, dict[str, Any]], Any]
"""Runs on a rewritten graph before it is compiled; gets the graph and the objects its
call_module/get_attr targets name (the fusion pass, say)."""


class BaseForward(nn.Module):
    """Calls a layer's class forward, bypassing the rewritten forward installed on that layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # a graph may also read the layer's attributes (``conv.weight.dtype``) through this path
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(self.__dict__["layer"], name, None)
            if not isinstance(value, torch.Tensor):
                raise
            return value


def region_module(model: nn.Module, region: Region) -> nn.Module:
    return model.get_submodule(region.path) if region.path else model


def escape(path: str) -> str:
    return path.replace(".", "_") or "root"


@dataclass
class Rewrite:
    """One region's rewritten graph, the module its code runs on, and what it adapted."""

    graph: fx.Graph | None
    holder: RegionModule | Dispatcher
    adapted: dict[str, list[str]]


def rewrite_region(
    model: nn.Module,
    region: Region,
    active: ActiveLayers,
    mixed: bool = False,
    graph_passes: Sequence[GraphPass] = (),
    calls: Sequence[tuple[str, CallAdapter]] = (),
) -> Rewrite:
    """A copy of the region's base graph with adapter subgraphs after each targeted layer node,
    then the nodes of the call adapters that `touch <CallAdapter.touches>` the region.

    ``mixed``: each adapter runs only on the batch rows assigned to it (``adapter_names``).
    ``graph_passes`` then run on the rewritten graph, in order.
    """
    module = region_module(model, region)
    graph = copy.deepcopy(region.base)
    root: dict[str, Any] = {}
    adapted: dict[str, list[str]] = {}
    constants = getattr(region.base, "constants", {})
    for node in list(graph.nodes):
        if node.op not in ("call_module", "get_attr"):
            continue
        if node.op == "get_attr" and node.target in constants:
            root[node.target] = constants[node.target]
            continue
        if region.leaf:
            root[node.target] = BaseForward(module)
            layer = module
        else:
            layer = operator.attrgetter(node.target)(module)
            # a specialised region's layers also carry their own rewrites (for calls that run
            # the module's own forward): its graph must not apply their adapters twice
            specialised = region.specialised and node.op == "call_module"
            root[node.target] = BaseForward(layer) if specialised else layer
        if node.op == "call_module" and id(layer) in active:
            emit = _emit_mixed if mixed else _emit_adapters
            emit(graph, root, node, active[id(layer)], region)
            adapted[_full_path(region, str(node.target))] = [n for n, _ in active[id(layer)]]
    for name, call in calls:
        if call.touches(region):
            call.emit_region(
                EmitContext(graph, root, f"adapters.{name}", name, call.method), region
            )
            adapted.setdefault(region.path or "<root>", []).append(name)
    for graph_pass in graph_passes:
        graph_pass(graph, root)
    graph.lint()
    return Rewrite(graph, RegionModule(root, graph, f"{region.module_type}Rewritten"), adapted)


def _emit_adapters(
    graph: fx.Graph,
    root: dict[str, Any],
    node: fx.Node,
    adapters: Sequence[tuple[str, AdapterLayer]],
    region: Region,
) -> None:
    x = layer_input = _layer_input(node)
    inserted: set[fx.Node] = set()
    names = {id(adapter): name for name, adapter in adapters}
    for adapter in input_application_order([adapter for _, adapter in adapters]):
        name = names[id(adapter)]
        with graph.inserting_before(node):
            transformed = adapter.emit_input(_context(graph, root, region, node, name, adapter), x)
        x = transformed if transformed is not None else x  # the next adapter transforms this one
    if x is not layer_input:
        _set_layer_input(node, x)
    base = out = _replace_base_call(graph, root, node, adapters, region)
    with graph.inserting_before(base.next):
        for name, adapter in adapters:
            ctx = _context(graph, root, region, node, name, adapter)
            out = adapter.emit(ctx, layer_input, out)
            inserted.update(ctx.inserted)
    base.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)
    if not base.users:  # an adapter computed the layer's whole output itself (FRoD alone)
        graph.erase_node(base)


def _context(
    graph: fx.Graph,
    root: dict[str, Any],
    region: Region,
    node: fx.Node,
    name: str,
    adapter: AdapterLayer,
) -> EmitContext:
    prefix = _prefix(region, node, name)
    return EmitContext(graph, root, prefix, name, adapter.method, adapter.fuses_as, node)


def _set_layer_input(node: fx.Node, x: fx.Node) -> None:
    if node.args:
        node.args = (x, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, next(iter(node.kwargs)): x}


def _replace_base_call(
    graph: fx.Graph,
    root: dict[str, Any],
    node: fx.Node,
    adapters: Sequence[tuple[str, AdapterLayer]],
    region: Region,
) -> fx.Node:
    """The first adapter that spells out its base layer's computation (`AdapterLayer.emit_base`)
    replaces the layer's call node; the node that now gives the base output is returned."""
    for name, adapter in adapters:
        with graph.inserting_before(node):
            base_out = adapter.emit_base(
                _context(graph, root, region, node, name, adapter), _layer_input(node)
            )
        if base_out is not None:
            base_out.meta["surgeon"]["replaces"] = str(node.target)
            node.replace_all_uses_with(base_out)
            graph.erase_node(node)
            return base_out
    return node


def _emit_mixed(
    graph: fx.Graph,
    root: dict[str, Any],
    node: fx.Node,
    adapters: Sequence[tuple[str, AdapterLayer]],
    region: Region,
) -> None:
    """Per adapter: gather its rows of the batch, run it there, scatter the result back. An
    adapter that transforms the layer's input does so on its rows before the layer runs."""
    x = _layer_input(node)
    transformed = x
    with graph.inserting_before(node):
        for name, adapter in adapters:
            if not adapter.transforms_input:
                continue
            ctx = _context(graph, root, region, node, name, adapter)
            rows = ctx.call(batch_rows, name, x)
            part = adapter.emit_input(ctx, ctx.call(torch.index_select, transformed, 0, rows))
            transformed = ctx.call(torch.index_copy, transformed, 0, rows, part)
    if transformed is not x:
        _set_layer_input(node, transformed)
    inserted: set[fx.Node] = set()
    out = node
    with graph.inserting_before(node.next):
        for name, adapter in adapters:
            ctx = _context(graph, root, region, node, name, adapter)
            rows = ctx.call(batch_rows, name, x)
            base_rows = ctx.call(torch.index_select, node, 0, rows)
            part = adapter.emit(ctx, ctx.call(torch.index_select, x, 0, rows), base_rows)
            if part is base_rows:  # it only transforms the input: nothing to scatter back
                for unused in reversed(ctx.inserted):
                    graph.erase_node(unused)
                continue
            out = ctx.call(torch.index_copy, out, 0, rows, part)
            inserted.update(ctx.inserted)
    node.replace_all_uses_with(out, delete_user_cb=lambda user: user not in inserted)


_ROWS: contextvars.ContextVar[dict[str, list[int]] | None] = contextvars.ContextVar(
    "surgeon_rows", default=None
)


@contextlib.contextmanager
def mixed_rows(adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, mixed-batch graphs read which rows each adapter owns."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        rows.setdefault(name, []).append(i)
    token = _ROWS.set({"__count__": [len(adapter_names)], **rows})
    try:
        yield
    finally:
        _ROWS.reset(token)


def in_mixed_batch() -> bool:
    """Whether a mixed-batch call (``adapter_names``) is running."""
    return _ROWS.get() is not None


def batch_rows(adapter: str, like: torch.Tensor) -> torch.Tensor:
    """The batch rows that ``adapter`` owns in the current mixed-batch call, on ``like``'s device."""
    rows = _ROWS.get()
    if rows is None:
        raise RuntimeError("a mixed-batch graph ran outside a call with adapter_names")
    if like.shape[0] != rows["__count__"][0]:
        raise SpecError(
            f"adapter_names has {rows['__count__'][0]} entries but the batch has "
            f"{like.shape[0]} rows"
        )
    return torch.tensor(rows.get(adapter, []), dtype=torch.long, device=like.device)


_CALL_VALUES: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "surgeon_call_values", default=None
)


_DERIVED_VALUES: contextvars.ContextVar[Mapping[str, Mapping[str, Any]] | None] = (
    contextvars.ContextVar("surgeon_derived_values", default=None)
)


def set_call_values(
    values: Mapping[str, Any], derived: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """The layer adapters' own call arguments (`AdapterLayer.call_arguments`) of the model call
    about to run, and per adapter the values its spec derived from the call
    (`MethodSpec.call_values`), which the graphs read through `call_value`."""
    _CALL_VALUES.set(dict(values))
    _DERIVED_VALUES.set(dict(derived or {}))


def call_value(name: str, adapter: str) -> Any:
    """``name`` for ``adapter`` in the running model call, as given: the call's own argument
    if it has one (the caller's word wins), else the value ``adapter``'s spec derived from the
    call (`MethodSpec.call_values`: aLoRA's offsets from ``input_ids``), else None."""
    value = (_CALL_VALUES.get() or {}).get(name)
    if value is None:
        value = (_DERIVED_VALUES.get() or {}).get(adapter, {}).get(name)
    return value


def own_rows(adapter: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` (one entry per batch row); in a mixed batch, only ``adapter``'s rows of it."""
    if _ROWS.get() is None:
        return value
    return value.index_select(0, batch_rows(adapter, value))


def call_argument(name: str, adapter: str, like: torch.Tensor) -> torch.Tensor:
    """Argument ``name`` of the running model call (Poly's ``task_ids``) as a tensor on
    ``like``'s device; in a mixed batch, only ``adapter``'s rows of it."""
    value = call_value(name, adapter)
    if value is None:
        raise SpecError(
            f"adapter {adapter!r} needs `{name}` in the model call (one per batch row): pass "
            f"{name}=... to the compiled model, generate or the training samples"
        )
    return own_rows(adapter, torch.as_tensor(value, device=like.device))


def _layer_input(node: fx.Node) -> fx.Node:
    """The input a layer's call node passes to the layer (its first argument)."""
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


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
    """ids of the layers that some region's graph calls (a specialised region's: every layer
    in its subtree, which any of its variants may call)."""
    seen: set[int] = set()
    for region in regions:
        module = region_module(model, region)
        if region.specialised:
            seen.update(id(layer) for _, layer in _layers_in(model, region))
            continue
        for node in region.base.nodes:
            if node.op == "call_module":
                seen.add(id(module) if region.leaf else id(module.get_submodule(node.target)))
    return seen


def specialised_rewrite(
    model: nn.Module,
    region: Region,
    active: ActiveLayers,
    mixed: bool = False,
    graph_passes: Sequence[GraphPass] = (),
) -> Rewrite:
    """A dispatcher for a specialised region: each variant it traces is rewritten like any
    region graph (the same adapter subgraphs and graph passes)."""

    def build(graph: fx.Graph) -> Rewrite:
        variant = Region(region.path, region.module_type, graph, specialised=True)
        return rewrite_region(model, variant, active, mixed, graph_passes)

    dispatcher = Dispatcher(region_module(model, region), region, build, adaptable_types())
    adapted = {
        path: [name for name, _ in active[id(layer)]]
        for path, layer in _layers_in(model, region)
        if id(layer) in active
    }
    return Rewrite(None, dispatcher, adapted)


def _layers_in(model: nn.Module, region: Region) -> list[tuple[str, nn.Module]]:
    module = region_module(model, region)
    prefix = f"{region.path}." if region.path else ""
    return [
        (prefix + name, m)
        for name, m in module.named_modules()
        if isinstance(m, adaptable_types()) or is_parameter_owner(m)
    ]


def leaf_region(model: nn.Module, path: str) -> Region:
    layer = model.get_submodule(path)
    return Region(path, type(layer).__name__, leaf_graph(layer), leaf=True)


def install(model: nn.Module, region: Region, rewrite: Rewrite | None) -> None:
    """Run a rewrite as the region module's forward (or restore its own forward when None)."""
    module = region_module(model, region)
    module.__dict__.pop("forward", None)
    region.graph, region.gm, region.adapted = None, None, {}
    if rewrite is None:
        return
    region.graph, region.gm, region.adapted = rewrite.graph, rewrite.holder, rewrite.adapted
    module.forward = types.MethodType(rewrite.holder.run, rewrite.holder)
    if rewrite.graph is not None:
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
