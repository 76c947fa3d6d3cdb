"""The Triton path of each op: operand views and strides, tile sizes, which kernels run.

Imported only when a Triton path runs (CUDA tensors, or CPU tensors with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton

FUSED_LOWRANK_MAX_ROWS = 128
"""Up to this many rows the GEMM computes ``x·Aᵀ`` in its own loop (one pass over x; the redone
rank-R work is free while memory-bound). Above it, a projection kernel runs first."""

MAX_BLOCK_R = 64
"""Ranks up to this are one register tile; larger ranks run in chunks of it."""

GROUP_M = 8
_MODULES = (
    "surgeon.kernels.triton_tiles",
    "surgeon.kernels.triton_lowrank",
    "surgeon.kernels.triton_gemm",
)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    """The kernel modules, decorated for the current mode.

    ``@triton.jit`` decides when it runs whether a kernel is interpreted; if TRITON_INTERPRET
    changed since the modules were imported, they are reloaded so the decision follows it.
    """
    modules = [importlib.import_module(name) for name in _MODULES]
    kernel = modules[-1].gemm_lowrank_kernel
    if (type(kernel).__name__ == "InterpretedFunction") != interpreting():
        modules = [importlib.reload(m) for m in modules]
    return modules[1], modules[2]


def _dot(dtype: torch.dtype) -> dict:
    """Tile-product arguments for activations of ``dtype`` (see `triton_tiles.mma`)."""
    import triton.language as tl

    dots = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if dtype not in dots:
        raise TypeError(f"surgeon.kernels: activations must be float32/16 or bfloat16, got {dtype}")
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT": dots[dtype],
        "UPCAST": interpreting() and dtype == torch.bfloat16,
        "PRECISION": "tf32" if tf32 and not interpreting() else "ieee",
    }


def _block_r(rank: int) -> int:
    return max(16, min(MAX_BLOCK_R, triton.next_power_of_2(rank)))


def _block_m(rows: int) -> int:
    if interpreting():
        return 16
    return next(b for b in (16, 32, 64, 128) if rows <= b or b == 128)


# -- operands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightTile:
    """The base weight as the GEMM's ``[Q, P]`` operand: a tensor and its strides along Q and P;
    for NF4 ``tensor`` is the packed bytes and the strides are those of the logical row-major
    weight (element ``q * stride_q + p * stride_p``)."""

    tensor: torch.Tensor
    stride_q: int
    stride_p: int
    absmax: torch.Tensor | None = None
    code: torch.Tensor | None = None
    block_size: int = 0


class DenseWeight:
    """An ``[out, in]`` weight with any strides (GPT-2's Conv1D passes a transposed view)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.shape = tuple(weight.shape)

    def forward(self) -> WeightTile:  # x·Wᵀ: Q = in, P = out
        return WeightTile(self.weight, self.weight.stride(1), self.weight.stride(0))

    def backward(self) -> WeightTile:  # dy·W: Q = out, P = in
        return WeightTile(self.weight, self.weight.stride(0), self.weight.stride(1))


class NF4Weight:
    """A weight in bitsandbytes' 4-bit layout, dequantized tile by tile inside the GEMM."""

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        shape: Sequence[int],
        block_size: int,
    ) -> None:
        self.packed = packed.reshape(-1)
        self.absmax = absmax.reshape(-1).float()
        self.code = code.float()
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = int(block_size)

    def _tile(self, stride_q: int, stride_p: int) -> WeightTile:
        return WeightTile(self.packed, stride_q, stride_p, self.absmax, self.code, self.block_size)

    def forward(self) -> WeightTile:
        return self._tile(1, self.shape[1])

    def backward(self) -> WeightTile:
        return self._tile(self.shape[1], 1)


@dataclass
class LowRank:
    """The low-rank term ``Σ_l [index = l] · scale_l · (h·U_l)·V_l`` of a fused GEMM.

    ``u`` is ``[L, Q, R]`` (projects the input), ``v`` ``[L, R, P]``; ``h`` is the GEMM's own
    input unless ``xl`` is given; ``low`` is ``h·U`` when already computed. ``add`` False: only
    compute ``h·U`` (and return it), leave the output without the term.
    """

    v: torch.Tensor
    scales: Sequence[float]
    u: torch.Tensor | None = None
    index: torch.Tensor | None = None
    xl: torch.Tensor | None = None
    low: torch.Tensor | None = None
    add: bool = True


# -- kernels -----------------------------------------------------------------------------------


def project(
    x: torch.Tensor,
    u: torch.Tensor,
    index: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``[M, Q] · [L, Q, R] -> [M, R]`` in float32, row m through adapter ``index[m]``; tile
    products in ``dtype`` (default: ``x``'s)."""
    lowrank_mod, _ = _kernels()
    rows, rank = x.shape[0], u.shape[2]
    out = torch.empty(rows, rank, device=x.device, dtype=torch.float32)
    # memory-bound: many small row tiles keep every SM reading
    block_m = 16 if interpreting() or rows < 8192 else 32
    block_r = _block_r(rank)
    block_q = 16 if interpreting() else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(rank, block_r))
    lowrank_mod.project_kernel[grid](
        x,
        u,
        out if index is None else index,
        out,
        rows,
        x.shape[1],
        rank,
        u.shape[0],
        x.stride(0),
        x.stride(1),
        u.stride(0),
        u.stride(1),
        u.stride(2),
        out.stride(0),
        out.stride(1),
        HAS_INDEX=index is not None,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_R=block_r,
        **_dot(dtype or x.dtype),
    )
    return out


def reduce_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    scales: Sequence[float],
    index: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``out[l] = scale_l · Σ_{m: index[m] = l} x[m]ᵀ y[m]`` into ``out`` viewed ``[L, P, R]``."""
    lowrank_mod, _ = _kernels()
    rows, cols, rank = x.shape[0], x.shape[1], y.shape[1]
    block = 16 if interpreting() else 64
    block_r = _block_r(rank)
    grid = (triton.cdiv(cols, block), triton.cdiv(rank, block_r), len(scales))
    lowrank_mod.reduce_rows_kernel[grid](
        x,
        y,
        out if index is None else index,
        _scales(scales, x.device) if index is not None else out,
        out,
        rows,
        cols,
        rank,
        float(scales[0]),
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        HAS_INDEX=index is not None,
        BLOCK_M=block,
        BLOCK_P=block,
        BLOCK_R=block_r,
        **_dot(dtype),
    )
    return out


def _scales(scales: Sequence[float], device: torch.device) -> torch.Tensor:
    return _scales_on(tuple(float(s) for s in scales), device)


@functools.lru_cache(maxsize=256)
def _scales_on(scales: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Per-adapter scales on the device, made once: no host-to-device copy per call (which would
    also break CUDA-graph capture)."""
    return torch.tensor(scales, dtype=torch.float32, device=device)


def fused_gemm(
    x: torch.Tensor | None,
    weight: WeightTile | None,
    n_out: int,
    *,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    lowrank: LowRank | None = None,
    bias: torch.Tensor | None = None,
    colscale: torch.Tensor | None = None,
    return_low: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``colscale ⊙ (x·W + low-rank term) + bias`` as ``[M, n_out]`` (see `triton_gemm`).

    ``dtype`` is the activation dtype the tile products run in. With ``return_low``, also
    ``h·U`` (float32, ``[M, R]``).
    """
    _, gemm_mod = _kernels()
    ref = x if x is not None else lowrank.low
    rows = ref.shape[0]
    out = torch.empty(rows, n_out, device=ref.device, dtype=out_dtype)
    mode, low = 0, None
    rank, count = 0, 1
    if lowrank is not None:
        rank, count = lowrank.v.shape[1], lowrank.v.shape[0]
        low = lowrank.low
        fits = lowrank.index is None and rank <= MAX_BLOCK_R
        if low is None and fits and x is not None and rows <= FUSED_LOWRANK_MAX_ROWS:
            mode = 1
            if return_low:
                low = torch.empty(rows, rank, device=ref.device, dtype=torch.float32)
        else:
            if low is None:
                source = x if lowrank.xl is None else lowrank.xl
                low = project(source, lowrank.u, lowrank.index, dtype)
            mode = 2 if lowrank.add else 0
    dummy = out
    xl = lowrank.xl if lowrank is not None and lowrank.xl is not None else x
    u = lowrank.u if mode == 1 else None
    v = lowrank.v if lowrank is not None else None
    q = x.shape[1] if x is not None else 0
    args = [
        x if x is not None else dummy,
        xl if xl is not None else dummy,
        weight.tensor if weight is not None else dummy,
        weight.absmax if weight is not None and weight.absmax is not None else dummy,
        weight.code if weight is not None and weight.code is not None else dummy,
        u if u is not None else dummy,
        low if low is not None else dummy,
        v if v is not None else dummy,
        _scales(lowrank.scales, ref.device) if lowrank and lowrank.index is not None else dummy,
        lowrank.index if lowrank is not None and lowrank.index is not None else dummy,
        bias if bias is not None else dummy,
        colscale if colscale is not None else dummy,
        out,
        low if low is not None else dummy,
        rows,
        n_out,
        q,
        rank,
        count,
        triton.next_power_of_2(max(rows, 16)),
        float(lowrank.scales[0]) if lowrank is not None else 1.0,
        weight.block_size if weight is not None else 0,
        *(x.stride() if x is not None else (0, 0)),
        *(xl.stride() if xl is not None else (0, 0)),
        *((weight.stride_q, weight.stride_p) if weight is not None else (0, 0)),
        *((u.stride(1), u.stride(2)) if u is not None else (0, 0)),
        *(low.stride() if low is not None else (0, 0)),
        *(v.stride() if v is not None else (0, 0, 0)),
        *out.stride(),
    ]
    flags = {
        "HAS_W": weight is not None,
        "LOOP_Q": weight is not None or mode == 1,
        "NF4": weight is not None and weight.absmax is not None,
        "LOW": mode,
        "SAME_X": lowrank is None or lowrank.xl is None,
        "ADD_LOW": lowrank is not None and lowrank.add,
        "WRITE_LOW": mode == 1 and return_low,
        "HAS_INDEX": lowrank is not None and lowrank.index is not None,
        "HAS_BIAS": bias is not None,
        "HAS_COLSCALE": colscale is not None,
        "BLOCK_M": _block_m(rows),
        "BLOCK_R": _block_r(rank),
        "GROUP_M": GROUP_M,
        **_dot(dtype),
    }
    if interpreting():
        grid = (triton.cdiv(rows, 16) * triton.cdiv(n_out, 16),)
        gemm_mod.gemm_lowrank_kernel[grid](*args, BLOCK_P=16, BLOCK_Q=16, **flags)
    else:
        tuned = gemm_mod.gemm_lowrank_small_m if rows <= 64 else gemm_mod.gemm_lowrank_large_m
        block_m = flags["BLOCK_M"]

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(rows, block_m) * triton.cdiv(n_out, meta["BLOCK_P"]),)

        tuned[grid](*args, **flags)
    return out, (low if return_low else None)


# -- the ops' Triton paths ---------------------------------------------------------------------


def _check(x: torch.Tensor, *others: torch.Tensor | None) -> None:
    for t in others:
        if t is not None and t.device != x.device:
            raise ValueError(
                f"surgeon.kernels: tensors on different devices ({x.device} and {t.device})"
            )


def lora_forward(
    x: torch.Tensor,
    weight: DenseWeight | NF4Weight,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: Sequence[float],
    index: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    colscale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Forward of the LoRA family; ``lora_A``/``lora_B`` stacked ``[L, r, in]``/``[L, out, r]``;
    the result in ``out_dtype`` (default ``x``'s)."""
    _check(x, bias, lora_A, lora_B, index, x_lora)
    n_out, n_in = weight.shape
    x2 = x.reshape(-1, n_in)
    lowrank = LowRank(
        v=lora_B.transpose(1, 2),
        scales=scales,
        u=lora_A.transpose(1, 2),
        index=index,
        xl=None if x_lora is None else x_lora.reshape(-1, n_in),
    )
    out, _ = fused_gemm(
        x2,
        weight.forward(),
        n_out,
        dtype=x.dtype,
        out_dtype=out_dtype or x.dtype,
        lowrank=lowrank,
        bias=bias,
        colscale=colscale,
    )
    return out.reshape(*x.shape[:-1], n_out)


def lora_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: DenseWeight | NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: Sequence[float],
    index: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    input_grad: bool,
    adapter_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_lora, dA, dB)`` as `reference.lora_linear_backward` defines them."""
    n_out, n_in = weight.shape
    g = grad.reshape(-1, n_out)
    h = (x if x_lora is None else x_lora).reshape(-1, n_in)

    def empty() -> torch.Tensor:  # one per output: outputs of an op must not alias
        return grad.new_empty(0)

    dx = empty()
    if input_grad:
        dx, dyb = fused_gemm(
            g,
            weight.backward(),
            n_in,
            dtype=x.dtype,
            out_dtype=x.dtype,
            lowrank=LowRank(v=lora_A, scales=scales, u=lora_B, index=index, add=x_lora is None),
            return_low=True,
        )
        dx = dx.reshape(x.shape)
    else:
        dyb = project(g, lora_B, index, x.dtype)
    d_a, d_b, dx_lora = empty(), empty(), empty()
    if adapter_grad:
        xa = project(h, lora_A.transpose(1, 2), index, x.dtype)
        d_a = torch.empty_like(lora_A)
        d_b = torch.empty_like(lora_B)
        reduce_rows(h, dyb, d_a.transpose(1, 2), scales, index, x.dtype)
        reduce_rows(g, xa, d_b, scales, index, x.dtype)
    if x_lora is not None:
        dx_lora, _ = fused_gemm(
            None,
            None,
            n_in,
            dtype=x.dtype,
            out_dtype=x_lora.dtype,
            lowrank=LowRank(v=lora_A, scales=scales, index=index, low=dyb),
        )
        dx_lora = dx_lora.reshape(x_lora.shape)
    return dx, dx_lora, d_a, d_b
