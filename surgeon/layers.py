"""What methods need to know about the layers they adapt: which kind a layer is (norms
included), its sizes, the dtype adapters take on it, how to put back a layer whose storage
changed, and the weight math of methods that rescale ``W + ΔW`` by a learned magnitude (DoRA,
DVoRA)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def gpt2_conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D`` (a Linear with its weight stored in, out), if transformers is loaded.

    A model can only contain one if transformers is already imported, so this never imports it.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    if module is None and "transformers" in sys.modules:
        import transformers.pytorch_utils as module
    return getattr(module, "Conv1D", None) if module is not None else None


def layer_kind(layer: nn.Module) -> str | None:
    """``linear``, ``conv1d_gpt2`` (GPT-2's Conv1D), ``conv`` (Conv1d/2d/3d), ``embedding``, or
    None for layers of other types."""
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


def is_norm(layer: nn.Module) -> bool:
    """A layer or RMS norm with a learned scale: torch's LayerNorm and RMSNorm, or a model's own
    class named so (LlamaRMSNorm, T5LayerNorm) holding only its ``weight`` and ``bias``. LN tuning
    adapts these, so tracing keeps them as calls instead of inlining their arithmetic."""
    if isinstance(layer, (nn.LayerNorm, nn.RMSNorm)):
        return isinstance(getattr(layer, "weight", None), nn.Parameter)
    name = type(layer).__name__
    if not name.endswith(("LayerNorm", "RMSNorm")) or next(layer.children(), None) is not None:
        return False
    own = dict(layer.named_parameters(recurse=False))
    return "weight" in own and set(own) <= {"weight", "bias"} and not dict(layer.named_buffers())


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """Input and output features (channels) of a Linear, a convolution or GPT-2's Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.in_channels, layer.out_channels
    fan_in, fan_out = layer.weight.shape  # GPT-2's Conv1D stores (in, out)
    return fan_in, fan_out


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Half-precision bases get float32 adapters, as PEFT does by default (autocast_adapter_dtype)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def adapter_tensor_kwargs(weight: torch.Tensor) -> dict[str, Any]:
    """``device`` and ``dtype`` for an adapter's tensors beside the base ``weight``: its device,
    `adapter_dtype`."""
    return {"device": weight.device, "dtype": adapter_dtype(weight)}


def through_base_dtype(value: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
    """``value`` rounded to the base weight's dtype, kept in the adapter's dtype: PEFT first moves
    adapter tensors to the base dtype, then upcasts half precision to float32."""
    device = base_weight.device
    return value.to(base_weight.dtype).to(device=device, dtype=adapter_dtype(base_weight))


def snapshot_storage(module: nn.Module) -> tuple:
    """What `restore_storage` needs to put back how ``module`` stores its weights: its class, its
    own parameters and buffers, and its plain attributes (references, no copies)."""
    plain = {k: v for k, v in vars(module).items() if _is_plain(k)}
    return type(module), dict(module._parameters), dict(module._buffers), plain


def restore_storage(module: nn.Module, snapshot: tuple) -> None:
    """Undo storage changes made since `snapshot_storage` (a layer turned into 4 bits and back)."""
    cls, parameters, buffers, plain = snapshot
    module.__class__ = cls
    module._parameters.clear()
    module._parameters.update(parameters)
    module._buffers.clear()
    module._buffers.update(buffers)
    for key in [k for k in vars(module) if _is_plain(k)]:
        del module.__dict__[key]
    module.__dict__.update(plain)


def _is_plain(key: str) -> bool:
    # "forward" may be a rewritten forward that surgeon installs and removes on its own
    return not key.startswith("_") and key not in ("training", "forward")


class DropoutCorrection(nn.Module):
    """For methods that rescale the adapted weight by ``f = m / ‖W + ΔW‖`` (DoRA, DVoRA) and
    apply their dropout to the update's input: while training, adds ``(f - 1) ⊙ W·(drop(x) - x)``,
    which turns that output into PEFT's DoRA training one (the dropped input feeds W too). In
    eval dropout is the identity and it adds nothing."""

    def __init__(self, base_without_bias: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.base_without_bias = base_without_bias  # the adapter's method (rebound by deepcopy)

    def forward(
        self, out: torch.Tensor, x: torch.Tensor, dropped: torch.Tensor, factor: torch.Tensor
    ) -> torch.Tensor:
        if not self.training:
            return out
        return torch.addcmul(out, factor - 1, self.base_without_bias(dropped - x))


class UpdateFromOriginalWeight:
    """Merge and unmerge for adapter layers whose update is a function of the base weight
    itself (HiRA's ``W0 ⊙ BA``, PEANuT's network of ``W0``). A mixin before the layer's adapter
    class; the layer gives ``update_from(w0)``: ``ΔW`` from the weight ``w0``, in the adapter's
    dtype.

    The update is taken from the weight as the unmerged graph sees it: as it was before any
    adapter of the same merge folded in (`prepare_merge` keeps a CPU copy). Unmerging puts the
    weight from before this adapter merged back, bit for bit (dividing the update out would
    not be exact)."""

    _pending: tuple[torch.Tensor, tuple] | None = None
    _restore: torch.Tensor | None = None

    @staticmethod
    def _written(weight: torch.Tensor) -> tuple:
        """What tells whether a weight was written since (its version counter and storage)."""
        return weight._version, weight.data_ptr(), weight.device

    @torch.no_grad()
    def prepare_merge(self) -> None:
        weight = self.base.weight
        self._pending = (weight.detach().to("cpu", copy=True), self._written(weight))

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base.weight
        pending, self._pending = self._pending, None
        unchanged = pending is not None and pending[1] == self._written(weight)
        # nothing folded in since prepare_merge: the weight is W0 and its copy the one to restore
        w0 = pending[0].to(weight.device) if pending is not None and not unchanged else weight
        self._restore = pending[0] if unchanged else weight.detach().to("cpu", copy=True)
        # in the weight's dtype, as PEFT merges: W + ΔW rounded to it
        weight.add_(self.update_from(w0).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._restore is None:
            raise RuntimeError(f"{type(self).__name__}.unmerge() without a merge() before it")
        self.base.weight.copy_(self._restore)
        self._restore = None

    def unload(self, requantize: bool = False) -> None:
        self._restore = None


class WeightDecomposed:
    """Merge and unmerge for adapter layers whose adapted weight is ``m ⊙ V / ‖V‖`` per output
    feature, ``V = W + ΔW`` (DoRA over LoRA's update, DVoRA over VeRA's). A mixin before the
    layer's adapter class; the layer holds ``magnitude`` and gives
    ``_rows(weight)`` (its weight with output features first, and back) and ``_update_rows()``
    (``ΔW`` so laid out, in the adapter's dtype)."""

    _merged_norm: torch.Tensor | None = None
    _pending_norm: torch.Tensor | None = None

    def _adapted_rows(self) -> torch.Tensor:
        """``V = W + ΔW`` with output features first, in the adapter's dtype."""
        update = self._update_rows()
        return self._rows(self.base.weight.to(update.dtype)) + update

    @staticmethod
    def _row_norm(rows: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(rows.flatten(1), dim=1)

    def _fold(self, rows: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """``rows`` scaled per output feature, back in the base weight's layout and dtype."""
        scaled = rows * factor.view(-1, *(1,) * (rows.dim() - 1))
        return self._rows(scaled).to(self.base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds: ``m ⊙ V / ‖V‖ - W`` (not a sum of its own: these layers merge and
        unmerge themselves)."""
        rows = self._adapted_rows()
        return self._fold(rows, self.magnitude.flatten() / self._row_norm(rows)) - self.base.weight

    @torch.no_grad()
    def prepare_merge(self) -> None:
        # The graph divides by the norm of the *base* weight plus this adapter; adapters merged
        # before this one in the same merge change the weight, not that norm. unmerge needs it
        # too: the merged weight no longer shows it.
        self._pending_norm = self._row_norm(self._adapted_rows())

    @torch.no_grad()
    def merge(self) -> None:
        rows = self._adapted_rows()
        norm = self._pending_norm if self._pending_norm is not None else self._row_norm(rows)
        self._pending_norm, self._merged_norm = None, norm
        self.base.weight.copy_(self._fold(rows, self.magnitude.flatten() / norm))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged_norm is None:
            raise RuntimeError(f"{type(self).__name__} unmerge() without a merge() before it")
        weight = self.base.weight
        factor = self.magnitude.flatten() / self._merged_norm.to(weight.device)
        rows = self._rows(weight.to(self.magnitude.dtype))
        rows = rows / factor.view(-1, *(1,) * (rows.dim() - 1))
        weight.copy_(self._rows(rows - self._update_rows()).to(weight.dtype))
        self._merged_norm = None
