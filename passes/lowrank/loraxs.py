"""LoRA-XS: low-rank adaptation with an extremely small number of parameters (Bałazy et al.,
2024, arXiv 2405.17604, §3, eq. 2).

``h = W x + b + scale · U_r Σ_r R V_rᵀ dropout(x)``: ``U_r``, ``Σ_r``, ``V_r`` are the top-r
singular triplets of the frozen base weight ``W`` (out x in), taken when the adapter is built
(``torch.linalg.svd``, in float32 for half-precision weights), and only the r x r matrix ``R``
trains. ``scale = alpha / r`` as LoRA's: the paper's implementation is PEFT's LoRA with ``R``
inserted between its factors, and keeps LoRA's ``lora_alpha / r``. The frozen factors are held
as ``A = V_rᵀ`` (r x in) and ``B = U_r Σ_r`` (out x r), the split of the paper's equation.

``R`` starts as the paper's code draws it: normal with mean 0 and standard deviation
``init_std = 1e-5``, so a fresh adapter changes the outputs, slightly; ``init_std=0`` starts
it at zero (a fresh adapter is then the base layer).

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_LORA_XS"`` (PEFT has no LoRA-XS; its loader refuses
such a file). The config holds ``r``, ``lora_alpha``, ``lora_dropout``, ``init_std`` and the
selection; per layer the file holds ``lora_xs_R`` (r x r) and also the frozen factors
``lora_xs_A`` and ``lora_xs_B``, as the paper's code saves them: a load uses the file's factors,
never a decomposition of the weight it lands on, so the update ``ΔW`` a file describes is the
same on any base (an SVD is not unique: signs, and bases of repeated singular values, differ
between devices and libraries).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (the paper adapts the attention and
feed-forward projections of transformers), in float32, float64, float16 or bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import (
    check_finite,
    check_int,
    check_number,
    check_positive,
    check_probability,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_dtype, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_LORA_XS"
"""This project's own PEFT type: PEFT has no LoRA-XS."""

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("lora_alpha", "alpha", 16, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("init_std", "init_std", 1e-5, NUMBER),
    ),
    # a bias switch would train the base biases besides R: not this method
    switches={"bias": "none"},
)


@dataclass(frozen=True)
class LoRAXS(MethodSpec):
    """LoRA-XS: an r x r matrix trained between the frozen top-r singular vectors of W."""

    name = "loraxs"
    peft_format = PEFT_FORMAT

    rank: int = 8
    alpha: float = 16
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    init_std: float = 1e-5
    """Standard deviation of R's initial normal draw (the paper's 1e-5); 0: R starts at zero."""
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)
        check_finite(owner, "init_std", self.init_std)
        check_number(owner, "init_std", self.init_std, 0, low_inclusive=True)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the paper's draw, then R from zero with dropout (a fresh adapter is the base)
        return {
            "default": cls(rank=3, targets=targets),
            "zero-dropout": cls(rank=2, alpha=3, init_std=0.0, dropout=0.1, targets=targets),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    @property
    def starts_as_base(self) -> bool:
        return self.init_std == 0

    def create_layer(self, layer: nn.Module, path: str) -> LoRAXSLayer:
        fan_in, fan_out = in_out_features(layer)
        if self.rank > min(fan_in, fan_out):
            raise SpecError(
                f"LoRAXS.rank={self.rank} on {path}: must be at most min(in_features, "
                f"out_features) = {min(fan_in, fan_out)} (the weight has no more singular vectors)"
            )
        return LoRAXSLayer(layer, self)


@torch.no_grad()
def singular_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = V_rᵀ`` (r x in) and ``B = U_r Σ_r`` (out x r) of an (out x in) ``weight``, in the
    adapter's dtype (float32 for a half-precision weight)."""
    u, s, vh = torch.linalg.svd(weight.to(adapter_dtype(weight)), full_matrices=False)
    return vh[:rank].contiguous(), (u[:, :rank] * s[:rank]).contiguous()


class LoRAXSLayer(AdapterLayer):
    """One layer's frozen factors ``lora_xs_A``, ``lora_xs_B`` (buffers, saved in the file) and
    its trainable ``lora_xs_R``."""

    method = "loraxs"

    def __init__(self, base: nn.Module, spec: LoRAXS) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.scale = spec.alpha / spec.rank
        a, b = singular_factors(self._out_in(base.weight), spec.rank)
        self.register_buffer("lora_xs_A", a)
        self.register_buffer("lora_xs_B", b)
        self.lora_xs_R = nn.Parameter(
            torch.zeros(spec.rank, spec.rank, dtype=a.dtype, device=a.device)
        )
        if spec.init_std > 0:
            with torch.no_grad():
                nn.init.normal_(self.lora_xs_R, std=spec.init_std)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """GPT-2's Conv1D stores (in, out); the factors are of the (out, in) matrix."""
        return weight.t() if self.kind == "conv1d_gpt2" else weight

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_xs_A", self.lora_xs_A)
        r = ctx.attr("lora_xs_R", self.lora_xs_R)
        b = ctx.attr("lora_xs_B", self.lora_xs_B)
        cast = self.lora_xs_R.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.lora_xs_R.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        # the scale multiplies the rank-r intermediate: r/out of the work of scaling the output
        h = ctx.call(F.linear, ctx.call(F.linear, h, a), r)
        delta = ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        return self._out_in(self.lora_xs_B @ self.lora_xs_R @ self.lora_xs_A) * self.scale

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """``lora_xs_R`` and the frozen factors: a file carries the whole update."""
        return {
            "lora_xs_A": self.lora_xs_A,
            "lora_xs_B": self.lora_xs_B,
            "lora_xs_R": self.lora_xs_R,
        }
