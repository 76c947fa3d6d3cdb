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

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.errors import SpecError
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


class _ClassForward(nn.Module):
    """Runs a layer's class forward: the layer itself may carry a forward surgeon installed,
    which would run the adapters again."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.layer).forward(self.layer, x)


def norm_with(
    layer: nn.Module, x: torch.Tensor, params: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``layer``'s output on ``x`` computed with ``params`` in place of its own parameters, by
    its own code (RMS norms differ: Gemma scales by ``1 + w``, Llama casts before scaling)."""
    swapped = {f"layer.{name}": value for name, value in params.items()}
    return functional_call(_ClassForward(layer), swapped, (x,))


def refuse_several(out: torch.Tensor, message: str) -> torch.Tensor:
    """Raised when the graph runs, not when it is built: as in PEFT, several LN tuning adapters
    may be loaded and active together (a mixed batch gives each its rows); only running one norm
    with several of them is refused."""
    raise SpecError(message)


class LNTuningLayer(AdapterLayer):
    """The trained copy of one norm's ``weight`` (and ``bias``), in the norm's dtype: PEFT keeps
    its copy as the base layer is (it skips the float32 upcast of other adapters)."""

    method = "ln_tuning"
    peft_names = {"weight": "ln_tuning_layers.weight", "bias": "ln_tuning_layers.bias"}

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__(base)
        self.path = path
        for name, param in base.named_parameters(recurse=False):
            setattr(self, name, nn.Parameter(param.detach().clone()))
        self._saved: dict[str, torch.Tensor] | None = None

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters(recurse=False))

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        return self._norm(ctx, x)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        tag = base_out.meta.get("surgeon", {})
        if not tag.get("replaces"):  # a mixed batch: the base norm ran on this adapter's rows
            return self._norm(ctx, x)
        if tag["adapter"] == ctx.tag["adapter"]:
            return base_out  # emit_base computed this adapter's norm
        message = (
            f"LN tuning adapters {tag['adapter']!r} and {ctx.tag['adapter']!r} are both active on "
            f"{self.path}; a norm runs with one adapter's parameters at a time (PEFT's LN_TUNING "
            f"refuses this too): activate one of them, or give each its rows of a mixed batch"
        )
        return ctx.call(refuse_several, base_out, message)

    def _norm(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        params = {name: ctx.attr(name, p) for name, p in self._params().items()}
        return ctx.call(norm_with, ctx.attr("base_layer", self.base), x, params)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the trained copy into the norm, keeping its values for `unmerge`."""
        own = dict(self.base.named_parameters(recurse=False))
        self._saved = {name: p.detach().clone() for name, p in own.items()}
        for name, p in self._params().items():
            own[name].copy_(p)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._saved is None:
            raise RuntimeError("LNTuningLayer.unmerge() without a merge() before it")
        own = dict(self.base.named_parameters(recurse=False))
        for name, value in self._saved.items():
            own[name].copy_(value)
        self._saved = None
