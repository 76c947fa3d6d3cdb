"""MiSS: matrix shard sharing (Kang, 2024, "MiSS: Balancing LoRA Performance and Efficiency with
Simple Shard Sharing", first published as Bone, https://arxiv.org/abs/2409.15371).

``W' = W + D``: ``D`` repeats one trained shard ``S`` (PEFT's ``miss_block``, ``r x out``)
along the input features, ``D[o, k·r + j] = S[j, o]``; so ``base(x) + (Σ_k x_k) S``, with
``x_k`` the input's r-wide shards (the last one zero-padded where r does not divide it). The
shard starts at zero, so a fresh adapter leaves the layer as it was.

Each of PEFT's ``init_weights`` is its own form (``init`` here):

* ``default`` (PEFT's true): the shard above, ``r x out``, zeros; ``random`` (PEFT's false):
  the same form, drawn kaiming-uniform as PEFT draws it;
* ``mini``: a narrower shard (``r x mini_rank``) repeated along the outputs as well,
  ``D[o, k·r + j] = S[j, o mod mini_rank]``: ``(Σ_k x_k) S`` tiled to the output width;
* ``bat``: ``r x r`` blocks, one ``B_b`` per block row of the weight (``(out/r, r, r)``), and
  every block of W becomes ``W_bc + W_bc B_b + B_b``: the update depends on W, so the layer
  runs with the adapted weight (built on each call: caching it would hold a second copy of
  every adapted weight). Stacked bat adapters compose as in PEFT, each adapting the weight the
  one before it adapted; a bat adapter can follow only other bat adapters on a layer (after
  another method's output it could not be merged to the same outputs).

Merging adds ``D`` (in the adapter's dtype, rounded once into the weight's, as PEFT);
unmerging subtracts it. A bat adapter merges into the weight it finds and unmerges by solving
``X (I + B_b) = W' - B_b`` per block (PEFT inverts ``I + B_b``): exact up to rounding.

Shard shapes follow PEFT's rules, checked on every selected layer before the model changes
(a `SpecError` naming the field and the layer): ``rank <= in_features``; ``bat`` needs the
rank to divide both sizes, ``mini`` needs ``mini_rank`` to divide out_features.

Layers: Linear, as PEFT (PEFT also wraps bitsandbytes' quantized Linear layers; surgeon's
4-bit layers are refused by the core, as for every method but LoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, check_int, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind, through_base_dtype
from surgeon.peft import (
    BOOL_OR_STRING,
    INT,
    NUMBER,
    STRING,
    PeftFormat,
    PeftKey,
    choices,
    selection_keys,
)
from surgeon.spec import MethodSpec

INITS: dict[str, bool | str] = {"default": True, "random": False, "bat": "bat", "mini": "mini"}
"""surgeon's ``init`` -> PEFT's ``init_weights``."""
BIAS_MODES = ("none", "all", "miss_only")

PEFT_FORMAT = PeftFormat(
    "MISS",
    keys=(
        PeftKey("r", "rank", 64, INT),
        PeftKey("mini_r", "mini_rank", 1, INT),
        PeftKey("miss_dropout", "dropout", 0.0, NUMBER),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL_OR_STRING,
            save=lambda spec, paths: INITS[spec.init],
            load=choices({v: k for k, v in INITS.items()}, "init_weights"),
        ),
        # PEFT trains the adapted layers' biases for any value ending in "_only" (its docstring
        # spells it MiSS_only)
        PeftKey(
            "bias",
            "bias",
            "none",
            STRING,
            load=choices({**{m: m for m in BIAS_MODES}, "MiSS_only": "miss_only"}, "bias"),
        ),
        *selection_keys(),
    ),
)


@dataclass(frozen=True)
class MiSS(MethodSpec):
    """Matrix shard sharing: one trained shard repeated over each targeted weight.

    ``rank``: the shard's height (PEFT's ``r``); ``init``: ``default``, ``random``, ``mini``
    or ``bat`` (see the module); ``mini_rank``: the shard's width with ``init="mini"``
    (PEFT's ``mini_r``); ``bias``: ``all`` or ``miss_only`` also train the base biases (all,
    or the adapted layers').
    """

    name = "miss"
    peft_format = PEFT_FORMAT

    rank: int = 64
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    init: str = "default"
    mini_rank: int = 1
    dropout: float = 0.0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_choice(owner, "init", self.init, tuple(INITS))
        check_int(owner, "mini_rank", self.mini_rank)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # rank 5 leaves a padded last shard on the MLP (12 and 24 inputs) and none on the
        # 5-input layer; bat needs a rank dividing every size (the MLP's head has 5 outputs),
        # the card runs wider blocks where they fit
        return {
            "default": cls(rank=5, targets=targets),
            "mini-dropout": cls(rank=2, init="mini", dropout=0.1, targets=targets),
            "bat": cls(rank=1, init="bat", targets=targets),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init != "random"

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def select(self, model: nn.Module) -> list[str]:
        """The targets, each checked against the shard rules before anything is built."""
        paths = super().select(model)
        for path in paths:
            self.shard_shape(model.get_submodule(path), path)
        return paths

    def shard_shape(self, layer: nn.Linear, path: str) -> tuple[int, ...]:
        """``miss_block``'s shape on ``layer``, by PEFT's rules; `SpecError` naming the field
        and the layer a rule refuses."""
        owner, rank = type(self).__name__, self.rank
        n_in, n_out = layer.in_features, layer.out_features
        if rank > n_in:
            raise SpecError(
                f"{owner}.rank={rank}: {path} has {n_in} input features; a shard cannot be "
                f"wider than the input (rank <= in_features)"
            )
        if self.init == "bat":
            if n_in % rank or n_out % rank:
                raise SpecError(
                    f"{owner}.rank={rank}: init='bat' cuts {path}'s weight ({n_out} x {n_in}) "
                    f"into rank x rank blocks, so the rank must divide both sizes"
                )
            return (n_out // rank, rank, rank)
        if self.init == "mini":
            if n_out % self.mini_rank:
                raise SpecError(
                    f"{owner}.mini_rank={self.mini_rank}: {path} has {n_out} output features, "
                    f"not a multiple of it (init='mini' repeats the shard's columns across them)"
                )
            return (rank, self.mini_rank)
        return (rank, n_out)

    def create_layer(self, layer: nn.Module, path: str) -> MiSSLayer:
        return MiSSLayer(layer, self.shard_shape(layer, path), self.init, self.dropout)


# -- the math shared by the graph, merge and unmerge ----------------------------------------------


def shard_update(block: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    """``D`` (out x in) of a ``default``/``random`` shard (r x out) or a ``mini`` one
    (r x mini_rank): the shard's transpose tiled along the outputs and the inputs, the last
    tile cut to fit."""
    rank, width = block.shape
    rows = block.t().repeat(n_out // width, -(-n_in // rank))
    return rows[:, :n_in]


def weight_blocks(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """``weight`` (out x in) as its r x r blocks, indexed ``[c, b]`` (input block, output
    block), so that one ``B_b`` per output block broadcasts over the input blocks."""
    n_out, n_in = weight.shape
    return weight.reshape(n_out // rank, rank, n_in // rank, rank).permute(2, 0, 1, 3)


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """The weight `weight_blocks` cut."""
    n_in_blocks, n_out_blocks, rank, _ = blocks.shape
    return blocks.permute(1, 2, 0, 3).reshape(n_out_blocks * rank, n_in_blocks * rank)


def bat_update(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``W_bc B_b + B_b`` for every block of ``weight``, in ``block``'s dtype."""
    blocks = weight_blocks(weight.to(block.dtype), block.shape[-1])
    return from_blocks(blocks @ block + block)


def bat_weight(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The weight a bat adapter runs with: ``W + W_bc B_b + B_b``, in ``block``'s dtype."""
    return weight.to(block.dtype) + bat_update(weight, block)


def bat_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer run with a bat adapter's weight as PEFT runs it: input and bias in the
    weight's dtype (the adapter's), output in the input's."""
    bias = bias.to(weight.dtype) if bias is not None else None
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


class BatWeight(nn.Module):
    """A bat adapter's weight, computed from the base weight or, stacked on another bat adapter,
    from the weight that one adapted (``weight``)."""

    def __init__(self, layer: MiSSLayer) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # its owner: not a child module

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        layer = self._layer
        return bat_weight(layer.base.weight if weight is None else weight, layer.miss_block)


# -- the layer ------------------------------------------------------------------------------------


class MiSSLayer(AdapterLayer):
    """``miss_block`` of one Linear layer: ``(r, out)``, ``(r, mini_rank)`` or, for bat,
    ``(out/r, r, r)``; float32 over a half-precision base, as PEFT keeps it."""

    method = "miss"

    def __init__(self, base: nn.Linear, shape: tuple[int, ...], init: str, dropout: float) -> None:
        super().__init__(base)
        self.init = init
        weight = base.weight
        if init == "random":
            # PEFT draws in float32 on the CPU, then moves the values to the base's dtype
            block = torch.zeros(shape)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            self.miss_block = nn.Parameter(through_base_dtype(block, weight))
        else:
            factory = adapter_tensor_kwargs(weight)
            self.miss_block = nn.Parameter(torch.zeros(shape, **factory))
        self.rank = shape[-1] if init == "bat" else shape[0]
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.adapted_weight = BatWeight(self) if init == "bat" else None

    # -- the graph ---------------------------------------------------------------------------

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        """A bat adapter runs the layer with its adapted weight instead of the layer's own (the
        base call would be wasted: its output cannot be adapted)."""
        return self._emit_bat_linear(ctx, x) if self.init == "bat" else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        if self.init == "bat":
            return self._emit_after_bat(ctx, x, base_out)
        block = ctx.attr("miss_block", self.miss_block)
        h = x
        padding = -self.base.in_features % self.rank
        if padding:
            h = ctx.call(F.pad, h, (0, padding))
        cast = self.miss_block.dtype != self.base.weight.dtype
        if cast:
            h = ctx.method("to", h, self.miss_block.dtype)
        if self.dropout is not None:  # after the padding, as PEFT: the same draws
            h = ctx.module("dropout", self.dropout, h)
        shards = ctx.method("unflatten", h, -1, (-1, self.rank))
        update = ctx.call(torch.matmul, ctx.method("sum", shards, -2), block)
        if self.init == "mini":  # mini_rank columns, repeated to the output width
            repeats = self.base.out_features // self.miss_block.shape[1]
            update = ctx.call(torch.tile, update, (repeats,))
        out = ctx.call(torch.add, base_out, update)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _emit_bat_linear(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        bias = ctx.attr("base_bias", self.base.bias) if self.base.bias is not None else None
        return ctx.call(bat_linear, x, ctx.module("adapted_weight", self.adapted_weight), bias)

    def _emit_after_bat(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        """The output of a layer whose call a bat adapter's `emit_base` replaced: this adapter's
        own, or another bat adapter's, whose weight this one adapts further (merging them in
        order gives that weight). A mixed batch (no replaced call) runs this adapter's rows of
        the input with its weight."""
        tag = base_out.meta.get("surgeon", {})
        mine = tag.get("adapter") == ctx.tag["adapter"]
        if base_out.op == "call_function" and base_out.target is bat_linear:
            if base_out.args[0] is not x:
                raise SpecError(
                    f"MiSS adapter {ctx.tag['adapter']!r} with init='bat' adapts the layer's "
                    f"weight: it cannot follow an adapter that transforms the layer's input"
                )
            if not mine:
                with ctx.graph.inserting_before(base_out):
                    weight = ctx.module("adapted_weight", self.adapted_weight, base_out.args[1])
                base_out.update_arg(1, weight)
            return base_out
        if not mine:
            raise SpecError(
                f"MiSS adapter {ctx.tag['adapter']!r} with init='bat' runs the layer with its "
                f"adapted weight: on one layer it can follow only other bat adapters, not "
                f"{tag.get('method', 'another method')} adapter {tag.get('adapter')!r}"
            )
        return self._emit_bat_linear(ctx, x)

    # -- merging -------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the weight as it is now (a bat update depends on it)."""
        if self.init == "bat":
            return bat_update(self.base.weight, self.miss_block)
        return shard_update(self.miss_block, self.base.in_features, self.base.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        # added from the adapter's dtype and rounded once into the weight's, as PEFT
        self.base.weight.add_(self.delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base.weight
        if self.init != "bat":
            weight.sub_(self.delta_weight())
            return
        block = self.miss_block
        merged = weight_blocks(weight.to(block.dtype), self.rank)
        eye = torch.eye(self.rank, device=block.device, dtype=block.dtype)
        restored = torch.linalg.solve(eye + block, merged - block, left=False)
        weight.copy_(from_blocks(restored))
