"""Tile helpers shared by the Triton kernels: loads (dense and NF4 weights) and the tile product.

The kernels use only Triton's builtins plus these helpers, none of triton.language's own
``@triton.jit`` library functions (``tl.cdiv``, ``tl.zeros``, ``tl.max``, ...): those are
decorated once, when triton is imported, so they would not follow ``TRITON_INTERPRET`` when it is
set later; our modules are reloaded when it changes (see `launch._kernels`).
"""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a·b`` with both tiles rounded to ``DOT`` first (the activation dtype), fp32 accumulate.

    ``UPCAST`` multiplies the rounded tiles in fp32: Triton's CPU interpreter multiplies the bit
    patterns of bfloat16 tiles (triton-lang/triton#11584, unsupported upstream), and products of
    bfloat16 values are exact in fp32, so this gives what the tensor cores give (up to summation
    order)."""
    a = a.to(DOT)
    b = b.to(DOT)
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def dense_tile(ptr, offs_a, offs_b, stride_a, stride_b, size_a, size_b):
    """The ``[len(offs_a), len(offs_b)]`` tile of a strided matrix, zero outside it."""
    mask = (offs_a[:, None] < size_a) & (offs_b[None, :] < size_b)
    return tl.load(
        ptr + offs_a[:, None] * stride_a + offs_b[None, :] * stride_b, mask=mask, other=0.0
    )


@triton.jit
def nf4_tile(
    packed_ptr, absmax_ptr, code_ptr, offs_a, offs_b, stride_a, stride_b, size_a, size_b, block_size
):
    """A tile of a 4-bit weight in bitsandbytes' layout, dequantized to fp32 in registers.

    Element ``e`` of the flattened row-major weight (``offs_a * stride_a + offs_b * stride_b``)
    sits in byte ``e // 2``, high nibble for even ``e``; its value is ``code[nibble]`` times the
    absmax of block ``e // block_size``.
    """
    mask = (offs_a[:, None] < size_a) & (offs_b[None, :] < size_b)
    element = offs_a[:, None].to(tl.int64) * stride_a + offs_b[None, :].to(tl.int64) * stride_b
    byte = tl.load(packed_ptr + element // 2, mask=mask, other=0).to(tl.int32)
    shift = ((1 - element % 2) * 4).to(tl.int32)
    nibble = (byte >> shift) & 0xF
    value = tl.load(code_ptr + nibble)
    absmax = tl.load(absmax_ptr + element // block_size, mask=mask, other=0.0)
    return value * absmax


@triton.jit
def _larger(a, b):
    return tl.maximum(a, b)


@triton.jit
def any_true(flags):
    """Whether any entry of a 1-D boolean tile is set."""
    return tl.reduce(flags.to(tl.int32), 0, _larger) > 0
