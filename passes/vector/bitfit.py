"""BitFit: train only the bias terms, everything else frozen (Ben Zaken et al., 2022).

A targeted layer computes ``W x + (b + Δb)``: its bias ``b`` stays frozen and the adapter holds
the trainable update ``Δb`` (one entry per output feature: per channel for convolutions, per
normalised element for LayerNorm), starting at zero so a fresh adapter changes nothing. The
graph adds ``Δb`` to the base output (broadcast over the output features, along the channel axis
for convolutions), so several adapters on one layer add up and a mixed batch gives each row its
own ``Δb``. Merging adds ``Δb`` to the base bias; unmerging subtracts it again.

``targets`` defaults to ``"all-biases"`` (`ALL_BIASES`): every layer with a bias that BitFit
adapts, the paper's "all bias terms". Presets (``all-linear``, ...) skip layers without a bias;
such a layer named explicitly is refused, as there is nothing to tune.

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_BITFIT"`` (PEFT has no BitFit tuner; its loader
refuses such a file). The config holds the selection (``target_modules``, ``exclude_modules``,
``layers_to_transform``, ``layers_pattern``); per layer the file holds ``bitfit_delta``, ``Δb``
in the base bias's shape.

Layers: Linear, transformers' GPT-2 ``Conv1D``, Conv1d/2d/3d and LayerNorm, each with a bias
(embeddings have none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind
from surgeon.peft import PeftFormat, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import PRESETS, select_targets, show_selector

ALL_BIASES = "all-biases"
"""BitFit's own preset: every layer of the model with a bias that BitFit adapts."""

PEFT_FORMAT = PeftFormat(
    "SURGEON_BITFIT",
    keys=selection_keys(),
    # PEFT's bias switch would train the base biases besides the deltas: not this method
    switches={"bias": "none"},
)


def bitfit_kind(layer: nn.Module) -> str | None:
    """linear, conv1d_gpt2, conv (1d/2d/3d) or layer_norm for the layer types BitFit adapts
    (with or without a bias), else None."""
    if isinstance(layer, nn.LayerNorm):
        return "layer_norm"
    kind = layer_kind(layer)
    return kind if kind in ("linear", "conv1d_gpt2", "conv") else None


def has_bias(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "bias", None), torch.Tensor)


@dataclass(frozen=True)
class BitFit(MethodSpec):
    """Bias-terms fine-tuning."""

    name = "bitfit"
    peft_format = PEFT_FORMAT

    targets: str | tuple[str, ...] = ALL_BIASES
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # named layers, and the preset over the whole model (GPT-2's LayerNorms included)
        return {"named": cls(targets=targets), "all-biases": cls()}

    def supports(self, layer: nn.Module) -> bool:
        return bitfit_kind(layer) is not None and has_bias(layer)

    def select(self, model: nn.Module) -> list[str]:
        """As every method selects, ``all-biases`` spelled out as the layers it picks; a layer
        without a bias named explicitly is refused saying so (presets skip it)."""
        owner = type(self).__name__
        if self.targets == ALL_BIASES:
            return MethodSpec.select(self.replace(targets=self._all_biases(model)), model)
        if not (isinstance(self.targets, str) and self.targets in PRESETS):
            typed = select_targets(
                model,
                owner,
                self.targets,
                lambda layer: bitfit_kind(layer) is not None,
                layers=self.layers,
                exclude=self.exclude,
            )
            unbiased = [p for p in typed if not has_bias(model.get_submodule(p))]
            if unbiased:
                shown = ", ".join(unbiased[:3]) + (" ..." if len(unbiased) > 3 else "")
                raise SpecError(
                    f"{owner}.targets={show_selector(self.targets)} matches layers without a bias "
                    f"({shown}): BitFit trains bias terms only; target layers with a bias or "
                    f"exclude these"
                )
        return super().select(model)

    def _all_biases(self, model: nn.Module) -> str:
        """A regex matching exactly the paths of the layers BitFit can adapt in ``model``."""
        paths = [p for p, m in model.named_modules() if p and self.supports(m)]
        if not paths:
            raise SpecError(
                f"{type(self).__name__}.targets={ALL_BIASES!r}: {type(model).__name__} has no "
                f"layer with a bias that BitFit adapts (Linear, GPT-2 Conv1D, Conv1d/2d/3d, "
                f"LayerNorm)"
            )
        return "|".join(re.escape(p) for p in paths)

    def create_layer(self, layer: nn.Module, path: str) -> BitFitLayer:
        return BitFitLayer(layer)


class BitFitLayer(AdapterLayer):
    """The bias update ``bitfit_delta`` of one layer, in the base bias's shape (float32 on a
    half-precision base, as PEFT keeps adapter parameters)."""

    method = "bitfit"
    # the bias it updates is exempt from weight decay (as biases are), so is the update
    no_weight_decay = ("bitfit_delta",)

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.kind = bitfit_kind(base)
        bias = base.bias
        self.bitfit_delta = nn.Parameter(torch.zeros(bias.shape, **adapter_tensor_kwargs(bias)))

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        delta = ctx.attr("bitfit_delta", self.bitfit_delta)
        if self.kind == "conv":  # (out,) -> (out, 1, ...): along the channel axis
            spatial = self.base.weight.dim() - 2
            delta = ctx.method("view", delta, -1, *(1,) * spatial)
        dtype = self.base.bias.dtype
        if self.bitfit_delta.dtype != dtype:  # a float32 delta on a half base: round it first
            delta = ctx.method("to", delta, dtype)
        return ctx.call(torch.add, base_out, delta)

    @torch.no_grad()
    def merge(self) -> None:
        bias = self.base.bias
        bias.add_(self.bitfit_delta.to(bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        bias = self.base.bias
        bias.sub_(self.bitfit_delta.to(bias.dtype))
