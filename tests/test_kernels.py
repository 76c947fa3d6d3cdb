"""The fused ops: the reference against the formulas (and bitsandbytes for NF4), the Triton kernels
against the reference, forward and backward.

The kernels run on CPU tensors through Triton's interpreter: tests that take the ``interpreter``
fixture set ``TRITON_INTERPRET=1`` for their own duration only (the kernel modules are reloaded
when the mode changes), so the rest of the suite keeps the reference path. Shapes are small and
odd (37 or 38 rows, 45 inputs, 29 outputs: no multiple of the 16-wide interpreter tiles); the
``gpu`` tests repeat the checks on CUDA at sizes that span several autotuned tiles.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import surgeon.kernels as K
from surgeon.kernels import reference

IN, OUT = 45, 29
LEADING = (2, 19)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
"""Largest error relative to the largest reference entry: half-precision kernels round the
adapter factors to the activation dtype (tensor-core inputs); the unfused graph keeps them fp32."""


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def two_stage_if(monkeypatch):
    """``two_stage_if(True)``: the GEMM reads a precomputed x·Aᵀ instead of computing it in its
    own loop (what it does above `launch.FUSED_LOWRANK_MAX_ROWS` rows)."""
    from surgeon.kernels import launch

    def apply(flag: bool) -> None:
        if flag:
            monkeypatch.setattr(launch, "FUSED_LOWRANK_MAX_ROWS", 0)

    return apply


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual.double() - expected.double()).abs().max()
    assert error <= TOLERANCE[dtype] * expected.double().abs().max().clamp_min(1e-3), (
        f"max error {error:.3g} (largest entry {expected.abs().max():.3g})"
    )


def lora_inputs(dtype, rank, bias=True, device="cpu", leading=LEADING, n_in=IN, n_out=OUT):
    gen = torch.Generator().manual_seed(rank)

    def rand(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(device=device, dtype=dt)

    x = rand(*leading, n_in).requires_grad_()
    weight = rand(n_out, n_in, s=n_in**-0.5)
    b = rand(n_out).requires_grad_() if bias else None
    a = rand(rank, n_in, dt=torch.float32, s=n_in**-0.5).requires_grad_()
    bb = rand(n_out, rank, dt=torch.float32, s=rank**-0.5).requires_grad_()
    return x, weight, b, a, bb


def grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, g, retain_graph=True)


def check_against_reference(op, ref, args, inputs, dtype):
    out = op(*args)
    expected = ref(*args)
    close(out, expected, dtype)
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        close(got, want, dtype)


# -- the reference -----------------------------------------------------------------------------


def test_reference_is_the_lora_formula_and_its_backward_is_autograds():
    x, weight, b, a, bb = lora_inputs(torch.float64, 4)
    a, bb = a.detach().double().requires_grad_(), bb.detach().double().requires_grad_()
    out = K.lora_linear(x, weight, b, a, bb, 0.5)
    formula = x @ weight.t() + b + 0.5 * x @ a.t() @ bb.t()
    torch.testing.assert_close(out, formula)
    for got, want in zip(grads(out, [x, b, a, bb]), grads(formula, [x, b, a, bb])):
        torch.testing.assert_close(got, want)


def test_reference_backward_with_dropout_input_gives_each_input_its_part():
    x, weight, b, a, bb = lora_inputs(torch.float64, 3)
    a, bb = a.detach().double().requires_grad_(), bb.detach().double().requires_grad_()
    dropped = F.dropout(x, 0.4, training=True)
    out = K.lora_linear(x, weight, b, a, bb, 1.5, dropped)
    formula = x @ weight.t() + b + 1.5 * dropped @ a.t() @ bb.t()
    torch.testing.assert_close(out, formula)
    for got, want in zip(grads(out, [x, a, bb]), grads(formula, [x, a, bb])):
        torch.testing.assert_close(got, want)


def test_dequantize_reference_equals_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    for block in (64, 128):
        packed, state = bnbf.quantize_4bit(
            weight, blocksize=block, quant_type="nf4", compress_statistics=False
        )
        ours = K.dequantize_nf4_reference(packed, state.absmax, state.code, weight.shape, block)
        assert torch.equal(ours, bnbf.dequantize_4bit(packed, state))


def test_ops_run_on_the_meta_device():
    x, weight, b, a, bb = (
        t.detach().to("meta") if t is not None else t for t in lora_inputs(torch.float32, 2)
    )
    assert K.lora_linear(x, weight, b, a, bb, 2.0).shape == (*LEADING, OUT)
    mag = torch.ones(OUT, device="meta")
    assert K.dora_linear(x, weight, b, a, bb, mag, mag, 2.0).shape == (*LEADING, OUT)


def test_without_interpreter_cpu_tensors_take_the_reference_path(monkeypatch):
    import surgeon

    assert surgeon.kernels is K  # reachable from the package, imported on first use
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not K.uses_triton(torch.zeros(1))


def test_bad_arguments_say_what_is_wrong():
    x, weight, b, a, bb = lora_inputs(torch.float32, 2)
    with pytest.raises(ValueError, match="index must be int64 with one entry per token"):
        K.multi_lora_linear(
            x, weight, b, a[None], bb[None], [1.0], torch.zeros(3, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="one scale per adapter"):
        K.multi_lora_linear(
            x, weight, b, a[None], bb[None], [1.0, 2.0], torch.zeros(38, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="packed must be uint8"):
        K.nf4_lora_linear(x, weight, torch.ones(30), torch.ones(16), [OUT, IN], 64, b, a, bb, 1.0)


# -- the Triton kernels against the reference --------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
RANKS = [1, 5, 128]


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_kernel(dtype, rank):
    x, weight, b, a, bb = lora_inputs(dtype, rank)
    assert K.uses_triton(x)
    check_against_reference(
        K.lora_linear, reference.lora_linear, (x, weight, b, a, bb, 0.75), (x, b, a, bb), dtype
    )


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_kernel_two_stage(dtype, two_stage_if):
    two_stage_if(True)
    x, weight, b, a, bb = lora_inputs(dtype, 7)
    check_against_reference(
        K.lora_linear, reference.lora_linear, (x, weight, b, a, bb, 2.0), (x, b, a, bb), dtype
    )


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("staged", [False, True], ids=["fused", "two_stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lora_linear_kernel_with_dropout_input_and_no_bias(dtype, staged, two_stage_if):
    two_stage_if(staged)
    x, weight, _, a, bb = lora_inputs(dtype, 3, bias=False)
    torch.manual_seed(0)
    dropped = F.dropout(x.float(), 0.3, training=True)
    check_against_reference(
        K.lora_linear,
        reference.lora_linear,
        (x, weight, None, a, bb, 0.5, dropped),
        (x, a, bb),
        dtype,
    )


@pytest.mark.usefixtures("interpreter")
def test_lora_linear_kernel_on_a_transposed_weight_and_only_adapter_gradients():
    """GPT-2's Conv1D stores (in, out): the fusion pass passes ``weight.t()``, a strided view."""
    x, weight, b, a, bb = lora_inputs(torch.float32, 4)
    stored = weight.t().contiguous()
    x = x.detach()
    check_against_reference(
        K.lora_linear, reference.lora_linear, (x, stored.t(), b, a, bb, 1.0), (a, bb), torch.float32
    )


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [2, 128])
def test_dora_linear_kernel(dtype, rank):
    x, weight, b, a, bb = lora_inputs(dtype, rank)
    scale = 0.8
    with torch.no_grad():
        norm = (weight.float() + scale * bb @ a).norm(dim=1)
    magnitude = (norm * 1.3).requires_grad_()
    check_against_reference(
        K.dora_linear,
        reference.dora_linear,
        (x, weight, b, a, bb, magnitude, norm, scale),
        (x, b, a, bb, magnitude),
        dtype,
    )


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("block", "rank"), [(64, 3), (32, 128)])
def test_nf4_lora_linear_kernel_against_bitsandbytes_weights(dtype, block, rank):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    x, weight, b, a, bb = lora_inputs(dtype, rank)
    packed, state = bnbf.quantize_4bit(
        weight.float(), blocksize=block, quant_type="nf4", compress_statistics=False
    )
    args = (x, packed, state.absmax, state.code, [OUT, IN], block, b, a, bb, 1.25)
    check_against_reference(
        K.nf4_lora_linear, reference.nf4_lora_linear, args, (x, b, a, bb), dtype
    )
    # and the reference on bitsandbytes' own dequantized weight
    dequantized = bnbf.dequantize_4bit(packed, state).to(dtype)
    close(
        K.nf4_lora_linear(*args),
        reference.lora_linear(x, dequantized, b, a, bb, 1.25),
        dtype,
    )


def quantized_inputs(quant_type, compute_dtype, dropout=False):
    """fp32 activations on a weight stored by `surgeon.quant` (double-quantized absmax read back
    in float32, as the fusion pass passes it) and adapters in the compute dtype, as QLoRA has."""
    from surgeon import quant

    x, weight, b, a, bb = lora_inputs(torch.float32, 3)
    state = quant.quantize_4bit(weight, 32, quant_type, double_quant=True)
    a = a.detach().to(compute_dtype).requires_grad_()
    bb = bb.detach().to(compute_dtype).requires_grad_()
    torch.manual_seed(0)
    dropped = F.dropout(x.to(compute_dtype), 0.3, training=True) if dropout else None
    code = quant.code_4bit(quant_type)
    op_args = (x, state.packed, state.fp32_absmax(), code, [OUT, IN], 32, b, a, bb, 1.25, dropped)
    return state, op_args


@pytest.mark.parametrize("dropout", [False, True], ids=["x", "dropout"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_reference_in_a_compute_dtype_is_qloras_unfused_graph(quant_type, dropout):
    from surgeon import quant

    state, args = quantized_inputs(quant_type, torch.bfloat16, dropout)
    x, _, _, _, _, _, b, a, bb, scale, dropped = args
    out = K.nf4_lora_linear(*args, torch.bfloat16)
    base = quant.linear_4bit(x, state.dequantize(torch.bfloat16), b)
    h = x.to(torch.bfloat16) if dropped is None else dropped
    delta = F.linear(F.linear(h, a) * scale, bb)
    unfused = base + delta.type_as(base)
    assert out.dtype == torch.float32 and torch.equal(out, unfused)
    inputs = [x, b, a, bb]
    for got, want in zip(grads(out, inputs), grads(unfused, inputs)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dropout", [False, True], ids=["x", "dropout"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_kernel_in_a_compute_dtype(quant_type, dropout):
    _, args = quantized_inputs(quant_type, torch.bfloat16, dropout)
    x, _, _, _, _, _, b, a, bb, _, _ = args
    check_against_reference(
        K.nf4_lora_linear,
        reference.nf4_lora_linear,
        (*args, torch.bfloat16),
        (x, b, a, bb),
        torch.bfloat16,
    )


def multi_inputs(dtype, ranks=(2, 5, 3), device="cpu"):
    x, weight, b, _, _ = lora_inputs(dtype, 1, device=device)
    gen = torch.Generator().manual_seed(7)
    a_list = [
        (torch.randn(r, IN, generator=gen) * IN**-0.5).to(device).requires_grad_() for r in ranks
    ]
    b_list = [
        (torch.randn(OUT, r, generator=gen) * r**-0.5).to(device).requires_grad_() for r in ranks
    ]
    tokens = x.numel() // IN
    index = torch.randint(-1, len(ranks), (tokens,), generator=gen).to(device)
    index[:5] = 1  # a run of one adapter, as a batch row gives
    return x, weight, b, a_list, b_list, index


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_lora_linear_kernel(dtype):
    x, weight, b, a_list, b_list, index = multi_inputs(dtype)
    scales = [0.5, 2.0, 1.0]

    def run(op):
        a, bb = K.stack_adapters(a_list, b_list)
        return op(x, weight, b, a, bb, scales, index)

    out, expected = run(K.multi_lora_linear), run(reference.multi_lora_linear)
    close(out, expected, dtype)
    inputs = [x, b, *a_list, *b_list]
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        close(got, want, dtype)


def test_multi_lora_linear_reference_is_each_token_through_its_adapter():
    x, weight, b, a_list, b_list, index = multi_inputs(torch.float64)
    a_list = [t.detach().double() for t in a_list]
    b_list = [t.detach().double() for t in b_list]
    scales = [0.5, 2.0, 1.0]
    a, bb = K.stack_adapters(a_list, b_list)
    out = K.multi_lora_linear(x, weight, b, a, bb, scales, index).reshape(-1, OUT)
    flat = x.reshape(-1, IN)
    for t, k in enumerate(index.tolist()):
        want = flat[t] @ weight.t() + b
        if k >= 0:
            want = want + scales[k] * flat[t] @ a_list[k].t() @ b_list[k].t()
        torch.testing.assert_close(out[t], want)


# -- under autocast ----------------------------------------------------------------------------
# The unfused subgraphs as passes/lora.py, dora.py and qlora.py emit them: under autocast their
# F.linear calls run in bfloat16, their element-wise ops in the promoted dtype.


def unfused_lora(x, weight, b, a, bb, scale, x_lora=None):
    h = x if x_lora is None else x_lora
    return torch.add(F.linear(x, weight, b), F.linear(torch.mul(F.linear(h, a), scale), bb))


def unfused_dora(x, weight, b, a, bb, magnitude, norm, scale):
    factor = torch.div(magnitude, norm)
    b_scaled = torch.mul(bb, torch.mul(factor, scale).view(-1, 1))
    shift = torch.addcmul(b, b, factor, value=-1)
    low = F.linear(F.linear(x, a), b_scaled, shift)
    return torch.addcmul(low, F.linear(x, weight, b), factor)


def unfused_qlora(state, x, b, a, bb, scale, compute_dtype):
    from surgeon import quant

    base = quant.linear_4bit(x, state.dequantize(compute_dtype), b)
    delta = F.linear(torch.mul(F.linear(x.to(a.dtype), a), scale), bb)
    return torch.add(base, delta.type_as(base))


def dora_inputs(dtype):
    x, weight, b, a, bb = lora_inputs(dtype, 3)
    with torch.no_grad():
        norm = (weight.float() + 0.8 * bb @ a).norm(dim=1)
    return (x, weight, b, a, bb, (norm * 1.3).requires_grad_(), norm, 0.8), (x, b, a, bb)


def autocast_cases():
    """(name, fused op, unfused graph, arguments, tensors to differentiate, largest error)."""
    x, weight, b, a, bb = lora_inputs(torch.float32, 3)
    torch.manual_seed(0)
    dropped = F.dropout(x, 0.3, training=True)
    lora = (x, weight, b, a, bb, 1.5, dropped)
    dora, dora_grads = dora_inputs(torch.float32)
    state, nf4 = quantized_inputs("nf4", torch.float32)
    x4, b4, a4, bb4, scale4 = nf4[0], nf4[6], nf4[7], nf4[8], nf4[9]
    return [
        ("lora", K.lora_linear, unfused_lora, lora, (x, b, a, bb), 0.0),
        # DoRA's result is rounded to bfloat16 once before addcmul's float32 one, and its
        # backward rounds the scaled gradient where autograd keeps it: a bfloat16 step or two
        ("dora", K.dora_linear, unfused_dora, dora, dora_grads, 1e-2),
        (
            "nf4",
            lambda *args: K.nf4_lora_linear(*args[:10], None, torch.float32),
            lambda x, *_: unfused_qlora(state, x, b4, a4, bb4, scale4, torch.float32),
            nf4[:10],
            (x4, b4, a4, bb4),
            0.0,
        ),
    ]


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("case", range(3), ids=["lora", "dora", "nf4"])
def test_ops_under_autocast_compute_in_the_unfused_graphs_dtypes(case):
    _, op, unfused, args, inputs, tolerance = autocast_cases()[case]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(*args)
        expected = unfused(*args)
    assert out.dtype == expected.dtype
    assert relative_error(out, expected) <= tolerance
    for got, want in zip(grads(out, inputs), grads(expected, inputs), strict=True):
        assert got.dtype == want.dtype == torch.float32
        assert relative_error(got, want) <= max(tolerance, 1e-5)
    outside = op(*args)  # outside autocast nothing changes
    assert outside.dtype == torch.float32 and relative_error(outside, unfused(*args)) < 1e-5


def test_multi_lora_under_autocast_runs_in_bfloat16():
    x, weight, b, a_list, b_list, index = multi_inputs(torch.float32)
    a, bb = K.stack_adapters(a_list, b_list)
    scales = [0.5, 2.0, 1.0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = K.multi_lora_linear(x, weight, b, a, bb, scales, index)
    cast = [t.to(torch.bfloat16) for t in (x, weight, b, a, bb)]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.multi_lora_linear(*cast[:5], scales, index))
    inputs = [x, b, *a_list, *b_list]
    expected = reference.multi_lora_linear(*(t.float() for t in cast), scales, index)
    for got, want in zip(grads(out, inputs), grads(expected, inputs), strict=True):
        assert got.dtype == torch.float32 and relative_error(got, want) <= 2e-2


@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("case", range(3), ids=["lora", "dora", "nf4"])
def test_kernels_under_autocast(case):
    _, op, unfused, args, inputs, _ = autocast_cases()[case]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(*args)
        expected = unfused(*args)
    assert out.dtype == expected.dtype
    close(out, expected.to(out.dtype), torch.bfloat16)
    for got, want in zip(grads(out, inputs), grads(expected, inputs), strict=True):
        close(got, want, torch.bfloat16)


# -- on a GPU ----------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 16, 128])
def test_lora_linear_kernel_on_cuda(dtype, rank, rows):
    x, weight, b, a, bb = lora_inputs(
        dtype, rank, device="cuda", leading=(rows,), n_in=1000, n_out=700
    )
    check_against_reference(
        K.lora_linear, reference.lora_linear, (x, weight, b, a, bb, 0.5), (x, b, a, bb), dtype
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 300])
def test_nf4_and_multi_kernels_on_cuda(rows):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    dtype = torch.bfloat16
    x, weight, b, a, bb = lora_inputs(
        dtype, 16, device="cuda", leading=(rows,), n_in=1000, n_out=700
    )
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    args = (x, packed, state.absmax, state.code, [700, 1000], 64, b, a, bb, 1.0)
    check_against_reference(
        K.nf4_lora_linear, reference.nf4_lora_linear, args, (x, b, a, bb), dtype
    )
    index = torch.randint(-1, 2, (rows,), device="cuda")
    stacked = K.stack_adapters([a, a * 2], [bb, bb])
    close(
        K.multi_lora_linear(x, weight, b, *stacked, [1.0, 0.5], index),
        reference.multi_lora_linear(x, weight, b, *stacked, [1.0, 0.5], index),
        dtype,
    )


# -- the GPU benchmark script, on the CPU ------------------------------------------------------


def test_gpu_benchmark_parses_formats_and_stops_cleanly_without_a_gpu(monkeypatch):
    import dataclasses
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("gpu_kernels", folder / "gpu_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_kernels", bench)
    spec.loader.exec_module(bench)
    assert bench.parse_args(["--quick", "--json", "x.json"]).quick
    rows = [
        bench.Row("lora fwd", "4096x4096", 4096, 210.0, 230.0, 200.0, 0.913, 660.0, 120.0),
        bench.Row("nf4+lora fwd", "4096x14336", 1, 12.0, None, None, None, 0.01, 3400.0),
    ]
    table = bench.format_rows(rows)
    assert "0.913" in table and "+5.0%" in table and "71" in table  # 3400 GB/s of 4800
    fast = dataclasses.replace(rows[0], fused_us=205.0)
    page = bench.markdown([fast, rows[1]], "a machine", ["4096x4096 at 16 tokens"])
    assert "# GPU kernel benchmark" in page and "Not measured in this run: 4096x4096 at 16" in page
    assert "4096x4096, 4096 tokens: +2.5% (goal <= +5%): met" in page
    assert "4096x14336, 4096 tokens: not measured" in page
    assert "4096x14336, 1 token: 71% of HBM (goal >= 70%): met" in page
    assert "NF4+LoRA vs bitsandbytes, 4096x14336, 1 token: not measured" in page  # no bnb row
    slow_nf4 = dataclasses.replace(rows[1], unfused_us=15.0, paired=0.8, gbs=2000.0)
    verdicts = bench.goals([slow_nf4])
    assert "1.25x (goal >= 1.5x): NOT met" in verdicts[1] and "42% of HBM" in verdicts[2]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="cannot run here: no CUDA device"):
            bench.main(["--quick"])
