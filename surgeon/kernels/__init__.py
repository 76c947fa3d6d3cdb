"""Fused adapter ops: one ``torch.library`` op per adapter pattern, Triton kernels on CUDA.

``surgeon.kernels.lora_linear(x, W, b, A, B, scale)`` and friends compute a base linear layer and
its adapter in one op. On CUDA tensors they run Triton kernels (on CPU tensors too when
``TRITON_INTERPRET=1``, through Triton's interpreter: that is how the kernels are tested without a
GPU); elsewhere `surgeon.kernels.reference`, which computes exactly what the unfused graphs do.
The fusion pass (``passes/fuse.py``, ``surgeon.compile(..., fuse=True)``) puts them in graphs.
"""

from surgeon.kernels import autocast  # noqa: F401  (the ops' autocast kernels)
from surgeon.kernels.ops import (
    dora_linear,
    lora_linear,
    multi_lora_linear,
    nf4_lora_linear,
    stack_adapters,
    uses_triton,
)
from surgeon.kernels.reference import dequantize_nf4_reference

__all__ = [
    "dequantize_nf4_reference",
    "dora_linear",
    "lora_linear",
    "multi_lora_linear",
    "nf4_lora_linear",
    "stack_adapters",
    "uses_triton",
]
