"""Fused adapter kernels on a GPU: surgeon's ops vs unfused PyTorch (PEFT's path) vs bitsandbytes.

Usage::

    python benchmarks/gpu_kernels.py                  # full run (under 8 minutes on one H200)
    python benchmarks/gpu_kernels.py --quick          # one shape, two token counts
    python benchmarks/gpu_kernels.py --markdown out/gpu_section.md --json out.json

Needs a CUDA GPU and Triton; bitsandbytes is optional (without it the NF4 rows time surgeon
alone, on random 4-bit codes).

Method
------
* Shapes: Llama-8B's 4096x4096 (q/o projections) and 4096x14336 (gate/up), bf16 activations and
  weights, LoRA rank 16 in bf16 on both sides (PEFT keeps adapters in fp32 by default, which
  only makes its path slower), at 1, 16, 512 and 4096 tokens.
* Contestants, per row: the fused op; "unfused" = what PEFT runs (cuBLAS ``F.linear`` for the
  base, then ``F.linear(F.linear(x, A) * s, B)`` and an add; for NF4 bitsandbytes'
  ``matmul_4bit`` (double-quantized statistics, as QLoRA) plus the same LoRA matmuls; for mixed
  batches a gather/adapter/scatter loop per adapter, as surgeon's unfused graph); and "base" =
  the plain base product alone (cuBLAS; bitsandbytes for NF4), to show what the adapter adds.
* Correct first: before timing, every fused output is compared with the reference
  implementation (``surgeon.kernels.reference``) on the same inputs; the script aborts on a
  mismatch (largest error over largest entry above 2e-2).
* Timing: forward rows capture ``ITERS`` calls in one CUDA graph and time its replays with CUDA
  events (launch overhead would otherwise hide microsecond kernels); inputs and weights rotate
  over enough copies to exceed the L2 cache (256 MB), so bandwidth is HBM's. Contestants run
  interleaved, repetition by repetition (``common.interleaved``); medians are reported, ratios
  are paired medians of per-repetition ratios. Train rows (forward + backward for x, A, B; 512
  and 4096 tokens) run eagerly, timed by events around ``ITERS`` steps.
* Figures: TFLOP/s = 2·M·N·K (+ the low-rank work) / time; GB/s = the fewest bytes each call
  must move (weights, statistics, activations in and out, adapters) / time; both against the
  H200's datasheet peaks (dense bf16 989 TFLOP/s, HBM3e 4.8 TB/s; measured ceilings on this
  workplace's H200s were about 790 TFLOP/s and 4.3 TB/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from common import format_table, interleaved, median_ms, paired_ratio

PEAK_TFLOPS = 989.0  # H200 SXM dense bf16, datasheet
PEAK_GBS = 4800.0  # H200 HBM3e, datasheet
SHAPES = [(4096, 4096), (4096, 14336)]  # (in, out)
TOKENS = [1, 16, 512, 4096]
RANK, SCALE = 16, 2.0
ADAPTERS = 4  # mixed-batch rows
L2_BYTES = 256 * 2**20
TOLERANCE = 2e-2


@dataclass(frozen=True)
class Settings:
    shapes: Sequence[tuple[int, int]]
    tokens: Sequence[int]
    reps: int
    warmup: int


FULL = Settings(SHAPES, TOKENS, reps=15, warmup=2)
QUICK = Settings(SHAPES[:1], [1, 4096], reps=5, warmup=1)


@dataclass
class Row:
    op: str
    shape: str
    tokens: int
    fused_us: float
    unfused_us: float | None
    base_us: float | None
    paired: float | None  # median of per-repetition fused/unfused
    tflops: float
    gbs: float

    @property
    def overhead(self) -> float | None:
        """What the fused op costs beyond the plain base product."""
        return None if self.base_us is None else self.fused_us / self.base_us - 1


def format_rows(rows: Sequence[Row]) -> str:
    header = ["op", "shape", "tokens", "fused us", "unfused us", "fused/unfused", "base us",
              "over base", "TFLOP/s", "% peak", "GB/s", "% HBM"]  # fmt: skip

    def opt(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        [
            r.op,
            r.shape,
            str(r.tokens),
            f"{r.fused_us:.1f}",
            opt(r.unfused_us, ".1f"),
            opt(r.paired, ".3f"),
            opt(r.base_us, ".1f"),
            opt(None if r.overhead is None else 100 * r.overhead, "+.1f")
            + "%" * (r.overhead is not None),
            f"{r.tflops:.0f}",
            f"{100 * r.tflops / PEAK_TFLOPS:.0f}",
            f"{r.gbs:.0f}",
            f"{100 * r.gbs / PEAK_GBS:.0f}",
        ]
        for r in rows
    ]
    return format_table(header, lines)


# -- timing ------------------------------------------------------------------------------------


def graph_timer(step: Callable[[int], object], iters: int) -> Callable[[], float]:
    """Seconds per call of ``step(i)``, from replays of a CUDA graph of ``iters`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):  # compile, autotune and allocate outside the capture
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            step(i)

    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    return run


def eager_timer(step: Callable[[int], object], iters: int) -> Callable[[], float]:
    for i in range(2):
        step(i)

    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            step(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters

    return run


def iterations(flops: float) -> int:
    """Enough calls per replay to last about a millisecond at peak speed, at least 10."""
    return int(min(500, max(10, 1e-3 / (flops / (PEAK_TFLOPS * 1e12) + 2e-6))))


def copies(nbytes: int) -> int:
    return max(1, min(64, -(-L2_BYTES // max(nbytes, 1))))


# -- cases -------------------------------------------------------------------------------------


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    error = rel_error(out, ref)
    if not error <= TOLERANCE:
        raise SystemExit(f"{name}: fused output differs from the reference by {error:.3g}")


class Case:
    """One shape and token count: weights and inputs in ``count`` rotating copies."""

    def __init__(self, n_in: int, n_out: int, tokens: int, nf4: bool = False) -> None:
        self.n_in, self.n_out, self.tokens = n_in, n_out, tokens
        per_copy = (n_in * n_out) // (4 if nf4 else 1) * 2 + tokens * (n_in + n_out) * 2
        self.count = copies(per_copy)
        dev, bf16 = "cuda", torch.bfloat16

        def rand(*shape, scale=1.0):
            return torch.randn(*shape, device=dev, dtype=bf16) * scale

        self.x = [rand(tokens, n_in) for _ in range(self.count)]
        self.a = rand(RANK, n_in, scale=n_in**-0.5)
        self.b = rand(n_out, RANK, scale=RANK**-0.5)
        self.bias = rand(n_out)
        if not nf4:
            self.w = [rand(n_out, n_in, scale=n_in**-0.5) for _ in range(self.count)]

    @property
    def base_flops(self) -> float:
        return 2.0 * self.tokens * self.n_in * self.n_out

    @property
    def lora_flops(self) -> float:
        return self.base_flops + 2.0 * self.tokens * RANK * (self.n_in + self.n_out)

    def activation_bytes(self) -> int:
        return self.tokens * (self.n_in + self.n_out) * 2 + RANK * (self.n_in + self.n_out) * 2


def unfused_lora(x, w, bias, a, b):
    return F.linear(x, w, bias) + F.linear(F.linear(x, a) * SCALE, b)


def measure(name, case, fused, unfused, base, flops, nbytes, settings, train=False) -> Row:
    timer = eager_timer if train else graph_timer
    iters = iterations(flops)
    timers = {"fused": timer(fused, iters)}
    if unfused is not None:
        timers["unfused"] = timer(unfused, iters)
    if base is not None:
        timers["base"] = timer(base, iters)
    samples = interleaved(timers, settings.reps, settings.warmup)
    fused_s = median_ms(samples["fused"]) / 1e3
    return Row(
        op=name,
        shape=f"{case.n_in}x{case.n_out}",
        tokens=case.tokens,
        fused_us=fused_s * 1e6,
        unfused_us=median_ms(samples["unfused"]) * 1e3 if "unfused" in samples else None,
        base_us=median_ms(samples["base"]) * 1e3 if "base" in samples else None,
        paired=paired_ratio(samples["fused"], samples["unfused"]) if "unfused" in samples else None,
        tflops=flops / fused_s / 1e12,
        gbs=nbytes / fused_s / 1e9,
    )


def lora_rows(case: Case, settings: Settings) -> list[Row]:
    from surgeon import kernels
    from surgeon.kernels import reference

    x, w, n = case.x, case.w, case.count
    check("lora_linear", kernels.lora_linear(x[0], w[0], case.bias, case.a, case.b, SCALE),
          reference.lora_linear(x[0], w[0], case.bias, case.a, case.b, SCALE))  # fmt: skip
    weight_bytes = case.n_in * case.n_out * 2 + case.activation_bytes()
    rows = [
        measure(
            "lora fwd",
            case,
            lambda i: kernels.lora_linear(x[i % n], w[i % n], case.bias, case.a, case.b, SCALE),
            lambda i: unfused_lora(x[i % n], w[i % n], case.bias, case.a, case.b),
            lambda i: F.linear(x[i % n], w[i % n], case.bias),
            case.lora_flops,
            weight_bytes,
            settings,
        )
    ]
    if case.tokens >= 512:
        a, b = case.a.clone().requires_grad_(), case.b.clone().requires_grad_()
        xs = [t.clone().requires_grad_() for t in x[:2]]

        def train(forward):
            def step(i):
                out = forward(xs[i % 2], w[i % n], case.bias, a, b)
                torch.autograd.grad(out, [xs[i % 2], a, b], out)

            return step

        rows.append(
            measure(
                "lora fwd+bwd",
                case,
                train(lambda x_, w_, b_, a_, bb: kernels.lora_linear(x_, w_, b_, a_, bb, SCALE)),
                train(unfused_lora),
                None,
                2 * case.lora_flops,  # forward, and dx backward (the base weight is frozen)
                2 * weight_bytes,
                settings,
                train=True,
            )
        )
    return rows


def dora_row(case: Case, settings: Settings) -> Row:
    from surgeon import kernels
    from surgeon.kernels import reference

    x, w, n = case.x, case.w, case.count
    # magnitude and norm in the adapters' dtype, as the DoRA pass keeps them
    norm = (w[0].float() + SCALE * case.b.float() @ case.a.float()).norm(dim=1).to(torch.bfloat16)
    magnitude = norm * 1.1

    def unfused(i):
        factor = magnitude / norm
        low = F.linear(F.linear(x[i % n], case.a), case.b * (factor * SCALE)[:, None])
        return torch.addcmul(low, F.linear(x[i % n], w[i % n]), factor) + case.bias

    def fused(i):
        return kernels.dora_linear(
            x[i % n], w[i % n], case.bias, case.a, case.b, magnitude, norm, SCALE
        )

    check("dora_linear", fused(0),
          reference.dora_linear(x[0], w[0], case.bias, case.a, case.b, magnitude, norm, SCALE))  # fmt: skip
    weight_bytes = case.n_in * case.n_out * 2 + case.activation_bytes()
    return measure("dora fwd", case, fused, unfused, None, case.lora_flops, weight_bytes, settings)


def nf4_row(case: Case, settings: Settings) -> Row:
    from surgeon import kernels
    from surgeon.kernels import reference

    n_in, n_out, n = case.n_in, case.n_out, case.count
    block = 64
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = None
    if bnb is not None:
        states = [bnbf.quantize_4bit(torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * n_in**-0.5,
                                     blocksize=block, quant_type="nf4", compress_statistics=True)
                  for _ in range(n)]  # fmt: skip
        packed = [p for p, _ in states]
        absmax = [bnbf.dequantize_blockwise(s.absmax, s.state2) + s.offset for _, s in states]
        code = states[0][1].code.float()
    else:
        print("bitsandbytes is not installed: NF4 rows time surgeon alone, on random codes")
        packed = [torch.randint(0, 256, (n_out * n_in // 2, 1), device="cuda", dtype=torch.uint8)
                  for _ in range(n)]  # fmt: skip
        absmax = [torch.rand(n_out * n_in // block, device="cuda") * 0.1 for _ in range(n)]
        code = torch.linspace(-1, 1, 16, device="cuda")
    x = case.x

    def fused(i):
        return kernels.nf4_lora_linear(x[i % n], packed[i % n], absmax[i % n], code, [n_out, n_in],
                                       block, case.bias, case.a, case.b, SCALE)  # fmt: skip

    check("nf4_lora_linear", fused(0),
          reference.nf4_lora_linear(x[0], packed[0], absmax[0], code, [n_out, n_in], block,
                                    case.bias, case.a, case.b, SCALE))  # fmt: skip
    unfused = base = None
    if bnb is not None:

        def base(i):
            return bnb.matmul_4bit(
                x[i % n], packed[i % n].t(), quant_state=states[i % n][1], bias=case.bias
            )

        def unfused(i):
            return base(i) + F.linear(F.linear(x[i % n], case.a) * SCALE, case.b)

    nbytes = n_in * n_out // 2 + n_in * n_out // block * 4 + case.activation_bytes()
    return measure("nf4+lora fwd", case, fused, unfused, base, case.lora_flops, nbytes, settings)


def multi_row(case: Case, settings: Settings) -> Row:
    from surgeon import kernels
    from surgeon.kernels import reference

    x, w, n = case.x, case.w, case.count
    a_list = [case.a * (k + 1) for k in range(ADAPTERS)]
    b_list = [case.b for _ in range(ADAPTERS)]
    a, b = kernels.stack_adapters(a_list, b_list)
    scales = [SCALE] * ADAPTERS
    index = (torch.arange(case.tokens, device="cuda") * ADAPTERS // case.tokens).long()
    rows = [(index == k).nonzero().flatten() for k in range(ADAPTERS)]

    def fused(i):
        return kernels.multi_lora_linear(x[i % n], w[i % n], case.bias, a, b, scales, index)

    def unfused(i):
        out = F.linear(x[i % n], w[i % n], case.bias)
        for k in range(ADAPTERS):
            part = F.linear(F.linear(x[i % n][rows[k]], a_list[k]) * SCALE, b_list[k])
            out = out.index_add(0, rows[k], part)
        return out

    check("multi_lora_linear", fused(0),
          reference.multi_lora_linear(x[0], w[0], case.bias, a, b, scales, index))  # fmt: skip
    weight_bytes = case.n_in * case.n_out * 2 + case.activation_bytes()
    return measure(
        "multi-lora fwd", case, fused, unfused, None, case.lora_flops, weight_bytes, settings
    )


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape, 1 and 4096 tokens")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows here")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write a results page here")
    parser.add_argument(
        "--budget", type=float, metavar="SECONDS", help="start no new shape after this long"
    )
    return parser.parse_args(argv)


def require_gpu() -> None:
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device is visible to torch")
    try:
        import triton  # noqa: F401
    except ImportError:
        problems.append("triton is not installed")
    if problems:
        raise SystemExit(
            f"gpu_kernels.py times CUDA kernels and cannot run here: {'; '.join(problems)}. "
            f"Run it on a machine with an NVIDIA GPU (see the module docstring)."
        )


def machine_line() -> str:
    import triton

    props = torch.cuda.get_device_properties(0)
    return (
        f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )


def goals(rows: Sequence[Row]) -> list[str]:
    """The issue's goals, each with the measured figure and whether it holds (rows not measured
    are said so, never passed)."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    for shape in dict.fromkeys(r.shape for r in rows):
        lora = [r for r in rows if (r.op, r.shape, r.tokens) == ("lora fwd", shape, 4096)]
        if lora and lora[0].overhead is not None:
            over = lora[0].overhead
            lines.append(f"LoRA overhead over the base GEMM, {shape}, 4096 tokens: "
                         f"{100 * over:+.1f}% (goal <= +5%): {verdict(over <= 0.05)}")  # fmt: skip
        else:
            lines.append(f"LoRA overhead, {shape}, 4096 tokens: not measured")
        nf4 = [r for r in rows if (r.op, r.shape, r.tokens) == ("nf4+lora fwd", shape, 1)]
        if nf4 and nf4[0].paired is not None:
            speedup = 1 / nf4[0].paired
            lines.append(f"NF4+LoRA vs bitsandbytes+LoRA, {shape}, 1 token: {speedup:.2f}x "
                         f"(goal >= 1.5x): {verdict(speedup >= 1.5)}")  # fmt: skip
        else:
            lines.append(f"NF4+LoRA vs bitsandbytes, {shape}, 1 token: not measured")
        if nf4:
            share = nf4[0].gbs / PEAK_GBS
            lines.append(f"NF4+LoRA bandwidth, {shape}, 1 token: {100 * share:.0f}% of HBM "
                         f"(goal >= 70%): {verdict(share >= 0.7)}")  # fmt: skip
    return lines


def markdown(rows: Sequence[Row], machine: str, skipped: Sequence[str] = ()) -> str:
    date = datetime.date.today().isoformat()
    verdicts = "".join(f"- {line}\n" for line in goals(rows))
    left_out = f"\nNot measured in this run: {', '.join(skipped)}.\n" if skipped else ""
    return (
        f"# GPU kernel benchmark\n\nMeasured {date} on {machine} with "
        f"`python benchmarks/gpu_kernels.py`.\nPeaks: {PEAK_TFLOPS:.0f} TFLOP/s dense bf16, "
        f"{PEAK_GBS:.0f} GB/s HBM (datasheet).\n\n## Goals\n\n{verdicts}{left_out}\n"
        f"## All rows\n\n```\n{format_rows(rows)}\n```\n"
    )


def case_rows(n_in: int, n_out: int, tokens: int, settings: Settings) -> list[Row]:
    case = Case(n_in, n_out, tokens)
    rows = lora_rows(case, settings)
    rows.append(dora_row(case, settings))
    if tokens >= ADAPTERS:
        rows.append(multi_row(case, settings))
    del case
    rows.append(nf4_row(Case(n_in, n_out, tokens, nf4=True), settings))
    torch.cuda.empty_cache()
    return rows


def labels(cases: Sequence[tuple[int, int, int]]) -> list[str]:
    return [f"{n_in}x{n_out} at {tokens} tokens" for n_in, n_out, tokens in cases]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_gpu()
    settings = QUICK if args.quick else FULL
    torch.manual_seed(0)
    machine = machine_line()
    print(machine, flush=True)
    start = time.monotonic()
    rows: list[Row] = []
    cases = [(n_in, n_out, t) for n_in, n_out in settings.shapes for t in settings.tokens]
    for done, (n_in, n_out, tokens) in enumerate(cases):
        if args.budget is not None and time.monotonic() - start > args.budget:
            print(f"time budget of {args.budget:.0f} s spent; not measured: "
                  f"{', '.join(labels(cases[done:]))}")  # fmt: skip
            break
        new = case_rows(n_in, n_out, tokens, settings)
        rows += new
        print("\n".join(format_rows(new).splitlines()[2:]), flush=True)
        # written after every case: a run stopped early still leaves what it measured
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        if args.markdown:
            args.markdown.write_text(markdown(rows, machine, labels(cases[done + 1 :])))
    print()
    print(format_rows(rows))
    print("\n".join(goals(rows)))


if __name__ == "__main__":
    sys.exit(main())
