"""(IA)³: learned vectors that rescale a layer's activations (Liu et al., 2022).

A targeted layer's output is multiplied by a vector ``l`` (one entry per output feature:
``l ⊙ (W x + b)``); feed-forward targets instead scale their input (``W (l ⊙ x) + b``), as in the
paper. Vectors start at one, so a fresh adapter leaves the model unchanged. Merging folds ``l``
into the weight's rows (and the bias) or, for feed-forward targets, its columns.

Layers: Linear, transformers' GPT-2 ``Conv1D``, Conv2d and Conv3d (those PEFT's IA3 supports).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_targets
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import (
    NAMES,
    PREFIX,
    REQUIRED,
    PeftFormat,
    PeftKey,
    as_json,
    selection_keys,
    written_targets,
)
from surgeon.spec import Combination, MethodSpec


def ia3_kind(layer: nn.Module) -> str | None:
    """linear, conv1d_gpt2 or conv (2d/3d) when IA³ can adapt ``layer``, else None."""
    kind = layer_kind(layer)
    if kind == "conv" and not isinstance(layer, (nn.Conv2d, nn.Conv3d)):
        return None
    return kind if kind in ("linear", "conv1d_gpt2", "conv") else None


def matches_feedforward(path: str, feedforward: str | Sequence[str]) -> bool:
    """PEFT's rule, kept exactly so files mean the same: a regex must match the whole path, a
    name only has to end the path (no dot boundary, unlike target names)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, path) is not None
    return any(path.endswith(name) for name in feedforward)


def _written_feedforward(spec: IA3, paths: Sequence[str]) -> str | list[str]:
    """PEFT checks that the feed-forward modules are among the targets: where the targets are
    written as the chosen paths, so are the feed-forward ones."""
    if written_targets(spec, paths, PEFT_FORMAT) == sorted(paths):
        return sorted(p for p in paths if spec.is_feedforward(p))
    return as_json(spec.feedforward)


PEFT_FORMAT = PeftFormat(
    "IA3",
    keys=(
        *selection_keys(layers=False),
        PeftKey(
            "feedforward_modules",
            "feedforward",
            REQUIRED,
            NAMES,
            _written_feedforward,
            lambda value, config, where: tuple(value) if isinstance(value, list) else value,
            why_required="surgeon needs it written out (PEFT fills it in from the model type)",
        ),
    ),
    # fan_in_fan_out is implied by the layer type; init_ia3_weights only decides values the
    # file replaces
    constants={"fan_in_fan_out": False, "init_ia3_weights": True},
)


@dataclass(frozen=True)
class IA3(MethodSpec):
    """Infused Adapter by Inhibiting and Amplifying Inner Activations."""

    name = "ia3"
    peft_format = PEFT_FORMAT
    combinations = ("linear",)

    targets: str | tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: str | tuple[str, ...] = ("down_proj",)
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        self._set(
            "feedforward", check_targets(owner, "feedforward", self.feedforward, allow_empty=True)
        )
        if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
            stray = [f for f in self.feedforward if f not in self.targets]
            if stray:
                raise SpecError(
                    f"{owner}.feedforward={list(self.feedforward)!r}: {stray[0]!r} is not in "
                    f"targets {list(self.targets)!r}; feed-forward modules must be a subset of the "
                    f"targets (use feedforward=() when no feed-forward layer is targeted)"
                )

    def supports(self, layer: nn.Module) -> bool:
        return ia3_kind(layer) is not None

    def is_feedforward(self, path: str) -> bool:
        return matches_feedforward(path, self.feedforward)

    def create_layer(self, layer: nn.Module, path: str) -> IA3Layer:
        return IA3Layer(layer, self.is_feedforward(path))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "output": cls(targets=targets, feedforward=()),
            "feedforward": cls(targets=targets, feedforward=targets[-1:]),
        }

    def combine(
        self, model: nn.Module, sources: Sequence[Combination], how: str, options: Any
    ) -> tuple[IA3, dict[str, torch.Tensor]]:
        """The vectors add up with their weights (PEFT's IA3 add_weighted_adapter): a layer that
        only some adapters cover gets only their terms. A layer must be feed-forward in all or
        none."""
        vectors: dict[str, torch.Tensor] = {}
        feedforward: dict[str, bool] = {}
        for source in sources:
            for path, layer in source.layers.items():
                if feedforward.setdefault(path, layer.feedforward) != layer.feedforward:
                    raise SpecError(
                        f"merge_adapters: {path} is a feed-forward target in some of the adapters "
                        f"and not in others; IA³ cannot combine those"
                    )
                term = layer.peft_tensors()["ia3_l"].detach().float() * source.weight
                vectors[path] = vectors[path] + term if path in vectors else term
        paths = sorted(vectors)
        spec = IA3(targets=tuple(paths), feedforward=tuple(p for p in paths if feedforward[p]))
        return spec, {f"{PREFIX}{p}.ia3_l": v for p, v in vectors.items()}


class IA3Layer(AdapterLayer):
    """The vector ``ia3_l`` of one layer, shaped to broadcast over what it scales: ``(n,)`` for
    linear layers, ``(1, n, 1, ...)`` over a convolution's channels."""

    method = "ia3"

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__(base)
        self.kind = ia3_kind(base)
        self.feedforward = feedforward
        in_features, out_features = in_out_features(base)
        size = in_features if feedforward else out_features
        shape = (1, size, *(1,) * (base.weight.dim() - 2)) if self.kind == "conv" else (size,)
        weight = base.weight
        self.ia3_l = nn.Parameter(torch.ones(shape, **adapter_tensor_kwargs(weight)))

    @property
    def transforms_input(self) -> bool:
        return self.feedforward

    def emit_input(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        return self._scaled(ctx, x) if self.feedforward else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        return base_out if self.feedforward else self._scaled(ctx, base_out)

    def _scaled(self, ctx: EmitContext, h: fx.Node) -> fx.Node:
        # a float32 vector promotes a half-precision activation; cast back as PEFT does
        out = ctx.call(torch.mul, h, ctx.attr("ia3_l", self.ia3_l))
        dtype = self.base.weight.dtype
        return ctx.method("to", out, dtype) if self.ia3_l.dtype != dtype else out

    @torch.no_grad()
    def merge(self) -> None:
        self._fold(torch.mul, self.ia3_l)

    @torch.no_grad()
    def unmerge(self) -> None:
        # a zero entry erased its row for good; dividing by one keeps it zero instead of NaN
        self._fold(torch.div, self.ia3_l.masked_fill(self.ia3_l == 0, 1))

    def _fold(self, op, scale: torch.Tensor) -> None:
        weight, bias = self.base.weight, self.base.bias
        weight.copy_(op(weight, self._weight_shaped(scale)))
        if bias is not None and not self.feedforward:
            bias.copy_(op(bias, scale.reshape(bias.shape)))

    def _weight_shaped(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` laid out to broadcast against the base weight."""
        if self.kind == "conv":
            return self._conv_weight_shaped(scale)
        out_axis = 0 if self.kind == "linear" else 1  # GPT-2's Conv1D stores (in, out)
        axis = 1 - out_axis if self.feedforward else out_axis
        return scale.unsqueeze(1 - axis)

    def _conv_weight_shaped(self, scale: torch.Tensor) -> torch.Tensor:
        if not self.feedforward:
            return scale.transpose(0, 1)
        conv = self.base
        if conv.groups == 1:
            return scale
        # weight is (out, in / groups, *kernel): each output channel reads its group's inputs
        per_group = conv.in_channels // conv.groups
        ones = scale.shape[2:]
        return (
            scale.reshape(conv.groups, 1, per_group, *ones)
            .expand(conv.groups, conv.out_channels // conv.groups, per_group, *ones)
            .reshape(conv.out_channels, per_group, *ones)
        )

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.kind == "conv":
            return {"ia3_l": self.ia3_l}
        peft_shape = (1, -1) if self.feedforward else (-1, 1)
        return {"ia3_l": self.ia3_l.view(peft_shape)}
