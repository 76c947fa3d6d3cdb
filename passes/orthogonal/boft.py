"""BOFT: butterfly orthogonal finetuning (Liu et al., 2024, "Parameter-Efficient Orthogonal
Finetuning via Butterfly Factorization").

The adapted layer computes ``s ⊙ (W Rᵀ x) + b``: ``R = F_{m-1} ⋯ F_1 F_0`` is orthogonal, a
product of ``m`` butterfly factors ``F_i = P_i · blockdiag(Q_i,1 … Q_i,D) · P_iᵀ``; each ``H x H``
block is ``Q = (I - S)(I + S)⁻¹``, the Cayley transform of the skew-symmetric part ``S`` of a
learned block (PEFT's ``boft_R``, shape ``(m, D, H, H)``); ``P_i`` is a fixed butterfly
permutation (the identity for ``F_0``); ``s`` is a learned scale per output feature (``boft_s``:
``(out, 1)``, ``(1, out)`` on a convolution). The bias stays out of the scale, as in PEFT.
Blocks start at zero and scales at one, so a fresh adapter leaves the layer as it was.

``D x H`` is the layer's input size (a Conv2d's ``in·k·k``: the rotation acts on the flattened
kernel); a spec gives ``block_size`` (H) or ``blocks`` (D), and each layer derives the other by
PEFT's rules. ``dropout`` is PEFT's multiplicative dropout: while training, in one factor drawn
at random, a share of its blocks drawn at random become the identity.

Linear layers act on the activations: ``x @ R`` runs as ``m`` block-diagonal products and index
gathers, ``O(n·H·m)`` per token where PEFT multiplies by the dense ``n x n`` matrix (same
numbers to float rounding). A Conv2d rotates its weight, as PEFT does (mixing the kernel's
flattened input would need the activations unfolded), and convolves with ``diag(s) W Rᵀ``. In
eval mode, where no gradient reaches ``boft_R``, the Cayley blocks are cached until it changes.
Merging sets ``W <- diag(s) W Rᵀ``; unmerging ``W <- diag(1/s) W R`` (Rᵀ as R's inverse, as
PEFT).

Several BOFT adapters on one layer compose as in PEFT and as merging them in order does: on a
Linear their rotations meet the input last adapter first (`AdapterLayer.input_order_as_merged`;
training therefore draws their dropout in the reverse of PEFT's order), on a Conv2d each rotates
the weight the one before it adapted. On a Conv2d, BOFT cannot follow another method's adapter.

PEFT builds the factors' block diagonals with a CUDA extension; without it (its pure-torch
fallback) it silently keeps one factor. Files with ``boft_n_butterfly_factor > 1`` therefore
match PEFT with its extension; PEFT without it cannot load them (its ``boft_R`` has another
shape).

Layers: Linear and Conv2d, as PEFT; a Conv2d only where PEFT's forward is the base layer's
(square kernel, equal strides and paddings, no dilation or groups, zero padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_choice, check_int, check_number
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, through_base_dtype
from surgeon.passes.orthogonal.common import cayley, rotate_blocks
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, choices, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import PRESETS, select_targets

BIAS_MODES = ("none", "all", "boft_only")
INITS = {"default": True, "random": False}
"""surgeon's init -> PEFT's init_weights (``random``: blocks ~ N(0, 0.1), scales ~ N(1, 0.1))."""

PEFT_FORMAT = PeftFormat(
    "BOFT",
    keys=(
        *selection_keys(),
        PeftKey("boft_block_size", "block_size", 4, INT),
        PeftKey("boft_block_num", "blocks", 0, INT),
        PeftKey("boft_n_butterfly_factor", "butterfly_factors", 1, INT),
        PeftKey("boft_dropout", "dropout", 0.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: INITS[spec.init],
            # the weights come from the file; the init only decided values it replaces
            load=choices({True: "default", False: "default"}, "init_weights"),
            lossy=True,
        ),
    ),
    # PEFT resets fan_in_fan_out on Linear layers and ignores it on Conv2d
    constants={"fan_in_fan_out": False},
)


def boft_kind(layer: nn.Module) -> str | None:
    """``linear`` or ``conv2d`` for the layer types BOFT adapts (PEFT's: exactly these two)."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    return None


def rotated_size(layer: nn.Module) -> int:
    """The size R rotates: in_features, or a Conv2d's flattened kernel ``in·k·k``."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


def _conv_refusal(conv: nn.Conv2d) -> str | None:
    """Why PEFT's BOFT would not compute ``conv`` (it refuses groups, flattens the kernel as
    square and convolves with the first stride and padding only, no dilation), or None."""
    if conv.groups != 1:
        return f"groups={conv.groups} (PEFT's BOFT refuses grouped convolutions)"
    if conv.kernel_size[0] != conv.kernel_size[1]:
        return f"kernel_size={conv.kernel_size} (PEFT's BOFT needs a square kernel)"
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation} (PEFT's BOFT convolves without dilation)"
    padding, stride = conv.padding, conv.stride
    if isinstance(padding, str) or len(set(padding)) > 1 or len(set(stride)) > 1:
        return (
            f"stride={stride}, padding={padding!r} (PEFT's BOFT convolves with the first stride "
            f"and padding in both directions)"
        )
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (PEFT's BOFT pads with zeros)"
    return None


class Layout(NamedTuple):
    """How one layer's rotation is cut: ``factors`` butterfly factors of ``count`` blocks of
    ``size`` (``boft_R``'s shape is ``(factors, count, size, size)``)."""

    factors: int
    count: int
    size: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.factors, self.count, self.size, self.size)


@dataclass(frozen=True)
class BOFT(MethodSpec):
    """Butterfly orthogonal finetuning. Set ``block_size`` or ``blocks`` (the other 0), as
    PEFT's ``boft_block_size`` / ``boft_block_num``."""

    name = "boft"
    peft_format = PEFT_FORMAT

    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    block_size: int = 4
    blocks: int = 0
    butterfly_factors: int = 1
    dropout: float = 0.0
    bias: str = "none"
    init: str = "default"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "block_size", self.block_size, minimum=0)
        check_int(owner, "blocks", self.blocks, minimum=0)
        if self.block_size == 0 and self.blocks == 0:
            raise SpecError(
                f"{owner}.block_size=0 and {owner}.blocks=0: set one of them (block_size x blocks "
                f"is each layer's input size; the other is derived)"
            )
        if self.block_size and self.blocks:
            raise SpecError(
                f"{owner}.block_size={self.block_size} and {owner}.blocks={self.blocks}: set only "
                f"one of them, the other to 0 (block_size x blocks is each layer's input size)"
            )
        check_int(owner, "butterfly_factors", self.butterfly_factors)
        # PEFT turns int(p·D) blocks into the identity: any share up to all of them
        check_number(owner, "dropout", self.dropout, 0, 1, low_inclusive=True, high_inclusive=True)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        check_choice(owner, "init", self.init, tuple(INITS))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # one block fits any input size: layers that blocks of 4 do not fit get adapted too
        return {
            "default": cls(targets=targets),
            "one-block-random": cls(targets=targets, block_size=0, blocks=1, init="random"),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "default"

    def supports(self, layer: nn.Module) -> bool:
        """Linear and Conv2d layers whose sizes this spec's blocks fit (a preset skips others)."""
        if boft_kind(layer) is None:
            return False
        try:
            self.layout(layer, "")
        except SpecError:
            return False
        return True

    def select(self, model: nn.Module) -> list[str]:
        """The targets; one named explicitly that the blocks do not fit fails naming the rule
        it breaks (where `supports` alone would only say BOFT cannot adapt it)."""
        if not (isinstance(self.targets, str) and self.targets in PRESETS):
            owner = type(self).__name__
            typed = select_targets(
                model,
                owner,
                self.targets,
                lambda layer: boft_kind(layer) is not None,
                layers=self.layers,
                exclude=self.exclude,
            )
            for path in typed:
                self.layout(model.get_submodule(path), path)
        return super().select(model)

    def layout(self, layer: nn.Module, path: str) -> Layout:
        """``layer``'s blocks by PEFT's rules; `SpecError` naming the field a rule refuses."""
        owner = type(self).__name__
        if isinstance(layer, nn.Conv2d) and (refusal := _conv_refusal(layer)):
            raise SpecError(f"{owner} cannot adapt {path}: {refusal}")
        n = rotated_size(layer)
        what = f"{path}'s {'in·k·k' if isinstance(layer, nn.Conv2d) else 'in_features'} ({n})"
        doubling = 2 ** (self.butterfly_factors - 1)  # a factor's blocks span 2**i blocks
        if self.blocks:
            if n % self.blocks:
                raise SpecError(f"{owner}.blocks={self.blocks}: {what} is not divisible by it")
            if self.blocks % doubling:
                raise SpecError(
                    f"{owner}.blocks={self.blocks}: with butterfly_factors="
                    f"{self.butterfly_factors} it must be a multiple of {doubling}"
                )
            count, size = self.blocks, n // self.blocks
        else:
            if n % (self.block_size * doubling):
                rule = f"block_size x {doubling} (butterfly_factors={self.butterfly_factors})"
                raise SpecError(
                    f"{owner}.block_size={self.block_size}: {what} is not divisible by "
                    f"{rule if doubling > 1 else 'it'}"
                )
            count, size = n // self.block_size, self.block_size
        if doubling > 1 and (count % 2 or size % 2):
            raise SpecError(
                f"{owner}.butterfly_factors={self.butterfly_factors}: butterfly factors need an "
                f"even number of blocks of even size; {what} gives {count} blocks of {size}"
            )
        return Layout(self.butterfly_factors, count, size)

    def create_layer(self, layer: nn.Module, path: str) -> BOFTLayer:
        return BOFTLayer(layer, path, self.layout(layer, path), self.dropout, self.init)


# -- the rotation -------------------------------------------------------------------------------


def cayley_blocks(params: torch.Tensor) -> torch.Tensor:
    """``Q = (I - S)(I + S)⁻¹`` per block, ``S`` the skew-symmetric part of the learned block:
    BOFT stores whole blocks (OFT only their upper triangles)."""
    return cayley(0.5 * (params - params.transpose(-1, -2)))


def butterfly_permutation(size: int, block_size: int, factor: int) -> torch.Tensor:
    """Where factor ``factor``'s permutation ``P`` takes each entry from (PEFT's ``boft_P`` has
    ``P[i, perm[i]] = 1``): inside each run of ``2**factor`` blocks the half-blocks come
    even-numbered first, then odd-numbered, so a block of this factor mixes the halves of blocks
    ``2**(factor - 1)`` apart. Factor 0 keeps the order."""
    half = block_size // 2
    run = block_size * 2**factor
    halves = torch.arange(run // half)
    order = torch.cat([halves[0::2], halves[1::2]])
    within = (order[:, None] * half + torch.arange(half)).flatten()
    return (torch.arange(0, size, run)[:, None] + within).flatten()


Gather = tuple[torch.Tensor, torch.Tensor] | None
"""A factor's permutation and its inverse, or None where it keeps the order."""


def times_factor(v: torch.Tensor, block: torch.Tensor, gather: Gather) -> torch.Tensor:
    """``v @ P B Pᵀ`` over ``v``'s last dim, ``B`` the block diagonal of ``block`` (D, H, H):
    ``v @ P`` gathers by the inverse permutation, ``@ Pᵀ`` by the permutation."""
    if gather is not None:
        v = v.index_select(-1, gather[1])
    v = rotate_blocks(v, block)
    return v.index_select(-1, gather[0]) if gather is not None else v


def rotate(
    v: torch.Tensor, blocks: torch.Tensor, gathers: Sequence[Gather], transposed: bool = False
) -> torch.Tensor:
    """``v @ R`` (``transposed``: ``v @ Rᵀ``) over ``v``'s last dim, ``R = F_{m-1} ⋯ F_0``
    from ``blocks`` (m, D, H, H); ``Fᵀ = P Bᵀ Pᵀ``."""
    factors = range(len(blocks)) if transposed else reversed(range(len(blocks)))
    for i in factors:
        block = blocks[i].transpose(-1, -2) if transposed else blocks[i]
        v = times_factor(v, block, gathers[i])
    return v


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: in one factor drawn at random, ``int(p·D)`` of its ``D``
    blocks drawn at random become the identity. Draws as PEFT does (the factor, then a
    permutation of the blocks, from the global generator), so seeded runs match it."""
    factors, count, size = blocks.shape[:3]
    factor = int(torch.randint(0, factors, (1,)).item())
    chosen = torch.arange(count) < int(p * count)
    dropped = torch.zeros(factors, count, dtype=torch.bool)
    dropped[factor] = chosen[torch.randperm(count)]
    eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
    return torch.where(dropped.to(blocks.device)[..., None, None], eye, blocks)


class Butterfly(nn.Module):
    """One layer's ``R`` in factored form: the Cayley blocks of ``boft_R`` (through block
    dropout while training) and each factor's permutation. Called on activations it returns
    ``x @ R``. The blocks are kept in eval until ``boft_R`` changes (`Cached`)."""

    def __init__(self, layer: BOFTLayer, layout: Layout, dropout: float) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # a back-reference, outside the module tree
        self.dropout = dropout
        self.factors = layout.factors
        size, device = layout.count * layout.size, layer.boft_R.device
        for i in range(1, layout.factors):
            perm = butterfly_permutation(size, layout.size, i)
            self.register_buffer(f"perm_{i}", perm.to(device), persistent=False)
            self.register_buffer(f"inverse_{i}", torch.argsort(perm).to(device), persistent=False)
        self.cayley = Cached(self._blocks_now, self._sources)

    def gathers(self) -> list[Gather]:
        later = [
            (getattr(self, f"perm_{i}"), getattr(self, f"inverse_{i}"))
            for i in range(1, self.factors)
        ]
        return [None, *later]

    def blocks(self) -> torch.Tensor:
        """The Cayley blocks (m, D, H, H) in the adapter's dtype."""
        return self.cayley()

    def _blocks_now(self) -> torch.Tensor:
        blocks = cayley_blocks(self._layer.boft_R)
        return drop_blocks(blocks, self.dropout) if self.training and self.dropout else blocks

    def _sources(self) -> tuple[torch.Tensor]:
        return (self._layer.boft_R,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT casts the rotation to the activations' dtype before applying it
        return rotate(x, self.blocks().to(x.dtype), self.gathers())


class WeightRotation(nn.Module):
    """A Conv2d's adapted weight ``diag(s) W Rᵀ`` (rotated in ``W``'s dtype, then scaled in the
    adapter's, as PEFT), from the base weight or, stacked on another BOFT adapter, from the
    weight that one adapted."""

    def __init__(self, layer: BOFTLayer) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        layer = self._layer
        weight = layer.base.weight if weight is None else weight
        butterfly = layer.butterfly
        rows = rotate(
            weight.flatten(1), butterfly.blocks().to(weight.dtype), butterfly.gathers(), True
        )
        return (rows * layer.boft_s.view(-1, 1)).view(weight.shape)


def boft_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
) -> torch.Tensor:
    """The convolution with BOFT's adapted weight as PEFT runs it: input and bias in the
    weight's dtype (the adapter's, which the scale promotes it to), output in the input's."""
    bias = bias.to(weight.dtype) if bias is not None else None
    return F.conv2d(x.to(weight.dtype), weight, bias, stride, padding).to(x.dtype)


# -- the layer ----------------------------------------------------------------------------------


class BOFTLayer(AdapterLayer):
    """``boft_R`` (m, D, H, H) and ``boft_s`` for one Linear or Conv2d layer."""

    method = "boft"
    input_order_as_merged = True  # stacked rotations meet the input last adapter first

    def __init__(
        self, base: nn.Module, path: str, layout: Layout, dropout: float, init: str
    ) -> None:
        super().__init__(base)
        self.kind = boft_kind(base)
        weight = base.weight
        out = weight.shape[0]
        scale_shape = (1, out) if self.kind == "conv2d" else (out, 1)
        factory = adapter_tensor_kwargs(weight)
        if init == "random":
            # PEFT draws in float32 on the CPU, then moves the values to the base's dtype
            blocks = torch.empty(layout.shape).normal_(0.0, 0.1)
            scale = torch.empty(scale_shape).normal_(1.0, 0.1)
            self.boft_R = nn.Parameter(through_base_dtype(blocks, weight))
            self.boft_s = nn.Parameter(through_base_dtype(scale, weight))
        else:
            self.boft_R = nn.Parameter(torch.zeros(layout.shape, **factory))
            self.boft_s = nn.Parameter(torch.ones(scale_shape, **factory))
        self.butterfly = Butterfly(self, layout, dropout)
        self.weight_rotation = WeightRotation(self) if self.kind == "conv2d" else None

    @property
    def transforms_input(self) -> bool:
        return self.kind == "linear"

    # -- the graph ---------------------------------------------------------------------------

    def emit_input(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        if self.kind != "linear":
            return None
        return ctx.module("butterfly", self.butterfly, x)

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        """A Conv2d runs with the adapted weight instead of its own (the base call would be
        wasted: its output cannot be rotated)."""
        return self._emit_conv(ctx, x) if self.kind == "conv2d" else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        if self.kind == "conv2d":
            return self._emit_after_conv(ctx, x, base_out)
        # s ⊙ (W Rᵀ x) with the bias kept out of the scale, in PEFT's order of operations
        bias = ctx.attr("base_bias", self.base.bias) if self.base.bias is not None else None
        out = ctx.call(torch.sub, base_out, bias) if bias is not None else base_out
        out = ctx.call(torch.mul, out, ctx.method("view", ctx.attr("boft_s", self.boft_s), -1))
        out = ctx.call(torch.add, out, bias) if bias is not None else out
        cast = self.boft_s.dtype != self.base.weight.dtype
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _emit_conv(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        base = self.base
        bias = ctx.attr("base_bias", base.bias) if base.bias is not None else None
        weight = ctx.module("weight_rotation", self.weight_rotation)
        return ctx.call(boft_conv2d, x, weight, bias, base.stride, base.padding)

    def _emit_after_conv(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        """The output of a Conv2d whose call `emit_base` replaced: this adapter's own, or that of
        a BOFT adapter before it on the layer, whose weight this one rotates further (merging
        them in order gives that weight). A mixed batch (no replaced call) convolves this
        adapter's rows of the input."""
        tag = base_out.meta.get("surgeon", {})
        if base_out.op == "call_function" and base_out.target is boft_conv2d:
            if tag.get("adapter") != ctx.tag["adapter"]:
                with ctx.graph.inserting_before(base_out):
                    weight = ctx.module("weight_rotation", self.weight_rotation, base_out.args[1])
                base_out.update_arg(1, weight)
            return base_out
        if tag.get("adapter") != ctx.tag["adapter"]:
            raise SpecError(
                f"BOFT adapter {ctx.tag['adapter']!r} on a Conv2d rotates the layer's weight: "
                f"on one layer it can follow only other BOFT adapters, not "
                f"{tag.get('method', 'another method')} adapter {tag.get('adapter')!r}"
            )
        return self._emit_conv(ctx, x)

    # -- merging -------------------------------------------------------------------------------

    def _rotated_weight(self, transposed: bool) -> torch.Tensor:
        """The base weight's rows times ``Rᵀ`` (merge) or ``R`` (unmerge), in the adapter's
        dtype, without dropout."""
        rows = self.base.weight.flatten(1).to(self.boft_R.dtype)
        return rotate(rows, cayley_blocks(self.boft_R), self.butterfly.gathers(), transposed)

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base.weight
        merged = self._rotated_weight(transposed=True) * self.boft_s.view(-1, 1)
        weight.copy_(merged.view(weight.shape).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base.weight
        restored = self._rotated_weight(transposed=False) * (1 / self.boft_s.view(-1, 1))
        weight.copy_(restored.view(weight.shape).to(weight.dtype))
