"""MoRA: high-rank updating with one square matrix (Jiang et al., 2024, "MoRA: High-Rank Updating
for Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2405.12130, §3, eqs. 6-9).

``h = W x + b + f_decomp(M f_comp(dropout(x)))``: ``M`` (r̂ x r̂) is the only trained tensor and
starts at zero (a fresh adapter is the base layer); compression and decompression have no
parameters. ``r̂`` gives ``M`` the parameter count of a rank-``r`` LoRA on the layer: the
authors' code takes ``r̂ = int(sqrt((in + out) · r) + 0.5)``, the square root rounded to the
nearest integer (not the paper's floor), and for rotation the even number at or below it.

The input is first padded to whole groups of r̂ features by repeating it from its start (the
authors' code pads with the input's own first features, not zeros; cyclically here, so a group
wider than the input still fills), giving ``g = ceil(in / r̂)`` groups ``x_1 .. x_g``:

* ``sharing`` (the paper's eq. 6, the authors' ``mora_type`` 1, meant for large ranks):
  ``f_comp(x) = Σ_i x_i`` (the features r̂ apart summed) and ``f_decomp`` repeats ``M``'s
  output cyclically to the ``out`` features;
* ``rotation`` (eq. 9, ``mora_type`` 6, the authors' choice for small ranks): each group is
  rotated as RoPE rotates position ``i - 1`` (``x_i cos θ_i + rotate_half(x_i) sin θ_i``,
  ``θ_i = (i - 1) · 10000^(-2k/r̂)`` for feature pair ``k``), every group goes through ``M``
  alone, and ``f_decomp`` concatenates the groups' outputs, cut or repeated cyclically to
  ``out``. ΔW is block-diagonal with the blocks ``M R_i``.

The update is linear in ``x``, so merging adds ``ΔW = f_decomp(M f_comp(I))`` (the identity's
rows through the same map: an ``in x in`` matrix in the adapter's dtype, built at merge time).

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_MORA"`` (PEFT has no MoRA; its loader refuses such a
file). The config holds the keys of the authors' PEFT fork: ``r``, ``mora_type`` (1 or 6; 6 is
written, a file without it is the fork's default, 1), ``lora_dropout``, the selection; the
fork's ``lora_alpha`` does not scale MoRA's update and is ignored. Per layer the file holds
``mora_M`` (r̂ x r̂).

Layers: Linear and transformers' GPT-2 ``Conv1D``, in float32, float64, float16 or bfloat16
(``M`` is float32 over a half-precision base, as the authors' fork keeps it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, check_int, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, PeftFormat, PeftKey, choices, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_MORA"
"""This project's own PEFT type: PEFT has no MoRA."""

MORA_TYPES = {"sharing": 1, "rotation": 6}
"""surgeon's ``variant`` -> the authors' ``mora_type``."""

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey(
            "mora_type",
            "variant",
            1,  # the fork's LoraConfig default
            INT,
            save=lambda spec, paths: MORA_TYPES[spec.variant],
            load=choices({v: k for k, v in MORA_TYPES.items()}, "mora_type"),
        ),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
    ),
    # a bias switch would train the base biases besides M: not this method
    switches={"bias": "none"},
    # the fork sets MoRA's scaling to 1 whatever lora_alpha says
    ignored=frozenset({"lora_alpha"}),
)


@dataclass(frozen=True)
class MoRA(MethodSpec):
    """A square matrix trained between parameter-free compression and decompression.

    ``rank``: the LoRA rank whose parameter count ``M`` matches (r̂ from it, per layer: see the
    module); ``variant``: ``rotation`` (groups rotated, each through ``M``) or ``sharing``
    (groups summed, the output repeated); ``dropout``: on the update's input, as LoRA's.
    """

    name = "mora"
    peft_format = PEFT_FORMAT

    rank: int = 8
    variant: str = "rotation"
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_choice(owner, "variant", self.variant, tuple(MORA_TYPES))
        check_probability(owner, "dropout", self.dropout)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # rank 1 rotation: several groups, outputs cut (MLP head) and repeated (12 -> 24);
        # rank 2 sharing: inputs padded from their start, outputs repeated, with dropout
        return {
            "default": cls(rank=1, targets=targets),
            "sharing-dropout": cls(rank=2, variant="sharing", dropout=0.1, targets=targets),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layer(self, layer: nn.Module, path: str) -> MoRALayer:
        fan_in, fan_out = in_out_features(layer)
        size = square_size(fan_in, fan_out, self.rank, self.variant)
        if size < 1:
            raise SpecError(
                f"MoRA.rank={self.rank} on {path}: M would be {size} x {size} on a layer of "
                f"{fan_in} inputs and {fan_out} outputs (rotation turns pairs of features)"
            )
        return MoRALayer(layer, size, self.variant, self.dropout)


def square_size(fan_in: int, fan_out: int, rank: int, variant: str) -> int:
    """r̂, the side of ``M``: ``sqrt((in + out) · rank)`` rounded to the nearest integer as the
    authors' code rounds it, for rotation the even number at or below it."""
    size = int(math.sqrt((fan_in + fan_out) * rank) + 0.5)
    return size // 2 * 2 if variant == "rotation" else size


# -- the parameter-free maps, shared by the graph and merging -------------------------------------


def cyclic(h: torch.Tensor, width: int) -> torch.Tensor:
    """``h``'s last dimension repeated from its start until ``width`` features, cut there: how
    MoRA pads its input to whole groups and spreads its output over the layer's."""
    have = h.shape[-1]
    if width <= have:
        return h[..., :width]
    return torch.cat([h] * -(-width // have), dim=-1)[..., :width]


def rotate_groups(groups: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of each group (``groups``: ``(..., g, r̂)``) by its index: the first and
    second halves of a group are the pairs' two coordinates."""
    first, second = groups.chunk(2, dim=-1)
    return groups * cos + torch.cat((-second, first), dim=-1) * sin


@torch.no_grad()
def rotation_angles(groups: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos θ`` and ``sin θ``, ``(groups, size)``: ``θ = i · 10000^(-2k/size)`` for group ``i``
    and feature pair ``k``, computed in float32 as the authors' code computes them."""
    inverse = 1.0 / (10000 ** (torch.arange(0, size, 2, dtype=torch.float32) / size))
    angles = torch.outer(torch.arange(groups, dtype=torch.float32), inverse)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def mora_update(
    h: torch.Tensor,
    m: torch.Tensor,
    padded_width: int,
    fan_out: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """``f_decomp(M f_comp(h))`` for ``h`` (..., in): ``h`` padded cyclically to
    ``padded_width`` (whole groups of r̂), then either summed over its groups (sharing) or each
    group rotated by ``cos``/``sin`` and sent through ``M`` alone (rotation); the result spread
    cyclically over ``fan_out`` features."""
    size = m.shape[0]
    groups = cyclic(h, padded_width).unflatten(-1, (-1, size))
    if cos is None:
        return cyclic(F.linear(groups.sum(-2), m), fan_out)
    rotated = rotate_groups(groups, cos, sin)
    return cyclic(F.linear(rotated, m).flatten(-2), fan_out)


class MoRALayer(AdapterLayer):
    """One layer's ``mora_M`` (r̂ x r̂), and for rotation its groups' ``cos``/``sin`` (buffers
    rebuilt from the shapes, never saved)."""

    method = "mora"

    def __init__(self, base: nn.Module, size: int, variant: str, dropout: float) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.variant = variant
        self.fan_in, self.fan_out = in_out_features(base)
        self.groups = -(-self.fan_in // size)
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.mora_M = nn.Parameter(torch.zeros(size, size, **factory))
        if variant == "rotation":
            cos, sin = rotation_angles(self.groups, size)
            self.register_buffer("cos", cos.to(**factory), persistent=False)
            self.register_buffer("sin", sin.to(**factory), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        cast = self.mora_M.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.mora_M.dtype) if cast else x
        if self.dropout is not None:  # before the padding, as the authors': padded copies match
            h = ctx.module("dropout", self.dropout, h)
        delta = ctx.call(mora_update, h, ctx.attr("mora_M", self.mora_M), *self._maps(ctx))
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _maps(self, ctx: EmitContext | None = None) -> tuple:
        """The arguments of `mora_update` after ``h`` and ``M``: the widths, and the rotation's
        tables (as graph attributes where ``ctx`` is given)."""
        widths = (self.groups * self.mora_M.shape[0], self.fan_out)
        if self.variant == "sharing":
            return widths
        if ctx is None:
            return (*widths, self.cos, self.sin)
        return (*widths, ctx.attr("cos", self.cos), ctx.attr("sin", self.sin))

    def delta_weight(self) -> torch.Tensor:
        """``f_decomp(M f_comp(I))``: row ``j`` of the result is what input feature ``j`` adds,
        so it is ΔW in (in, out), the Conv1D layout, and its transpose for a Linear."""
        eye = torch.eye(self.fan_in, dtype=self.mora_M.dtype, device=self.mora_M.device)
        delta = mora_update(eye, self.mora_M, *self._maps())
        return delta if self.kind == "conv1d_gpt2" else delta.t()
