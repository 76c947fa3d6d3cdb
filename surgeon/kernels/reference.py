"""The reference implementation of every fused op, in plain torch.

It computes exactly what the unfused adapter graphs compute (same operations, same dtypes: the
base product in the activation dtype, the adapter product in the adapter's dtype, one cast back
at the end), so a fused graph on the CPU equals the unfused one. It is also the oracle the Triton
kernels are tested against. Backward formulas are written out (no autograd inside), the way the
kernels compute them: with ``g`` the output gradient, ``h`` the adapter's input, ``s`` the scale,

    dx = g W + s (g B) A        dA = s (g B)ᵀ h        dB = s gᵀ (h Aᵀ)

so the full-size ΔW = s B A is never formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from surgeon.quant import unpack_4bit


def dequantize_nf4_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: Sequence[int],
    block_size: int,
) -> torch.Tensor:
    """bitsandbytes' 4-bit layout back to a float32 weight of ``shape``.

    ``packed``: uint8, the row-major weight flattened, two codes per byte, the first element in
    the high nibble; ``absmax``: one float32 scale per ``block_size`` consecutive elements;
    ``code``: the 16-entry table (NF4's, or FP4's) the nibbles index.
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    nibbles = unpack_4bit(packed.reshape(-1), numel).long()
    scales = absmax.reshape(-1).float().repeat_interleave(block_size)[:numel]
    return (code.float()[nibbles] * scales).reshape(tuple(int(d) for d in shape))


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scale · (h Aᵀ) Bᵀ`` with ``h = x_lora`` (dropout's output) or ``x``."""
    base = F.linear(x, weight, bias)
    h = (x if x_lora is None else x_lora).to(lora_A.dtype)
    delta = F.linear(F.linear(h, lora_A) * scale, lora_B)
    return (base + delta).to(x.dtype)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``f ⊙ (x Wᵀ + scale · (h Aᵀ) Bᵀ) + b`` with ``f = magnitude / weight_norm`` (the norm of
    ``W + scale·B·A`` per output feature, a constant), as passes/dora.py emits it."""
    factor = magnitude / weight_norm
    base = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    h = (x if x_lora is None else x_lora).to(lora_A.dtype)
    hidden = F.linear(h, lora_A)
    # a float32 factor (under autocast) scales B and the bias shift before the rounding to the
    # products' dtype, as in the unfused graph
    shift = None if bias is None else (bias - bias * factor).to(hidden.dtype)
    low = F.linear(hidden, (lora_B * (factor * scale).view(-1, 1)).to(hidden.dtype), shift)
    return torch.addcmul(low, base, factor).to(x.dtype)


def nf4_lora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: Sequence[int],
    block_size: int,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`lora_linear` on the 4-bit weight as QLoRA's unfused graph computes it: the base as
    bitsandbytes' ``Linear4bit`` (weight, ``x`` and bias in ``compute_dtype``, default ``x``'s;
    the product back in ``x``'s dtype), the adapter in ``lora_A``'s dtype, added in ``x``'s."""
    dtype = compute_dtype or x.dtype
    weight = dequantize_nf4_reference(packed, absmax, code, shape, block_size).to(dtype)
    bias = None if bias is None else bias.to(dtype)
    base = F.linear(x.to(dtype), weight, bias).to(x.dtype)
    h = (x if x_lora is None else x_lora).to(lora_A.dtype)
    delta = F.linear(F.linear(h, lora_A) * scale, lora_B)
    return base + delta.to(x.dtype)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: Sequence[float],
    index: torch.Tensor,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each token through its own adapter: ``lora_A`` (L, r, in), ``lora_B`` (L, out, r) stacked
    (ranks zero-padded to one r), ``index`` (tokens,) picks the adapter, -1 for none."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    h = (flat if x_lora is None else x_lora.reshape(flat.shape)).to(lora_A.dtype)
    out = F.linear(flat, weight, bias).to(lora_A.dtype)
    for k, s in enumerate(scales):
        rows = (index == k).nonzero().flatten()
        if rows.numel():
            delta = F.linear(F.linear(h[rows], lora_A[k]) * s, lora_B[k])
            out = out.index_add(0, rows, delta)
    return out.to(x.dtype).reshape(*shape[:-1], -1)


def lora_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: Sequence[float],
    index: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    input_grad: bool,
    adapter_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the LoRA-family ops: ``(dx, dx_lora, dA, dB)``.

    ``lora_A``/``lora_B`` are stacked (L, r, in) / (L, out, r); ``index`` assigns tokens to
    adapters (None: every token to adapter 0). ``dx`` is the gradient through the base weight,
    plus the adapter's when ``x_lora`` is None; with ``x_lora`` the adapter's part is ``dx_lora``.
    Tensors that are not asked for (``input_grad``/``adapter_grad`` False, no ``x_lora``) come
    back empty.
    """
    n_out, n_in = weight.shape
    g = grad.reshape(-1, n_out)
    h = (x if x_lora is None else x_lora).reshape(-1, n_in).to(lora_A.dtype)
    g_low = g.to(lora_A.dtype)
    d_a = torch.zeros_like(lora_A)
    d_b = torch.zeros_like(lora_B)
    d_low = torch.zeros(h.shape, dtype=lora_A.dtype, device=h.device)
    for k, s in enumerate(scales):
        rows = torch.arange(g.shape[0], device=g.device) if index is None else index == k
        g_k, h_k = g_low[rows], h[rows]
        # scaled where the unfused graph scales, so rounding in half precision is the same
        gb = (g_k @ lora_B[k]) * s
        d_a[k] = gb.t() @ h_k
        d_b[k] = g_k.t() @ ((h_k @ lora_A[k].t()) * s)
        d_low[rows] = gb @ lora_A[k]
    dx = (g @ weight.to(g.dtype)).to(x.dtype) if input_grad else grad.new_empty(0)
    dx_lora = grad.new_empty(0)
    if x_lora is None and input_grad:
        dx = (dx + d_low).to(x.dtype)
    elif x_lora is not None:
        dx_lora = d_low.to(x_lora.dtype).reshape(x_lora.shape)
    if not adapter_grad:
        d_a, d_b = grad.new_empty(0), grad.new_empty(0)
    return dx.reshape(x.shape) if input_grad else dx, dx_lora, d_a, d_b
