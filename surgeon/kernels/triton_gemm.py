"""The fused GEMM: a base product plus a low-rank product, in one kernel.

Computes, for an output tile ``[BLOCK_M, BLOCK_P]``::

    out = colscale ⊙ (X·W + Σ_l [index = l] · scale_l · low·V_l) + bias

``X`` is ``[M, Q]``, ``W`` the base weight seen as ``[Q, P]`` (dense with any strides, or NF4
dequantized tile by tile inside the Q loop), ``V_l`` ``[R, P]``. ``low`` (``[M, R]``) is either

* computed in the same Q loop as the base product (``LOW == 1``), from the *same X tiles*
  (``SAME_X``) or from a second input (dropout's output) read at the same offsets: one pass over
  X for both products, no round trip of ``low`` through memory. Every P-tile redoes that rank-R
  work, which is free while the kernel is memory-bound (few rows) and costs R/BLOCK_P extra
  tensor-core work when it is compute-bound, so the launcher uses it for small M only; or
* read from memory (``LOW == 2``), computed by `triton_lowrank.project_kernel` first: the
  compute-bound case (many rows), ranks above 64, and mixed batches (``HAS_INDEX``: each token
  picks its adapter; a tile runs only the adapters its tokens use).

The same kernel is the forward (``X = x``, ``W = Wᵀ``, ``U = Aᵀ``, ``V = Bᵀ``) and the input
gradient (``X = dy``, ``W = W``, ``U = B``, ``V = A``): ``dx = dy·W + scale·(dy·B)·A``.
With ``WRITE_LOW`` the first P-tile column stores ``low`` (the backward's ``dy·B``).
"""

import triton
import triton.language as tl

from surgeon.kernels.triton_tiles import any_true, dense_tile, mma, nf4_tile


@triton.jit
def gemm_lowrank_kernel(
    x_ptr,
    xl_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    u_ptr,
    low_ptr,
    v_ptr,
    scales_ptr,
    index_ptr,
    bias_ptr,
    colscale_ptr,
    out_ptr,
    low_out_ptr,
    M,
    P,
    Q,
    R,
    L,
    M_BUCKET,  # only a key for the autotuner: rows rounded up to a power of two
    scale,
    block_size,
    stride_xm,
    stride_xq,
    stride_xlm,
    stride_xlq,
    stride_wq,
    stride_wp,
    stride_uq,
    stride_ur,
    stride_lowm,
    stride_lowr,
    stride_vl,
    stride_vr,
    stride_vp,
    stride_om,
    stride_op,
    HAS_W: tl.constexpr,
    LOOP_Q: tl.constexpr,  # HAS_W or LOW == 1
    NF4: tl.constexpr,
    LOW: tl.constexpr,
    SAME_X: tl.constexpr,
    ADD_LOW: tl.constexpr,
    WRITE_LOW: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_COLSCALE: tl.constexpr,
    DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: neighbouring programs share W tiles in L2
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_p = (P + BLOCK_P - 1) // BLOCK_P
    group = GROUP_M * num_p
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_p = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_m < M
    acc = tl.full((BLOCK_M, BLOCK_P), 0.0, tl.float32)
    low = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)

    if LOOP_Q:
        for q0 in range(0, Q, BLOCK_Q):
            offs_q = q0 + tl.arange(0, BLOCK_Q)
            x = dense_tile(x_ptr, offs_m, offs_q, stride_xm, stride_xq, M, Q)
            if HAS_W:
                if NF4:
                    w = nf4_tile(
                        w_ptr,
                        absmax_ptr,
                        code_ptr,
                        offs_q,
                        offs_p,
                        stride_wq,
                        stride_wp,
                        Q,
                        P,
                        block_size,
                    )
                else:
                    w = dense_tile(w_ptr, offs_q, offs_p, stride_wq, stride_wp, Q, P)
                acc = mma(x, w, acc, DOT, UPCAST, PRECISION)
            if LOW == 1:
                if SAME_X:
                    xl = x
                else:
                    xl = dense_tile(xl_ptr, offs_m, offs_q, stride_xlm, stride_xlq, M, Q)
                u = dense_tile(u_ptr, offs_q, offs_r, stride_uq, stride_ur, Q, R)
                low = mma(xl, u, low, DOT, UPCAST, PRECISION)

    if LOW == 1:
        if WRITE_LOW:  # noqa: SIM102  (a compile-time branch around a run-time one)
            if pid_p == 0:
                mask = rows[:, None] & (offs_r[None, :] < R)
                ptrs = low_out_ptr + offs_m[:, None] * stride_lowm + offs_r[None, :] * stride_lowr
                tl.store(ptrs, low, mask=mask)
        if ADD_LOW:
            v = dense_tile(v_ptr, offs_r, offs_p, stride_vr, stride_vp, R, P)
            acc = mma(low * scale, v, acc, DOT, UPCAST, PRECISION)

    if LOW == 2:
        if HAS_INDEX:
            index = tl.load(index_ptr + offs_m, mask=rows, other=-1)
        else:
            index = tl.full((BLOCK_M,), 0, tl.int32)
        for adapter in range(L):
            hit = (index == adapter) & rows
            if any_true(hit):
                s = tl.load(scales_ptr + adapter) if HAS_INDEX else scale
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + offs_r
                    mask = hit[:, None] & (rr[None, :] < R)
                    ptrs = low_ptr + offs_m[:, None] * stride_lowm + rr[None, :] * stride_lowr
                    part = tl.load(ptrs, mask=mask, other=0.0)
                    v = dense_tile(
                        v_ptr + adapter * stride_vl, rr, offs_p, stride_vr, stride_vp, R, P
                    )
                    acc = mma(part * s, v, acc, DOT, UPCAST, PRECISION)

    cols = offs_p < P
    if HAS_COLSCALE:
        acc = acc * tl.load(colscale_ptr + offs_p, mask=cols, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_p, mask=cols, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & cols[None, :])


def _configs(small_m: bool) -> list:
    """A few tile shapes: many narrow column tiles when there are few rows (memory-bound: keep
    every SM streaming the weight), large square tiles when there are many (compute-bound)."""
    if small_m:
        shapes = [(32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 5), (128, 64, 8, 4)]
    else:
        shapes = [(128, 64, 8, 3), (128, 32, 4, 4), (256, 64, 8, 3), (64, 64, 4, 4)]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_Q": q}, num_warps=w, num_stages=s)
        for p, q, w, s in shapes
    ]


_KEY = ["M_BUCKET", "P", "Q", "R", "HAS_W", "NF4", "LOW", "SAME_X", "HAS_INDEX"]
gemm_lowrank_small_m = triton.autotune(_configs(True), key=_KEY)(gemm_lowrank_kernel)
gemm_lowrank_large_m = triton.autotune(_configs(False), key=_KEY)(gemm_lowrank_kernel)
