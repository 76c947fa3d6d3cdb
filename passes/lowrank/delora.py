"""DeLoRA: decoupled low-rank adaptation (https://arxiv.org/abs/2503.18225).

``ΔW = (λ / r) · B Ξ A · diag(‖W_{:,k}‖)`` with ``Ξ = diag(1 / (‖A_i‖ ‖B^i‖))``: each of the r
rank-one terms ``B^i A_i`` is normalised to unit norm, so ``‖(λ / r) B Ξ A‖_F ≤ λ`` whatever A
and B learn: the update's direction (A, B) is decoupled from its strength, the trainable
scalar ``λ``. ``‖W_{:,k}‖`` is the norm of the base weight's column k (one per input feature),
taken when the adapter is created and kept as the buffer ``delora_w_norm``, which files save:
merging other adapters later does not change it. The norms in ``Ξ`` are clamped below at
1e-4, as PEFT clamps them.

The layer computes ``base(x) + B (A' dropout(x))`` with ``A' = (λ / r) Ξ A diag(‖W_{:,k}‖)``
(r x in): the scales fold into the small A, computed per forward while training or while
autograd needs it, and cached in eval until A, B, λ or the norms change. PEFT scales the input
(tokens x in) and the intermediate instead; the two agree to float32 rounding. ``A`` starts
kaiming-uniform (drawn on the CPU and rounded through the base dtype, as PEFT draws it), ``B``
at zero, so a fresh adapter changes nothing; ``λ`` starts at ``lambda_init`` (per layer:
``lambda_pattern``, as ``rank_pattern`` for the rank). Merging adds ``B A'`` to the weight.

Layers: Linear (the only type PEFT's DeLoRA supports). PEFT keys: ``delora_A`` (r x in),
``delora_B`` (out x r), ``delora_lambda`` (1), ``delora_w_norm`` (in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import (
    check_choice,
    check_int,
    check_number,
    check_pattern_map,
    check_probability,
)
from surgeon.layers import adapter_tensor_kwargs, layer_kind, through_base_dtype
from surgeon.peft import INT, MAPPING, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import pattern_value

BIAS_MODES = ("none", "all", "delora_only")
NORM_FLOOR = 1e-4
"""PEFT's lower clamp of the rows' norms of A and the columns' of B."""

PEFT_FORMAT = PeftFormat(
    "DELORA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("delora_lambda", "lambda_init", 15, NUMBER),
        PeftKey("module_dropout", "dropout", 0.0, NUMBER),
        *selection_keys(),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey("rank_pattern", "rank_pattern", {}, MAPPING.optional()),
        PeftKey("lambda_pattern", "lambda_pattern", {}, MAPPING.optional()),
    ),
    # init_weights=False draws B at random too: values the file's weights replace on loading
    constants={"init_weights": True},
)


def _non_negative(owner: str, name: str, value: object) -> float:
    return check_number(owner, name, value, 0, low_inclusive=True)


@dataclass(frozen=True)
class DeLoRA(MethodSpec):
    """Decoupled low-rank adaptation.

    ``lambda_init``: the starting value of each layer's trainable bound ``λ`` (PEFT's
    ``delora_lambda``); ``rank_pattern`` / ``lambda_pattern``: per-layer ranks and starting
    bounds by module pattern. ``dropout``: on the update's input (PEFT's ``module_dropout``).
    ``bias``: ``all`` or ``delora_only`` also train the base biases (all, or the adapted
    layers').
    """

    name = "delora"
    peft_format = PEFT_FORMAT
    pattern_fields = ("rank_pattern", "lambda_pattern")

    rank: int = 8
    lambda_init: float = 15
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    lambda_pattern: Mapping[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        _non_negative(owner, "lambda_init", self.lambda_init)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        self._set(
            "rank_pattern", check_pattern_map(owner, "rank_pattern", self.rank_pattern, check_int)
        )
        self._set(
            "lambda_pattern",
            check_pattern_map(owner, "lambda_pattern", self.lambda_pattern, _non_negative),
        )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, targets=targets),
            "dropout-patterns": cls(
                rank=3,
                lambda_init=2.5,
                dropout=0.1,
                targets=targets,
                rank_pattern={targets[0]: 5},
                lambda_pattern={targets[0]: 7},
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> DeLoRALayer:
        rank = pattern_value(self.rank_pattern, path, self.rank)
        bound = pattern_value(self.lambda_pattern, path, self.lambda_init)
        return DeLoRALayer(layer, rank, bound, self.dropout)


class DeLoRALayer(AdapterLayer):
    """``delora_A`` (r x in), ``delora_B`` (out x r), the bound ``delora_lambda`` (1) and the
    buffer ``delora_w_norm`` (in) of one Linear; float32 over a half-precision base, as PEFT
    keeps them."""

    method = "delora"
    loraplus_b = ("delora_B",)  # PEFT's LoRA+ raises every parameter whose name has "lora_B"

    def __init__(self, base: nn.Linear, rank: int, lambda_init: float, dropout: float) -> None:
        super().__init__(base)
        self.rank = rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # on the CPU's generator, as PEFT draws
        self.delora_A = nn.Parameter(through_base_dtype(a, weight))
        self.delora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, **adapter_tensor_kwargs(weight))
        )
        bound = torch.full((1,), float(lambda_init))
        self.delora_lambda = nn.Parameter(through_base_dtype(bound, weight))
        # the norms of W's columns, in W's dtype, as PEFT takes them when it creates the layer
        norms = torch.linalg.vector_norm(weight.detach(), dim=0)
        self.register_buffer("delora_w_norm", through_base_dtype(norms, weight))
        self.scaled_a = Cached(self.scaled_a_now, self._scaled_a_sources)

    def _scaled_a_sources(self) -> tuple:
        return (self.delora_A, self.delora_B, self.delora_lambda, self.delora_w_norm)

    def scaled_a_now(self) -> torch.Tensor:
        """``A' = (λ / r) Ξ A diag(‖W_{:,k}‖)``: everything but B, folded into A (r x in)."""
        a, b = self.delora_A, self.delora_B
        row_norms = a.norm(dim=1).clamp(min=NORM_FLOOR)
        column_norms = b.norm(dim=0).clamp(min=NORM_FLOOR)
        per_rank = (self.delora_lambda / self.rank) / (row_norms * column_norms)
        return per_rank[:, None] * a * self.delora_w_norm

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.module("scaled_a", self.scaled_a)
        b = ctx.attr("delora_B", self.delora_B)
        dtype = self.delora_B.dtype
        cast = dtype != self.base.weight.dtype
        # PEFT drops the input in its own dtype and computes the update in the adapter's
        h = ctx.module("dropout", self.dropout, x) if self.dropout is not None else x
        if cast:
            h = ctx.method("to", h, dtype)
        delta = ctx.call(F.linear, ctx.call(F.linear, h, a), b)
        if cast:
            delta = ctx.method("to", delta, self.base.weight.dtype)
        return ctx.call(torch.add, base_out, delta)

    def delta_weight(self) -> torch.Tensor:
        return self.delora_B @ self.scaled_a_now()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters and the norms buffer (PEFT saves and loads it)."""
        return {**super().peft_tensors(), "delora_w_norm": self.delora_w_norm}
