"""QLoRA: LoRA on base weights stored in 4 bits (Dettmers et al., 2023).

Creating the adapter stores base layers in 4 bits (`surgeon.quant`: NF4 blocks of 64 with
double-quantized absmax, byte for byte what bitsandbytes stores): the adapted layers, and by
default every other linear layer but the output head, as bitsandbytes' ``load_in_4bit`` does
(``quantize=``). The full-precision weights are dropped. The layers are LoRA's 4-bit layers
(`QLoRALayer`): the graph spells each base out (dequantize into ``compute_dtype``, matmul) and
runs LoRA in the compute dtype beside it; the matmul re-dequantizes in backward instead of
keeping the weight. Only LoRA trains.

Saved adapters are plain PEFT LoRA adapters (PEFT keeps quantization out of adapter files). They
load back as `LoRA`, which on a layer stored in 4 bits builds this same layer, so a 4-bit model
plus a saved adapter computes what the QLoRA model did. ``merge_and_unload(requantize=True)``
stores the merged weight in 4 bits again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from surgeon.checks import check_targets
from surgeon.layers import restore_storage, snapshot_storage
from surgeon.passes.lowrank.lora import LoRA, QLoRALayer
from surgeon.quant import NF4, quantizable, quantizable_paths, quantize_linear
from surgeon.spec import MethodSpec

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
    peft_format = LoRA.peft_format.but(claims_files=False)  # its files are LoRA's
    combinations = ()

    targets: str | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    quant: NF4 = field(default_factory=NF4)
    quantize: str | tuple[str, ...] = "all-linear"

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        self._set("quant", NF4.from_value(self.quant, f"{owner}.quant"))
        if self.quantize != ONLY_TARGETS:
            self._set("quantize", check_targets(owner, "quantize", self.quantize))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        exact = NF4(compute_dtype="float32")  # oracles in float32 compare exactly
        return {
            "default": cls(rank=4, targets=targets, quant=exact, quantize=ONLY_TARGETS),
            "fp4-all-linear": cls(
                rank=2,
                dropout=0.1,
                targets=targets,
                quant=NF4(
                    block_size=32, double_quant=False, compute_dtype="float32", quant_type="fp4"
                ),
            ),
        }

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

    def on_full_precision_base(self) -> MethodSpec:
        return LoRA(**_lora_fields(self))

    @classmethod
    def on_4bit_base(cls, method: MethodSpec) -> MethodSpec | None:
        """A QLoRA spec as it is; a LoRA (or DoRA) as QLoRA with its LoRA fields and `NF4`."""
        if isinstance(method, QLoRA):
            return method
        if isinstance(method, LoRA):
            return cls(**_lora_fields(method))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "quant": self.quant.to_dict()}


def _lora_fields(method: LoRA) -> dict[str, Any]:
    """``method``'s LoRA fields for a memory estimate: a residual init (which rewrites the base
    weights) is left out, the estimate does not depend on it."""
    names = [f.name for f in dataclasses.fields(LoRA)]
    return {n: getattr(method, n) for n in names if n != "init" or method.init == "default"}
