"""LoHa: ``base(x) + ΔW x`` with ``ΔW = (W1a·W1b ⊙ W2a·W2b) · alpha/r`` (Hadamard product of
two rank-r products; FedPara, Hyeon-Woo et al., 2021).

Keys and shapes are PEFT's: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in), ``hada_w2_a``,
``hada_w2_b``; convolutions flatten the kernel into ``in`` unless ``effective_conv``, which
factors each side as ``hada_t1`` (r, r, kh, kw) with ``hada_w1_a`` (r, out) and ``hada_w1_b``
(r, in). Default init as PEFT: kaiming-uniform everywhere except ``hada_w2_b`` = 0.

Forward: ``W1a·W1b ⊙ W2a·W2b = (W1a ⊙ᵣ W2a)(W1b ⊙ᶜ W2b)`` (row-/column-wise Kronecker
products, inner size r²), so when ``r² (in + out) < in · out`` the delta runs as two thin
matmuls and ΔW is never built; otherwise ΔW is materialised, as PEFT always does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import EmitContext
from surgeon.passes.lycoris.common import (
    LycorisLayer,
    LycorisMethod,
    conv_function,
    cp_rebuild,
    kaiming,
    peft_keys,
)
from surgeon.peft import PeftFormat
from surgeon.spec import MethodSpec


@dataclass(frozen=True)
class LoHa(LycorisMethod):
    """Low-rank Hadamard product adaptation."""

    name = "loha"
    inits = ("default", "random")
    peft_format = PeftFormat("LOHA", peft_keys(inits))

    rank: int = 8
    alpha: float = 16
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    effective_conv: bool = False
    init: str = "default"

    def validate(self) -> None:
        self.validate_common()

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=2, targets=targets),
            "effective-conv-dropouts": cls(
                rank=3,
                alpha=5,
                effective_conv=True,
                rank_dropout=0.2,
                module_dropout=0.1,
                targets=targets,
            ),
            "random-patterns": cls(
                rank=1,
                init="random",
                targets=targets,
                rank_pattern={targets[0]: 2},
                alpha_pattern={targets[0]: 3},
            ),
        }

    def create_layer(self, layer: nn.Module, path: str) -> LoHaLayer:
        rank, scale = self.rank_and_scale(path)
        return LoHaLayer(layer, path, rank, scale, self)


def row_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row i of the result is kron(a[i], b[i]): (n, r) x (n, s) -> (n, r·s)."""
    return (a.unsqueeze(2) * b.unsqueeze(1)).flatten(1)


def column_kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column j of the result is kron(a[:, j], b[:, j]): (r, n) x (s, n) -> (r·s, n)."""
    return (a.unsqueeze(1) * b.unsqueeze(0)).flatten(0, 1)


def hadamard_delta(
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    scale: float,
    shape: Sequence[int],
) -> torch.Tensor:
    """ΔW in the base weight's ``shape``, in PEFT's order of operations."""
    return ((w1_a @ w1_b) * (w2_a @ w2_b) * scale).reshape(shape)


def hadamard_delta_cp(
    t1: torch.Tensor,
    w1_a: torch.Tensor,
    w1_b: torch.Tensor,
    t2: torch.Tensor,
    w2_a: torch.Tensor,
    w2_b: torch.Tensor,
    scale: float,
    shape: Sequence[int],
) -> torch.Tensor:
    """ΔW of an effective-conv LoHa (each side a CP-factored kernel)."""
    return (cp_rebuild(t1, w1_a, w1_b) * cp_rebuild(t2, w2_a, w2_b) * scale).reshape(shape)


class LoHaLayer(LycorisLayer):
    """The four LoHa factors (and two CP cores with ``effective_conv``) for one layer."""

    method = "loha"

    def __init__(self, base: nn.Module, path: str, rank: int, scale: float, spec: LoHa) -> None:
        super().__init__(base, path, rank, scale, spec.rank_dropout, True, spec.module_dropout)
        weight_shape = base.weight.shape
        out, fan_in = weight_shape[0], math.prod(weight_shape[1:])
        kernel = tuple(weight_shape[2:])
        # PEFT ignores effective_conv for kernels of size 1: they are plain matmuls
        self.cp = spec.effective_conv and self.is_conv and math.prod(kernel) > 1
        factory = self.factory
        if self.cp:
            core = (rank, rank, *kernel, *(1,) * (2 - len(kernel)))  # Conv1d: (r, r, k, 1)
            a_shape, b_shape = (rank, out), (rank, weight_shape[1])
            self.hada_t1 = nn.Parameter(torch.empty(core, **factory))
            self.hada_t2 = nn.Parameter(torch.empty(core, **factory))
        else:
            a_shape, b_shape = (out, rank), (rank, fan_in)
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape, **factory))
        groups = getattr(base, "groups", 1)
        self.factored_forward = (
            not self.cp and groups == 1 and rank * rank * (fan_in + out) < fan_in * out
        )
        self._initialise(spec.init)

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        for param in self.parameters():
            kaiming(param)
        if init == "default":  # one zero factor: the delta starts at zero
            nn.init.zeros_(self.hada_w2_b)

    def _factor_names(self) -> tuple[str, ...]:
        if self.cp:
            return ("hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b")
        return ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def delta_weight(self) -> torch.Tensor:
        build = hadamard_delta_cp if self.cp else hadamard_delta
        factors = [getattr(self, n) for n in self._factor_names()]
        return build(*factors, self.scale, tuple(self.base.weight.shape))

    def emit_delta(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        factors = {n: ctx.attr(n, getattr(self, n)) for n in self._factor_names()}
        if self.factored_forward:
            return self._emit_factored(ctx, x, factors)
        build = hadamard_delta_cp if self.cp else hadamard_delta
        weight = ctx.call(build, *factors.values(), self.scale, tuple(self.base.weight.shape))
        return self.emit_through_weight(ctx, x, weight)

    def _emit_factored(self, ctx: EmitContext, x: fx.Node, factors: dict[str, fx.Node]) -> fx.Node:
        """ΔW x = (W1a ⊙ᵣ W2a) · (scale · (W1b ⊙ᶜ W2b)) · x: inner size r², ΔW never built."""
        left = ctx.call(row_kron, factors["hada_w1_a"], factors["hada_w2_a"])
        right = ctx.call(column_kron, factors["hada_w1_b"], factors["hada_w2_b"])
        if self.scale != 1:
            right = ctx.call(torch.mul, right, self.scale)
        if not self.is_conv:
            return ctx.call(F.linear, ctx.call(F.linear, x, right), left)
        base = self.base
        conv = conv_function(base)
        inner = self.rank * self.rank
        right = ctx.method("view", right, inner, *base.weight.shape[1:])
        hidden = ctx.call(conv, x, right, None, base.stride, base.padding, base.dilation)
        ones = (1,) * len(base.kernel_size)
        return ctx.call(conv, hidden, ctx.method("view", left, -1, inner, *ones))
