"""MultiLoRA: LoRA scaled horizontally, n parallel units with learnable scaling factors (Wang et
al., 2023, arXiv 2311.11501, §3).

``h = W x + b + scale · Σ_i s_i B_i A_i dropout(x)``, ``scale = alpha / r``: ``units`` LoRA units
of rank ``r`` each (``A_i``: r x in, ``B_i``: out x r) side by side, each weighted by its own
trainable scalar ``s_i``. Initialisation as the paper changes LoRA's: the scaling factors start
at zero, which alone makes a fresh adapter the base layer, so both factors of every unit start
random (Kaiming-uniform, as PEFT's LoRA draws ``A``) and every unit gets gradients from the
first step on; LoRA's zero ``B`` would leave the units identical in effect.

Source check (issue #21): summaries of the paper (arXiv 2311.11501) confirm the parallel units
("scales LoRA modules horizontally"), learnable per-unit scaling factors and a Kaiming-based
initialisation replacing LoRA's zero B; that the factors start at zero, the ``alpha/r`` scale and
the plain sum over units could not be read from the paper's text here (§3) and are not verified.

The units are stored stacked: ``multilora_A`` (units·r x in, unit i in rows i·r to (i+1)·r),
``multilora_B`` (out x units·r, unit i in the same columns) and ``multilora_scales`` (units,).
The graph runs them as one LoRA of rank units·r whose intermediate is scaled per unit: two
matmuls for all the units.

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_MULTILORA"`` (PEFT has no MultiLoRA; its loader
refuses such a file). The config holds ``r``, ``units``, ``lora_alpha``, ``lora_dropout`` and the
selection; per layer the file holds the three tensors above.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (the paper adapts LLaMA's linear projections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_int, check_positive, check_probability
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_MULTILORA"
"""This project's own PEFT type: PEFT has no MultiLoRA."""

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("units", "units", 2, INT),
        PeftKey("lora_alpha", "alpha", 16, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
    ),
    # a bias switch would train the base biases besides the units: not this method
    switches={"bias": "none"},
)


@dataclass(frozen=True)
class MultiLoRA(MethodSpec):
    """MultiLoRA: ``units`` parallel LoRA units of rank ``rank``, each with a learnable scale."""

    name = "multilora"
    peft_format = PEFT_FORMAT

    rank: int = 8
    """The rank of each unit."""
    units: int = 2
    """How many parallel units (the paper's n)."""
    alpha: float = 16
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "units", self.units)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=2, units=3, targets=targets),
            "one-unit-dropout": cls(rank=3, units=1, alpha=5, dropout=0.1, targets=targets),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layer(self, layer: nn.Module, path: str) -> MultiLoRALayer:
        return MultiLoRALayer(layer, self)


class MultiLoRALayer(AdapterLayer):
    """One layer's stacked units ``multilora_A`` (units·r x in), ``multilora_B`` (out x units·r)
    and their scaling factors ``multilora_scales`` (units,)."""

    method = "multilora"
    loraplus_b = ("multilora_B",)

    def __init__(self, base: nn.Module, spec: MultiLoRA) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.rank = spec.rank
        self.scale = spec.alpha / spec.rank
        fan_in, fan_out = in_out_features(base)
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        stacked = spec.units * spec.rank
        self.multilora_A = nn.Parameter(torch.empty(stacked, fan_in, **factory))
        self.multilora_B = nn.Parameter(torch.empty(fan_out, stacked, **factory))
        self.multilora_scales = nn.Parameter(torch.zeros(spec.units, **factory))
        self._initialise(spec.units)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    @torch.no_grad()
    def _initialise(self, units: int) -> None:
        """Each unit's A and B Kaiming-uniform over its own fan-in (in for A, r for B)."""
        r = self.rank
        for i in range(units):
            nn.init.kaiming_uniform_(self.multilora_A[i * r : (i + 1) * r], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.multilora_B[:, i * r : (i + 1) * r], a=math.sqrt(5))

    def _per_rank(self) -> torch.Tensor:
        """``scale · s_i`` repeated over the r rows of unit i."""
        return self.multilora_scales.repeat_interleave(self.rank) * self.scale

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("multilora_A", self.multilora_A)
        b = ctx.attr("multilora_B", self.multilora_B)
        scales = ctx.attr("multilora_scales", self.multilora_scales)
        per_rank = ctx.call(
            torch.mul, ctx.method("repeat_interleave", scales, self.rank), self.scale
        )
        cast = self.multilora_A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.multilora_A.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        # every unit at once: the scales weight the units·r intermediate, not the output
        h = ctx.call(torch.mul, ctx.call(F.linear, h, a), per_rank)
        out = ctx.call(torch.add, base_out, ctx.call(F.linear, h, b))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        delta = (self.multilora_B * self._per_rank()) @ self.multilora_A
        return delta.t() if self.kind == "conv1d_gpt2" else delta
