"""DoRA: weight-decomposed LoRA (Liu et al., 2024).

The adapted weight is ``m ⊙ (W + scale·B·A) / ‖W + scale·B·A‖``: a trainable magnitude ``m`` per
output feature times the LoRA-updated weight normalised per output feature (the norm runs over
the input dims). As in the paper (§4.3) and PEFT, the norm is a constant in backward.

With ``f = m / ‖W + scale·B·A‖`` the output is ``f ⊙ (W x + scale·B A x) + b``, emitted as
``f ⊙ base(x) + (f·scale ⊙ B)(A x) + (1 - f) ⊙ b``: the factor scales B (out x r), the bias
shift rides along as the second matmul's bias, and one ``addcmul`` finishes, so the full-size
work is what LoRA does. In eval mode the norm is cached until W, A, B or the scale change.

With dropout, PEFT feeds the dropped input to the base weight too while training (its output is
``base(x) + (f - 1) ⊙ W·drop(x) + f·scale ⊙ B A drop(x)``); a small module adds that difference
in training and is a pass-through in eval, where dropout is the identity.

Layers: Linear, Conv1d/2d/3d, Embedding and GPT-2's ``Conv1D``, as PEFT. The magnitude is saved
as PEFT's ``lora_magnitude_vector`` (shape ``(out,)``, convolutions ``(1, out, 1, ...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import Cached, EmitContext
from surgeon.layers import DropoutCorrection, WeightDecomposed
from surgeon.passes.lowrank.lora import LoRA, LoRALayer


@dataclass(frozen=True)
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation; the same fields as `LoRA`."""

    name = "dora"
    peft_format = LoRA.peft_format.but(
        switches={**LoRA.peft_format.switches, "use_dora": True, "lora_bias": False}
    )
    adapts_quantized = False
    combinations = ()

    def create_layer(self, layer: nn.Module, path: str) -> DoRALayer:
        rank, scale = self.rank_and_scale(path)
        return DoRALayer(layer, path, rank, scale, self.dropout, self.init)


class DoRALayer(WeightDecomposed, LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` plus the magnitude ``m``, initialised to ``‖W + scale·B·A‖``
    so the adapted layer starts as the base layer (as PEFT)."""

    method = "dora"
    fuses_as = "dora"
    no_weight_decay = ("magnitude",)

    def __init__(
        self, base: nn.Module, path: str, rank: int, scale: float, dropout: float, init: str
    ) -> None:
        super().__init__(base, path, rank, scale, dropout, init)
        # ‖W + scale·B·A‖, detached: computed each training call, kept in eval until W, A, B or
        # the scale change
        self.weight_norm = Cached(self.weight_norm_now, self._norm_sources, detached=True)
        self.magnitude = nn.Parameter(self.weight_norm_now())
        uses_dropout = self.dropout is not None and self.kind != "embedding"
        self.dropout_correction = (
            DropoutCorrection(self.base_without_bias) if uses_dropout else None
        )

    # -- weight math, shared by forward, merge and unmerge ---------------------------------------

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with output features first (GPT-2's Conv1D and embeddings store them last)."""
        return weight.t() if self.kind in ("conv1d_gpt2", "embedding") else weight

    def _magnitude_shape(self) -> tuple[int, ...]:
        """PEFT's: ``(out,)``, and ``(1, out, 1, ...)`` for convolutions (it broadcasts over NCHW)."""
        rows = self._rows(self.base.weight)
        if self.kind == "conv":
            return (1, rows.shape[0], *(1,) * (rows.dim() - 2))
        return (rows.shape[0],)

    def _update_rows(self) -> torch.Tensor:
        """``scale·B·A`` with output features first."""
        return self._rows(LoRALayer.delta_weight(self))

    def _norm_sources(self) -> tuple:
        return (self.scale, self.base.weight, self.lora_A, self.lora_B)

    @torch.no_grad()
    def weight_norm_now(self) -> torch.Tensor:
        """``‖W + scale·B·A‖`` per output feature, computed now, in the magnitude's shape."""
        return self._row_norm(self._adapted_rows()).view(self._magnitude_shape())

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's weight applied to ``x`` (in ``x``'s dtype), without its bias."""
        weight = self.base.weight.to(x.dtype)
        if self.kind == "conv":
            conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
            return conv(x, weight, None, self.base.stride, self.base.padding)
        return F.linear(x, self._rows(weight))

    # -- the graph ---------------------------------------------------------------------------

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.lora_A)
        b = ctx.attr("lora_B", self.lora_B)
        factor = ctx.call(
            torch.div,
            ctx.attr("magnitude", self.magnitude),
            ctx.module("weight_norm", self.weight_norm),
        )
        flat = ctx.method("view", factor, -1) if self.kind == "conv" else factor
        per_row = (-1, *(1,) * (self.lora_B.dim() - 1))
        b_scaled = ctx.call(
            torch.mul, b, ctx.method("view", ctx.call(torch.mul, flat, self.scale), *per_row)
        )
        cast = self.lora_A.dtype != self.base.weight.dtype
        if self.kind == "embedding":
            low = self._emit_embedding(ctx, x, a, b_scaled)
        else:
            h = ctx.method("to", x, self.lora_A.dtype) if cast else x
            dropped = ctx.module("dropout", self.dropout, h) if self.dropout is not None else h
            low = self._emit_low_rank(ctx, dropped, a, b_scaled, self._emit_bias_shift(ctx, flat))
        out = ctx.call(torch.addcmul, low, base_out, factor)
        if self.dropout_correction is not None:
            out = ctx.module("dropout_correction", self.dropout_correction, out, h, dropped, factor)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _emit_bias_shift(self, ctx: EmitContext, flat: fx.Node) -> fx.Node | None:
        """``(1 - f) ⊙ b``: the base output carries ``b``, the adapted one ``b`` too."""
        if self.base.bias is None:
            return None
        bias = ctx.attr("base_bias", self.base.bias)
        return ctx.call(torch.addcmul, bias, bias, flat, value=-1)

    def _emit_low_rank(
        self, ctx: EmitContext, h: fx.Node, a: fx.Node, b: fx.Node, bias: fx.Node | None
    ) -> fx.Node:
        if self.kind == "conv":
            conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
            hidden = ctx.call(conv, h, a, None, self.base.stride, self.base.padding)
            return ctx.call(conv, hidden, b, bias)
        return ctx.call(F.linear, ctx.call(F.linear, h, a), b, bias)

    def _emit_embedding(self, ctx: EmitContext, x: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        return ctx.call(torch.matmul, self.emit_lookup(ctx, x, a), ctx.method("t", b))

    @property
    def peft_names(self) -> dict[str, str]:
        return {**super().peft_names, "magnitude": "lora_magnitude_vector"}
