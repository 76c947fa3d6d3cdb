"""Tied-LoRA: ``base(x) + (alpha/r) · Λ_v B Λ_u A dropout(x)``, LoRA's factors tied across layers
and scaled per layer (Renduchintala, Konuk and Kuchaiev, NAACL 2024, "Tied-LoRA: Enhancing
parameter efficiency of LoRA with weight tying", https://arxiv.org/abs/2311.09578).

Every adapted layer ``l`` computes ``ΔW_l = (alpha/r) · diag(v_l) B diag(u_l) A``: ``A`` (r x in)
and ``B`` (out x r) are one pair for the same projection in every transformer layer (the layers
whose paths differ only in their layer numbers, as ``model.layers.*.self_attn.q_proj``), ``u_l``
(r,) and ``v_l`` (out,) are the layer's own. ``config`` names which of them train; an
untrained ``u`` or ``v`` is the constant 1, neither held nor saved. The paper's two recommended
configurations are named (its Table 1, checked against the paper's own parameter counts below):

=======  ===  ===  ===  ===  ==============================  ====================
config    A    B    u    v   trained (paper's fused QKV)     here (separate q, v)
=======  ===  ===  ===  ===  ==============================  ====================
TL5       ∇    ∇    ●    ●   4dr                             Σ_projections r(in + out)
TL6       ∇    ∇    ∇    ∇   4dr + L(r + 3d)                 TL5 + Σ_layers (r + out)
=======  ===  ===  ===  ===  ==============================  ====================

(∇ trains, ● is held at 1; ``d`` the hidden size, ``L`` the number of layers.) Source check
(issue #21): for LLaMA2-7B at r = 8 the paper gives LoRA ~4.2M parameters, tying alone ~131K
(4dr) and TL6 12.5% of LoRA, and 4dr + L(r + 3d) = 524,544 is 12.5% of 4Ldr = 4,194,304;
TL5 trains the tied A and B with u = v = 1, TL6 all four (a later paper that ran TL6 describes it
the same way: "train A, B, u, v"). The paper sets ``alpha = r`` (no scaling): ``alpha=None``,
the default, does the same. The paper's other rows (TL1-TL4) could not be
read from a primary source here, so their names are refused rather than guessed; every
configuration can be asked for by the letters of what it trains instead (``config="Buv"``:
A frozen; ``config="uv"``: A and B frozen random, VeRA-like with tied factors).

Inits: ``A`` kaiming-uniform as LoRA's A and, where it does not train, ``B`` too (both from the
global generator, frozen or not); ``u`` and ``v`` one. One trained factor starts at zero so a
fresh adapter leaves the model as it is: ``B`` where it trains (LoRA's choice, the paper's TL5
and TL6), else ``v`` (VeRA's), else ``u``, else ``A``. Merging adds ``ΔW_l`` to each weight.

Tying: the paper ties across layers, never across projections, and adapts a fused QKV
projection whose one A serves q, k and v. Here each projection (q_proj, v_proj, ...) has its own
tied pair even where two have the same shape, and each adapted module its own u: with a fused
projection, as GPT-2's ``c_attn``, this is the paper's layout; with separate ones it trains
another A per projection.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_TIED_LORA"`` (PEFT
has no Tied-LoRA; its loader refuses such a file). The config holds LoRA's keys (``r``,
``lora_alpha``, null for alpha = r, ``lora_dropout``, the selection) and ``tied_config``; the
file holds ``base_model.tiedlora_A.<projection>`` and ``base_model.tiedlora_B.<projection>``
once per projection (its path with ``*`` for the layer numbers; frozen ones too: they are
random draws), and per layer ``tiedlora_u`` and ``tiedlora_v`` where they train. In half
precision every tensor is kept in float32, as PEFT keeps LoRA's.

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
from surgeon.checks import check_finite, check_int, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

FACTORS = "ABuv"

PRESETS: dict[str, str] = {"TL5": "AB", "TL6": "ABuv"}
"""The paper's configurations checked against it, by the factors each trains."""

UNMAPPED = ("TL1", "TL2", "TL3", "TL4")
"""The paper's rows whose factors could not be checked: refused, not guessed."""

ZERO_START_ORDER = "BvuA"
"""The first trained factor in this order starts at zero, so a fresh adapter is the identity."""


def trained_factors(owner: str, config: str) -> frozenset[str]:
    """The factors ``config`` trains: a preset's, or its letters; a `SpecError` names the rest."""
    if not isinstance(config, str):
        raise SpecError(f"{owner}.config={config!r}: expected a string")
    if config in PRESETS:
        return frozenset(PRESETS[config])
    if config in UNMAPPED:
        raise SpecError(
            f"{owner}.config={config!r}: the paper's {', '.join(UNMAPPED)} are not mapped in "
            "surgeon (which of A, B, u, v they train could not be checked against the paper); "
            "name what trains instead, e.g. config='Buv' (A frozen) or config='uv' (A and B "
            "frozen), or use 'TL5' (A, B) or 'TL6' (A, B, u, v)"
        )
    if not config or any(c not in FACTORS for c in config) or len(set(config)) != len(config):
        raise SpecError(
            f"{owner}.config={config!r}: expected 'TL5', 'TL6' or the letters of the factors "
            "it trains, each once, from A, B, u, v (e.g. 'Buv')"
        )
    return frozenset(config)


def projection_keys(model: nn.Module, paths: Sequence[str]) -> dict[str, str]:
    """Each layer's projection: its path with ``*`` for the layer numbers
    (``model.layers.*.self_attn.q_proj``), plus ``.<in>x<out>`` where the layers of one
    projection differ in shape (some models change widths with depth)."""
    shapes = {p: in_out_features(model.get_submodule(p)) for p in paths}
    patterns = {
        p: ".".join("*" if part.isdigit() else part for part in p.split(".")) for p in paths
    }
    widths: dict[str, set[tuple[int, int]]] = {}
    for path, pattern in patterns.items():
        widths.setdefault(pattern, set()).add(shapes[path])
    return {
        path: pattern
        if len(widths[pattern]) == 1
        else f"{pattern}.{'x'.join(map(str, shapes[path]))}"
        for path, pattern in patterns.items()
    }


SHARED_PREFIX = "base_model.tiedlora_"

PEFT_FORMAT = PeftFormat(
    "SURGEON_TIED_LORA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        *selection_keys(),
        PeftKey("lora_alpha", "alpha", None, NUMBER.optional()),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("tied_config", "config", "TL6", STRING),
    ),
    # LoRA's bias switch would train base biases too: not this method
    switches={"bias": "none"},
    constants={"fan_in_fan_out": False},  # implied by the layer type
)


@dataclass(frozen=True)
class TiedLoRA(MethodSpec):
    """LoRA factors tied across layers, one pair per projection, with per-layer scaling vectors.

    ``config``: which of A, B, u, v train: ``"TL6"`` (all four, the paper's best), ``"TL5"`` (A
    and B) or the letters of the trained factors (``"Buv"``); see the module docstring.
    ``alpha``: the update is scaled by ``alpha / rank``; None (the paper's choice) scales by 1.
    ``dropout``: on the adapter's input, as LoRA's.
    """

    name = "tiedlora"
    peft_format = PEFT_FORMAT

    rank: int = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    config: str = "TL6"
    alpha: float | None = None
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        trained_factors(owner, self.config)
        if self.alpha is not None:
            check_finite(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # TL6: everything trains; TL5: the tied factors alone, with dropout and a scale; "uv":
        # frozen random A and B (both saved), the zero start in v
        return {
            "default": cls(rank=2, targets=targets),
            "tl5-dropout": cls(rank=3, alpha=6, config="TL5", dropout=0.1, targets=targets),
            "frozen-factors": cls(rank=2, config="uv", targets=targets),
        }

    @property
    def trains(self) -> frozenset[str]:
        """Which of A, B, u, v this configuration trains."""
        return trained_factors(type(self).__name__, self.config)

    @property
    def zero_start(self) -> str:
        """The trained factor that starts at zero (`ZERO_START_ORDER`)."""
        return next(f for f in ZERO_START_ORDER if f in self.trains)

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 where alpha is None (the paper's alpha = r)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, TiedLoRALayer]:
        factors: dict[str, TiedFactors] = {}
        layers = {}
        keys = projection_keys(model, paths)
        for path in paths:  # model order: each pair is drawn as its projection's first layer comes
            base = model.get_submodule(path)
            key = keys[path]
            if key not in factors:
                factors[key] = TiedFactors(self, key, *in_out_features(base), base.weight)
            layers[path] = TiedLoRALayer(base, factors[key], self)
        return layers

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        pairs = {
            layer.factors.key: layer.factors
            for layer in layers.values()
            if isinstance(layer, TiedLoRALayer)  # not the copies of modules_to_save
        }
        out = {}
        for key, pair in sorted(pairs.items()):
            out[f"{SHARED_PREFIX}A.{key}"] = pair.tiedlora_A
            out[f"{SHARED_PREFIX}B.{key}"] = pair.tiedlora_B
        return out


class TiedFactors(nn.Module):
    """``tiedlora_A`` (r x in) and ``tiedlora_B`` (out x r) of one projection, shared by its
    adapted layers: parameters where the configuration trains them, buffers where not."""

    def __init__(
        self,
        spec: TiedLoRA,
        key: str,
        in_features: int,
        out_features: int,
        base_weight: torch.Tensor,
    ) -> None:
        super().__init__()
        self.key = key
        factory = adapter_tensor_kwargs(base_weight)
        self._hold(spec, "A", _start(spec, "A", (spec.rank, in_features), factory))
        self._hold(spec, "B", _start(spec, "B", (out_features, spec.rank), factory))

    def _hold(self, spec: TiedLoRA, factor: str, value: torch.Tensor) -> None:
        name = f"tiedlora_{factor}"
        if factor in spec.trains:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)


def _start(spec: TiedLoRA, factor: str, shape: tuple[int, int], factory: dict) -> torch.Tensor:
    """A factor's initial value: zero where it is the configuration's zero start, else drawn as
    LoRA's A (kaiming-uniform), so a frozen B is a random projection as VeRA's."""
    value = torch.empty(shape, **factory)
    if spec.zero_start == factor:
        return nn.init.zeros_(value)
    return nn.init.kaiming_uniform_(value, a=math.sqrt(5))


def _vector(spec: TiedLoRA, factor: str, size: int, factory: dict) -> nn.Parameter | None:
    """A layer's ``u`` or ``v`` where the configuration trains it: one, or zero as its zero
    start; None where it is the constant 1."""
    if factor not in spec.trains:
        return None
    fill = 0.0 if spec.zero_start == factor else 1.0
    return nn.Parameter(torch.full((size,), fill, **factory))


class TiedLoRALayer(AdapterLayer):
    """One layer's ``tiedlora_u`` (r,) and ``tiedlora_v`` (out,) where its configuration trains
    them, over its projection's shared `TiedFactors`."""

    method = "tiedlora"

    def __init__(self, base: nn.Module, factors: TiedFactors, spec: TiedLoRA) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.factors = factors
        self.scale = spec.scale
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        factory = adapter_tensor_kwargs(base.weight)
        self.tiedlora_u = _vector(spec, "u", spec.rank, factory)
        self.tiedlora_v = _vector(spec, "v", in_out_features(base)[1], factory)

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
        if self.scale != 1:  # on the rank-r intermediate: r/out of the work of the output's
            h = ctx.call(torch.mul, h, self.scale)
        delta = ctx.call(F.linear, h, b)
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
