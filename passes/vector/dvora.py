"""DVoRA: DoRA's magnitude and direction over VeRA's update (Liu et al., 2024, DoRA §5).

``W' = m ⊙ V / ‖V‖`` with ``V = W + Λ_b B Λ_d A``: VeRA's frozen shared projections ``A``
(r x in) and ``B`` (out x r), drawn from ``seed`` exactly as `surgeon.passes.vector.vera` draws
them, VeRA's trainable vectors ``λ_b`` (out, starts at zero) and ``λ_d`` (r, starts at
``d_initial``), and DoRA's trainable magnitude ``m`` per output feature, starting at ``‖W‖`` so a
fresh adapter changes nothing. The norm runs per output feature over the input features and,
as in the DoRA paper (§4.3) and PEFT's DoRA, is a constant in backward.

With ``f = m / ‖V‖`` the output is ``f ⊙ (W x + λ_b ⊙ B (λ_d ⊙ A x)) + b``, emitted as our DoRA
emits it, the base output reused: ``f ⊙ base(x) + (f ⊙ λ_b ⊙ B)(λ_d ⊙ A x) + (1 - f) ⊙ b``. The
factor scales the small ``B`` (out x r), the bias shift rides along as its matmul's bias, one
``addcmul`` finishes. In eval mode the norm is cached until W, the vectors or the projections
change. With dropout, training follows PEFT's DoRA: the dropped input also feeds the base weight
(``base(x) + (f - 1) ⊙ W·drop(x) + f ⊙ ΔV·drop(x)``); in eval dropout is the identity.

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_DVORA"``, which PEFT does not know (its loader refuses
such a file). The config holds VeRA's keys (``r``, ``target_modules``, ``projection_prng_key``,
``save_projection``, ``vera_dropout``, ``d_initial``, ...); per layer the file holds
``vera_lambda_b``, ``vera_lambda_d`` and ``dvora_magnitude`` (shape ``(out,)``), and the shared
``base_model.vera_A`` / ``base_model.vera_B`` as VeRA's when ``save_projection`` is on (else a
load redraws them from the seed).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those VeRA adapts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import Cached, EmitContext
from surgeon.layers import DropoutCorrection, WeightDecomposed
from surgeon.passes.vector.vera import PEFT_FORMAT as VERA_FORMAT
from surgeon.passes.vector.vera import Projections, VeRA, VeRALayer, shared_projections

PEFT_TYPE = "SURGEON_DVORA"
"""This project's own PEFT type: PEFT has no DVoRA, and must not read the file as VeRA."""


@dataclass(frozen=True)
class DVoRA(VeRA):
    """Weight-decomposed VeRA; the same fields, PEFT keys and examples as `VeRA` (the examples'
    dropout exercises the training correction, unsaved projections the redraw from the seed)."""

    name = "dvora"
    peft_format = VERA_FORMAT.but(peft_type=PEFT_TYPE)

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, DVoRALayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        projections = shared_projections(self, bases)
        return {
            p: DVoRALayer(b, projections, self.dropout, self.d_initial) for p, b in bases.items()
        }


class DVoRALayer(WeightDecomposed, VeRALayer):
    """VeRA's ``vera_lambda_b``, ``vera_lambda_d`` over the shared projections, plus the
    magnitude ``m``, initialised to ``‖W + ΔV‖`` (= ``‖W‖``, as ``λ_b`` starts at zero)."""

    method = "dvora"
    no_weight_decay = ("magnitude",)
    peft_names = {"magnitude": "dvora_magnitude"}

    def __init__(
        self, base: nn.Module, projections: Projections, dropout: float, d_initial: float
    ) -> None:
        super().__init__(base, projections, dropout, d_initial)
        # ‖W + ΔV‖, detached: computed each training call, kept in eval until W, a vector or a
        # projection changes
        self.weight_norm = Cached(self.weight_norm_now, self._norm_sources, detached=True)
        self.magnitude = nn.Parameter(self.weight_norm_now())
        self.dropout_correction = (
            DropoutCorrection(self.base_without_bias) if self.dropout is not None else None
        )

    # -- weight math, shared by forward, merge and unmerge ---------------------------------------

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight with output features first (GPT-2's Conv1D stores them last)."""
        return weight.t() if self.kind == "conv1d_gpt2" else weight

    def _update_rows(self) -> torch.Tensor:
        """VeRA's ``ΔV = Λ_b B Λ_d A`` (out x in), in the adapter's dtype."""
        sliced_a, sliced_b = self._sliced()
        return (self.vera_lambda_b[:, None] * sliced_b) @ (self.vera_lambda_d[:, None] * sliced_a)

    def _norm_sources(self) -> tuple[torch.Tensor, ...]:
        projections = self.projections
        return (
            self.base.weight,
            self.vera_lambda_b,
            self.vera_lambda_d,
            projections.vera_A,
            projections.vera_B,
        )

    @torch.no_grad()
    def weight_norm_now(self) -> torch.Tensor:
        """``‖W + ΔV‖`` per output feature, computed now."""
        return self._row_norm(self._adapted_rows())

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's weight applied to ``x`` (in ``x``'s dtype), without its bias."""
        return F.linear(x, self._rows(self.base.weight.to(x.dtype)))

    # -- the graph ---------------------------------------------------------------------------

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        sliced_a, sliced_b = self._sliced()
        a = ctx.attr("vera_A", sliced_a)  # sliced once here, not on every call
        b = ctx.attr("vera_B", sliced_b)
        lambda_d = ctx.attr("vera_lambda_d", self.vera_lambda_d)
        lambda_b = ctx.attr("vera_lambda_b", self.vera_lambda_b)
        factor = ctx.call(
            torch.div,
            ctx.attr("magnitude", self.magnitude),
            ctx.module("weight_norm", self.weight_norm),
        )
        # f ⊙ λ_b scales B's rows: the output-sized work stays one matmul and one addcmul
        per_row = ctx.method("view", ctx.call(torch.mul, factor, lambda_b), -1, 1)
        b_scaled = ctx.call(torch.mul, b, per_row)
        cast = self.vera_lambda_d.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.vera_lambda_d.dtype) if cast else x
        dropped = ctx.module("dropout", self.dropout, h) if self.dropout is not None else h
        mid = ctx.call(torch.mul, ctx.call(F.linear, dropped, a), lambda_d)
        low = ctx.call(F.linear, mid, b_scaled, self._emit_bias_shift(ctx, factor))
        out = ctx.call(torch.addcmul, low, base_out, factor)
        if self.dropout_correction is not None:
            out = ctx.module("dropout_correction", self.dropout_correction, out, h, dropped, factor)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _emit_bias_shift(self, ctx: EmitContext, factor: fx.Node) -> fx.Node | None:
        """``(1 - f) ⊙ b``: the base output carries ``b`` scaled by ``f``, the result needs ``b``."""
        if self.base.bias is None:
            return None
        bias = ctx.attr("base_bias", self.base.bias)
        return ctx.call(torch.addcmul, bias, bias, factor, value=-1)
