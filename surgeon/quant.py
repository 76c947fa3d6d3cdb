"""4-bit weights (NF4, FP4) stored the way bitsandbytes stores them, bit for bit.

Layout (what kernels read; identical to bitsandbytes' ``quantize_4bit``):

* the row-major ``[out, in]`` weight is flattened and cut into blocks of ``block_size``
  consecutive values (the last block may be shorter);
* ``absmax[b]`` is the largest ``|w|`` of block ``b``; each value is divided by its block's
  absmax and replaced by the index of the nearest of 16 code values (``nf4_code`` or
  ``fp4_code``; ties go to the lower code, as bitsandbytes' ``bucketize`` does);
* two indices per byte, ``packed[i] = (q[2i] << 4) | q[2i + 1]``: the first element in the HIGH
  nibble; an odd element count pads the last low nibble with the index of 0.0;
* double quantization: ``absmax - mean(absmax)`` is quantized to 8 bits with the signed dynamic
  code (``dynamic_code``) in blocks of 256, which leaves uint8 ``absmax``, fp32
  ``nested_absmax`` (one per 256 blocks) and the fp32 ``absmax_offset`` (the mean).

Dequantizing is ``code[q] * absmax[block]`` in float32, then a cast to the compute dtype.

The quantizers reproduce bitsandbytes 0.50's CPU results exactly: the 4-bit one is its reference
algorithm (scale by ``1 / absmax``, midpoint search), the 8-bit one its CPU kernel, which maps
``x / absmax`` through a 65536-entry table (``x -> (x + 1) / 2 * 65535 + 0.5``, truncated).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from surgeon.checks import ValidatingMeta, check_bool, check_choice
from surgeon.errors import SpecError
from surgeon.layers import gpt2_conv1d_type
from surgeon.targets import PRESETS, matches_selector, preset_paths

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The 16 NF4 values: quantiles of N(0, 1) normalised to [-1, 1], 8 negative and 9 non-negative
# (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' create_normal_map(0.9677083)).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit; bitsandbytes' exponent bias) indexed by bit pattern:
# magnitude bits e1 e0 m -> 0, 0.0625 (subnormals), then (1 + m/2) * 2^(4 - e) for e = 1, 2, 3.
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# Bit patterns in increasing value order (+0.0 before the -0.0 pattern, as a stable sort).
FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

# Elements per chunk when quantizing, bytes per chunk when dequantizing on the CPU: bound the
# temporaries (and keep them in cache) for large weights.
CHUNK = 1 << 20
DEQUANTIZE_CHUNK = 1 << 13  # below torch's parallel grain: no thread hand-offs per chunk


# -- code books -------------------------------------------------------------------------------


def _tables(make: Callable[..., Any]) -> Callable[..., Any]:
    """functools.cache for the code tables, built outside any fake-tensor mode: a table first
    asked for while a region is traced with fake tensors must still be a real one."""

    @functools.cache
    def cached(*args: Any) -> Any:
        with unset_fake_temporarily():
            return make(*args)

    return functools.wraps(make)(cached)


@_tables
def _code(quant_type: str, device: torch.device) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    magnitudes = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32)
    code = torch.cat([magnitudes, 0.0 - magnitudes]) / magnitudes.max()  # +0.0 at 8, as bnb
    return code.to(device)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values (float32), index = 4-bit code."""
    return _code("nf4", torch.device(device))


def fp4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 FP4 values (float32, normalised to [-1, 1]), index = 4-bit pattern."""
    return _code("fp4", torch.device(device))


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    return _code(quant_type, torch.device(device))


def _dynamic_values() -> tuple[float, ...]:
    # Signed dynamic code, 7 exponent bits (Dettmers 2015): for exponent i the fraction takes
    # 2^i values, the midpoints of linspace(0.1, 1, 2^i + 1), scaled by 10^(i - 6); plus 0 and 1.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    return tuple(sorted(values))


# Built once at import: torch.compile cannot trace the tolist() above inside a forward.
DYNAMIC_VALUES = _dynamic_values()


@_tables
def _dynamic_code(device: torch.device) -> torch.Tensor:
    return torch.tensor(DYNAMIC_VALUES, dtype=torch.float32, device=device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value signed dynamic code (bitsandbytes' ``create_dynamic_map()``), float32, sorted."""
    return _dynamic_code(torch.device(device))


@_tables
def _midpoints_4bit(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between consecutive code values in value order, and value order -> code index."""
    code = _code(quant_type, device)
    order = torch.arange(16) if quant_type == "nf4" else torch.tensor(FP4_ORDER)
    order = order.to(device)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


@_tables
def _pair_rows(quant_type: str, device: torch.device) -> torch.Tensor:
    """``rows[byte] = (code[byte >> 4], code[byte & 15])``: one lookup dequantizes a byte."""
    code = _code(quant_type, device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()


@_tables
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """`_pair_rows` with each row read as one 64-bit value: a 1-D gather of these is much faster
    than gathering rows of two floats."""
    return _pair_rows(quant_type, device).view(torch.int64).view(-1)


@_tables
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """bitsandbytes' CPU table: entry u holds the code index nearest to 2u/65535 - 1."""
    code = _dynamic_code(device)
    midpoints = (code[:-1] + code[1:]) * 0.5
    u = torch.arange(65536, dtype=torch.float32, device=device)
    return torch.bucketize((u + u) / 65535.0 - 1.0, midpoints).to(torch.uint8)


# -- 4-bit quantization -----------------------------------------------------------------------


@dataclasses.dataclass
class QuantState:
    """A 4-bit weight: packed codes plus the statistics that undo the scaling.

    ``absmax`` is float32 without double quantization; with it, uint8 codes of
    ``absmax - offset`` under the dynamic code, scaled per 256 blocks by ``nested_absmax``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def fp32_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax, self.nested_absmax, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_4bit(
            self.packed,
            self.fp32_absmax(),
            self.shape,
            self.block_size,
            self.quant_type,
            dtype or self.dtype,
        )

    @property
    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def check_block_size(owner: str, value: Any) -> int:
    if isinstance(value, bool) or value not in BLOCK_SIZES:
        raise SpecError(
            f"{owner}.block_size={value!r}: expected a power of two from 32 to 4096 "
            f"({', '.join(map(str, BLOCK_SIZES))})"
        )
    return value


def quantize_4bit(
    weight: torch.Tensor,
    block_size: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> QuantState:
    """Blockwise 4-bit quantization, byte for byte what bitsandbytes' ``quantize_4bit`` stores
    (``compress_statistics`` = ``double_quant``)."""
    check_block_size("quantize_4bit", block_size)
    check_choice("quantize_4bit", "quant_type", quant_type, QUANT_TYPES)
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise SpecError(
            f"quantize_4bit: weights must be float32, bfloat16 or float16, got {weight.dtype}"
        )
    n = weight.numel()
    if n == 0:
        raise SpecError("quantize_4bit: cannot quantize an empty tensor")
    if weight.is_meta:
        return _meta_state(weight, block_size, quant_type, double_quant)
    flat = weight.detach().reshape(-1)
    full = n - n % block_size
    # chunks hold whole blocks, so the split does not change any result
    step = max(block_size, CHUNK // block_size * block_size)
    codes, absmax = [], []
    for start in range(0, full, step):
        q, a = _quantize_blocks(flat[start : min(start + step, full)], block_size, quant_type)
        codes.append(q)
        absmax.append(a)
    if full < n:
        q, a = _quantize_tail(flat[full:], quant_type)
        codes.append(q)
        absmax.append(a)
    packed = pack_4bit(torch.cat(codes), _zero_index(quant_type, weight.device))
    state = QuantState(
        packed, torch.cat(absmax), tuple(weight.shape), weight.dtype, block_size, quant_type
    )
    if double_quant:
        _double_quantize(state)
    return state


def _quantize_blocks(
    values: torch.Tensor, block_size: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    copied = values.dtype != torch.float32  # then the float32 copy may be scaled in place
    blocks = values.float().view(-1, block_size)
    # max |x| without a |x| temporary; + 0.0 turns -0.0 into 0.0, as |x| would
    absmax = torch.maximum(blocks.amax(dim=1), -blocks.amin(dim=1)) + 0.0
    # multiply by the reciprocal (not divide): bitsandbytes rounds that way
    scale = (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)
    scaled = (blocks.mul_(scale) if copied else blocks * scale).clamp_(-1, 1)
    return _nearest_4bit(scaled.reshape(-1), quant_type), absmax


def _quantize_tail(values: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The short last block: bitsandbytes divides here, and keeps the clamped absmax."""
    values = values.float()
    absmax = values.abs().max().clamp(min=1e-38)
    return _nearest_4bit(torch.clamp(values / absmax, -1, 1), quant_type), absmax.reshape(1)


def _nearest_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    midpoints, order = _midpoints_4bit(quant_type, scaled.device)
    rank = torch.bucketize(scaled, midpoints, out_int32=True)
    return rank.to(torch.uint8) if quant_type == "nf4" else order[rank]


def _zero_index(quant_type: str, device: torch.device) -> int:
    return int(_nearest_4bit(torch.zeros(1, device=device), quant_type).item())


def pack_4bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble; an odd count is padded with ``pad``."""
    codes = codes.to(torch.uint8).reshape(-1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit codes of ``packed`` (uint8, one code per element)."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:n]


def _double_quantize(state: QuantState) -> None:
    offset = state.absmax.mean()
    q, nested = quantize_blockwise_8bit(state.absmax - offset, NESTED_BLOCK_SIZE)
    state.absmax, state.nested_absmax, state.offset = q, nested, offset


def _meta_state(weight: torch.Tensor, block_size: int, quant_type: str, double: bool) -> QuantState:
    """Shapes and dtypes only (for models built on the meta device)."""
    n = weight.numel()
    blocks = -(-n // block_size)
    meta = {"device": "meta"}
    state = QuantState(
        torch.empty((n + 1) // 2, dtype=torch.uint8, **meta),
        torch.empty(blocks, dtype=torch.uint8 if double else torch.float32, **meta),
        tuple(weight.shape),
        weight.dtype,
        block_size,
        quant_type,
    )
    if double:
        nested = -(-blocks // NESTED_BLOCK_SIZE)
        state.nested_absmax = torch.empty(nested, dtype=torch.float32, **meta)
        state.offset = torch.empty((), dtype=torch.float32, **meta)
    return state


# -- 8-bit dynamic quantization (the absmax of double quantization) ----------------------------


def quantize_blockwise_8bit(
    values: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic code, as bitsandbytes' CPU kernel: returns
    uint8 codes and the float32 absmax per block (a block of zeros gets codes 0)."""
    flat = values.detach().reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    empty = absmax == 0
    inverse = torch.where(empty, 0.0, 1.0 / absmax)
    scaled = torch.clamp(blocks * inverse.unsqueeze(1), -1, 1)
    # (x + 1) / 2 * 65535 + 0.5 is one fused multiply-add in the kernel: computing it in float64
    # is exact here (x + 1 is a multiple of 2^-24), and the cast rounds it once, as the FMA does
    position = (((scaled + 1.0) * 0.5).double() * 65535.0 + 0.5).float()
    index = position.clamp(0, 65535).to(torch.int64)
    codes = _dynamic_lut(flat.device)[index]
    codes = torch.where(empty.unsqueeze(1), 0, codes).to(torch.uint8)
    return codes.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """``dynamic_code[codes] * absmax[block]`` in float32."""
    n = codes.numel()
    values = dynamic_code(codes.device)[codes.reshape(-1).long()]
    values = F.pad(values, (0, -n % block_size)).view(-1, block_size)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


# -- what the rewritten graphs call -------------------------------------------------------------


def dequantize_absmax(
    absmax: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The float32 absmax of a double-quantized weight."""
    out = dequantize_blockwise_8bit(absmax, nested_absmax) + offset
    _remember(out, functools.partial(dequantize_absmax, absmax, nested_absmax, offset))
    return out


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    block_size: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight of shape ``shape`` in ``dtype``: ``code[q] * absmax[block]`` in float32, cast."""
    n = math.prod(shape)
    if torch.compiler.is_compiling():  # torch.export / ONNX: plain ops, no 64-bit reinterpreting
        rows = _pair_rows(quant_type, packed.device)
        values = torch.index_select(rows, 0, packed.reshape(-1).int()).reshape(-1)[:n]
        values = F.pad(values, (0, -n % block_size)).view(-1, block_size)
        return (values * absmax.unsqueeze(1)).reshape(-1)[:n].view(shape).to(dtype)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    if not packed.is_meta:
        _dequantize_into(out, packed.reshape(-1), absmax, block_size, quant_type)
    out = out.view(shape)
    absmax_again = getattr(absmax, "_surgeon_recompute", None) or (lambda: absmax)
    _remember(
        out,
        lambda: dequantize_4bit(packed, absmax_again(), shape, block_size, quant_type, dtype),
    )
    return out


def _dequantize_into(
    out: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block_size: int, quant_type: str
) -> None:
    """Fill ``out`` (n values): one gather of value pairs per byte, scaled per block in float32,
    cast into ``out``. On the CPU it goes in cache-sized chunks of whole blocks through one small
    float32 buffer."""
    n = out.numel()
    table = _pair_table(quant_type, packed.device)
    full_bytes = n // block_size * block_size // 2
    step = DEQUANTIZE_CHUNK if packed.device.type == "cpu" else max(full_bytes, 1)
    buffer = torch.empty(min(step, full_bytes), dtype=torch.int64, device=packed.device)
    for start in range(0, full_bytes, step):
        stop = min(start + step, full_bytes)
        pairs = torch.index_select(table, 0, packed[start:stop].int(), out=buffer[: stop - start])
        values = pairs.view(torch.float32)
        values.view(-1, block_size).mul_(
            absmax[2 * start // block_size : 2 * stop // block_size, None]
        )
        out[2 * start : 2 * stop].copy_(values)
    if 2 * full_bytes < n:
        tail = torch.index_select(table, 0, packed[full_bytes:].int()).view(torch.float32)
        out[2 * full_bytes :] = tail[: n - 2 * full_bytes] * absmax[-1]


def linear_4bit(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` in the weight's dtype, returned in ``x``'s dtype (bitsandbytes'
    Linear4bit). A weight from `dequantize_4bit` is not kept for backward but dequantized again
    there, as bitsandbytes' MatMul4Bit does: training holds 4 bits per weight, not 16."""
    xc = x.to(weight.dtype)
    bc = bias.to(weight.dtype) if bias is not None else None
    recompute = getattr(weight, "_surgeon_recompute", None)
    if recompute is None or weight.requires_grad or not torch.is_grad_enabled():
        out = F.linear(xc, weight, bc)
    else:
        out = _RecomputedLinear.apply(xc, weight, bc, recompute)
    return out.to(x.dtype)


def _remember(tensor: torch.Tensor, recompute: Any) -> None:
    if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
        tensor._surgeon_recompute = recompute


class _RecomputedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recompute):
        ctx.recompute = recompute
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # under autocast the product ran in grad's dtype
            grad_x = grad @ ctx.recompute().to(grad.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


# -- the spec -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NF4(metaclass=ValidatingMeta):
    """How QLoRA stores base weights: 4-bit NormalFloat blocks of ``block_size`` values, absmax
    double-quantized, dequantized into ``compute_dtype`` for the matmul. ``quant_type="fp4"``
    (or `FP4`) uses bitsandbytes' 4-bit float instead of NormalFloat."""

    block_size: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_type: str = "nf4"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_block_size(owner, self.block_size)
        check_bool(owner, "double_quant", self.double_quant)
        dtype = self.compute_dtype
        if isinstance(dtype, torch.dtype):
            dtype = next((k for k, v in COMPUTE_DTYPES.items() if v == dtype), str(dtype))
        object.__setattr__(
            self, "compute_dtype", check_choice(owner, "compute_dtype", dtype, COMPUTE_DTYPES)
        )
        check_choice(owner, "quant_type", self.quant_type, QUANT_TYPES)

    @property
    def dtype(self) -> torch.dtype:
        """``compute_dtype`` as a torch dtype."""
        return COMPUTE_DTYPES[self.compute_dtype]

    def bytes_per_weight(self) -> float:
        """Storage per quantized weight, statistics included (large matrices)."""
        if not self.double_quant:
            return 0.5 + 4 / self.block_size
        return 0.5 + 1 / self.block_size + 4 / (self.block_size * NESTED_BLOCK_SIZE)

    def quantize(self, weight: torch.Tensor) -> QuantState:
        return quantize_4bit(weight, self.block_size, self.quant_type, self.double_quant)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: Any, where: str) -> NF4:
        """``value`` if it is already a quantization spec, else built from a mapping."""
        if isinstance(value, NF4):
            return value
        if not isinstance(value, Mapping):
            raise SpecError(
                f"{where}={value!r}: expected surgeon.NF4(...) or a table of its fields "
                f"(block_size, double_quant, compute_dtype, quant_type)"
            )
        try:
            return cls(**value)
        except SpecError as err:
            raise SpecError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class FP4(NF4):
    """`NF4` with bitsandbytes' 4-bit float code (``quant_type="fp4"``)."""

    quant_type: str = "fp4"


# -- the layer ------------------------------------------------------------------------------------


class Linear4bit(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in 4 bits, in bitsandbytes' layout.

    ``weight`` is the packed uint8 parameter (frozen), ``absmax`` the per-block statistics
    (uint8 with double quantization, then also ``nested_absmax`` and ``absmax_offset``). The
    forward dequantizes into ``quant.compute_dtype`` and returns the input's dtype. Layers turn
    into this class in place (`quantize_linear`), so every reference to them stays valid.
    """

    STATISTICS: ClassVar[tuple[str, ...]] = ("absmax", "nested_absmax", "absmax_offset")

    quant: NF4
    weight_dtype: torch.dtype
    """The dtype the weight had before quantization (what `dequantize_linear` restores)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear_4bit(input, self.dequantize(), self.bias)

    def fp32_absmax(self) -> torch.Tensor:
        if not self.quant.double_quant:
            return self.absmax
        return dequantize_absmax(self.absmax, self.nested_absmax, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (``[out, in]``), by default in the compute dtype."""
        q = self.quant
        return dequantize_4bit(
            self.weight,
            self.fp32_absmax(),
            (self.out_features, self.in_features),
            q.block_size,
            q.quant_type,
            dtype or q.dtype,
        )

    def state(self) -> QuantState:
        double = self.quant.double_quant
        return QuantState(
            self.weight.data,
            self.absmax,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.quant.block_size,
            self.quant.quant_type,
            self.nested_absmax if double else None,
            self.absmax_offset if double else None,
        )

    def storage_bytes(self) -> int:
        """Bytes of the 4-bit weight and its statistics (the bias not included)."""
        return self.state().nbytes

    def extra_repr(self) -> str:
        q = self.quant
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {q.quant_type}, block_size={q.block_size}, "
            f"double_quant={q.double_quant}, compute_dtype={q.compute_dtype}"
        )

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() cast floating buffers; the statistics stay float32 (as
        # bitsandbytes' quant_state does) and only follow device moves
        before = {n: self._buffers[n] for n in self.STATISTICS if n in self._buffers}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return out


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, Linear4bit)


def quantizable(layer: nn.Module) -> bool:
    """Plain ``nn.Linear`` and GPT-2's ``Conv1D`` can be stored in 4 bits."""
    conv1d = gpt2_conv1d_type()
    return type(layer) in (nn.Linear, Linear4bit) or (conv1d is not None and type(layer) is conv1d)


def quantize_linear(layer: nn.Module, quant: NF4, dtype: torch.dtype | None = None) -> Linear4bit:
    """Store ``layer``'s weight in 4 bits, in place (the module object stays the same); ``dtype``:
    cast the weight first (the dtype the layer would hold; `dequantize_linear` brings it back in
    it). GPT-2's ``Conv1D`` (weight ``[in, out]``) becomes a Linear layer. The full-precision
    parameter is dropped from the layer."""
    if isinstance(layer, Linear4bit):
        if layer.quant != quant:
            raise SpecError(
                f"this layer is already stored as {layer.quant}; it cannot also be {quant}"
            )
        return layer
    if not quantizable(layer):
        raise SpecError(
            f"{type(layer).__name__} cannot be stored in 4 bits (only nn.Linear and Conv1D)"
        )
    weight = layer.weight if isinstance(layer, nn.Linear) else layer.weight.t()
    weight = weight.detach().to(dtype) if dtype is not None else weight.detach()
    out_features, in_features = weight.shape
    state = quant.quantize(weight)
    del weight
    del layer._parameters["weight"]
    layer.__class__ = Linear4bit
    layer.in_features, layer.out_features = in_features, out_features
    install_state(layer, state, quant)
    return layer


def install_state(layer: Linear4bit, state: QuantState, quant: NF4) -> None:
    """Put a quantized weight into a 4-bit layer (replacing what it stored)."""
    layer.weight = nn.Parameter(state.packed, requires_grad=False)
    layer.register_buffer("absmax", state.absmax)
    if state.double_quant:
        layer.register_buffer("nested_absmax", state.nested_absmax)
        layer.register_buffer("absmax_offset", state.offset)
    layer.quant = quant
    layer.weight_dtype = state.dtype


def dequantize_linear(layer: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """Turn a 4-bit layer back into a plain ``nn.Linear`` (in place), its weight dequantized
    into ``dtype`` (default: the dtype it had before quantization)."""
    weight = layer.dequantize(dtype or layer.weight_dtype)
    for name in Linear4bit.STATISTICS:
        layer._buffers.pop(name, None)
    del layer._parameters["weight"]
    del layer.quant, layer.weight_dtype
    layer.__class__ = nn.Linear
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


def quantizable_paths(model: nn.Module, selector: str | Sequence[str], owner: str) -> list[str]:
    """Paths of the layers ``selector`` picks (a preset, a regex or name suffixes, as in
    ``targets``) that can be stored in 4 bits; `SpecError` if there are none."""
    if isinstance(selector, str) and selector in PRESETS:
        hits = preset_paths(model, selector)
    else:
        hits = [p for p, _ in model.named_modules() if p and matches_selector(p, selector)]
    hits = [p for p in hits if quantizable(model.get_submodule(p))]
    if not hits:
        raise SpecError(
            f"{owner}={selector!r} selects no layer that can be stored in 4 bits "
            f"(nn.Linear, GPT-2's Conv1D)"
        )
    return hits


def quantize_model(
    model: nn.Module, quant: NF4 | None = None, layers: str | Sequence[str] = "all-linear"
) -> list[str]:
    """Store ``model``'s linear layers in 4 bits, in place; returns their paths. ``layers``: a
    preset (default every linear layer but the output head, as bitsandbytes' ``load_in_4bit``),
    a regex or name suffixes. Adapters (LoRA, QLoRA) compiled onto the model adapt them in 4 bits."""
    quant = NF4.from_value(quant if quant is not None else NF4(), "quantize_model.quant")
    paths = quantizable_paths(model, layers, "quantize_model.layers")
    for path in paths:
        quantize_linear(model.get_submodule(path), quant)
    return paths
