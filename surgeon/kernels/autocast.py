"""The fused ops under ``torch.autocast``: they compute in the dtypes the unfused graphs would.

Autocast runs ``F.linear`` and ``matmul`` in its lower precision and leaves element-wise ops to
type promotion, so an unfused adapter graph rounds every product's operands to autocast's dtype
while what it only scales by stays as it is: a 4-bit weight's absmax and code table, DoRA's
magnitude and norm, and DoRA's bias shift ``(1 - f) b``. `torch.library.register_autocast`
casts every floating input to one dtype fixed at registration; these kernels read the dtype the
autocast region runs in at each call, cast the products' operands, and call the op with
autocast off (as register_autocast's kernel does). Float64 tensors and tensors on another device
type are left alone, as autocast leaves them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIB = torch.library.Library("surgeon", "FRAGMENT")  # kernels for the ops ops.py defines
DEVICE_TYPES = ("cpu", "cuda")


def _cast(value, dtype: torch.dtype, device_type: str):
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.dtype != torch.float64
        return value.to(dtype) if eligible and value.device.type == device_type else value
    return value


def _lora(dtype, device_type, x, weight, bias, lora_A, lora_B, scale, x_lora=None):
    cast = [_cast(t, dtype, device_type) for t in (x, weight, bias, lora_A, lora_B, x_lora)]
    x, weight, bias, lora_A, lora_B, x_lora = cast
    return torch.ops.surgeon.lora_linear.default(x, weight, bias, lora_A, lora_B, scale, x_lora)


def _multi(dtype, device_type, x, weight, bias, lora_A, lora_B, scales, index, x_lora=None):
    cast = [_cast(t, dtype, device_type) for t in (x, weight, bias, lora_A, lora_B, x_lora)]
    x, weight, bias, lora_A, lora_B, x_lora = cast
    return torch.ops.surgeon.multi_lora_linear.default(
        x, weight, bias, lora_A, lora_B, scales, index, x_lora
    )


def _dora(dtype, device_type, x, weight, bias, lora_A, lora_B, magnitude, norm, scale, x_lora=None):
    """The bias stays: the unfused graph computes the shift from it before rounding. The result
    is ``addcmul(low, base, f)``'s promoted dtype (float32 for a float32 factor)."""
    cast = [_cast(t, dtype, device_type) for t in (x, weight, lora_A, lora_B, x_lora)]
    x, weight, lora_A, lora_B, x_lora = cast
    out = torch.ops.surgeon.dora_linear.default(
        x, weight, bias, lora_A, lora_B, magnitude, norm, scale, x_lora
    )
    factor = torch.promote_types(magnitude.dtype, norm.dtype)
    return out.to(torch.promote_types(out.dtype, factor))


def _nf4(
    dtype, device_type, x, packed, absmax, code, shape, block_size, bias, lora_A, lora_B, scale,
    x_lora=None, compute_dtype=None,
):  # fmt: skip
    """The base product in autocast's dtype instead of the layer's compute dtype (the unfused
    ``linear_4bit`` rounds the dequantized weight to it; a float16 compute dtype under bfloat16
    autocast rounds twice there, once here); the result stays in ``x``'s dtype."""
    lora_A, lora_B, x_lora = (_cast(t, dtype, device_type) for t in (lora_A, lora_B, x_lora))
    return torch.ops.surgeon.nf4_lora_linear.default(
        x, packed, absmax, code, shape, block_size, bias, lora_A, lora_B, scale, x_lora, dtype
    )


def _register(name: str, rule: Callable, device_type: str) -> None:
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return rule(dtype, device_type, *args)

    _LIB.impl(name, kernel, key, with_keyset=True)


for _device_type in DEVICE_TYPES:
    for _name, _rule in (
        ("lora_linear", _lora),
        ("multi_lora_linear", _multi),
        ("dora_linear", _dora),
        ("nf4_lora_linear", _nf4),
    ):
        _register(_name, _rule, _device_type)
