"""LN tuning: train only the scale and shift of the targeted norm layers (Zhao et al., 2023,
"Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning").

A targeted norm computes ``norm(x; w', b')``: its own computation with a trained copy of its
weight ``w`` and bias ``b`` (the base layer stays frozen, as PEFT's ``ln_tuning_layers`` copy).
The copy starts equal to the base, so a fresh adapter changes nothing. Merging writes the copy
into the norm; unmerging puts the original values back exactly.

One adapter at a time runs a norm, as in PEFT (it refuses several active adapters); a mixed
batch gives each row its adapter's parameters.

Layers: torch's LayerNorm and RMSNorm, and a model's own layer or RMS norm classes
(LlamaRMSNorm, T5LayerNorm; see `surgeon.layers.is_norm`). PEFT copies whatever module it is
given; other modules are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgeon.copies import ParameterCopy
from surgeon.layers import is_norm
from surgeon.peft import PeftFormat, selection_keys
from surgeon.spec import MethodSpec

PEFT_FORMAT = PeftFormat("LN_TUNING", keys=selection_keys(layers=False))


@dataclass(frozen=True)
class LNTuning(MethodSpec):
    """Tuning only the norm layers' parameters."""

    name = "ln_tuning"
    peft_format = PEFT_FORMAT
    stacks = False  # a norm runs with one adapter's parameters (PEFT refuses two as well)

    targets: str | tuple[str, ...] = ("input_layernorm", "post_attention_layernorm", "norm")
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def supports(self, layer: nn.Module) -> bool:
        return is_norm(layer)

    def create_layer(self, layer: nn.Module, path: str) -> LNTuningLayer:
        return LNTuningLayer(layer, path)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {"default": cls(targets=targets)}


class LNTuningLayer(ParameterCopy):
    """The trained copy of one norm's ``weight`` (and ``bias``), in the norm's dtype: PEFT keeps
    its copy as the base layer is (it skips the float32 upcast of other adapters)."""

    method = "ln_tuning"
    peft_names = {"weight": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"}

    def several_message(self, first: str, second: str) -> str:
        return (
            f"LN tuning adapters {first!r} and {second!r} are both active on {self.path}; a norm "
            f"runs with one adapter's parameters at a time (PEFT's LN_TUNING refuses this too): "
            f"activate one of them, or give each its rows of a mixed batch"
        )
