"""What methods need to know about the layers they adapt: which kind a layer is, its sizes,
the dtype adapters take on it, and how to put back a layer whose storage changed."""

from __future__ import annotations

import sys

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
