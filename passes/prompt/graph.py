"""The graph route of the prefix methods: in regions whose attention traces, each layer's key and
value prefix is concatenated in front of the keys and values right before attention, and the
attention mask is padded so that every query attends to every prefix token.

Two forms of attention are recognised in a region's FX graph, both with keys and values the graph
computes (traced, not constants):

* ``F.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=...)``;
* the matmul-softmax pattern of eager attention: ``matmul(q, k.transpose(-2, -1))``, optionally
  scaled and plus an additive mask, ``softmax(dim=-1)``, optionally cast or dropped out, then
  ``matmul(probabilities, v)``. Anything else between those ops is not matched (the model then
  takes the cache route).

Which decoder layer an attention belongs to comes from the module it was traced in.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import EmitContext
from surgeon.graph import Graph
from surgeon.targets import layer_index
from surgeon.trace import Region

SDPA = F.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MATMUL = ({torch.matmul, operator.matmul}, {"matmul"})
_SCALE = ({operator.mul, operator.truediv, torch.mul, torch.div}, {"mul", "div"})
_ADD = ({operator.add, torch.add}, {"add"})
_SOFTMAX = ({F.softmax, torch.softmax}, {"softmax"})
_TRANSPOSE = ({torch.transpose}, {"transpose"})
_CAST = ({F.dropout}, {"to", "float", "type_as", "contiguous"})


def _is(node: Any, ops: tuple[set, set]) -> bool:
    functions, methods = ops
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


@dataclass
class AttentionSite:
    """One traced attention: the call (or the pattern's nodes) a layer's prefix is spliced into."""

    anchor: fx.Node  # the sdpa call, or the pattern's softmax (its module gives the layer)
    sdpa: fx.Node | None = None
    key_transpose: fx.Node | None = None
    value_matmul: fx.Node | None = None
    mask_adds: list[fx.Node] = field(default_factory=list)


def _sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    named = dict(zip(SDPA_ARGS, node.args))
    named.update(node.kwargs)
    named.setdefault("attn_mask", None)
    named.setdefault("is_causal", False)
    return named


def _sdpa_site(node: fx.Node) -> AttentionSite | None:
    named = _sdpa_arguments(node)
    if isinstance(named.get("key"), fx.Node) and isinstance(named.get("value"), fx.Node):
        return AttentionSite(node, sdpa=node)
    return None


def _swaps_last_two(node: fx.Node) -> bool:
    dims = {d for d in node.args[1:3] if isinstance(d, int)}
    return _is(node, _TRANSPOSE) and dims in ({-2, -1}, {2, 3})


def _softmax_site(softmax: fx.Node) -> AttentionSite | None:
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    if dim not in (-1, 3):
        return None
    scores, adds = softmax.args[0], []
    while not _is(scores, _MATMUL):
        if _is(scores, _SCALE) and isinstance(scores.args[0], fx.Node):
            scores = scores.args[0]
        elif _is(scores, _ADD) and all(isinstance(a, fx.Node) for a in scores.args[:2]):
            adds.append(scores)  # scores + mask
            scores = scores.args[0]
        else:
            return None
    key_transpose = scores.args[1]
    if not isinstance(key_transpose, fx.Node) or not _swaps_last_two(key_transpose):
        return None
    probabilities = softmax
    while len(probabilities.users) == 1:
        user = next(iter(probabilities.users))
        if _is(user, _MATMUL) and user.args[0] is probabilities:
            return AttentionSite(
                softmax, key_transpose=key_transpose, value_matmul=user, mask_adds=adds
            )
        if not (_is(user, _CAST) or _is_dropout_module(user)):
            return None
        probabilities = user
    return None


def _is_dropout_module(node: fx.Node) -> bool:
    return node.op == "call_module" and "dropout" in str(node.target).split(".")[-1].lower()


def attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """The graph's traced attention calls, in execution order."""
    sites = []
    for node in graph.nodes:
        site = None
        if node.op == "call_function" and node.target is SDPA:
            site = _sdpa_site(node)
        elif _is(node, _SOFTMAX):
            site = _softmax_site(node)
        if site is not None:
            sites.append(site)
    return sites


def _site_layer(region: Region, site: AttentionSite) -> int | None:
    """The decoder layer of an attention, from the module it was traced in."""
    stack = site.anchor.meta.get("nn_module_stack") or {}
    inner = next(reversed(stack.values()))[0] if stack else ""
    return layer_index(".".join(p for p in (region.path, inner) if p))


def graph_sites(graph: Graph, num_layers: int) -> tuple[dict[str, list[int]], str | None]:
    """Region path -> the layer of each traced attention in it, when every layer's attention is
    traced exactly once; else ({}, why the graph route does not apply)."""
    sites: dict[str, list[int]] = {}
    for region in graph.regions:
        if not region.leaf:
            layers = [_site_layer(region, site) for site in attention_sites(region.base)]
            if layers:
                sites[region.path] = layers
    found = sorted(layer for layers in sites.values() for layer in layers if layer is not None)
    if found == list(range(num_layers)) and all(None not in ls for ls in sites.values()):
        return sites, None
    if not sites:
        breaks = ", ".join(sorted({b.module_type for b in graph.breaks})) or "none"
        return (
            {},
            f"no traced region computes attention on traced keys and values (graph breaks: {breaks})",
        )
    return {}, (
        f"traced attention covers layers {found}, the model has {num_layers} layers (each "
        f"must be traced exactly once)"
    )


# -- what the inserted nodes compute --------------------------------------------------------------


def with_prefix(states: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) keys or values with the prefix in front; prefix heads are
    repeated when the keys were (grouped-query attention repeated before the call)."""
    repeats = states.shape[1] // prefix.shape[1]
    if repeats != 1:
        prefix = prefix.repeat_interleave(repeats, dim=1)
    return torch.cat([prefix.to(states.dtype), states], dim=-2)


def pad_mask(mask: Any, prefix: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """An attention mask with prefix columns in front that every query attends to (True for
    boolean masks, 0 for additive ones); masks broadcast over the key axis stay as they are."""
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0 or mask.shape[-1] == 1:
        return mask
    fill = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
    return torch.cat([fill(*mask.shape[:-1], prefix[0].shape[-2]), mask], dim=-1)


def attend_with_prefix(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    prefix: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The keys, values and mask an sdpa call reads with the prefix in front."""
    if is_causal:  # F.scaled_dot_product_attention's own causal mask (top-left aligned)
        attn_mask = torch.ones(
            query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device
        ).tril()
    return with_prefix(key, prefix[0]), with_prefix(value, prefix[1]), pad_mask(attn_mask, prefix)


# -- the rewrite ----------------------------------------------------------------------------------


class PrefixSource(Protocol):
    def layer_prefix(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class LayerPrefix(nn.Module):
    """In a region graph: one layer's key and value prefix, for the batch and dtype of ``like``."""

    def __init__(self, source: PrefixSource, layer: int) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: parameters live once
        self.layer = layer

    def forward(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.layer_prefix(self.layer, like)


def insert_prefix(ctx: EmitContext, index: int, prefix: LayerPrefix) -> None:
    """Splice ``prefix`` into the ``index``-th attention of ``ctx.graph``."""
    site = attention_sites(ctx.graph)[index]
    name = f"prefix_{index}"
    if site.sdpa is not None:
        _into_sdpa(ctx, site.sdpa, name, prefix)
    else:
        _into_softmax_pattern(ctx, site, name, prefix)


def _into_sdpa(ctx: EmitContext, node: fx.Node, name: str, prefix: LayerPrefix) -> None:
    named = _sdpa_arguments(node)
    with ctx.graph.inserting_before(node):
        kv = ctx.module(name, prefix, named["query"])
        parts = ctx.call(
            attend_with_prefix,
            named["query"],
            named["key"],
            named["value"],
            named["attn_mask"],
            named["is_causal"],
            kv,
        )
        key, value, mask = (ctx.call(operator.getitem, parts, i) for i in range(3))
    rest = {k: v for k, v in named.items() if k not in ("query", "key", "value")}
    node.args = (named["query"], key, value)
    node.kwargs = {**rest, "attn_mask": mask, "is_causal": False}


def _into_softmax_pattern(
    ctx: EmitContext, site: AttentionSite, name: str, prefix: LayerPrefix
) -> None:
    transpose, matmul = site.key_transpose, site.value_matmul
    key = transpose.args[0]
    with ctx.graph.inserting_before(transpose):
        kv = ctx.module(name, prefix, key)
        prefixed = ctx.call(with_prefix, key, ctx.call(operator.getitem, kv, 0))
    transpose.args = (prefixed, *transpose.args[1:])
    for add in site.mask_adds:
        with ctx.graph.inserting_before(add):
            add.args = (add.args[0], ctx.call(pad_mask, add.args[1], kv), *add.args[2:])
    value = matmul.args[1]
    with ctx.graph.inserting_before(matmul):
        prefixed = ctx.call(with_prefix, value, ctx.call(operator.getitem, kv, 1))
    matmul.args = (matmul.args[0], prefixed, *matmul.args[2:])
