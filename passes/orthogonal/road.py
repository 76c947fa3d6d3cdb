"""RoAd: 2-D rotary adaptation (Liao et al., 2024, "3-in-1: 2D Rotary Adaptation for Efficient
Finetuning, Efficient Batching and Composability"): ``h' = alpha R(theta) h`` on pairs of outputs.

A targeted layer's outputs ``h = W x + b`` are taken in pairs ``(h_i, h_j)``, and each pair
becomes ``(alpha cos(theta) h_i - alpha sin(theta) h_j, alpha sin(theta) h_i + alpha cos(theta)
h_j)``. Pairs follow PEFT's layout: the outputs fall into groups of ``group_size`` and within a
group element ``i`` pairs with element ``i + group_size / 2``. ``variant`` sets how many angles
and scales each pair has: ``road_1`` one of each (a scaled rotation), ``road_2`` one per output
(each row of the pair's 2x2 block its own), ``road_4`` one per entry of the 2x2 block. Angles
start at 0 and scales at 1, so a fresh adapter leaves the model unchanged. The unmerged forward
is elementwise on the layer's output; merging folds the block-diagonal ``R`` into the weight and
the bias (``R (W x + b) = (R W) x + R b``), unmerging applies its exact 2x2-block inverse.

Layers: Linear (what PEFT's RoAd supports) whose output features are a multiple of
``group_size``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, check_int
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind
from surgeon.peft import INT, PeftFormat, PeftKey, one_of, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import select_targets

PARAMETERS_PER_PAIR = {"road_1": 1, "road_2": 2, "road_4": 4}
"""Angles (and as many scales) each pair of outputs has, by variant."""

PEFT_FORMAT = PeftFormat(
    "ROAD",
    keys=(
        # RoadConfig has neither exclude_modules nor layers_to_transform: a selection using
        # them is written as the chosen module paths
        *selection_keys(exclude=False, layers=False),
        PeftKey("variant", "variant", "road_1", one_of(*PARAMETERS_PER_PAIR)),
        PeftKey("group_size", "group_size", 64, INT),
    ),
    # init_weights=False only draws starting values the file's weights replace
    constants={"init_weights": True},
)


def _is_linear(layer: nn.Module) -> bool:
    return layer_kind(layer) == "linear"


@dataclass(frozen=True)
class RoAd(MethodSpec):
    """2-D rotary adaptation: each pair of output features rotated by theta and scaled by alpha."""

    name = "road"
    peft_format = PEFT_FORMAT

    variant: str = "road_1"
    group_size: int = 64
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "variant", self.variant, tuple(PARAMETERS_PER_PAIR))
        check_int(owner, "group_size", self.group_size, minimum=2)
        if self.group_size % 2:
            raise SpecError(
                f"{owner}.group_size={self.group_size!r}: expected an even integer (each group "
                f"pairs its first half with its second half)"
            )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the first example's group size decides which zoo layers are targets: the largest one
        # comes first, so the others divide every layer it keeps
        return {
            "road_1": cls(targets=targets, variant="road_1", group_size=4),
            "road_2-adjacent-pairs": cls(targets=targets, variant="road_2", group_size=2),
            "road_4": cls(targets=targets, variant="road_4", group_size=4),
        }

    def supports(self, layer: nn.Module) -> bool:
        return _is_linear(layer) and layer.out_features % self.group_size == 0

    def select(self, model: nn.Module) -> list[str]:
        """As every method selects, but a targeted Linear whose outputs do not fill whole groups
        is refused with the reason (PEFT refuses it too), rather than as a layer type RoAd
        cannot adapt."""
        owner = type(self).__name__
        linear = select_targets(
            model, owner, self.targets, _is_linear, layers=self.layers, exclude=self.exclude
        )
        ungrouped = [p for p in linear if not self.supports(model.get_submodule(p))]
        if ungrouped:
            sizes = ", ".join(f"{p} ({model.get_submodule(p).out_features})" for p in ungrouped[:3])
            raise SpecError(
                f"{owner}.group_size={self.group_size}: the output features of {sizes}"
                f"{' ...' if len(ungrouped) > 3 else ''} are not a multiple of it; RoAd pairs "
                f"outputs within groups of group_size (choose one that divides them, or exclude "
                f"those layers)"
            )
        return super().select(model)

    def create_layer(self, layer: nn.Module, path: str) -> RoAdLayer:
        return RoAdLayer(layer, self.variant, self.group_size)


# -- the rotation, elementwise ----------------------------------------------------------------


def rotation_coefficients(
    variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output feature, the coefficient of its own value (``alpha cos theta``) and of its
    partner's (``alpha sin theta``; `rotate_pairs` gives it the rotation's sign). The parameters
    are laid out as PEFT stores them: ``road_1`` one value per pair (where a group's first half
    is), ``road_2`` one per output, ``road_4`` per group the ``group_size`` own terms, then the
    ``group_size`` partner terms."""
    if variant == "road_4":
        theta = theta.unflatten(0, (-1, 2, group_size))
        alpha = alpha.unflatten(0, (-1, 2, group_size))
        own = alpha[:, 0] * theta[:, 0].cos()
        partner = alpha[:, 1] * theta[:, 1].sin()
        return own.flatten(), partner.flatten()
    if variant == "road_1":  # both members of a pair share its angle and scale
        half = group_size // 2
        theta = theta.unflatten(0, (-1, 1, half)).expand(-1, 2, half).flatten()
        alpha = alpha.unflatten(0, (-1, 1, half)).expand(-1, 2, half).flatten()
    return alpha * theta.cos(), alpha * theta.sin()


def rotate_pairs(
    h: torch.Tensor, own: torch.Tensor, partner: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``h`` (outputs on the last axis) with every pair rotated: the first of a pair gets
    ``own h_i - partner h_j``, the second ``own h_j + partner h_i``."""
    first, second = h.unflatten(-1, (-1, 2, group_size // 2)).unbind(-2)
    partners = torch.stack((-second, first), dim=-2).flatten(-3)
    return h * own + partners * partner


def swap_partners(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """``v`` with each entry moved to its partner's place (the halves of every group swapped)."""
    return v.unflatten(-1, (-1, 2, group_size // 2)).flip(-2).flatten(-3)


def inverse_coefficients(
    own: torch.Tensor, partner: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients whose `rotate_pairs` undoes ``own``/``partner``'s: each pair's 2x2 block
    ``[[own_i, -partner_i], [partner_j, own_j]]`` inverted. A singular block (a zero scale) lost
    its pair for good; it is left as it is (identity) rather than filled with infinities."""
    own_swapped = swap_partners(own, group_size)
    det = own * own_swapped + partner * swap_partners(partner, group_size)
    singular = det == 0
    det = det.masked_fill(singular, 1)
    inverse_own = (own_swapped / det).masked_fill(singular, 1)
    inverse_partner = (-partner / det).masked_fill(singular, 0)
    return inverse_own, inverse_partner


class RoAdLayer(AdapterLayer):
    """``road_theta`` and ``road_alpha`` of one Linear layer (``out / 2`` each for ``road_1``,
    ``out`` for ``road_2``, ``2 out`` for ``road_4``), PEFT's names and shapes."""

    method = "road"

    def __init__(self, base: nn.Module, variant: str, group_size: int) -> None:
        super().__init__(base)
        self.variant = variant
        self.group_size = group_size
        size = base.out_features // 2 * PARAMETERS_PER_PAIR[variant]
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.road_theta = nn.Parameter(torch.zeros(size, **factory))
        self.road_alpha = nn.Parameter(torch.ones(size, **factory))

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        theta = ctx.attr("road_theta", self.road_theta)
        alpha = ctx.attr("road_alpha", self.road_alpha)
        coefficients = ctx.call(rotation_coefficients, self.variant, self.group_size, theta, alpha)
        own = ctx.call(operator.getitem, coefficients, 0)
        partner = ctx.call(operator.getitem, coefficients, 1)
        # float32 angles rotate a half-precision output in float32; cast back as PEFT does
        dtype = self.base.weight.dtype
        cast = self.road_theta.dtype != dtype
        h = ctx.method("to", base_out, self.road_theta.dtype) if cast else base_out
        out = ctx.call(rotate_pairs, h, own, partner, self.group_size)
        return ctx.method("to", out, dtype) if cast else out

    def _coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return rotation_coefficients(
            self.variant, self.group_size, self.road_theta.detach(), self.road_alpha.detach()
        )

    @torch.no_grad()
    def merge(self) -> None:
        self._fold(*self._coefficients())

    @torch.no_grad()
    def unmerge(self) -> None:
        self._fold(*inverse_coefficients(*self._coefficients(), self.group_size))

    def _fold(self, own: torch.Tensor, partner: torch.Tensor) -> None:
        """Rotate the weight's columns (each is an output vector) and the bias. As PEFT, the
        coefficients are rounded to the weight's dtype first; the sums run in float32 at least."""
        dtype = self.base.weight.dtype
        wide = torch.promote_types(dtype, torch.float32)
        own, partner = (c.to(dtype).to(wide) for c in (own, partner))

        def rotated(t: torch.Tensor) -> torch.Tensor:
            return rotate_pairs(t.to(wide), own, partner, self.group_size).to(dtype)

        weight, bias = self.base.weight, self.base.bias
        weight.copy_(rotated(weight.t()).t())
        if bias is not None:
            bias.copy_(rotated(bias))
