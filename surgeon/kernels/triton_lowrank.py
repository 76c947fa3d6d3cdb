"""The thin products around the fused GEMM: rank-R projections and their gradients.

* `project_kernel`: ``low[m] = X[m] · U_{index[m]}`` (``[M, Q] -> [M, R]``), each row through its
  own adapter; the forward's ``x·Aᵀ`` and the backward's ``dy·B`` when the GEMM does not compute
  them in its own loop.
* `reduce_rows_kernel`: ``C_l = scale_l · Σ_{m: index[m] = l} X[m]ᵀ · Y[m]`` (``[P, R]`` per
  adapter), the adapter gradients ``dB = s·dyᵀ·(x·Aᵀ)`` and ``dAᵀ = s·xᵀ·(dy·B)``: a reduction
  over the rows, never forming the full-size ``ΔW``.
"""

import triton
import triton.language as tl

from surgeon.kernels.triton_tiles import any_true, dense_tile, mma


@triton.jit
def project_kernel(
    x_ptr,
    u_ptr,
    index_ptr,
    out_ptr,
    M,
    Q,
    R,
    L,
    stride_xm,
    stride_xq,
    stride_ul,
    stride_uq,
    stride_ur,
    stride_om,
    stride_or,
    HAS_INDEX: tl.constexpr,
    DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = offs_m < M
    if HAS_INDEX:
        index = tl.load(index_ptr + offs_m, mask=rows, other=-1)
    else:
        index = tl.full((BLOCK_M,), 0, tl.int32)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for adapter in range(L):
        hit = (index == adapter) & rows
        if any_true(hit):
            for q0 in range(0, Q, BLOCK_Q):
                offs_q = q0 + tl.arange(0, BLOCK_Q)
                mask = hit[:, None] & (offs_q[None, :] < Q)
                ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :] * stride_xq
                x = tl.load(ptrs, mask=mask, other=0.0)
                u = dense_tile(
                    u_ptr + adapter * stride_ul, offs_q, offs_r, stride_uq, stride_ur, Q, R
                )
                acc = mma(x, u, acc, DOT, UPCAST, PRECISION)
    out = out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out, acc, mask=rows[:, None] & (offs_r[None, :] < R))


@triton.jit
def reduce_rows_kernel(
    x_ptr,
    y_ptr,
    index_ptr,
    scales_ptr,
    out_ptr,
    M,
    P,
    R,
    scale,
    stride_xm,
    stride_xp,
    stride_ym,
    stride_yr,
    stride_ol,
    stride_op,
    stride_or,
    HAS_INDEX: tl.constexpr,
    DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    adapter = tl.program_id(2)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_P, BLOCK_R), 0.0, tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m < M
        if HAS_INDEX:
            rows = rows & (tl.load(index_ptr + offs_m, mask=rows, other=-1) == adapter)
        xmask = rows[:, None] & (offs_p[None, :] < P)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_p[None, :] * stride_xp, mask=xmask, other=0.0
        )
        ymask = rows[:, None] & (offs_r[None, :] < R)
        y = tl.load(
            y_ptr + offs_m[:, None] * stride_ym + offs_r[None, :] * stride_yr, mask=ymask, other=0.0
        )
        acc = mma(tl.trans(x), y, acc, DOT, UPCAST, PRECISION)
    acc = acc * (tl.load(scales_ptr + adapter) if HAS_INDEX else scale)
    out = out_ptr + adapter * stride_ol + offs_p[:, None] * stride_op + offs_r[None, :] * stride_or
    tl.store(
        out,
        acc.to(out_ptr.dtype.element_ty),
        mask=(offs_p[:, None] < P) & (offs_r[None, :] < R),
    )
