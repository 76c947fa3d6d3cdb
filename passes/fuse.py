"""The fusion pass: the adapter subgraphs the method passes emit become single fused ops.

Runs on a rewritten region graph (`surgeon.rewrite.rewrite_region`'s ``graph_passes`` hook, which
`CompiledModel.fuse` turns on). Each rule is a plain pair of functions, ``match`` and ``replace``,
anchored on the ``(op, target)`` of the node that ends the subgraph, so most nodes are rejected
by one dictionary lookup:

Adapter layers declare which rule their subgraph follows (`AdapterLayer.fuses_as`, carried in
each node's ``surgeon`` tag); a rule only looks at nodes tagged with its name:

* ``lora``: ``base(x) + linear(linear(h, A) * s, B)`` (h: x, its cast, or dropout of them)
  -> ``surgeon::lora_linear``;
* ``qlora``: a 4-bit base spelled out by LoRA's 4-bit layer (passes/lowrank/lora.py,
  ``linear_4bit(x, dequantize_4bit(...))``)
  plus its LoRA -> ``surgeon::nf4_lora_linear`` on the packed weight (NF4 or FP4, any block size,
  absmax double-quantized or not), in the layer's compute dtype;
* ``dora``: ``addcmul(linear(linear(h, A), B * view(f * s), (1 - f) b), base(x), f)``
  -> ``surgeon::dora_linear`` (the norm module stays: it caches in eval mode; so does the
  dropout-correction module after it, which only adds a term while training);
* ``multi_lora``: a mixed batch's gather/adapter/scatter chain (``adapter_names=``) where every
  adapter is a LoRA without dropout -> ``surgeon::multi_lora_linear`` with a per-token index.

Base layers: ``nn.Linear`` (and subclasses that keep its forward), GPT-2's ``Conv1D``, whose
``(in, out)`` weight goes in as a transposed view, and QLoRA's 4-bit layers. Other layers,
adapters and methods are left as they are. LoRA dropout is fused exactly: the model's own dropout
module still draws the mask, and the fused op takes its output as the adapter's input
(``x_lora``). An adapter's cast back to its base's dtype stays after the fused op (a no-op,
except under autocast, where it gives the dtype the unfused graph gives).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgeon.kernels  # noqa: F401  (registers the torch.ops.surgeon ops)
from surgeon.kernels import stack_adapters
from surgeon.layers import gpt2_conv1d_type
from surgeon.quant import QUANT_TYPES, code_4bit, dequantize_4bit, linear_4bit
from surgeon.rewrite import BaseForward, batch_rows

# -- the base layer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseLayer:
    """A targeted layer's call node and how the fused op reads its weight."""

    node: fx.Node
    module: nn.Module
    path: str  # attribute path from the region holder to the module
    transposed: bool  # weight stored (in, out)

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]

    def emit_weight(self, graph: fx.Graph) -> tuple[fx.Node, fx.Node | None]:
        """get_attr nodes that read the live weight and bias through the module on every call
        (a swapped or re-cast parameter is picked up, as the layer's own forward would)."""
        weight = graph.get_attr(f"{self.path}.weight")
        if self.transposed:
            weight = graph.call_method("t", (weight,))
        bias = graph.get_attr(f"{self.path}.bias") if self.module.bias is not None else None
        return weight, bias


def _linear_layout(module: nn.Module) -> bool | None:
    """How a fused op reads each supported layer type's weight: ``transposed`` or None."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return False
    conv1d = gpt2_conv1d_type()
    if conv1d is not None and type(module) is conv1d:
        return True
    return None


def base_layer(node: Any, root: dict[str, Any]) -> BaseLayer | None:
    """The supported base layer that ``node`` calls with a single input, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or "surgeon" in node.meta:
        return None
    if len(node.args) != 1 or node.kwargs:
        return None
    owner = root.get(node.target)
    module = owner.layer if isinstance(owner, BaseForward) else owner
    path = f"{node.target}.layer" if isinstance(owner, BaseForward) else str(node.target)
    transposed = _linear_layout(module) if isinstance(module, nn.Module) else None
    if transposed is None:
        return None
    return BaseLayer(node, module, path, transposed)


@dataclass(frozen=True)
class QuantizedBase:
    """A 4-bit base as LoRA's 4-bit layer spells it out, ``linear_4bit(x, dequantize_4bit(packed,
    absmax, shape, block_size, quant_type, compute_dtype), bias)``, read as `nf4_lora_linear`
    takes it. ``absmax`` is the float32 one: with double quantization, the graph's own
    `dequantize_absmax` of the stored 8-bit state (1/64 of the weight's size), kept."""

    node: fx.Node  # the linear_4bit call
    dequantize: fx.Node
    packed: fx.Node
    absmax: fx.Node
    shape: tuple[int, int]
    block_size: int
    quant_type: str
    compute_dtype: torch.dtype
    bias: fx.Node | None

    @property
    def input(self) -> fx.Node:
        return self.node.args[0]

    @property
    def site(self) -> str:
        return self.node.meta["surgeon"]["replaces"]

    def emit_weight(self, graph: fx.Graph) -> tuple:
        """The op's weight arguments, ``packed, absmax, code, shape, block_size``."""
        code = graph.call_function(code_table, (self.packed, self.quant_type))
        return self.packed, self.absmax, code, list(self.shape), self.block_size


def quantized_base(node: Any) -> QuantizedBase | None:
    """The 4-bit base that ``node`` computes, or None (also for codes the op cannot take)."""
    args = _call(node, linear_4bit, 3)
    if args is None or "replaces" not in (_tag(node) or {}):
        return None
    weight = args[1]
    found = _call(weight, dequantize_4bit, 6)
    if found is None or len(weight.users) != 1:
        return None
    packed, absmax, shape, block_size, quant_type, dtype = found
    if quant_type not in QUANT_TYPES or len(shape) != 2:
        return None
    shape = tuple(shape)
    return QuantizedBase(
        node, weight, packed, absmax, shape, block_size, quant_type, dtype, args[2]
    )


def code_table(packed: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (NF4's or FP4's), on ``packed``'s device."""
    return code_4bit(quant_type, packed.device)


# -- node helpers ------------------------------------------------------------------------------


def _call(node: Any, target: Any, arity: int) -> tuple | None:
    """``node``'s positional args if it calls ``target`` with ``arity`` of them and no kwargs."""
    ok = isinstance(node, fx.Node) and node.op == "call_function" and node.target is target
    return node.args if ok and len(node.args) == arity and not node.kwargs else None


def _method(node: Any, name: str) -> tuple | None:
    ok = isinstance(node, fx.Node) and node.op == "call_method" and node.target == name
    return node.args if ok and not node.kwargs else None


def _tag(node: Any) -> dict | None:
    return node.meta.get("surgeon") if isinstance(node, fx.Node) else None


def _attr(node: Any, adapter: str) -> bool:
    """A get_attr the same adapter's pass inserted."""
    tag = _tag(node)
    return node.op == "get_attr" and tag is not None and tag.get("adapter") == adapter


@dataclass
class AdapterInput:
    """What an adapter reads: the layer input ``x``, possibly cast, possibly through dropout."""

    dropped: fx.Node | None  # dropout's output: the fused op's ``x_lora``
    nodes: list[fx.Node] = field(default_factory=list)  # the cast, removable once unused


def _adapter_input(h: Any, x: fx.Node, adapter: str, dropout: bool) -> AdapterInput | None:
    """Recognise ``h`` as ``x``, ``x.to(dtype)``, or (with ``dropout``) the dropout module on
    either; None if it is anything else."""
    found = AdapterInput(None)
    tag = _tag(h)
    if dropout and tag is not None and tag.get("adapter") == adapter and h.op == "call_module":
        if not str(h.target).endswith(".dropout") or len(h.args) != 1:
            return None
        found.dropped, h = h, h.args[0]
    cast = _method(h, "to")
    if cast is not None and _tag(h) is not None and len(cast) == 2 and cast[0] is x:
        found.nodes.append(h)
        h = x
    return found if h is x else None


# -- the rules ---------------------------------------------------------------------------------


@dataclass
class Match:
    """A recognised subgraph: the node to replace, the fused call's arguments, the nodes that
    die with it (erased once unused), and the tag of the adapter."""

    out: fx.Node
    build: Callable[[fx.Graph], fx.Node]
    dead: list[fx.Node]
    tag: dict
    site: str  # the base layer the fused op replaces


def _low_rank(delta: Any, adapter: str, x: fx.Node) -> tuple | None:
    """``linear(linear(h, A) * s, B)``: ``(A, B, s, input, nodes)`` or None."""
    outer = _call(delta, F.linear, 2)
    if outer is None or not _attr(outer[1], adapter):
        return None
    scaled = _call(outer[0], torch.mul, 2)
    if scaled is None or not isinstance(scaled[1], float):
        return None
    inner = _call(scaled[0], F.linear, 2)
    if inner is None or not _attr(inner[1], adapter):
        return None
    found = _adapter_input(inner[0], x, adapter, dropout=True)
    if found is None:
        return None
    return inner[1], outer[1], scaled[1], found, [delta, outer[0], scaled[0]]


def match_lora(add: fx.Node, root: dict[str, Any]) -> Match | None:
    tag = _tag(add)
    args = _call(add, torch.add, 2)
    if tag is None or tag.get("fuses_as") != "lora" or args is None:
        return None
    base = base_layer(args[0], root)
    if base is None or len(base.node.users) != 1:
        return None
    adapter = tag["adapter"]
    low = _low_rank(args[1], adapter, base.input)
    if low is None:
        return None
    a, b, scale, found, inner = low

    def build(graph: fx.Graph) -> fx.Node:
        weight, bias = base.emit_weight(graph)
        extra = (found.dropped,) if found.dropped is not None else ()
        return graph.call_function(
            torch.ops.surgeon.lora_linear.default, (base.input, weight, bias, a, b, scale, *extra)
        )

    dead = [add, *inner, base.node, *found.nodes]
    return Match(add, build, dead, tag, str(base.node.target))


def match_qlora(add: fx.Node, root: dict[str, Any]) -> Match | None:
    """``linear_4bit(x, dequantize_4bit(...), b) + type_as(linear(linear(h, A) * s, B), base)``
    (passes/lowrank/lora.py) -> ``surgeon::nf4_lora_linear`` in the base's compute dtype."""
    tag = _tag(add)
    args = _call(add, torch.add, 2)
    if tag is None or tag.get("fuses_as") != "qlora" or args is None:
        return None
    base = quantized_base(args[0])
    cast = _method(args[1], "type_as")
    if base is None or cast is None or len(cast) != 2 or cast[1] is not base.node:
        return None
    if set(base.node.users) != {add, args[1]}:
        return None
    adapter = tag["adapter"]
    low = _low_rank(cast[0], adapter, base.input)
    if low is None:
        return None
    a, b, scale, found, inner = low

    def build(graph: fx.Graph) -> fx.Node:
        op_args = (base.input, *base.emit_weight(graph), base.bias, a, b, scale, found.dropped)
        return graph.call_function(
            torch.ops.surgeon.nf4_lora_linear.default, (*op_args, base.compute_dtype)
        )

    dead = [add, args[1], *inner, base.node, base.dequantize, *found.nodes]
    return Match(add, build, dead, tag, base.site)


def match_dora(out: fx.Node, root: dict[str, Any]) -> Match | None:
    tag = _tag(out)
    args = _call(out, torch.addcmul, 3)
    if tag is None or tag.get("fuses_as") != "dora" or args is None:
        return None
    low, base_out, factor = args
    base = base_layer(base_out, root)
    if base is None or len(base.node.users) != 1:
        return None
    adapter = tag["adapter"]
    parts = _dora_parts(low, factor, adapter, base)
    if parts is None:
        return None
    a, b, magnitude, norm, scale, found, inner = parts

    def build(graph: fx.Graph) -> fx.Node:
        weight, bias = base.emit_weight(graph)
        extra = (found.dropped,) if found.dropped is not None else ()
        return graph.call_function(
            torch.ops.surgeon.dora_linear.default,
            (base.input, weight, bias, a, b, magnitude, norm, scale, *extra),
        )

    dead = [out, *inner, factor, base.node, *found.nodes]
    return Match(out, build, dead, tag, str(base.node.target))


def _dora_parts(low: Any, factor: Any, adapter: str, base: BaseLayer) -> tuple | None:
    """``linear(linear(h, A), B * view(f * s, -1, 1), shift)`` with ``f = magnitude / norm``."""
    division = _call(factor, torch.div, 2)
    if division is None or not _attr(division[0], adapter):
        return None
    norm = division[1]
    if _tag(norm) is None or norm.op != "call_module" or norm.args:
        return None
    outer = _call(low, F.linear, 3)
    if outer is None:
        return None
    hidden, b_scaled, shift = outer
    inner = _call(hidden, F.linear, 2)
    scaled_b = _call(b_scaled, torch.mul, 2)
    if inner is None or scaled_b is None or not _attr(inner[1], adapter):
        return None
    view = _method(scaled_b[1], "view")
    per_row = _call(view[0], torch.mul, 2) if view is not None and view[1:] == (-1, 1) else None
    if not _attr(scaled_b[0], adapter) or per_row is None or per_row[0] is not factor:
        return None
    if not isinstance(per_row[1], float) or not _bias_shift(shift, factor, base, adapter):
        return None
    found = _adapter_input(inner[0], base.input, adapter, dropout=True)
    if found is None:
        return None
    nodes = [low, hidden, b_scaled, scaled_b[1], view[0]]
    if shift is not None:
        nodes += [shift, shift.args[0]]
    return inner[1], scaled_b[0], division[0], norm, per_row[1], found, nodes


def _bias_shift(shift: Any, factor: fx.Node, base: BaseLayer, adapter: str) -> bool:
    """``addcmul(b, b, f, value=-1)``, or None when the layer has no bias."""
    if shift is None:
        return base.module.bias is None
    ok = (
        isinstance(shift, fx.Node)
        and shift.op == "call_function"
        and shift.target is torch.addcmul
        and shift.kwargs == {"value": -1}
        and len(shift.args) == 3
    )
    return (
        ok
        and shift.args[0] is shift.args[1]
        and shift.args[2] is factor
        and _attr(shift.args[0], adapter)
    )


def match_mixed(first: fx.Node, root: dict[str, Any]) -> Match | None:
    """A mixed-batch chain ``index_copy(... index_copy(base, 0, rows_a, part_a) ..., rows_z,
    part_z)``, matched from its first scatter; every part must be a LoRA without dropout."""
    args = _call(first, torch.index_copy, 4)
    if _tag(first) is None or args is None:
        return None
    base = base_layer(args[0], root)
    if base is None:
        return None
    names: list[str] = []
    factors: list[tuple[fx.Node, fx.Node, float]] = []
    dead: list[fx.Node] = []
    node: fx.Node | None = first
    last = first
    while node is not None:
        step = _mixed_step(node, base)
        if step is None:
            return None
        name, a, b, scale, nodes = step
        names.append(name)
        factors.append((a, b, scale))
        dead = [node, *nodes, *dead]
        last = node
        node = next(
            (u for u in node.users if _call(u, torch.index_copy, 4) and u.args[0] is node), None
        )
    if set(base.node.users) - set(dead):
        return None

    def build(graph: fx.Graph) -> fx.Node:
        weight, bias = base.emit_weight(graph)
        index = graph.call_function(token_adapter_index, (tuple(names), base.input))
        stacked = graph.call_function(
            stack_adapters, ([a for a, _, _ in factors], [b for _, b, _ in factors])
        )
        a_all = graph.call_function(operator.getitem, (stacked, 0))
        b_all = graph.call_function(operator.getitem, (stacked, 1))
        scales = [s for _, _, s in factors]
        return graph.call_function(
            torch.ops.surgeon.multi_lora_linear.default,
            (base.input, weight, bias, a_all, b_all, scales, index),
        )

    tag = {"adapter": ",".join(names), "method": "lora", "fuses_as": "lora"}
    return Match(last, build, [*dead, base.node], tag, str(base.node.target))


def _mixed_step(node: fx.Node, base: BaseLayer) -> tuple | None:
    """One adapter of a mixed chain: ``(name, A, B, scale, nodes)`` or None."""
    _, dim, rows, part = node.args
    row_args = _call(rows, batch_rows, 2)
    if dim != 0 or row_args is None or row_args[1] is not base.input:
        return None
    name = row_args[0]
    add = part
    cast = _method(part, "to")
    if cast is not None and _tag(part) is not None and _tag(part).get("adapter") == name:
        add = cast[0]
    args = _call(add, torch.add, 2)
    if args is None or _tag(add) is None or _tag(add).get("fuses_as") != "lora":
        return None
    base_rows = _call(args[0], torch.index_select, 3)
    if base_rows is None or base_rows != (base.node, 0, rows):
        return None
    x_rows = _gathered_input(args[1], rows, base.input)
    if x_rows is None:
        return None
    low = _low_rank(args[1], name, x_rows)
    if low is None or low[3].dropped is not None:
        return None
    a, b, scale, found, inner = low
    nodes = [part, add, *inner, args[0], *found.nodes, x_rows, rows]
    return name, a, b, scale, list(dict.fromkeys(nodes))


def _gathered_input(delta: Any, rows: fx.Node, x: fx.Node) -> fx.Node | None:
    """The ``index_select(x, 0, rows)`` node at the start of a gathered LoRA delta."""
    for node in _ancestors(delta, depth=5):
        if _call(node, torch.index_select, 3) == (x, 0, rows):
            return node
    return None


def _ancestors(node: Any, depth: int) -> list[fx.Node]:
    seen: list[fx.Node] = []
    frontier = [node]
    for _ in range(depth):
        frontier = [a for n in frontier if isinstance(n, fx.Node) for a in n.all_input_nodes]
        seen.extend(frontier)
    return seen


def token_adapter_index(names: Sequence[str], x: torch.Tensor) -> torch.Tensor:
    """Per token of ``x`` (batch rows first, features last), the position in ``names`` of the
    adapter its row runs in the current mixed-batch call, -1 for none."""
    index = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for k, name in enumerate(names):
        index[batch_rows(name, x)] = k
    per_row = x.numel() // max(x.shape[0] * x.shape[-1], 1)
    return index.repeat_interleave(per_row)


@dataclass(frozen=True)
class Rule:
    name: str
    anchor: tuple[str, Any]
    match: Callable[[fx.Node, dict[str, Any]], Match | None]


RULES = (
    Rule("lora", ("call_function", torch.add), match_lora),
    Rule("qlora", ("call_function", torch.add), match_qlora),
    Rule("dora", ("call_function", torch.addcmul), match_dora),
    Rule("multi_lora", ("call_function", torch.index_copy), match_mixed),
)
_BY_ANCHOR: dict[tuple[str, Any], list[Rule]] = {}
for _rule in RULES:
    _BY_ANCHOR.setdefault(_rule.anchor, []).append(_rule)


def fuse_graph(graph: fx.Graph, root: dict[str, Any]) -> int:
    """Replace every recognised adapter subgraph in ``graph`` by its fused op; returns how many.
    ``root`` maps the graph's call_module/get_attr targets to objects (as `rewrite_region`
    builds it)."""
    count = 0
    erased: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in erased:
            continue
        for rule in _BY_ANCHOR.get((node.op, node.target), ()):
            match = rule.match(node, root)
            if match is not None:
                erased |= _replace(graph, match, rule.name)
                count += 1
                break
    return count


def _replace(graph: fx.Graph, match: Match, rule: str) -> set[fx.Node]:
    """Insert the fused call, route the subgraph's users to it, erase what died; returns that."""
    before = set(graph.nodes)
    with graph.inserting_before(match.out):
        fused = match.build(graph)
    for node in graph.nodes:
        if node not in before:  # the fused call and the weight reads it needs
            node.meta["surgeon"] = dict(match.tag)
    fused.meta["surgeon"].update(fused=match.site, rule=rule)
    match.out.replace_all_uses_with(fused)
    alive = [n for n in dict.fromkeys(match.dead) if n is not fused]
    erased: set[fx.Node] = set()
    while unused := [n for n in alive if n not in erased and not n.users]:
        for node in unused:  # users before their inputs: repeat until nothing more dies
            graph.erase_node(node)
            erased.add(node)
    return erased


def fused_sites(graph: fx.Graph) -> int:
    """How many fused ops ``graph`` holds."""
    return sum(1 for n in graph.nodes if "fused" in n.meta.get("surgeon", {}))
