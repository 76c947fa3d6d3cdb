"""LoKr: ``base(x) + ΔW x`` with ``ΔW = kron(W1, W2) · alpha/r`` (LyCORIS; Yeh et al., 2023).

Shapes follow PEFT exactly so files interoperate: ``out = L·K`` and ``in = M·N`` are split by
`factorization` (``factor`` = PEFT's ``decompose_factor``); ``lokr_w1`` is (L, M), or
``lokr_w1_a`` (L, r) · ``lokr_w1_b`` (r, M) when ``decompose_both`` and r < max(L, M)/2;
``lokr_w2`` is (K, N[, kernel]), or ``lokr_w2_a`` (K, r) · ``lokr_w2_b`` (r, N·kernel) when
r < max(K, N)/2, with ``effective_conv`` a CP core ``lokr_t2`` (r, r, kh, kw) and
``lokr_w2_a`` (r, K), ``lokr_w2_b`` (r, N). Default init as PEFT: W1 (or W1a) zero.

Forward without ΔW: kron(W1, W2) x = vec(W1 · X · W2ᵀ) for x = vec(X), X of shape (M, N):
two small matmuls per token instead of one (out x in) matmul plus building ΔW. Convolutions
likewise: W2 convolves each of the M input-channel groups, W1 mixes the groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import EmitContext
from surgeon.checks import check_bool
from surgeon.errors import SpecError
from surgeon.passes.lycoris.common import (
    LycorisLayer,
    LycorisMethod,
    cp_rebuild,
    kaiming,
    peft_keys,
)
from surgeon.peft import BOOL, INT, PeftFormat, PeftKey
from surgeon.spec import MethodSpec

INITS = ("default", "random", "lycoris")
PEFT_FORMAT = PeftFormat(
    "LOKR",
    (
        *peft_keys(INITS),
        PeftKey("decompose_both", "decompose_both", False, BOOL),
        PeftKey("decompose_factor", "factor", -1, INT),
        PeftKey("rank_dropout_scale", "rank_dropout_scale", False, BOOL),
    ),
)


@dataclass(frozen=True)
class LoKr(LycorisMethod):
    """Low-rank Kronecker product adaptation."""

    name = "lokr"
    peft_format = PEFT_FORMAT
    inits = INITS

    rank: int = 8
    alpha: float = 16
    factor: int = -1
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    decompose_both: bool = False
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False
    module_dropout: float = 0.0
    effective_conv: bool = False
    init: str = "default"

    def validate(self) -> None:
        self.validate_common()
        owner = type(self).__name__
        factor = self.factor
        if (
            isinstance(factor, bool)
            or not isinstance(factor, int)
            or not (factor == -1 or factor >= 1)
        ):
            raise SpecError(
                f"{owner}.factor={factor!r}: expected -1 (split near the square root) "
                f"or an integer >= 1"
            )
        check_bool(owner, "decompose_both", self.decompose_both)
        check_bool(owner, "rank_dropout_scale", self.rank_dropout_scale)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=2, targets=targets),
            "factor-both-dropouts": cls(
                rank=1,
                alpha=3,
                factor=2,
                decompose_both=True,
                rank_dropout=0.2,
                rank_dropout_scale=True,
                module_dropout=0.1,
                targets=targets,
            ),
            "effective-conv-lycoris": cls(
                rank=1,
                effective_conv=True,
                init="lycoris",
                targets=targets,
                rank_pattern={targets[0]: 2},
                alpha_pattern={targets[0]: 3},
            ),
        }

    def create_layer(self, layer: nn.Module, path: str) -> LoKrLayer:
        rank, scale = self.rank_and_scale(path)
        return LoKrLayer(layer, path, rank, scale, self)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of ``dimension`` into two factors (the Kronecker shapes depend on it).

    A ``factor`` that divides ``dimension`` is taken as the first factor. Otherwise the
    divisors are taken in increasing order while they stay <= ``factor`` (any size for -1),
    stopping after the first that reaches its cofactor (the square root); the last one taken
    wins, and the pair is returned smaller first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    first = 1
    for divisor in range(2, dimension + 1):
        if dimension % divisor:
            continue
        if divisor > limit:
            break
        first = divisor
        if divisor >= dimension // divisor:
            break
    second = dimension // first
    return min(first, second), max(first, second)


def kron_delta(
    w1: torch.Tensor, w2: torch.Tensor, scale: float, shape: Sequence[int]
) -> torch.Tensor:
    """ΔW in the base weight's ``shape``, with PEFT's values: Kronecker product, then reshape.

    For a Conv1d with a full ``lokr_w2`` (K, N, k) PEFT's `torch.kron` reads W1 as (1, L, M),
    which is not the Kronecker product over (out, in). PEFT defines the layer that way, so
    files mean it too, and this keeps it.
    """
    if w2.dim() == 4:
        # blockwise by hand: torch.kron trips over size-1 dims with odd strides, as a Conv1d CP
        # kernel (K, N, k, 1) has (PEFT's own Conv1d effective conv crashes there)
        (big_l, big_m), (big_k, big_n, *kernel) = w1.shape, w2.shape
        blocks = w1[:, None, :, None, None, None] * w2[None, :, None]
        kron = blocks.reshape(big_l * big_k, big_m * big_n, *kernel)
    else:
        kron = torch.kron(w1, w2)
    return (kron * scale).reshape(shape)


def kron_conv(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> torch.Tensor:
    """``conv(x, kron(W1, W2))`` without building the Kronecker product.

    W1 (L, M), W2 (K, N, *kernel), x (B, M·N, *spatial) or unbatched: W2 convolves each of
    the M groups of N input channels, W1 mixes the M results into L groups of K channels.
    """
    spatial = w2.dim() - 2
    conv = F.conv1d if spatial == 1 else F.conv2d
    batched = x.dim() == spatial + 2
    if not batched:
        x = x.unsqueeze(0)
    groups = w1.shape[1]
    hidden = conv(x.unflatten(1, (groups, -1)).flatten(0, 1), w2, None, stride, padding, dilation)
    hidden = hidden.unflatten(0, (-1, groups))  # (B, M, K, *spatial)
    out = torch.einsum("lm,bm...->bl...", w1, hidden).flatten(1, 2)
    return out if batched else out.squeeze(0)


class LoKrLayer(LycorisLayer):
    """W1 (full or low-rank) and W2 (full, low-rank, or CP-factored) for one layer."""

    method = "lokr"

    def __init__(self, base: nn.Module, path: str, rank: int, scale: float, spec: LoKr) -> None:
        super().__init__(
            base,
            path,
            rank,
            scale,
            spec.rank_dropout,
            spec.rank_dropout_scale,
            spec.module_dropout,
        )
        weight_shape = base.weight.shape
        kernel = tuple(weight_shape[2:])
        self.out_split = factorization(weight_shape[0], spec.factor)  # (L, K)
        self.in_split = factorization(weight_shape[1], spec.factor)  # (M, N)
        (big_l, big_k), (big_m, big_n) = self.out_split, self.in_split
        full_w1 = not (spec.decompose_both and rank < max(big_l, big_m) / 2)
        full_w2 = rank >= max(big_k, big_n) / 2
        self.cp = not full_w2 and spec.effective_conv and self.is_conv and math.prod(kernel) > 1
        factory = self.factory
        if full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(big_l, big_m, **factory))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(big_l, rank, **factory))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, big_m, **factory))
        if full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(big_k, big_n, *kernel, **factory))
        elif self.cp:
            core = (rank, rank, *kernel, *(1,) * (2 - len(kernel)))  # Conv1d: (r, r, k, 1)
            self.lokr_t2 = nn.Parameter(torch.empty(core, **factory))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, big_k, **factory))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, big_n, **factory))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(big_k, rank, **factory))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, big_n * math.prod(kernel), **factory))
        # PEFT's full Conv1d W2 makes torch.kron mix dims (see kron_delta): only ΔW is right there
        self.kron_forward = getattr(base, "groups", 1) == 1 and not (
            isinstance(base, nn.Conv1d) and full_w2
        )
        self._initialise(spec.init)

    @torch.no_grad()
    def _initialise(self, init: str) -> None:
        """PEFT: default zeroes W1 (or W1a), lycoris zeroes W2 (or W2b), random zeroes nothing."""
        for param in self.parameters():
            kaiming(param)
        zero = {"default": ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}
        for name in zero.get(init, ()):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name))

    # W1 and W2 as (function, factor names): built once from tensors (delta_weight), once as nodes
    def _w1_recipe(self) -> tuple[Callable[..., Any] | None, tuple[str, ...]]:
        if hasattr(self, "lokr_w1"):
            return None, ("lokr_w1",)
        return torch.matmul, ("lokr_w1_a", "lokr_w1_b")

    def _w2_recipe(self) -> tuple[Callable[..., Any] | None, tuple[str, ...]]:
        if hasattr(self, "lokr_w2"):
            return None, ("lokr_w2",)
        if self.cp:
            return cp_rebuild, ("lokr_t2", "lokr_w2_a", "lokr_w2_b")
        return torch.matmul, ("lokr_w2_a", "lokr_w2_b")

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = (
            _build(recipe, lambda n: getattr(self, n), lambda fn, *args: fn(*args))
            for recipe in (self._w1_recipe(), self._w2_recipe())
        )
        return kron_delta(w1, w2, self.scale, tuple(self.base.weight.shape))

    def emit_delta(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        w1, w2 = (
            _build(recipe, lambda n: ctx.attr(n, getattr(self, n)), ctx.call)
            for recipe in (self._w1_recipe(), self._w2_recipe())
        )
        if not self.kron_forward:
            weight = ctx.call(kron_delta, w1, w2, self.scale, tuple(self.base.weight.shape))
            return self.emit_through_weight(ctx, x, weight)
        if self.scale != 1:
            w1 = ctx.call(torch.mul, w1, self.scale)  # the smallest tensor carries the scale
        if self.is_conv:
            return self._emit_kron_conv(ctx, x, w1, w2)
        return self._emit_kron_linear(ctx, x, w1, w2)

    def _emit_kron_linear(self, ctx: EmitContext, x: fx.Node, w1: fx.Node, w2: fx.Node) -> fx.Node:
        """vec(W1 · X · W2ᵀ), multiplying in the cheaper order."""
        (big_l, big_k), (big_m, big_n) = self.out_split, self.in_split
        grid = ctx.method("unflatten", x, -1, (big_m, big_n))  # X: (..., M, N)
        if big_m * big_k * (big_n + big_l) <= big_l * big_n * (big_m + big_k):
            out = ctx.call(torch.matmul, w1, ctx.call(F.linear, grid, w2))
        else:
            out = ctx.call(F.linear, ctx.call(torch.matmul, w1, grid), w2)
        return ctx.method("flatten", out, -2)

    def _emit_kron_conv(self, ctx: EmitContext, x: fx.Node, w1: fx.Node, w2: fx.Node) -> fx.Node:
        base = self.base
        big_k, big_n = self.out_split[1], self.in_split[1]
        kernel = tuple(base.kernel_size)
        if not hasattr(self, "lokr_w2"):
            # low-rank W2 is (K, N·kernel) and a Conv1d CP kernel (K, N, k, 1): make it (K, N, *kernel)
            w2 = ctx.method("reshape", w2, big_k, big_n, *kernel)
        return ctx.call(kron_conv, x, w1, w2, base.stride, base.padding, base.dilation)


def _build(
    recipe: tuple[Callable[..., Any] | None, tuple[str, ...]],
    get: Callable[[str], Any],
    call: Callable[..., Any],
) -> Any:
    """A recipe's result: the one named tensor, or ``call(fn, *named)``."""
    fn, names = recipe
    args = [get(n) for n in names]
    return args[0] if fn is None else call(fn, *args)
