"""HRA: Householder reflection adaptation (Yuan et al., 2024).

``W' = W H`` with ``H = H_1 H_2 ⋯ H_r`` and ``H_i = I - 2 u_i u_iᵀ / ‖u_i‖²``: a chain of r
reflections whose vectors are the columns of ``hra_u`` (input features x r). With
``gram_schmidt`` the u's are orthonormalised first (Gram-Schmidt), and ``H = I - 2 Q Qᵀ``.

Every such H is ``I - V S Vᵀ`` with V (n x r) and S (r x r): the reflections' unit vectors and
the upper-triangular S with ``S⁻¹ = ½ I + striu(VᵀV)`` (the compact WY form of a product of
reflections), or Q and ``2 I`` after Gram-Schmidt (QR gives Q up to column signs, which
``Q Qᵀ`` does not see). So no n x n matrix is built:

* a Linear's input is reflected, ``x Hᵀ = x - x V Sᵀ Vᵀ``, and the base layer runs on it (r-wide
  matmuls; ``W H`` would cost a copy of the weight);
* a Conv2d's weight is rotated, ``W H = W - W V S Vᵀ`` over its flattened input dims (channels
  x kernel), and the convolution runs with it (a patch's dims mix, so the input cannot be).

V and S are recomputed on every forward that needs gradients and cached otherwise (eval mode
without autograd: generation), until ``hra_u`` changes.

Several adapters on one layer compose as PEFT's: ``W H_a H_b``, so on a Linear b reflects the
input first, and on a Conv2d b rotates the weight a rotated. Merging folds ``W H`` into the
weight; unmerging applies ``Hᵀ = H⁻¹``. The fresh adapter is the identity: PEFT's init draws
each vector twice (``H_i H_i = I``), which needs an even rank; ``init="random"`` draws them all.

The optional regulariser is the paper's ``orth_reg_weight · Σ_layers ‖I - ÛᵀÛ‖_F`` (Û: the
u's normalised), as the authors' training code adds it; PEFT has no such term, so it is off by
default and is not written to adapter_config.json.

Layers: Linear and Conv2d (one group, a square kernel, equal strides and paddings, no dilation,
zero padding: PEFT computes other convolutions differently from the layer itself), as PEFT.
PEFT key: ``hra_u`` ((in features, r); a Conv2d's rows run over in channels x kernel).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_bool, check_choice, check_int, check_number, is_int
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, through_base_dtype
from surgeon.peft import BOOL, INT, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

INITS = ("symmetric", "random")
BIAS_MODES = ("none", "all", "hra_only")


def _init_from_peft(value: bool, config: Mapping[str, Any], where: str) -> str:
    """PEFT's ``init_weights``: true draws symmetric pairs, unless the rank is odd (PEFT warns
    and draws every vector at random) or Gram-Schmidt follows (pairs make it undefined; the
    file's weights replace the draw either way)."""
    rank = config.get("r", 8)
    pairs = is_int(rank) and rank % 2 == 0 and not config.get("apply_GS", False)
    return "symmetric" if value and pairs else "random"


PEFT_FORMAT = PeftFormat(
    "HRA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("apply_GS", "gram_schmidt", False, BOOL),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: spec.init == "symmetric",
            load=_init_from_peft,
            lossy=True,
        ),
        PeftKey("bias", "bias", "none", STRING),
        *selection_keys(),
    ),
)


@dataclass(frozen=True)
class HRA(MethodSpec):
    """Householder reflection adaptation: ``rank`` reflections per layer.

    ``init``: ``symmetric`` (PEFT's default: pairs of equal vectors, so the adapter starts as
    the identity; needs an even rank and no Gram-Schmidt) or ``random`` (kaiming-uniform).
    ``bias``: ``all`` or ``hra_only`` also train the base biases (all, or the adapted layers').
    ``orth_reg_weight``: the weight of the orthogonality regulariser training adds (0: off, as
    PEFT trains; the authors train with 1e-4).
    """

    name = "hra"
    peft_format = PEFT_FORMAT

    rank: int = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    gram_schmidt: bool = False
    init: str = "symmetric"
    bias: str = "none"
    orth_reg_weight: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_bool(owner, "gram_schmidt", self.gram_schmidt)
        check_choice(owner, "init", self.init, INITS)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        check_number(owner, "orth_reg_weight", self.orth_reg_weight, 0, low_inclusive=True)
        if self.init != "symmetric":
            return
        if self.rank % 2:
            raise SpecError(
                f"{owner}.rank={self.rank}: the symmetric init pairs every reflection with its "
                f"twin, so it needs an even rank; use an even rank or init='random' (PEFT warns "
                f"and draws at random)"
            )
        if self.gram_schmidt:
            raise SpecError(
                f"{owner}.gram_schmidt=True: Gram-Schmidt of the equal pairs the symmetric init "
                f"draws is undefined (PEFT gets rounding noise); use init='random'"
            )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, targets=targets),
            "gram-schmidt": cls(rank=3, gram_schmidt=True, init="random", targets=targets),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "symmetric"

    def supports(self, layer: nn.Module) -> bool:
        return isinstance(layer, (nn.Linear, nn.Conv2d))

    def create_layer(self, layer: nn.Module, path: str) -> HRALayer:
        return HRALayer(layer, path, self.rank, self.gram_schmidt, self.init)

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """``orth_reg_weight · Σ ‖I - ÛᵀÛ‖_F`` over the layers (Frobenius norms, not squared,
        summed: the authors' training code)."""
        if self.orth_reg_weight == 0:
            return None
        norms = []
        for layer in layers.values():
            unit = layer.hra_u / layer.hra_u.norm(dim=0)
            gram = unit.t() @ unit
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            norms.append(torch.linalg.matrix_norm(eye - gram))
        return self.orth_reg_weight * torch.stack(norms).sum()


# -- the math, as plain functions the graphs call ---------------------------------------------


def reflect_rows(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x Hᵀ = x - x V Sᵀ Vᵀ`` for the rows of ``x`` (the input a Linear reads as ``W H``),
    computed in the adapter's dtype and returned in ``x``'s."""
    h = x.to(v.dtype)
    return (h - h @ v @ s.mT @ v.mT).to(x.dtype)


def rotate_columns(weight: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W H = W - W V S Vᵀ`` over the weight's flattened input dims, in the adapter's dtype."""
    rows = weight.reshape(weight.shape[0], -1).to(v.dtype)
    return (rows - rows @ v @ s @ v.mT).view(weight.shape)


def _conv_rows(base: nn.Conv2d, path: str) -> int:
    """A Conv2d's input dims as PEFT flattens them (channels x kernel); SpecError for the
    convolutions PEFT cannot adapt or computes otherwise than the layer does."""
    kernel, stride, padding = base.kernel_size, base.stride, base.padding
    reasons = [
        (base.groups != 1, f"groups={base.groups} (PEFT refuses grouped convolutions)"),
        (
            kernel[0] != kernel[1],
            f"a non-square kernel {kernel} (PEFT sizes hra_u for a square one)",
        ),
        (
            isinstance(padding, str) or padding[0] != padding[1],
            f"padding={padding!r} (PEFT uses padding[0] alone)",
        ),
        (stride[0] != stride[1], f"stride={stride} (PEFT uses stride[0] alone)"),
        (any(d != 1 for d in base.dilation), f"dilation={base.dilation} (PEFT drops it)"),
        (base.padding_mode != "zeros", f"padding_mode={base.padding_mode!r} (PEFT pads zeros)"),
    ]
    for failed, reason in reasons:
        if failed:
            raise SpecError(f"HRA on {path}: Conv2d with {reason} is not supported")
    return base.in_channels * kernel[0] * kernel[1]


def _hra_conv(node: fx.Node) -> fx.Node | None:
    """The convolution an HRA adapter emitted for ``node`` (the layer's output, maybe cast
    back to its dtype), or None when ``node`` is something else (a mixed batch's rows)."""
    if node.op == "call_method" and node.target == "to":
        node = node.args[0]
    tag = node.meta.get("surgeon", {})
    is_conv = node.op == "call_function" and node.target is F.conv2d
    return node if is_conv and tag.get("method") == HRALayer.method else None


class HRALayer(AdapterLayer):
    """``hra_u`` (rows x r) for one layer: a Linear's rows are its input features, a Conv2d's
    its input channels x kernel."""

    method = "hra"
    input_order_as_merged = True  # W H_a H_b reads x H_bᵀ H_aᵀ: the last adapter reflects first

    def __init__(self, base: nn.Module, path: str, rank: int, gram_schmidt: bool, init: str):
        super().__init__(base)
        self.kind = "linear" if isinstance(base, nn.Linear) else "conv2d"
        rows = base.in_features if self.kind == "linear" else _conv_rows(base, path)
        if gram_schmidt and rank > rows:
            raise SpecError(
                f"HRA on {path}: gram_schmidt needs rank <= {rows} (the layer's input dims), "
                f"got {rank}; Gram-Schmidt runs out of directions"
            )
        self.rank = rank
        self.gram_schmidt = gram_schmidt
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.hra_u = nn.Parameter(torch.empty(rows, rank, **factory))
        # (V, S) of H = I - V S Vᵀ, kept in eval until hra_u changes
        self.householder = Cached(self.factors, self._factor_sources)
        self._initialise(init)

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        """PEFT's draws: kaiming-uniform in float32 on the CPU, for the symmetric init on half
        the columns, each then repeated; rounded through the base dtype, as PEFT moves them."""
        if self.hra_u.is_meta:
            return
        rows, rank = self.hra_u.shape
        drawn = torch.zeros(rows, rank // 2 if init == "symmetric" else rank)
        nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
        if init == "symmetric":
            drawn = drawn.repeat_interleave(2, dim=1)
        self.hra_u.copy_(through_base_dtype(drawn, self.base.weight))

    def _factor_sources(self) -> tuple[torch.Tensor]:
        return (self.hra_u,)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, S)`` with ``H = I - V S Vᵀ``: the unit reflection vectors and the inverse of
        ``½ I + striu(VᵀV)``, or Gram-Schmidt's Q and ``2 I``."""
        u = self.hra_u
        eye = torch.eye(self.rank, device=u.device, dtype=u.dtype)
        if self.gram_schmidt:
            return torch.linalg.qr(u).Q, 2 * eye
        v = u / u.norm(dim=0)
        inverse = torch.triu(v.t() @ v, diagonal=1) + eye / 2
        return v, torch.linalg.solve_triangular(inverse, eye, upper=True)

    # -- the graph ---------------------------------------------------------------------------

    @property
    def transforms_input(self) -> bool:
        return self.kind == "linear"

    def emit_input(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        return self._emit_reflection(ctx, x) if self.kind == "linear" else None

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        return self._emit_conv(ctx, x) if self.kind == "conv2d" else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        built = f"{ctx.prefix}.householder" in ctx.root  # by emit_input or emit_base
        if self.kind == "linear" or built:
            return base_out
        conv = _hra_conv(base_out)
        if conv is None:  # a mixed batch: the base layer's rows, run again with W H
            return self._emit_conv(ctx, x)
        # another adapter's convolution: rotate the weight it rotated (W H_a H_b)
        with ctx.graph.inserting_before(conv):
            weight = self._emit_rotation(ctx, conv.args[1])
        conv.args = (conv.args[0], weight, *conv.args[2:])
        return base_out

    def _emit_factors(self, ctx: EmitContext) -> tuple[fx.Node, fx.Node]:
        factors = ctx.module("householder", self.householder)
        return ctx.call(operator.getitem, factors, 0), ctx.call(operator.getitem, factors, 1)

    def _emit_reflection(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        return ctx.call(reflect_rows, x, *self._emit_factors(ctx))

    def _emit_rotation(self, ctx: EmitContext, weight: fx.Node) -> fx.Node:
        return ctx.call(rotate_columns, weight, *self._emit_factors(ctx))

    def _emit_conv(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        """The convolution with ``W H``, run in the adapter's dtype as PEFT runs it."""
        base = self.base
        weight = self._emit_rotation(ctx, ctx.attr("base_weight", base.weight))
        dtype = self.hra_u.dtype
        cast = dtype != base.weight.dtype
        bias = ctx.attr("base_bias", base.bias) if base.bias is not None else None
        if cast:
            x = ctx.method("to", x, dtype)
            bias = ctx.method("to", bias, dtype) if bias is not None else None
        out = ctx.call(F.conv2d, x, weight, bias, base.stride, base.padding)
        return ctx.method("to", out, base.weight.dtype) if cast else out

    # -- merging -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """``W ← W H``."""
        v, s = self.factors()
        self._fold(v, s)

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W ← W Hᵀ``: H is orthogonal, so this undoes `merge` exactly (up to rounding)."""
        v, s = self.factors()
        self._fold(v, s.mT)

    def _fold(self, v: torch.Tensor, s: torch.Tensor) -> None:
        weight = self.base.weight
        weight.copy_(rotate_columns(weight, v, s).to(weight.dtype))
