"""BEFT: a trained bias added to the output of chosen projections (Huang et al., 2025,
"BEFT: Bias-Efficient Fine-Tuning of Language Models", https://arxiv.org/abs/2509.15974).

``W x + b + Δb``: each targeted layer gets a vector ``Δb`` (one entry per output feature,
PEFT's ``beft_bias``, saved as ``(1, out)``). It starts at zero, so a fresh adapter leaves the
model unchanged. Merging adds ``Δb`` to the layer's bias. Where the layer has none, PEFT refuses
to merge; surgeon gives the layer a bias for as long as the adapter stays merged (unmerging
takes it away again), so such a model still merges, unloads and exports.

Layers: Linear (the only type PEFT's BEFT supports).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.layers import adapter_tensor_kwargs, layer_kind
from surgeon.peft import PeftFormat, selection_keys
from surgeon.spec import MethodSpec

PEFT_FORMAT = PeftFormat(
    "BEFT",
    # PEFT's BEFT has neither exclude_modules nor layers_to_transform: a selection that uses
    # them is written out as the chosen module paths
    keys=selection_keys(exclude=False, layers=False),
    # init_weights=False draws values that the file's weights replace on loading
    constants={"init_weights": True},
)


@dataclass(frozen=True)
class BEFT(MethodSpec):
    """Bias-efficient fine-tuning: a trained output bias on the targeted projections."""

    name = "beft"
    peft_format = PEFT_FORMAT

    targets: str | tuple[str, ...] = ("v_proj",)
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> BEFTLayer:
        return BEFTLayer(layer)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the targets are BEFT's only option; whether a layer has a bias of its own (the two
        # merge paths) is up to the zoo's models (the MLP's do, Llama's projections do not)
        return {"default": cls(targets=targets)}


class BEFTLayer(AdapterLayer):
    """The bias ``beft_bias`` of one layer, kept flat ``(out,)`` so that it adds to any output
    shape; float32 over a half-precision base, as PEFT keeps it."""

    method = "beft"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        weight = base.weight
        self.beft_bias = nn.Parameter(
            torch.zeros(base.out_features, **adapter_tensor_kwargs(weight))
        )
        # whether the last merge gave the base layer the bias it lacked (unmerge removes it)
        self.made_base_bias = False

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        out = ctx.call(torch.add, base_out, ctx.attr("beft_bias", self.beft_bias))
        # a float32 bias promotes a half-precision output; cast back as PEFT does
        dtype = self.base.weight.dtype
        return ctx.method("to", out, dtype) if self.beft_bias.dtype != dtype else out

    @torch.no_grad()
    def merge(self) -> None:
        base = self.base
        self.made_base_bias = base.bias is None
        if self.made_base_bias:
            weight = base.weight
            zeros = torch.zeros(base.out_features, device=weight.device, dtype=weight.dtype)
            base.bias = nn.Parameter(zeros, requires_grad=False)
        # added in the bias's own dtype from the float32 vector: PEFT's rounding exactly
        base.bias.add_(self.beft_bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.base
        base.bias.sub_(self.beft_bias)
        if self.made_base_bias:
            base.bias = None
            self.made_base_bias = False

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"beft_bias": self.beft_bias.view(1, -1)}
