"""VeLoRA: LoRA whose A projection keeps compressed activations for backward (Miles et al., 2024,
arXiv:2405.17991).

The forward is LoRA's, ``base(x) + scale * B(A(dropout(x)))``. While training, the A projection
saves for backward not its input ``x`` (tokens x in) but each token's ``groups`` sub-tokens
(``x`` zero-padded to ``groups * ceil(in / groups)`` features and cut into ``groups`` pieces)
projected on one unit vector ``v``: ``c = x_g · v`` (tokens x groups). Backward rebuilds
``x ≈ reconstruction_scale * (c ⊗ v)`` for A's gradient, ``dL/dA = g^T x̂``; the gradient that
flows on to ``x`` is exact (``g A``). So the gradients are VeLoRA's approximation, as PEFT
computes them, not autograd's exact ones; eval (and anything without gradients) runs plain LoRA.

``v`` (PEFT's ``lora_velora_embed``, saved in the file, in the base weight's dtype) is, per
``projection``: ``batch_average``, the normalised mean sub-token of each training batch (set
before that batch's projection); ``batch_average_once``, that of the first training batch after
the layer is built or loaded; ``random``, a normalised Gaussian drawn when the layer is built.

Layers: Linear and GPT-2's ``Conv1D``, as PEFT (which refuses embeddings and convolutions).
Merging is LoRA's. PEFT's ``velora_config`` holds ``num_groups`` (``groups``), ``scale``
(``reconstruction_scale``) and ``init_type`` (``projection``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import EmitContext
from surgeon.checks import check_choice, check_int, check_positive
from surgeon.errors import SpecError
from surgeon.layers import layer_kind
from surgeon.passes.lowrank.lora import LoRA, LoRALayer
from surgeon.peft import MAPPING, REQUIRED, PeftKey

PROJECTIONS = ("batch_average", "batch_average_once", "random")
VELORA_KEYS = {
    "num_groups": ("groups", 64),
    "scale": ("reconstruction_scale", 1.0),
    "init_type": ("projection", "batch_average"),
}
"""``velora_config``'s keys, the fields that carry them and PEFT's defaults."""


def sub_config_keys(key: str, entries: Mapping[str, tuple[str, Any]]) -> tuple[PeftKey, ...]:
    """The `PeftKey`s of a LoRA variant's sub-config ``key`` (VeLoRA's ``velora_config``, a
    mapping): one per entry (``entries``: its keys, each with the field that carries it and
    PEFT's default), each writing the whole mapping. A config without ``key`` is refused; an
    entry it leaves out takes PEFT's default; an entry PEFT's sub-config does not have is
    refused rather than dropped (PEFT drops it)."""

    def save(spec: Any, paths: Any) -> dict[str, Any]:
        return {sub: getattr(spec, name) for sub, (name, _) in entries.items()}

    def reads(sub: str) -> Callable[[Mapping[str, Any], Mapping[str, Any], str], Any]:
        def load(value: Mapping[str, Any], config: Mapping[str, Any], where: str) -> Any:
            unknown = sorted(set(value) - set(entries))
            if unknown:
                raise SpecError(
                    f"{where}: {key}.{unknown[0]} is not a setting of {key} (known: "
                    f"{', '.join(entries)})"
                )
            return value.get(sub, entries[sub][1])

        return load

    return tuple(
        PeftKey(key, name, REQUIRED, MAPPING, save, reads(sub))
        for sub, (name, _) in entries.items()
    )


@dataclass(frozen=True)
class VeLoRA(LoRA):
    """LoRA with compressed activations for A's gradient; LoRA's fields, plus ``groups`` (the
    sub-tokens per token), ``reconstruction_scale`` (what rebuilt activations are multiplied
    by) and ``projection`` (how ``v`` is chosen: one of `PROJECTIONS`)."""

    name = "velora"
    peft_format = LoRA.peft_format.but(
        keys=(*LoRA.peft_format.keys, *sub_config_keys("velora_config", VELORA_KEYS))
    )
    adapts_quantized = False
    combinations = ()

    groups: int = VELORA_KEYS["num_groups"][1]
    reconstruction_scale: float = VELORA_KEYS["scale"][1]
    projection: str = VELORA_KEYS["init_type"][1]

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_int(owner, "groups", self.groups)
        check_positive(owner, "reconstruction_scale", self.reconstruction_scale)
        check_choice(owner, "projection", self.projection, PROJECTIONS)

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        """LoRA files with ``velora_config`` set (even ``{}``: PEFT's defaults), and only those."""
        return isinstance(config.get("velora_config"), Mapping) and super().accepts_peft_config(
            config
        )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, VeLoRA]:
        return {
            "batch-average": cls(rank=4, targets=targets, groups=4),
            "random-scaled-dropout": cls(
                rank=3,
                targets=targets,
                groups=3,
                projection="random",
                reconstruction_scale=0.5,
                dropout=0.1,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2") and super().supports(layer)

    def create_layer(self, layer: nn.Module, path: str) -> VeLoRALayer:
        rank, scale = self.rank_and_scale(path)
        return VeLoRALayer(
            layer,
            path,
            rank,
            scale,
            self.dropout,
            self.init,
            self.lora_bias,
            CompressedProjection(
                layer.weight,
                layer_in_features(layer),
                self.groups,
                self.reconstruction_scale,
                self.projection,
            ),
        )


def layer_in_features(layer: nn.Module) -> int:
    """A Linear's input features; GPT-2's Conv1D stores its weight (in, out)."""
    return layer.weight.shape[0] if layer_kind(layer) == "conv1d_gpt2" else layer.weight.shape[1]


# -- the compression ---------------------------------------------------------------------------


def _sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` as (tokens, groups, ceil(in / groups)), its features zero-padded to fill the groups."""
    size = math.ceil(x.shape[-1] / groups)
    padded = F.pad(x, (0, groups * size - x.shape[-1]))
    return padded.reshape(-1, groups, size)


def _unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` in float32; the all-ones direction, normalised, where ``v`` is zero (as PEFT)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    fallback = torch.full_like(v, 1 / math.sqrt(v.numel()))
    return torch.where(norm == 0, fallback, v / norm)


def _rebuild(
    compressed: torch.Tensor, v: torch.Tensor, features: int, scale: float
) -> torch.Tensor:
    """The activations, (tokens, in), from their projections (tokens, groups) on ``v``."""
    return (compressed.unsqueeze(-1) * v).flatten(1)[:, :features] * scale


class _CompressedLinear(torch.autograd.Function):
    """``x A^T`` that saves ``x``'s sub-token projections on ``v`` (and A, v) for backward: A's
    gradient from the rebuilt activations, ``x``'s exact."""

    @staticmethod
    def forward(ctx, x, weight, v, groups: int, scale: float):  # type: ignore[override]
        ctx.x_shape, ctx.x_dtype, ctx.scale = x.shape, x.dtype, scale
        compressed = torch.einsum("tgd,d->tg", _sub_tokens(x, groups), v.to(x.dtype))
        ctx.save_for_backward(compressed, weight, v)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        compressed, weight, v = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = _rebuild(
                compressed.to(grad.dtype), v.to(grad.dtype), ctx.x_shape[-1], ctx.scale
            )
            grad_weight = (grad.t() @ rebuilt).to(weight.dtype)
        return grad_x, grad_weight, None, None, None


class CompressedProjection(nn.Module):
    """The A projection, ``F.linear(x, A)``; with gradients on in training, through
    `_CompressedLinear` after updating ``v`` as ``projection`` says."""

    def __init__(
        self, weight: torch.Tensor, features: int, groups: int, scale: float, projection: str
    ) -> None:
        super().__init__()
        self.groups = groups
        self.scale = scale
        self.projection = projection
        factory = {"device": weight.device, "dtype": weight.dtype}
        size = math.ceil(features / groups)
        if projection == "random":  # drawn in the weight's dtype, as PEFT
            v = _unit(torch.randn(size, **factory)).to(weight.dtype)
        else:
            v = torch.zeros(size, **factory)
        self.register_buffer("direction", v)
        # whether ``direction`` stays as it is (random, or averaged once): a buffer, so that a
        # checkpoint keeps it; PEFT's files do not (a loaded layer averages once again, as PEFT)
        self.register_buffer("settled", torch.tensor(projection == "random", device=weight.device))

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, weight)
        if self.projection == "batch_average" or (
            self.projection == "batch_average_once" and not self.settled
        ):
            self._average(x)
        return _CompressedLinear.apply(x, weight, self.direction, self.groups, self.scale)

    @torch.no_grad()
    def _average(self, x: torch.Tensor) -> None:
        """``v`` from this batch: its mean sub-token, normalised."""
        mean = _sub_tokens(x.detach(), self.groups).flatten(0, 1).mean(dim=0)
        self.direction.copy_(_unit(mean).to(self.direction.dtype))
        self.settled.fill_(True)


class VeLoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` (and B's bias with ``lora_bias``), A run through
    `CompressedProjection`, whose ``direction`` PEFT saves as ``lora_velora_embed``."""

    method = "velora"
    fuses_as = None  # the A projection is a module of its own while training

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        lora_bias: bool,
        projection: CompressedProjection,
    ) -> None:
        super().__init__(base, path, rank, scale, dropout, init, lora_bias=lora_bias)
        self.projection = projection

    def emit_update(self, ctx: EmitContext, h: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        h = ctx.module("projection", self.projection, h, a)
        return ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b, *self._emit_bias(ctx))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_velora_embed": self.projection.direction}
