"""GraLoRA: granular low-rank adaptation (Jung et al., 2025, "GraLoRA: Granular Low-Rank
Adaptation for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2505.20355).

``W x + b + scale · (G x + B_h A_h dropout(x))`` with ``scale = alpha / (r + hybrid_r)``: the
update ``G`` is a k x k grid of blocks, block ``(j, n)`` (output block j, input block n) a
rank-``r/k`` LoRA of its own, ``B_{j,n} A_{n,j}``; ``B_h A_h`` is the optional plain LoRA of rank
``hybrid_r`` beside it (hybrid GraLoRA). The grid has LoRA's parameter count at rank r (A: in x
r, B: r x out) and rank up to ``k · r``.

The factors are stored as PEFT stores them: ``gralora_A`` (k, in/k, r), input block n's
projection to r, whose slice j (r/k wide) feeds output block j; ``gralora_B`` (k, r, out/k),
output block j's projection from the r values it gathers, slice n from input block n. The
forward is two batched matmuls over the k blocks with a reshuffle between them, as PEFT's, with
its dropout (drawn separately for the grid and the hybrid part), dtypes (float32 factors on a
half-precision base, the terms cast back before they are scaled) and order of operations.
Initialisation as PEFT: A kaiming-uniform per block, B zero (a fresh adapter changes nothing),
drawn in PEFT's order.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's GraLoRA supports) whose input
and output features ``k`` divides. PEFT keys: ``gralora_A``, ``gralora_B``,
``gralora_A_general.weight`` (hybrid_r x in), ``gralora_B_general.weight`` (out x hybrid_r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, check_int, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import select_targets

BIAS_MODES = ("none", "all", "gralora_only")

PEFT_FORMAT = PeftFormat(
    "GRALORA",
    keys=(
        PeftKey("r", "rank", 32, INT),
        PeftKey("alpha", "alpha", 64, NUMBER),
        PeftKey("gralora_k", "k", 2, INT),
        PeftKey("hybrid_r", "hybrid_rank", 0, INT),
        # GraloraConfig has layers_to_transform but no exclude_modules: a selection that
        # excludes is written out as the chosen module paths
        *selection_keys(exclude=False),
        PeftKey("gralora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
    ),
    # fan_in_fan_out is implied by the layer type (PEFT corrects it alike); init_weights=False
    # draws random B factors that the file's weights replace
    constants={"fan_in_fan_out": False, "init_weights": True},
)


def _is_grid_kind(layer: nn.Module) -> bool:
    return layer_kind(layer) in ("linear", "conv1d_gpt2")


@dataclass(frozen=True)
class GraLoRA(MethodSpec):
    """Granular LoRA: a k x k grid of small LoRAs, optionally beside a plain one."""

    name = "gralora"
    peft_format = PEFT_FORMAT

    rank: int = 32
    alpha: float = 64
    k: int = 2
    hybrid_rank: int = 0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        check_int(owner, "k", self.k)
        check_int(owner, "hybrid_rank", self.hybrid_rank, minimum=0)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        if self.rank % self.k:
            raise SpecError(
                f"{owner}.k={self.k!r}: rank {self.rank} is not a multiple of it; each of the "
                f"k x k blocks has rank rank / k"
            )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the first example's k decides which zoo layers are targets: the others keep it
        return {
            "default": cls(rank=4, alpha=6, k=2, targets=targets),
            "hybrid-dropout": cls(
                rank=2, alpha=5, k=2, hybrid_rank=2, dropout=0.1, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        if not _is_grid_kind(layer):
            return False
        in_features, out_features = in_out_features(layer)
        return in_features % self.k == 0 and out_features % self.k == 0

    def select(self, model: nn.Module) -> list[str]:
        """As every method selects, but a targeted layer whose sizes ``k`` does not divide is
        refused with the reason (PEFT refuses it too), rather than as a layer type GraLoRA
        cannot adapt."""
        owner = type(self).__name__
        candidates = select_targets(
            model, owner, self.targets, _is_grid_kind, layers=self.layers, exclude=self.exclude
        )
        uneven = [p for p in candidates if not self.supports(model.get_submodule(p))]
        if uneven:
            sizes = ", ".join(
                f"{p} ({'x'.join(map(str, in_out_features(model.get_submodule(p))))})"
                for p in uneven[:3]
            )
            raise SpecError(
                f"{owner}.k={self.k}: it does not divide the input and output features of "
                f"{sizes}{' ...' if len(uneven) > 3 else ''} (in x out); the grid splits both "
                f"into k blocks (choose a k that divides them, or exclude those layers)"
            )
        return super().select(model)

    def create_layer(self, layer: nn.Module, path: str) -> GraLoRALayer:
        return GraLoRALayer(layer, self)


# -- the grid ---------------------------------------------------------------------------------


def grid_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G x`` for the grid of ``a`` (k, in/k, r) and ``b`` (k, r, out/k), any leading dims.

    Input block n goes to r values (``bmm`` over the blocks); output block j gathers slice j
    (r/k wide) of every input block's values, in block order, and maps those r values to its
    out/k outputs (a second ``bmm``)."""
    k, _, rank = a.shape
    leading = x.shape[:-1]
    blocks = x.reshape(-1, k, x.shape[-1] // k).transpose(0, 1)  # (n, tokens, in/k)
    hidden = torch.bmm(blocks, a)  # (n, tokens, r): slice j of r is for output block j
    gathered = hidden.unflatten(-1, (k, rank // k)).permute(2, 1, 0, 3).reshape(k, -1, rank)
    out = torch.bmm(gathered, b)  # (j, tokens, out/k)
    return out.transpose(0, 1).reshape(*leading, -1)


def grid_weight(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The grid as one (out, in) matrix: block (j, n) is ``B_j[slice n]ᵀ A_n[:, slice j]ᵀ``."""
    k, in_block, rank = a.shape
    out_block = b.shape[-1]
    sub = rank // k
    a_slices = a.view(k, in_block, k, sub)  # (n, i, j, s)
    b_slices = b.view(k, k, sub, out_block)  # (j, n, s, o)
    blocks = torch.einsum("nijs,jnso->joni", a_slices, b_slices)
    return blocks.reshape(k * out_block, k * in_block)


class GraLoRALayer(AdapterLayer):
    """``gralora_A`` (k, in/k, r) and ``gralora_B`` (k, r, out/k) of one layer, and with a
    hybrid rank its plain factors ``gralora_A_general`` (hybrid_r, in) and
    ``gralora_B_general`` (out, hybrid_r); float32 over a half-precision base, as PEFT keeps
    them."""

    method = "gralora"
    # PEFT's LoRA+ raises the rate of every parameter whose name holds "lora_B": both B factors
    loraplus_b = ("gralora_B", "gralora_B_general")
    peft_names = {
        "gralora_A_general": "gralora_A_general.weight",
        "gralora_B_general": "gralora_B_general.weight",
    }

    def __init__(self, base: nn.Module, spec: GraLoRA) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        in_features, out_features = in_out_features(base)
        k, rank, hybrid = spec.k, spec.rank, spec.hybrid_rank
        self.rank = rank + hybrid  # LoRA's rank at the same parameter count (for inspect)
        self.scale = spec.alpha / (rank + hybrid)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        # PEFT draws each block's A as (r, in/k), B zero, then stores them transposed
        a = torch.empty(k, rank, in_features // k, **factory)
        with torch.no_grad():
            for block in a:
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.gralora_A = nn.Parameter(a.transpose(1, 2).contiguous())
        self.gralora_B = nn.Parameter(torch.zeros(k, rank, out_features // k, **factory))
        self.gralora_A_general = self.gralora_B_general = None
        if hybrid:
            self._initialise_hybrid(hybrid, in_features, out_features, factory)

    def _initialise_hybrid(
        self, hybrid: int, in_features: int, out_features: int, factory: dict
    ) -> None:
        """PEFT builds the hybrid factors as bias-free ``nn.Linear`` layers, which draw their
        own weights (A, then B), then draws A again and zeroes B: the same draws here, so a seed
        gives PEFT's values."""
        a = torch.empty(hybrid, in_features, **factory)
        b = torch.empty(out_features, hybrid, **factory)
        with torch.no_grad():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b.zero_()
        self.gralora_A_general = nn.Parameter(a)
        self.gralora_B_general = nn.Parameter(b)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.gralora_A.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        grid = ctx.call(
            grid_product,
            self._dropped(ctx, h),
            ctx.attr("gralora_A", self.gralora_A),
            ctx.attr("gralora_B", self.gralora_B),
        )
        out = self._add_scaled(ctx, base_out, grid, cast)
        if self.gralora_A_general is None:
            return out
        # PEFT draws the hybrid part's dropout apart from the grid's
        low = ctx.call(
            F.linear, self._dropped(ctx, h), ctx.attr("A_general", self.gralora_A_general)
        )
        hybrid = ctx.call(F.linear, low, ctx.attr("B_general", self.gralora_B_general))
        return self._add_scaled(ctx, out, hybrid, cast)

    def _dropped(self, ctx: EmitContext, h: fx.Node) -> fx.Node:
        return ctx.module("dropout", self.dropout, h) if self.dropout is not None else h

    def _add_scaled(self, ctx: EmitContext, out: fx.Node, term: fx.Node, cast: bool) -> fx.Node:
        """``out + scale · term``, the term cast to the base dtype before it is scaled, as PEFT
        rounds it."""
        if cast:
            term = ctx.method("to", term, self.base.weight.dtype)
        return ctx.call(torch.add, out, ctx.call(torch.mul, term, self.scale))

    def delta_weight(self) -> torch.Tensor:
        """``scale · (G + B_h A_h)`` in the adapter's dtype, in the base weight's layout."""
        delta = grid_weight(self.gralora_A, self.gralora_B)
        if self.gralora_A_general is not None:
            delta = delta + self.gralora_B_general @ self.gralora_A_general
        delta = delta.t() if self.kind == "conv1d_gpt2" else delta
        return delta * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        # the float32 update added into the weight's own dtype, as PEFT rounds it
        self.base.weight.add_(self.delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base.weight.sub_(self.delta_weight())
