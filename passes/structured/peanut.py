"""PEANuT: parameter-efficient adaptation with weight-aware neural tweakers (Zhong et al., 2024,
"PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers",
https://arxiv.org/abs/2410.01870).

``base(x) + x ΔWᵀ`` with ``ΔWᵀ = s · B(net(W0ᵀ))``: the update is a small network applied to the
frozen weight itself. Each input feature's column of ``W0`` (its ``out`` weights) goes through
``A`` (out -> r) and the activation ``act``, then through ``depth`` encoders and as many decoders
(r -> r, each followed by ``act``; decoder ``i``'s output adds the input of encoder
``depth - 1 - i``, a U-Net-like skip), then through ``B`` (r -> out); ``s`` is ``scaling``. No
bias anywhere, no dropout. ``B`` starts at zero (``init="random"``: drawn like the others), so a
fresh adapter changes nothing.

Forward: ``ΔW`` depends on ``W0`` and cannot run as thin matmuls on ``x``; it is built as a
whole matrix on every training call and, in eval mode, kept until ``W0`` or a factor changes
(`Cached`), so inference pays for one matmul with it. Over a half-precision base the factors are
float32 (PEFT's upcast), ``W0`` and ``x`` are promoted to it, and the update is rounded to the
base dtype before it is added, as PEFT adds it.

Merging adds ``ΔW`` computed from ``W0`` read before any adapter of the same merge changed it
(`prepare_merge`), as the unmerged graph sees it; unmerging puts back a copy of the weight taken
right before this adapter folded in (on the CPU, as PEFT keeps its copy), so it is exact.

Layers: Linear only, as PEFT (its PEANuT refuses every other type, GPT-2's Conv1D included).

PEFT config: every key of PEFT 0.21's PeanutConfig is read. ``act_fn`` may name any of
transformers' ``ACT2FN`` keys in PEFT; surgeon computes the ones in `ACTIVATIONS` (each the same
operations as transformers' class) and refuses the others naming the key.

PEFT keys: ``peanut_A.weight`` (r, out), ``peanut_encoders.<i>.weight`` and
``peanut_decoders.<i>.weight`` (r, r), ``peanut_B.weight`` (out, r).
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

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_choice, check_finite, check_int
from surgeon.layers import (
    UpdateFromOriginalWeight,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

Activation = Callable[[torch.Tensor], torch.Tensor]


def _relu_squared(t: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(t))


def _gelu_tanh_formula(t: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_new``: the tanh approximation written out (GPT-2's)."""
    inner = math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0))
    return 0.5 * t * (1.0 + torch.tanh(inner))


def _quick_gelu(t: torch.Tensor) -> torch.Tensor:
    return t * torch.sigmoid(1.702 * t)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


ACTIVATIONS: dict[str, Activation] = {
    "relu": F.relu,
    "relu2": _relu_squared,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_new": _gelu_tanh_formula,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": _identity,
}
"""PEFT's ``act_fn`` names (transformers' ``ACT2FN`` keys) surgeon computes, each with the
operations transformers' class uses, so the values match bit for bit. Not here: variants that
clip or approximate otherwise (``gelu_10``, ``gelu_fast``, ``gelu_accurate``, the ``*_python``
ones, ``laplace``, ``sqrtsoftplus``) and activations with parameters of their own (``prelu``,
``xielu``: PEFT builds a fresh one on every call)."""

PEFT_INITS: dict[str, bool] = {"default": True, "random": False}
"""surgeon's ``init`` -> PEFT's ``init_weights``."""


def _read_init(value: Any, config: Mapping[str, Any], where: str) -> str:
    """PEFT zeroes ``B`` when ``init_weights`` is truthy; null (falsy) draws it like the rest."""
    return "default" if config.get("init_weights", True) else "random"


PEFT_FORMAT = PeftFormat(
    "PEANUT",
    keys=(
        PeftKey("r", "rank", 32, INT),
        PeftKey("depth", "depth", 0, INT),
        PeftKey("act_fn", "activation", "relu", STRING),
        PeftKey("scaling", "scaling", 1.0, NUMBER),
        *selection_keys(),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL.optional(),
            save=lambda spec, paths: PEFT_INITS[spec.init],
            load=_read_init,
        ),
    ),
)


@dataclass(frozen=True)
class PEANuT(MethodSpec):
    """Weight-aware neural tweakers: ``ΔW`` is a small bottleneck network applied to ``W0``."""

    name = "peanut"
    peft_format = PEFT_FORMAT

    rank: int = 32
    depth: int = 0
    activation: str = "relu"
    scaling: float = 1.0
    init: str = "default"
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "depth", self.depth, minimum=0)
        check_choice(owner, "activation", self.activation, tuple(ACTIVATIONS))
        check_finite(owner, "scaling", self.scaling)
        check_choice(owner, "init", self.init, tuple(PEFT_INITS))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            # depth 0: A, act, B only
            "default": cls(rank=4, targets=targets),
            # the encoder/decoder stack with its skips, another activation and a scale
            "deep-gelu": cls(rank=3, depth=2, activation="gelu", scaling=0.5, targets=targets),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init != "random"

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> PEANuTLayer:
        return PEANuTLayer(layer, self.rank, self.depth, self.activation, self.scaling, self.init)


def peft_draws(out_features: int, rank: int, depth: int, init: str) -> list[torch.Tensor]:
    """``A``, the encoders, the decoders and ``B`` as PEFT draws them, from the global generator
    on the CPU in float32: each built as a Linear (kaiming-uniform, in that order), then all
    re-drawn in the same order, ``B`` zeroed instead unless ``random``; the same seed gives
    PEFT's values."""
    shapes = [(rank, out_features)] + [(rank, rank)] * (2 * depth) + [(out_features, rank)]
    tensors = [torch.empty(shape) for shape in shapes]
    for tensor in tensors:  # the Linear constructors' own draws
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    *hidden, b = tensors
    for tensor in hidden:
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    if init == "random":
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)
    return tensors


class PEANuTLayer(UpdateFromOriginalWeight, AdapterLayer):
    """``peanut_A``, the encoders, the decoders and ``peanut_B`` of one Linear; float32 over a
    half-precision base (rounded through the base dtype first, as PEFT keeps them)."""

    method = "peanut"

    def __init__(
        self, base: nn.Module, rank: int, depth: int, activation: str, scaling: float, init: str
    ) -> None:
        super().__init__(base)
        self.rank = rank
        self.depth = depth
        self.activation = activation
        self.scaling = scaling
        _, out_features = in_out_features(base)
        a, *hidden, b = (
            nn.Parameter(through_base_dtype(t, base.weight))
            for t in peft_draws(out_features, rank, depth, init)
        )
        self.peanut_A = a
        self.peanut_encoders = nn.ParameterList(hidden[:depth])
        self.peanut_decoders = nn.ParameterList(hidden[depth:])
        self.peanut_B = b
        # ΔW as F.linear takes it: recomputed on every training call, kept in eval until W0 or
        # a factor changes
        self.update_weight = Cached(self.update_weight_now, self._sources)

    # -- weight math -----------------------------------------------------------------------------

    def _sources(self) -> tuple:
        return (
            self.base.weight,
            self.peanut_A,
            *self.peanut_encoders,
            *self.peanut_decoders,
            self.peanut_B,
        )

    def update_from(self, w0: torch.Tensor) -> torch.Tensor:
        """``ΔW`` (out, in) for base weight ``w0``, in the adapter's dtype (a half-precision W0
        is promoted exactly, as in PEFT)."""
        act = ACTIVATIONS[self.activation]
        h = act(w0.t().to(self.peanut_A.dtype) @ self.peanut_A.t())  # (in, r)
        skips = []
        for encoder in self.peanut_encoders:
            skips.append(h)
            h = act(F.linear(h, encoder))
        for decoder, skip in zip(self.peanut_decoders, reversed(skips), strict=True):
            h = act(F.linear(h, decoder)) + skip
        return (F.linear(h, self.peanut_B) * self.scaling).t()

    def update_weight_now(self) -> torch.Tensor:
        return self.update_from(self.base.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.update_weight_now()

    # -- the graph -------------------------------------------------------------------------------

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype, base_dtype = self.peanut_A.dtype, self.base.weight.dtype
        cast = dtype != base_dtype
        h = ctx.method("to", x, dtype) if cast else x
        weight = ctx.module("update_weight", self.update_weight)
        update = ctx.call(F.linear, h, weight)
        # PEFT rounds the float32 update to the output's dtype, then adds
        update = ctx.method("to", update, base_dtype) if cast else update
        return ctx.call(torch.add, base_out, update)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"peanut_A.weight": self.peanut_A, "peanut_B.weight": self.peanut_B}
        for side in ("encoders", "decoders"):
            for i, weight in enumerate(getattr(self, f"peanut_{side}")):
                tensors[f"peanut_{side}.{i}.weight"] = weight
        return tensors
