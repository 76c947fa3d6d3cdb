"""LoRA: ``base(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).

Layers: Linear, Conv1d/2d/3d, Embedding and transformers' GPT-2 ``Conv1D``. Initialisations
follow PEFT: ``default`` (A kaiming-uniform, B zero; for embeddings A zero, B normal),
``gaussian`` (A normal with std 1/r), ``pissa`` (principal singular vectors, base weight
replaced by the residual) and ``olora`` (QR of the base weight, residual likewise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.errors import SpecError
from surgeon.layers import gpt2_conv1d_type
from surgeon.quant import is_quantized
from surgeon.spec import (
    MethodSpec,
    check_bool,
    check_choice,
    check_int,
    check_layers,
    check_number,
    check_pattern_map,
    check_targets,
)
from surgeon.targets import pattern_value, peft_selection

INITS = ("default", "gaussian", "pissa", "olora")
# fan_in_fan_out is implied by the layer type (PEFT corrects it the same way).
PEFT_FIELDS = {
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
}
BIAS_MODES = ("none", "all", "lora_only")


def layer_kind(layer: nn.Module) -> str | None:
    """How LoRA attaches to ``layer``: linear, conv1d_gpt2, conv, embedding, or None."""
    conv1d = gpt2_conv1d_type()
    if isinstance(layer, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(layer, conv1d):
        return "conv1d_gpt2"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    return None


@dataclass(frozen=True)
class LoRA(MethodSpec):
    """Low-rank adaptation (Hu et al., 2021)."""

    name = "lora"
    peft_type = "LORA"
    pattern_fields = ("rank_pattern", "alpha_pattern")
    adapts_quantized = True  # on 4-bit layers it is QLoRA's layer (passes/qlora.py)

    rank: int = 8
    alpha: float = 16
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    bias: str = "none"
    rslora: bool = False
    init: str = "default"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_number(owner, "alpha", self.alpha, 0)
        self._set("targets", check_targets(owner, "targets", self.targets))
        check_number(owner, "dropout", self.dropout, 0, 1, low_inclusive=True)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        check_bool(owner, "rslora", self.rslora)
        check_choice(owner, "init", self.init, INITS)
        self._set("layers", check_layers(owner, "layers", self.layers))
        self._set("exclude", check_targets(owner, "exclude", self.exclude, allow_empty=True))
        self._set(
            "rank_pattern", check_pattern_map(owner, "rank_pattern", self.rank_pattern, check_int)
        )
        self._set(
            "alpha_pattern",
            check_pattern_map(
                owner, "alpha_pattern", self.alpha_pattern, lambda o, f, v: check_number(o, f, v, 0)
            ),
        )

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) is not None

    @property
    def rewrites_base(self) -> bool:
        return self.init in ("pissa", "olora")

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        rank = pattern_value(self.rank_pattern, path, self.rank)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        return rank, alpha / (math.sqrt(rank) if self.rslora else rank)

    def create_layer(self, layer: nn.Module, path: str) -> LoRALayer:
        rank, scale = self.rank_and_scale(path)
        if is_quantized(layer):
            from passes.qlora import QLoRALayer

            return QLoRALayer(layer, path, rank, scale, self.dropout, self.init, layer.quant)
        return LoRALayer(layer, path, rank, scale, self.dropout, self.init)

    def trainable_base_parameters(self, model: nn.Module, paths: Sequence[str]) -> list[str]:
        if self.bias == "all":
            return [n for n, _ in model.named_parameters() if n.endswith("bias")]
        if self.bias == "lora_only":
            return [
                f"{p}.bias"
                for p in paths
                if getattr(model.get_submodule(p), "bias", None) is not None
            ]
        return []

    def to_peft_config(self, paths: Sequence[str] = ()) -> dict[str, Any]:
        targets, exclude, layers = peft_selection(self, paths)
        return {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": targets,
            "exclude_modules": exclude,
            "lora_dropout": self.dropout,
            "bias": self.bias,
            "use_rslora": self.rslora,
            "init_lora_weights": True if self.init == "default" else self.init,
            "layers_to_transform": layers,
            "layers_pattern": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "fan_in_fan_out": False,
            "use_dora": False,
            "lora_bias": False,
            "modules_to_save": None,
        }

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return not config.get("use_dora", False)

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], where: str) -> LoRA:
        from surgeon.io import check_peft_fields, peft_targets

        check_peft_fields(config, PEFT_FIELDS, where)
        init = config.get("init_lora_weights", True)
        if isinstance(init, bool):
            init = "default"  # the weights come from the file; only residual inits change the base
        if init not in INITS:
            raise SpecError(
                f"{where}: init_lora_weights={init!r} is not supported (supported: true, "
                f"false, {', '.join(repr(i) for i in INITS[1:])})"
            )
        targets = peft_targets(config, where)
        exclude = config.get("exclude_modules") or ()
        return cls(
            rank=config.get("r", 8),
            alpha=config.get("lora_alpha", 8),
            targets=targets,
            dropout=config.get("lora_dropout", 0.0),
            bias=config.get("bias", "none"),
            rslora=bool(config.get("use_rslora", False)),
            init=init,
            layers=config.get("layers_to_transform"),
            exclude=exclude if isinstance(exclude, str) else tuple(exclude),
            rank_pattern=config.get("rank_pattern") or {},
            alpha_pattern=config.get("alpha_pattern") or {},
        )


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Half-precision bases get float32 adapters, as PEFT does by default (autocast_adapter_dtype)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class LoRALayer(AdapterLayer):
    """``lora_A`` (r x in) and ``lora_B`` (out x r) for one layer; convolutions keep kernel dims."""

    method = "lora"

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.rank = rank
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        factory = {"device": weight.device, "dtype": dtype or adapter_dtype(weight)}
        a_shape, b_shape = self._shapes(base, path, rank)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        self._initialise(init, path)

    @staticmethod
    def _shapes(base: nn.Module, path: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kind = layer_kind(base)
        if kind == "linear":
            return (rank, base.in_features), (base.out_features, rank)
        if kind == "conv1d_gpt2":
            fan_in, fan_out = base.weight.shape
            return (rank, fan_in), (fan_out, rank)
        if kind == "embedding":
            return (rank, base.num_embeddings), (base.embedding_dim, rank)
        if base.groups != 1 or any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
            raise SpecError(
                f"LoRA on {path}: convolutions with groups, dilation or non-zero padding_mode "
                f"are not supported yet"
            )
        ones = (1,) * len(base.kernel_size)
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, *ones)

    def _initialise(self, init: str, path: str) -> None:
        if init in ("pissa", "olora"):
            if self.kind not in ("linear", "conv1d_gpt2"):
                raise SpecError(
                    f"LoRA.init={init!r} supports Linear and Conv1D layers; {path} is "
                    f"{type(self.base).__name__}"
                )
            self._initialise_residual(init)
            return
        with torch.no_grad():
            if self.kind == "embedding":
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
                return
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def _initialise_residual(self, init: str) -> None:
        """PiSSA / OLoRA: A, B from a factorisation of W; the base keeps W - scale * B @ A (in place)."""
        weight = self.base.weight
        w = self._out_in(weight.float())
        if init == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            s = s[: self.rank] / self.scale
            a = torch.diag(s.sqrt()) @ vh[: self.rank]
            b = u[:, : self.rank] @ torch.diag(s.sqrt())
        else:
            q, r = torch.linalg.qr(w)
            a, b = r[: self.rank], q[:, : self.rank]
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        weight.copy_(self._out_in(w - self.scale * b @ a).to(weight.dtype))

    def _out_in(self, w: torch.Tensor) -> torch.Tensor:
        """GPT-2's Conv1D stores (in, out); everything here works in (out, in)."""
        return w.t() if self.kind == "conv1d_gpt2" else w

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.lora_A)
        b = ctx.attr("lora_B", self.lora_B)
        cast = self.lora_A.dtype != self.base.weight.dtype
        # the scale multiplies the rank-r intermediate: r/out of the work of scaling the output
        if self.kind == "embedding":
            emb = self.base
            hidden = ctx.call(
                F.embedding,
                x,
                ctx.method("t", a),
                emb.padding_idx,
                emb.max_norm,
                emb.norm_type,
                emb.scale_grad_by_freq,
                emb.sparse,
            )
            delta = ctx.call(
                torch.matmul, ctx.call(torch.mul, hidden, self.scale), ctx.method("t", b)
            )
        else:
            h = ctx.method("to", x, self.lora_A.dtype) if cast else x
            if self.dropout is not None:
                h = ctx.module("dropout", self.dropout, h)
            if self.kind == "conv":
                conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
                h = ctx.call(conv, h, a, None, self.base.stride, self.base.padding)
                delta = ctx.call(conv, ctx.call(torch.mul, h, self.scale), b)
            else:
                h = ctx.call(F.linear, h, a)
                delta = ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        if self.kind == "conv":
            if all(k == 1 for k in self.base.kernel_size):
                ones = (1,) * len(self.base.kernel_size)
                delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], *ones)
            else:
                conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
                delta = conv(a.transpose(0, 1), b).transpose(0, 1)
        elif self.kind == "embedding":
            delta = (b @ a).t()
        else:
            delta = self._out_in(b @ a)
        return delta * self.scale

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.kind == "embedding":
            return {"lora_embedding_A": self.lora_A, "lora_embedding_B": self.lora_B}
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
