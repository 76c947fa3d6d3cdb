"""4-bit storage against bitsandbytes: same code books, same bytes, same statistics, same weights."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon import quant

bnb_functional = pytest.importorskip("bitsandbytes.functional")
bnb_default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")

SHAPES = [(33, 70), (1, 1), (7, 9), (3, 1000), (129, 31), (64, 64), (2, 4099)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _eager_bitsandbytes():
    """bitsandbytes torch.compiles its reference dequantizer; eager gives the same numbers, fast."""
    saved = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = saved


def _weight(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


def _bnb_dequantized(packed, state, shape):
    """bitsandbytes' dequantization. Its CPU kernel's AVX-512 path (rows a multiple of 16 values,
    not of the block size) scales with the wrong block's absmax (0.50.2; its error is 4x that of
    its own reference), so there the reference implementation of its default backend is used."""
    row = shape[-1]
    if row % 16 == 0 and row % state.blocksize and len(shape) > 1 and shape[0] > 1:
        absmax = state.absmax
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = bnb_functional.get_4bit_type(state.quant_type, device="cpu")
        return bnb_default_ops._dequantize_4bit_compute(
            packed.view(-1), absmax, code, state.blocksize, shape, state.dtype
        )
    return bnb_functional.dequantize_4bit(packed, state)


# -- code books ------------------------------------------------------------------------------------


def test_code_books_equal_bitsandbytes():
    assert torch.equal(quant.nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(quant.fp4_code(), bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quant.dynamic_code(), bnb_functional.create_dynamic_map())


def test_nf4_values_are_normal_quantiles():
    # 8 quantiles below zero and 9 at or above it (QLoRA's asymmetric NormalFloat), normalised
    offset = 0.9677083
    lower = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    upper = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([lower, torch.zeros(1, dtype=torch.float64), upper]).sort().values
    values = values / values.max()
    torch.testing.assert_close(quant.nf4_code(), values.float(), rtol=0, atol=1.2e-7)  # 2 ulps


# -- 4-bit quantization ------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("block_size", quant.BLOCK_SIZES)
def test_same_bytes_and_statistics_as_bitsandbytes(block_size, double_quant, quant_type):
    for shape, dtype in itertools.product(SHAPES, DTYPES):
        weight = _weight(shape, dtype, seed=block_size + len(shape))
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type
        )
        ours = quant.quantize_4bit(weight, block_size, quant_type, double_quant)
        case = f"{shape} {dtype}"
        assert torch.equal(ours.packed, packed.view(-1)), case
        assert torch.equal(ours.absmax, state.absmax), case
        if double_quant:
            assert torch.equal(ours.nested_absmax, state.state2.absmax), case
            assert torch.equal(ours.offset, state.offset), case
        theirs = _bnb_dequantized(packed, state, shape)
        mine = ours.dequantize()
        assert mine.dtype == theirs.dtype == dtype, case
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6, msg=case)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_zero_blocks_and_tails_as_bitsandbytes(quant_type):
    code = quant.code_4bit(quant_type)
    ordered = code.sort().values
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    cases = [
        torch.cat([midpoints, torch.ones(1)]),  # every value exactly between two codes
        torch.zeros(70),  # zero blocks, and a zero tail (bitsandbytes keeps absmax 1e-38 there)
        torch.full((100,), -3.0),  # constant negative blocks
        torch.cat([torch.zeros(64), torch.tensor([0.0, 1e-30, -1e-30])]),
        torch.tensor([1e30, -1e30, 3.0, 0.0, 5.0]),
        torch.randn(1000) * 1e-20,
    ]
    for values in cases:
        for double_quant in (True, False):
            packed, state = bnb_functional.quantize_4bit(
                values, blocksize=64, compress_statistics=double_quant, quant_type=quant_type
            )
            ours = quant.quantize_4bit(values, 64, quant_type, double_quant)
            assert torch.equal(ours.packed, packed.view(-1))
            assert torch.equal(ours.absmax, state.absmax)
            theirs = bnb_functional.dequantize_4bit(packed, state).view(-1)  # 1-D comes back 1 x n
            torch.testing.assert_close(ours.dequantize(), theirs, rtol=0, atol=1e-6)


def test_pack_puts_the_first_value_in_the_high_nibble():
    packed = quant.pack_4bit(torch.tensor([1, 2, 3, 4, 5]), pad=7)
    assert packed.tolist() == [0x12, 0x34, 0x57]
    assert quant.unpack_4bit(packed, 5).tolist() == [1, 2, 3, 4, 5]
    # an odd count pads with the index of 0.0, as bitsandbytes
    assert quant.quantize_4bit(torch.tensor([1.0]), 64, "nf4", False).packed.tolist() == [0xF7]


def test_large_weights_are_quantized_in_chunks_with_the_same_result(monkeypatch):
    weight = _weight((70, 1000), torch.float32)
    whole = quant.quantize_4bit(weight)
    monkeypatch.setattr(quant, "CHUNK", 4096)
    chunked = quant.quantize_4bit(weight)
    assert torch.equal(whole.packed, chunked.packed)
    assert torch.equal(whole.absmax, chunked.absmax)
    assert torch.equal(whole.dequantize(), chunked.dequantize())


@pytest.mark.parametrize("dtype", DTYPES)
def test_traced_dequantize_equals_eager(monkeypatch, dtype):
    """torch.export / ONNX see plain ops (no 64-bit reinterpreting); the values are the same."""
    state = quant.quantize_4bit(_weight((33, 70), torch.float32), 64, "fp4")
    eager = state.dequantize(dtype)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = state.dequantize(dtype)
    assert torch.equal(traced, eager) and not hasattr(traced, "_surgeon_recompute")


def test_meta_tensors_give_shapes_only():
    state = quant.quantize_4bit(torch.empty(33, 70, device="meta"))
    real = quant.quantize_4bit(torch.ones(33, 70))
    for name in ("packed", "absmax", "nested_absmax", "offset"):
        ours, theirs = getattr(state, name), getattr(real, name)
        assert ours.is_meta and ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert state.dequantize(torch.bfloat16).shape == (33, 70)


def test_bad_input_is_refused():
    with pytest.raises(surgeon.SpecError, match="block_size=48"):
        quant.quantize_4bit(torch.ones(8), block_size=48)
    with pytest.raises(surgeon.SpecError, match="quant_type='int4'"):
        quant.quantize_4bit(torch.ones(8), quant_type="int4")
    with pytest.raises(surgeon.SpecError, match=r"torch\.int64"):
        quant.quantize_4bit(torch.ones(8, dtype=torch.long))


# -- 8-bit dynamic quantization (double quantization's absmax) -------------------------------------


def test_blockwise_8bit_matches_the_bitsandbytes_cpu_kernel():
    code = bnb_functional.create_dynamic_map()
    gen = torch.Generator().manual_seed(0)
    u = torch.arange(65536, dtype=torch.float32)
    # values at the kernel's table cell edges, where rounding decides the code
    edges = torch.cat([torch.ones(1), (u + 0.5) / 32767.5 - 1]).clamp(-1, 1)
    cases = [edges, torch.zeros(300), torch.cat([torch.zeros(256), torch.ones(3)])]
    for _ in range(60):
        n = int(torch.randint(1, 3000, (), generator=gen))
        values = torch.randn(n, generator=gen) * float(torch.rand((), generator=gen) * 4)
        cases.append(values - values.mean())
    for values in cases:
        codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default(values, code, 256)
        ours, our_absmax = quant.quantize_blockwise_8bit(values, 256)
        assert torch.equal(ours, codes) and torch.equal(our_absmax, absmax)
        theirs = bnb_functional.dequantize_blockwise(codes, absmax=absmax, blocksize=256)
        assert torch.equal(quant.dequantize_blockwise_8bit(ours, our_absmax, 256), theirs)


# -- the spec ------------------------------------------------------------------------------------------


def test_nf4_spec_defaults_and_validation():
    spec = surgeon.NF4()
    assert (spec.block_size, spec.double_quant, spec.compute_dtype, spec.quant_type) == (
        64,
        True,
        "bfloat16",
        "nf4",
    )
    assert surgeon.FP4().quant_type == "fp4"
    assert surgeon.NF4(compute_dtype=torch.float16).compute_dtype == "float16"
    assert spec.bytes_per_weight() <= 0.53
    for kwargs, match in [
        ({"block_size": 100}, r"NF4\.block_size=100: expected a power of two from 32 to 4096"),
        ({"block_size": 8192}, "block_size=8192"),
        ({"block_size": True}, "block_size=True"),
        ({"double_quant": "yes"}, r"NF4\.double_quant='yes'"),
        ({"compute_dtype": "float64"}, r"NF4\.compute_dtype='float64'.*'bfloat16'"),
        ({"quant_type": "nf8"}, r"NF4\.quant_type='nf8'.*did you mean 'nf4'"),
        ({"blocksize": 64}, r"NF4 has no field 'blocksize'.*did you mean 'block_size'"),
    ]:
        with pytest.raises(surgeon.SpecError, match=match):
            surgeon.NF4(**kwargs)


# -- the 4-bit layer -----------------------------------------------------------------------------------


def _linear(in_features=70, out_features=33, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
def test_layer_stores_bitsandbytes_bytes_and_computes_in_the_compute_dtype(compute_dtype):
    layer = _linear()
    weight = layer.weight.detach().clone()
    spec = surgeon.NF4(compute_dtype=compute_dtype)
    quant.quantize_linear(layer, spec)
    assert isinstance(layer, quant.Linear4bit) and isinstance(layer, nn.Linear)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    assert torch.equal(layer.weight.view(-1), packed.view(-1))
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    x = torch.randn(4, 70)
    expected = F.linear(
        x.to(spec.dtype),
        bnb_functional.dequantize_4bit(packed, state).to(spec.dtype),
        layer.bias.to(spec.dtype),
    ).float()
    out = layer(x)
    assert out.dtype == torch.float32  # back in the input's dtype, as bitsandbytes
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_layer_storage_is_at_most_0_53_bytes_per_weight():
    layer = quant.quantize_linear(_linear(4096, 1024, bias=False), surgeon.NF4())
    per_weight = layer.storage_bytes() / (4096 * 1024)
    assert per_weight <= 0.53
    assert per_weight == pytest.approx(surgeon.NF4().bytes_per_weight(), abs=1e-6)


def test_quantizing_drops_the_full_precision_weight():
    layer = _linear(256, 128)
    ref = weakref.ref(layer.weight)
    quant.quantize_linear(layer, surgeon.NF4())
    gc.collect()
    assert ref() is None
    assert all(
        t.dtype != torch.float32 or t.numel() < 256 * 128 / 32 for t in layer.state_dict().values()
    )


def test_dtype_casts_keep_the_statistics_in_float32():
    layer = quant.quantize_linear(_linear(), surgeon.NF4())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.bias.dtype == torch.float16
    for name in ("weight", "absmax", "nested_absmax", "absmax_offset"):
        assert torch.equal(getattr(layer, name), before[name])


def test_state_dict_round_trip_and_dequantize_back():
    layer = quant.quantize_linear(_linear(), surgeon.FP4(double_quant=False))
    other = quant.quantize_linear(_linear(), surgeon.FP4(double_quant=False))
    with torch.no_grad():
        other.weight.zero_()
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 70)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    expected = layer.dequantize(torch.float32)
    quant.dequantize_linear(layer)
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    assert torch.equal(layer.weight, expected)
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_requantizing_with_another_spec_is_refused():
    layer = quant.quantize_linear(_linear(), surgeon.NF4())
    assert quant.quantize_linear(layer, surgeon.NF4()) is layer
    with pytest.raises(surgeon.SpecError, match="already stored as NF4"):
        quant.quantize_linear(layer, surgeon.NF4(block_size=128))


def test_backward_recomputes_the_weight_instead_of_keeping_it():
    layer = quant.quantize_linear(_linear(512, 256), surgeon.NF4(compute_dtype="float32"))
    x = torch.randn(2, 512, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert max(saved, default=0) < 256 * 512  # no dequantized weight held for backward
    out.square().sum().backward()
    weight = layer.dequantize(torch.float32)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, weight, layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_backward_under_autocast_matches_f_linear():
    # autocast runs the matmul in bfloat16 while the weight was dequantized in float32
    layer = quant.quantize_linear(_linear(64, 32), surgeon.NF4(compute_dtype="float32"))
    x = torch.randn(3, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    weight = layer.dequantize(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = F.linear(x2, weight, layer.bias)
    assert expected.dtype == torch.bfloat16  # the layer returns it in x's dtype
    assert out.dtype == torch.float32 and torch.equal(out, expected.float())
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x2.grad)
