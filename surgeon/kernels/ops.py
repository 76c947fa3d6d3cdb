"""The fused ops, registered with ``torch.library``: schema, fake (meta) implementation, autograd.

Each op runs the Triton kernels on CUDA tensors (and on CPU tensors when ``TRITON_INTERPRET=1``,
through Triton's interpreter) and `surgeon.kernels.reference` elsewhere. Autograd calls
``surgeon::lora_backward``, itself an op with a fake implementation, so ``torch.compile`` traces
forward and backward. Base weights get gradients only if they require them (computed with a plain
matmul); NF4 weights never do. Under ``torch.autocast`` `surgeon.kernels.autocast`'s kernels
cast the operands first, as autocast casts the unfused graphs' products.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch.library import custom_op, register_autograd, register_fake

from surgeon.kernels import reference

_LORA = "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, Tensor? x_lora=None) -> Tensor"
_DORA = "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor weight_norm, float scale, Tensor? x_lora=None) -> Tensor"
_NF4 = "(Tensor x, Tensor packed, Tensor absmax, Tensor code, int[] shape, int block_size, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, Tensor? x_lora=None, ScalarType? compute_dtype=None) -> Tensor"
_MULTI = "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float[] scales, Tensor index, Tensor? x_lora=None) -> Tensor"
_BACKWARD = "(Tensor grad, Tensor x, Tensor weight, Tensor? absmax, Tensor? code, int[] shape, int block_size, Tensor lora_A, Tensor lora_B, float[] scales, Tensor? index, Tensor? x_lora, bool input_grad, bool adapter_grad) -> (Tensor, Tensor, Tensor, Tensor)"


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs the Triton kernels (else the reference implementation)."""
    if x.device.type == "cuda":
        return _has_triton()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return x.device.type == "cpu" and interpret and _has_triton()


def _launch():
    from surgeon.kernels import launch

    return launch


def _dense(x: torch.Tensor, weight: torch.Tensor):
    """The Triton operand for a dense weight, which must have the activations' dtype (as for
    ``F.linear``; the reference path raises the same way)."""
    if weight.dtype != x.dtype:
        raise ValueError(
            f"surgeon.kernels: x is {x.dtype} but the weight is {weight.dtype}; they must match"
        )
    return _launch().DenseWeight(weight)


# -- lora_linear -------------------------------------------------------------------------------


@custom_op("surgeon::lora_linear", mutates_args=(), schema=_LORA)
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scale · (h Aᵀ) Bᵀ`` in one op, ``h = x_lora`` (dropout's output) or ``x``.

    ``weight`` (out, in) with any strides, ``lora_A`` (r, in), ``lora_B`` (out, r); the result has
    ``x``'s dtype (products in ``x``'s dtype, fp32 accumulation).
    """
    if uses_triton(x):
        return _launch().lora_forward(
            x, _dense(x, weight), bias, lora_A[None], lora_B[None], [scale], None, x_lora
        )
    return reference.lora_linear(x, weight, bias, lora_A, lora_B, scale, x_lora)


@register_fake("surgeon::lora_linear")
def _(x, weight, bias, lora_A, lora_B, scale, x_lora=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_lora(ctx, inputs, output) -> None:
    x, weight, _, lora_A, lora_B, scale, x_lora = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, x_lora)
    ctx.scale = scale


def _backward_lora(ctx, grad):
    x, weight, lora_A, lora_B, x_lora = ctx.saved_tensors
    need = _needs(ctx, 7)
    dx, dx_lora, d_a, d_b = torch.ops.surgeon.lora_backward(
        grad, x, weight, None, None, list(weight.shape), 0, lora_A[None], lora_B[None],
        [ctx.scale], None, x_lora, need[0], need[3] or need[4],
    )  # fmt: skip
    return _grads(
        ctx,
        dx if need[0] else None,
        _weight_grad(grad, x, weight) if need[1] else None,
        _bias_grad(grad) if need[2] else None,
        d_a[0] if need[3] else None,
        d_b[0] if need[4] else None,
        None,
        dx_lora if need[6] else None,
    )


def _needs(ctx, count: int) -> tuple[bool, ...]:
    """Which of the op's ``count`` inputs need gradients. The dispatcher drops trailing
    arguments left at their defaults (``x_lora=None``), so ``ctx`` may list fewer."""
    need = tuple(ctx.needs_input_grad)
    return need + (False,) * (count - len(need))


def _grads(ctx, *grads):
    """One gradient per argument the op was called with (see `_needs`)."""
    return grads[: len(ctx.needs_input_grad)]


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A trainable base weight's gradient ``dyᵀ x`` (the base is frozen unless a user unfreezes it)."""
    g = grad.reshape(-1, grad.shape[-1])
    return (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)


def _bias_grad(grad: torch.Tensor) -> torch.Tensor:
    wide = torch.promote_types(grad.dtype, torch.float32)  # half precision sums in fp32
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=wide).to(grad.dtype)


register_autograd("surgeon::lora_linear", _backward_lora, setup_context=_setup_lora)


# -- dora_linear -------------------------------------------------------------------------------


@custom_op("surgeon::dora_linear", mutates_args=(), schema=_DORA)
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
    """DoRA: ``f ⊙ (x Wᵀ + scale · (h Aᵀ) Bᵀ) + b``, ``f = magnitude / weight_norm``.

    ``weight_norm`` is ``‖W + scale·B·A‖`` per output feature, a constant (no gradient), as in
    the paper and PEFT; the graph computes it (passes/dora.py caches it in eval mode).
    """
    if uses_triton(x):
        factor = (magnitude.float() / weight_norm.float()).reshape(-1)
        return _launch().lora_forward(
            x, _dense(x, weight), bias, lora_A[None], lora_B[None], [scale], None, x_lora, factor
        )
    return reference.dora_linear(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, x_lora
    )


@register_fake("surgeon::dora_linear")
def _(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, x_lora=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_dora(ctx, inputs, output) -> None:
    x, weight, _, lora_A, lora_B, magnitude, weight_norm, scale, x_lora = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, x_lora)
    ctx.scale = scale


def _backward_dora(ctx, grad):
    x, weight, lora_A, lora_B, magnitude, weight_norm, x_lora = ctx.saved_tensors
    need = _needs(ctx, 9)
    factor = (magnitude / weight_norm).reshape(-1)
    # kept in the factor's precision (float32), as the unfused graph's adapter path sees it
    scaled = grad * factor
    dx, dx_lora, d_a, d_b = torch.ops.surgeon.lora_backward(
        scaled, x, weight, None, None, list(weight.shape), 0, lora_A[None], lora_B[None],
        [ctx.scale], None, x_lora, need[0], need[3] or need[4],
    )  # fmt: skip
    d_magnitude = None
    if need[5]:
        # the output before the factor, recomputed rather than kept from the forward
        unscaled = torch.ops.surgeon.lora_linear(x, weight, None, lora_A, lora_B, ctx.scale, x_lora)
        g = grad.reshape(-1, grad.shape[-1]).float()
        d_factor = (g * unscaled.reshape(g.shape).float()).sum(0)
        d_magnitude = (d_factor / weight_norm.reshape(-1)).reshape(magnitude.shape)
        d_magnitude = d_magnitude.to(magnitude.dtype)
    return _grads(
        ctx,
        dx if need[0] else None,
        _weight_grad(scaled.to(grad.dtype), x, weight) if need[1] else None,
        _bias_grad(grad) if need[2] else None,
        d_a[0] if need[3] else None,
        d_b[0] if need[4] else None,
        d_magnitude,
        None,
        None,
        dx_lora if need[8] else None,
    )


register_autograd("surgeon::dora_linear", _backward_dora, setup_context=_setup_dora)


# -- nf4_lora_linear ---------------------------------------------------------------------------


@custom_op("surgeon::nf4_lora_linear", mutates_args=(), schema=_NF4)
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
    """`lora_linear` on a 4-bit weight in bitsandbytes' layout: ``packed`` uint8 (two codes per
    byte, first element high), ``absmax`` float32 per ``block_size`` elements, ``code`` the
    16-entry table (NF4's or FP4's), ``shape`` (out, in). The Triton kernel dequantizes tile by
    tile inside its K loop; no full-precision weight is ever formed.

    The base product runs in ``compute_dtype`` (default ``x``'s) and comes back in ``x``'s dtype,
    as bitsandbytes' ``Linear4bit`` does; the adapter's runs in ``lora_A``'s dtype and is added
    in ``x``'s (as QLoRA's unfused graph adds it).
    """
    _check_nf4(packed, absmax, code, shape, block_size)
    dtype = compute_dtype or x.dtype
    if uses_triton(x):
        weight = _launch().NF4Weight(packed, absmax, code, shape, block_size)
        return _launch().lora_forward(
            x.to(dtype), weight, bias, lora_A[None], lora_B[None], [scale], None, x_lora,
            out_dtype=x.dtype,
        )  # fmt: skip
    return reference.nf4_lora_linear(
        x, packed, absmax, code, shape, block_size, bias, lora_A, lora_B, scale, x_lora, dtype
    )


def _check_nf4(packed, absmax, code, shape, block_size) -> None:
    numel = int(shape[0]) * int(shape[1])
    if len(shape) != 2 or packed.dtype != torch.uint8 or packed.numel() * 2 < numel:
        raise ValueError(
            f"nf4_lora_linear: packed must be uint8 with (out*in+1)//2 bytes for shape {list(shape)}, "
            f"got {packed.dtype} with {packed.numel()} elements"
        )
    if block_size <= 0 or absmax.numel() * block_size < numel or code.numel() != 16:
        raise ValueError(
            f"nf4_lora_linear: need one absmax per {block_size} elements and a 16-entry code "
            f"(got {absmax.numel()} absmax, {code.numel()} codes for {numel} elements)"
        )


@register_fake("surgeon::nf4_lora_linear")
def _(x, packed, absmax, code, shape, block_size, bias, lora_A, lora_B, scale, x_lora=None,
      compute_dtype=None):  # fmt: skip
    return x.new_empty(*x.shape[:-1], shape[0])


def _setup_nf4(ctx, inputs, output) -> None:
    x, packed, absmax, code, shape, block_size, _, lora_A, lora_B, scale, x_lora, dtype = inputs
    ctx.save_for_backward(x, packed, absmax, code, lora_A, lora_B, x_lora)
    ctx.shape, ctx.block_size, ctx.scale = list(shape), block_size, scale
    ctx.compute_dtype = dtype


def _backward_nf4(ctx, grad):
    x, packed, absmax, code, lora_A, lora_B, x_lora = ctx.saved_tensors
    need = _needs(ctx, 12)
    dtype = ctx.compute_dtype or x.dtype
    xc, g = x.to(dtype), grad.to(dtype)
    # in another compute dtype, the base's and the adapter's input gradients are added in x's
    # dtype (each came back through its own cast): the backward returns them apart
    split = x_lora is None and dtype != x.dtype
    dx, dx_lora, d_a, d_b = torch.ops.surgeon.lora_backward(
        g, xc, packed, absmax, code, ctx.shape, ctx.block_size, lora_A[None], lora_B[None],
        [ctx.scale], None, xc if split else x_lora, need[0], need[7] or need[8],
    )  # fmt: skip
    if need[0]:
        dx = dx.to(x.dtype) + dx_lora.to(x.dtype) if split else dx.to(x.dtype)
    return _grads(
        ctx,
        dx if need[0] else None,
        None,
        None,
        None,
        None,
        None,
        _bias_grad(g) if need[6] else None,
        d_a[0] if need[7] else None,
        d_b[0] if need[8] else None,
        None,
        dx_lora if need[10] else None,
        None,
    )


register_autograd("surgeon::nf4_lora_linear", _backward_nf4, setup_context=_setup_nf4)


# -- multi_lora_linear -------------------------------------------------------------------------


@custom_op("surgeon::multi_lora_linear", mutates_args=(), schema=_MULTI)
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
    """Several LoRA adapters in one batch, each token through its own (Punica's BGMV/SGMV idea):
    ``lora_A`` (L, r, in) and ``lora_B`` (L, out, r) stacked (see `stack_adapters`), ``scales``
    one per adapter, ``index`` (tokens,) int64 with the adapter of each token, -1 for none.
    A tile of tokens runs only the adapters its tokens use."""
    _check_index(x, weight, lora_A, scales, index)
    if uses_triton(x):
        return _launch().lora_forward(
            x, _dense(x, weight), bias, lora_A, lora_B, list(scales), index, x_lora
        )
    return reference.multi_lora_linear(x, weight, bias, lora_A, lora_B, scales, index, x_lora)


def _check_index(x, weight, lora_A, scales, index) -> None:
    tokens = x.numel() // max(weight.shape[1], 1)
    if index.dim() != 1 or index.numel() != tokens or index.dtype != torch.int64:
        raise ValueError(
            f"multi_lora_linear: index must be int64 with one entry per token ({tokens}), got "
            f"{index.dtype} of shape {tuple(index.shape)}"
        )
    if lora_A.dim() != 3 or lora_A.shape[0] != len(scales):
        raise ValueError(
            f"multi_lora_linear: lora_A must be stacked (adapters, r, in) with one scale per "
            f"adapter, got shape {tuple(lora_A.shape)} and {len(scales)} scales"
        )


@register_fake("surgeon::multi_lora_linear")
def _(x, weight, bias, lora_A, lora_B, scales, index, x_lora=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_multi(ctx, inputs, output) -> None:
    x, weight, _, lora_A, lora_B, scales, index, x_lora = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, index, x_lora)
    ctx.scales = list(scales)


def _backward_multi(ctx, grad):
    x, weight, lora_A, lora_B, index, x_lora = ctx.saved_tensors
    need = _needs(ctx, 8)
    dx, dx_lora, d_a, d_b = torch.ops.surgeon.lora_backward(
        grad, x, weight, None, None, list(weight.shape), 0, lora_A, lora_B, ctx.scales, index,
        x_lora, need[0], need[3] or need[4],
    )  # fmt: skip
    return _grads(
        ctx,
        dx if need[0] else None,
        _weight_grad(grad, x, weight) if need[1] else None,
        _bias_grad(grad) if need[2] else None,
        d_a if need[3] else None,
        d_b if need[4] else None,
        None,
        None,
        dx_lora if need[7] else None,
    )


register_autograd("surgeon::multi_lora_linear", _backward_multi, setup_context=_setup_multi)


def stack_adapters(
    lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, r, in)`` and ``(L, out, r)`` stacks for `multi_lora_linear`, smaller ranks padded
    with zeros (which add nothing). Differentiable: gradients reach each adapter's own tensors."""
    rank = max(a.shape[0] for a in lora_As)
    a = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, rank - t.shape[0])) for t in lora_As])
    b = torch.stack([torch.nn.functional.pad(t, (0, rank - t.shape[1])) for t in lora_Bs])
    return a, b


# -- the shared backward -----------------------------------------------------------------------


@custom_op("surgeon::lora_backward", mutates_args=(), schema=_BACKWARD)
def lora_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    code: torch.Tensor | None,
    shape: Sequence[int],
    block_size: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scales: Sequence[float],
    index: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    input_grad: bool,
    adapter_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_lora, dA, dB)`` for the LoRA-family ops (see `reference.lora_linear_backward`);
    ``weight`` is NF4-packed when ``absmax`` is given. Adapters are stacked ``(L, ...)``."""
    if uses_triton(x):
        launch = _launch()
        w = (
            launch.DenseWeight(weight)
            if absmax is None
            else launch.NF4Weight(weight, absmax, code, shape, block_size)
        )
        return launch.lora_backward(
            grad, x, w, lora_A, lora_B, list(scales), index, x_lora, input_grad, adapter_grad
        )
    if absmax is not None:
        weight = reference.dequantize_nf4_reference(weight, absmax, code, shape, block_size)
    return reference.lora_linear_backward(
        grad, x, weight.to(x.dtype), lora_A, lora_B, scales, index, x_lora, input_grad,
        adapter_grad,
    )  # fmt: skip


@register_fake("surgeon::lora_backward")
def _(grad, x, weight, absmax, code, shape, block_size, lora_A, lora_B, scales, index, x_lora,
      input_grad, adapter_grad):  # fmt: skip
    return (
        x.new_empty(x.shape) if input_grad else grad.new_empty(0),
        x_lora.new_empty(x_lora.shape) if x_lora is not None else grad.new_empty(0),
        lora_A.new_empty(lora_A.shape) if adapter_grad else grad.new_empty(0),
        lora_B.new_empty(lora_B.shape) if adapter_grad else grad.new_empty(0),
    )
