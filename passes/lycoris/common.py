"""What LoHa and LoKr share (PEFT groups them as LyCORIS methods): spec fields, PEFT config
keys, rank and module dropout, and the emit scaffolding around each method's delta.

Both are additive: merge, unmerge and lowering use `AdapterLayer.delta_weight`. Layers:
Linear, Conv1d and Conv2d, as in PEFT.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_pattern_map,
    check_positive,
    check_probability,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs
from surgeon.peft import (
    BOOL,
    BOOL_OR_STRING,
    INT,
    MAPPING,
    NUMBER,
    PeftKey,
    choices,
    selection_keys,
)
from surgeon.spec import MethodSpec
from surgeon.targets import pattern_value

PEFT_INITS: dict[str, bool | str] = {"default": True, "random": False, "lycoris": "lycoris"}
"""surgeon's init -> PEFT's init_weights."""


def peft_keys(inits: tuple[str, ...]) -> tuple[PeftKey, ...]:
    """The adapter_config.json keys LoHa and LoKr share (``inits``: the method's ``init``s)."""
    return (
        PeftKey("r", "rank", 8, INT),
        PeftKey("alpha", "alpha", 8, NUMBER),
        *selection_keys(),
        PeftKey("rank_pattern", "rank_pattern", {}, MAPPING.optional()),
        PeftKey("alpha_pattern", "alpha_pattern", {}, MAPPING.optional()),
        PeftKey("rank_dropout", "rank_dropout", 0.0, NUMBER),
        PeftKey("module_dropout", "module_dropout", 0.0, NUMBER),
        PeftKey("use_effective_conv2d", "effective_conv", False, BOOL),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL_OR_STRING,
            save=lambda spec, paths: PEFT_INITS[spec.init],
            # the weights come from the file; a different init would only stop hot swaps
            load=choices({PEFT_INITS[i]: "default" for i in inits}, "init_weights"),
            lossy=True,
        ),
    )


class LycorisMethod(MethodSpec):
    """Spec behaviour common to LoHa and LoKr; the subclasses declare the dataclass fields."""

    inits: ClassVar[tuple[str, ...]]
    """Allowed ``init`` values (keys of `PEFT_INITS`)."""
    pattern_fields = ("rank_pattern", "alpha_pattern")

    def validate_common(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        self._set(
            "rank_pattern", check_pattern_map(owner, "rank_pattern", self.rank_pattern, check_int)
        )
        self._set(
            "alpha_pattern",
            check_pattern_map(owner, "alpha_pattern", self.alpha_pattern, check_positive),
        )
        # PEFT keeps the adapter with probability 1 - p: p = 1 would never train it
        check_probability(owner, "rank_dropout", self.rank_dropout)
        check_probability(owner, "module_dropout", self.module_dropout)
        check_bool(owner, "effective_conv", self.effective_conv)
        check_choice(owner, "init", self.init, self.inits)

    @property
    def starts_as_base(self) -> bool:
        return self.init != "random"

    def supports(self, layer: nn.Module) -> bool:
        return isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        rank = pattern_value(self.rank_pattern, path, self.rank)
        return rank, pattern_value(self.alpha_pattern, path, self.alpha) / rank


# -- layers -------------------------------------------------------------------------------------


class RankDropout(nn.Module):
    """PEFT's rank dropout: in training, zero whole output channels of the delta with
    probability ``p`` (one mask per call), optionally rescaled by the mask's mean.

    Scaling the delta's output channels equals PEFT's scaling of the rows of the delta weight.
    """

    def __init__(self, p: float, rescale: bool, channel_dim: int) -> None:
        super().__init__()
        self.p = p
        self.rescale = rescale
        self.channel_dim = channel_dim

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return delta
        channels = delta.shape[self.channel_dim]
        keep = (torch.rand(channels, device=delta.device) > self.p).to(delta.dtype)
        if self.rescale:
            # PEFT divides by 0 (NaN) when every channel drops; the all-zero mask stays zero here
            keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)
        trailing = -1 - self.channel_dim  # dims after the channel dim
        return delta * keep.view(channels, *(1,) * trailing)

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}"


class ModuleDropout(nn.Module):
    """PEFT's module dropout: in training, skip the whole adapter with probability ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, base_out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.training and torch.rand(1).item() <= self.p:
            return base_out
        return base_out + delta

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cp_rebuild(
    core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor
) -> torch.Tensor:
    """A convolution kernel from its Tucker/CP factors (FedPara's "effective conv").

    core (r, r, kh, kw), out_factor (r, out), in_factor (r, in) -> (out, in, kh, kw).
    """
    return torch.einsum("ijkl,ip,jr->prkl", core, out_factor, in_factor)


def kaiming(param: torch.Tensor) -> None:
    """PEFT's (and nn.Linear's) default: kaiming-uniform with a = sqrt(5)."""
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))


def conv_function(layer: nn.Module):
    return F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d


class LycorisLayer(AdapterLayer):
    """Casting, dropouts and the final add around a method's delta (`emit_delta`)."""

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        rank_dropout: float,
        rank_dropout_scale: bool,
        module_dropout: float,
    ) -> None:
        super().__init__(base)
        if isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.padding_mode != "zeros":
            # PEFT convolves the delta with zero padding whatever the mode: merged != unmerged
            raise SpecError(
                f"{type(self).method} on {path}: convolutions with padding_mode="
                f"{base.padding_mode!r} are not supported (only 'zeros')"
            )
        self.rank = rank
        self.scale = scale
        channel_dim = -1 if isinstance(base, nn.Linear) else -1 - len(base.kernel_size)
        self.rank_dropout = (
            RankDropout(rank_dropout, rank_dropout_scale, channel_dim) if rank_dropout else None
        )
        self.module_dropout = ModuleDropout(module_dropout) if module_dropout else None

    @property
    def factory(self) -> dict[str, Any]:
        weight = self.base.weight
        return adapter_tensor_kwargs(weight)

    @property
    def is_conv(self) -> bool:
        return not isinstance(self.base, nn.Linear)

    def emit_delta(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        """Nodes computing the adapter's contribution to the layer output for input ``x``."""
        raise NotImplementedError

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = next(self.parameters()).dtype
        cast = dtype != self.base.weight.dtype
        delta = self.emit_delta(ctx, ctx.method("to", x, dtype) if cast else x)
        if self.rank_dropout is not None:
            delta = ctx.module("rank_dropout", self.rank_dropout, delta)
        if self.module_dropout is not None:
            out = ctx.module("module_dropout", self.module_dropout, base_out, delta)
        else:
            out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def emit_through_weight(self, ctx: EmitContext, x: fx.Node, weight: fx.Node) -> fx.Node:
        """The base layer's operation with ``weight`` (the materialised delta), without bias."""
        if not self.is_conv:
            return ctx.call(F.linear, x, weight)
        base = self.base
        return ctx.call(
            conv_function(base),
            x,
            weight,
            None,
            base.stride,
            base.padding,
            base.dilation,
            base.groups,
        )
