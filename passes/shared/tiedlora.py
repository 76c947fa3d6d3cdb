"""Tied-LoRA: ``base(x) + (alpha/r) · Λ_v B Λ_u A dropout(x)``, LoRA's factors tied across layers
and scaled per layer (Renduchintala, Konuk and Kuchaiev, 2023, "Tied-LoRA: Enhancing parameter
efficiency of LoRA with weight tying", https://arxiv.org/abs/2311.09578, §2).

Every adapted layer ``l`` computes ``ΔW_l = (alpha/r) · diag(v_l) B diag(u_l) A``: ``A`` (r x in)
and ``B`` (out x r) are one pair for all adapted layers of the same shape (the paper ties them
across the transformer's layers, whose projections share a shape; here layers of different
shapes, such as a grouped-query v_proj beside q_proj, each get their shape's pair), ``u_l`` (r,)
and ``v_l`` (out,) are the layer's own. ``config`` names which of them train, as the paper's
table of configurations (∇ trains, ● frozen; a frozen ``u`` or ``v`` is the constant 1, so it is
neither held nor saved):

=======  ===  ===  ===  ===  =====================
config    A    B    u    v   trained parameters
=======  ===  ===  ===  ===  =====================
TL1       ∇    ∇    ∇    ∇   2dr + L(r + d)
TL2       ∇    ∇    ●    ∇   2dr + Ld
TL3       ∇    ∇    ∇    ●   2dr + Lr
TL4       ●    ∇    ∇    ∇   dr + L(r + d)
TL5       ●    ∇    ●    ●   dr
TL6       ∇    ∇    ●    ●   2dr
=======  ===  ===  ===  ===  =====================

(``d`` the hidden size, ``L`` the number of adapted layers.) Source check (issue #21): the paper's
text (its configuration table, §2) could not be read in this project's stored sources; only
secondary summaries of arXiv 2311.09578 were (A and B tied across layers, per-layer vectors
trained or frozen by configuration, TL6 the configuration the authors single out). Which of
A, B, u, v each TL row trains, the inits of u and v and the ``alpha/r`` scale are therefore
written from memory and NOT verified against the paper; in particular the v1 abstract's
"13% of LoRA's parameters" for the singled-out configuration suggests it trains per-layer
vectors, which the TL6 row above does not. Inits: ``A`` kaiming-uniform as
LoRA's A (from the global generator, frozen or not), ``B`` zero as LoRA's, ``u`` and ``v`` one,
so a fresh adapter leaves the model as it is (every configuration trains B). Merging adds
``ΔW_l`` to each weight.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_TIED_LORA"`` (PEFT
has no Tied-LoRA; its loader refuses such a file). The config holds LoRA's keys (``r``,
``lora_alpha``, ``lora_dropout``, the selection) and ``tied_config``; the file holds
``base_model.tiedlora_A.<in>x<out>`` and ``base_model.tiedlora_B.<in>x<out>`` once per shape
(a frozen A too: it is a random draw), and per layer ``tiedlora_u`` and ``tiedlora_v`` where they
train. In half precision every tensor is kept in float32, as PEFT keeps LoRA's.

Layers: Linear and transformers' GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, check_finite, check_int, check_probability
from surgeon.layers import adapter_dtype, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

CONFIGS: dict[str, frozenset[str]] = {
    "TL1": frozenset("ABuv"),
    "TL2": frozenset("ABv"),
    "TL3": frozenset("ABu"),
    "TL4": frozenset("Buv"),
    "TL5": frozenset("B"),
    "TL6": frozenset("AB"),
}
"""Which of A, B, u, v each of the paper's configurations trains."""

SHARED_PREFIX = "base_model.tiedlora_"

PEFT_FORMAT = PeftFormat(
    "SURGEON_TIED_LORA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        *selection_keys(),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("tied_config", "config", "TL6", STRING),
    ),
    # LoRA's bias switch would train base biases too: not this method
    switches={"bias": "none"},
    constants={"fan_in_fan_out": False},  # implied by the layer type
)


@dataclass(frozen=True)
class TiedLoRA(MethodSpec):
    """LoRA factors tied across the layers of each shape, with per-layer scaling vectors.

    ``config``: which of A, B, u, v train (``TL1`` ... ``TL6``, the paper's table in the module
    docstring, not verified against the paper: see there). ``alpha``: the update
    is scaled by ``alpha / rank``. ``dropout``: on the adapter's input, as LoRA's.
    """

    name = "tiedlora"
    peft_format = PEFT_FORMAT

    rank: int = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    config: str = "TL6"
    alpha: float = 8
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_choice(owner, "config", self.config, tuple(CONFIGS))
        check_finite(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # TL6: tied factors alone; TL1: both vectors too, with dropout; TL4: a frozen A (saved)
        return {
            "default": cls(rank=2, alpha=4, targets=targets),
            "tl1-dropout": cls(rank=3, alpha=3, config="TL1", dropout=0.1, targets=targets),
            "tl4-frozen-a": cls(rank=2, alpha=2, config="TL4", targets=targets),
        }

    @property
    def trains(self) -> frozenset[str]:
        """Which of A, B, u, v this configuration trains."""
        return CONFIGS[self.config]

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, TiedLoRALayer]:
        factors: dict[tuple[int, int], TiedFactors] = {}
        layers = {}
        for path in paths:  # model order: each shape's pair is drawn as its first layer comes
            base = model.get_submodule(path)
            shape = in_out_features(base)
            if shape not in factors:
                factors[shape] = TiedFactors(self, *shape, base.weight)
            layers[path] = TiedLoRALayer(base, factors[shape], self)
        return layers

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        pairs = {
            layer.factors.shape_key: layer.factors
            for layer in layers.values()
            if isinstance(layer, TiedLoRALayer)  # not the copies of modules_to_save
        }
        out = {}
        for shape_key, pair in sorted(pairs.items()):
            out[f"{SHARED_PREFIX}A.{shape_key}"] = pair.tiedlora_A
            out[f"{SHARED_PREFIX}B.{shape_key}"] = pair.tiedlora_B
        return out


class TiedFactors(nn.Module):
    """``tiedlora_A`` (r x in) and ``tiedlora_B`` (out x r) of one shape, shared by the adapted
    layers of that shape: parameters, A a buffer where the configuration freezes it."""

    def __init__(
        self, spec: TiedLoRA, in_features: int, out_features: int, base_weight: torch.Tensor
    ) -> None:
        super().__init__()
        self.shape_key = f"{in_features}x{out_features}"
        factory = {"device": base_weight.device, "dtype": adapter_dtype(base_weight)}
        a = torch.empty(spec.rank, in_features, **factory)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoRA's A
        if "A" in spec.trains:
            self.tiedlora_A = nn.Parameter(a)
        else:
            self.register_buffer("tiedlora_A", a)
        # every configuration trains B: starting at zero, it makes a fresh adapter the identity
        self.tiedlora_B = nn.Parameter(torch.zeros(out_features, spec.rank, **factory))


class TiedLoRALayer(AdapterLayer):
    """One layer's ``tiedlora_u`` (r,) and ``tiedlora_v`` (out,) where its configuration trains
    them, over its shape's shared `TiedFactors`."""

    method = "tiedlora"

    def __init__(self, base: nn.Module, factors: TiedFactors, spec: TiedLoRA) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.factors = factors
        self.scale = spec.alpha / spec.rank
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        weight = base.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        self.tiedlora_u = (
            nn.Parameter(torch.ones(spec.rank, **factory)) if "u" in spec.trains else None
        )
        out_features = in_out_features(base)[1]
        self.tiedlora_v = (
            nn.Parameter(torch.ones(out_features, **factory)) if "v" in spec.trains else None
        )

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("tiedlora_A", self.factors.tiedlora_A)
        b = ctx.attr("tiedlora_B", self.factors.tiedlora_B)
        cast = self.factors.tiedlora_B.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.factors.tiedlora_B.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        h = ctx.call(F.linear, h, a)
        if self.tiedlora_u is not None:
            h = ctx.call(torch.mul, h, ctx.attr("tiedlora_u", self.tiedlora_u))
        # the scale multiplies the rank-r intermediate: r/out of the work of scaling the output
        delta = ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b)
        if self.tiedlora_v is not None:
            delta = ctx.call(torch.mul, delta, ctx.attr("tiedlora_v", self.tiedlora_v))
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) · diag(v) B diag(u) A`` in the base weight's layout."""
        a, b = self.factors.tiedlora_A, self.factors.tiedlora_B
        if self.tiedlora_u is not None:
            a = self.tiedlora_u[:, None] * a
        if self.tiedlora_v is not None:
            b = self.tiedlora_v[:, None] * b
        delta = (b @ a) * self.scale
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The vectors this layer trains: A and B are the adapter's
        (`TiedLoRA.peft_shared_tensors`)."""
        names = ("tiedlora_u", "tiedlora_v")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
