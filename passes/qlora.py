"""QLoRA: LoRA on base weights stored in 4 bits (Dettmers et al., 2023).

Creating the adapter stores base layers in 4 bits (`surgeon.quant`: NF4 blocks of 64 with
double-quantized absmax, byte for byte what bitsandbytes stores): the adapted layers, and by
default every other linear layer but the output head, as bitsandbytes' ``load_in_4bit`` does
(``quantize=``). The full-precision weights are dropped. The rewritten graph spells each 4-bit base
out (dequantize into ``compute_dtype``, matmul) and runs LoRA in the compute dtype beside it; the
matmul re-dequantizes in backward instead of keeping the weight. Only LoRA trains.

Saved adapters are plain PEFT LoRA adapters (PEFT keeps quantization out of adapter files). They
load back as `LoRA`, which on a layer stored in 4 bits builds this same layer, so a 4-bit model
plus a saved adapter computes what the QLoRA model did.

Merging dequantizes the base and folds LoRA in, in float32, leaving a plain layer in the dtype the
weight had before quantization; unmerge restores the exact 4-bit storage, and
``merge_and_unload(requantize=True)`` stores the merged weight in 4 bits again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes.lora import LoRA, LoRALayer
from surgeon.adapter import EmitContext
from surgeon.errors import SpecError
from surgeon.layers import restore_storage, snapshot_storage
from surgeon.quant import (
    NF4,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_linear,
    is_quantized,
    linear_4bit,
    quantizable,
    quantizable_paths,
    quantize_linear,
)
from surgeon.spec import check_targets

ONLY_TARGETS = "targets"


@dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA on 4-bit base weights; the fields of `LoRA`, plus

    ``quant``: how base weights are stored (`surgeon.NF4`, or a table of its fields);
    ``quantize``: which other layers are stored in 4 bits too: ``"all-linear"`` (every linear
    layer but the output head, as bitsandbytes' ``load_in_4bit``), ``"targets"`` (only the
    adapted ones), or a selector like ``targets`` (name suffixes, a regex, a preset).
    """

    name = "qlora"
    peft_type = "LORA"

    targets: str | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    quant: NF4 = field(default_factory=NF4)
    quantize: str | tuple[str, ...] = "all-linear"

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        self._set("quant", NF4.from_value(self.quant, f"{owner}.quant"))
        if self.quantize != ONLY_TARGETS:
            self._set("quantize", check_targets(owner, "quantize", self.quantize))

    def supports(self, layer: nn.Module) -> bool:
        return quantizable(layer)

    def quantized_paths(self, model: nn.Module, paths: Sequence[str]) -> list[str]:
        """The layers this adapter stores in 4 bits: the adapted ones and what ``quantize`` selects."""
        chosen = set(paths)
        if self.quantize != ONLY_TARGETS:
            chosen |= set(
                quantizable_paths(model, self.quantize, f"{type(self).__name__}.quantize")
            )
        return [p for p, _ in model.named_modules() if p in chosen]

    def snapshot_base(self, model: nn.Module, paths: Sequence[str]) -> Callable[[], None]:
        restore_residuals = super().snapshot_base(model, paths)
        layers = [model.get_submodule(p) for p in self.quantized_paths(model, paths)]
        saved = [(layer, snapshot_storage(layer)) for layer in layers]

        def restore() -> None:
            for layer, snapshot in saved:
                restore_storage(layer, snapshot)
            restore_residuals()  # into the weights just put back

        return restore

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, QLoRALayer]:
        # LoRA first: residual inits (PiSSA, OLoRA) factor the full-precision weight, and the
        # residual is what gets quantized
        layers = {p: self.create_layer(model.get_submodule(p), p) for p in paths}
        for path in self.quantized_paths(model, paths):
            quantize_linear(model.get_submodule(path), self.quant)
        return layers

    def create_layer(self, layer: nn.Module, path: str) -> QLoRALayer:
        rank, scale = self.rank_and_scale(path)
        return QLoRALayer(layer, path, rank, scale, self.dropout, self.init, self.quant)

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return False  # a PEFT LoRA file is LoRA; on 4-bit layers LoRA builds QLoRA's layer

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "quant": self.quant.to_dict()}


class QLoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` in the compute dtype, on a base stored in 4 bits."""

    method = "qlora"

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        quant: NF4,
    ) -> None:
        if init in ("pissa", "olora") and is_quantized(base):
            raise SpecError(
                f"init={init!r} on {path}: the layer is already stored in 4 bits; residual inits "
                f"need its full-precision weight (QLoRA on a full-precision model quantizes the residual)"
            )
        super().__init__(base, path, rank, scale, dropout, init, dtype=quant.dtype)
        self.kind = "linear"  # 4-bit storage is [out, in], GPT-2's Conv1D included
        self._stored: tuple[tuple, NF4] | None = None  # the 4-bit storage while merged

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        base = self.base
        if not is_quantized(base):
            return None
        q = base.quant
        # read through the layer, so the graph always sees its current tensors
        layer = ctx.attr("base_layer", base)
        absmax = ctx.call(getattr, layer, "absmax")
        if q.double_quant:
            nested = ctx.call(getattr, layer, "nested_absmax")
            absmax = ctx.call(
                dequantize_absmax, absmax, nested, ctx.call(getattr, layer, "absmax_offset")
            )
        weight = ctx.call(
            dequantize_4bit,
            ctx.call(getattr, layer, "weight"),
            absmax,
            (base.out_features, base.in_features),
            q.block_size,
            q.quant_type,
            q.dtype,
        )
        bias = ctx.call(getattr, layer, "bias") if base.bias is not None else None
        return ctx.call(linear_4bit, x, weight, bias)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.lora_A)
        b = ctx.attr("lora_B", self.lora_B)
        h = ctx.method("to", x, self.lora_A.dtype)
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        h = ctx.call(F.linear, h, a)
        delta = ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b)
        return ctx.call(torch.add, base_out, ctx.method("type_as", delta, base_out))

    @torch.no_grad()
    def merge(self) -> None:
        base = self.base
        if not is_quantized(base):  # another adapter's merge dequantized it already
            super().merge()
            return
        self._stored = (snapshot_storage(base), base.quant)
        dtype = base.weight_dtype
        dequantize_linear(base, torch.float32)
        merged = base.weight + self.delta_weight().float()
        base.weight = nn.Parameter(merged.to(dtype), requires_grad=False)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._stored is None:
            super().unmerge()
            return
        restore_storage(self.base, self._stored[0])
        self._stored = None

    def unload(self, requantize: bool = False) -> None:
        if self._stored is not None and requantize:
            quantize_linear(self.base, self._stored[1])
        self._stored = None
