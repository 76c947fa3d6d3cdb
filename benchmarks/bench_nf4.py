"""NF4 storage and QLoRA training: surgeon vs bitsandbytes (and PEFT), in one process, interleaved.

Usage::

    python benchmarks/bench_nf4.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_nf4.py --quick    # smoke run, few repetitions
    python benchmarks/bench_nf4.py --json results.json

Every ratio is surgeon / bitsandbytes (or / PEFT + bitsandbytes): lower is better, 1.0 is parity.

Method
------
* Quantize: ``surgeon.quant.quantize_4bit(w, 64, "nf4", double_quant=True)`` against
  ``bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
  quant_type="nf4")`` on CPU tensors of the listed shapes and dtypes (seeded normal weights).
  Before timing, both outputs are checked byte for byte (packed codes, absmax, nested absmax,
  offset); the script aborts on any difference.
* Dequantize: the same 4-bit state back into float32 and bfloat16, surgeon's
  ``QuantState.dequantize`` against ``bitsandbytes.functional.dequantize_4bit`` (its CPU kernel;
  rows here are whole blocks, where that kernel is right), outputs checked equal first.
  Throughput is weights per second.
* QLoRA train step: a small Llama built from a config (hidden 256, 4 layers, 8 heads,
  intermediate 768, vocab 1000: every linear layer's input a multiple of 64), batch 4 x 32.
  PEFT's side: every linear layer but ``lm_head`` replaced by ``bitsandbytes.nn.Linear4bit``
  (NF4, blocks of 64, double quantization, the given compute dtype), then
  ``get_peft_model(LoraConfig(r=8, lora_alpha=16, target_modules=q,k,v,o_proj))``. surgeon's
  side: ``surgeon.compile(model, QLoRA(rank=8, alpha=16, quant=NF4(compute_dtype=...)))`` on the
  same base weights, LoRA weights copied from PEFT's (seeded noise added so the adapters are not
  the identity). Checked first: identical 4-bit bytes and, in float32, the same training-mode
  logits within 1e-4. A step is: train mode, forward, float32 cross-entropy on random labels,
  backward, AdamW step over the trainable parameters, zero_grad.
* Each repetition runs both contestants once, in an order rotating between repetitions; the
  ratio is the median of per-repetition ratios (both samples ran back to back). Warm-up first,
  garbage collector off while timing, torch's thread count as is.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    benchmark_parser,
    format_table,
    interleaved,
    machine,
    median_ms,
    paired_ratio,
    progress,
)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnb_functional  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import surgeon  # noqa: E402
from surgeon import quant  # noqa: E402

SHAPES = [(4096, 4096), (1000, 1030)]
DTYPES = [torch.float32, torch.bfloat16]
LLAMA = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 768,
    "vocab_size": 1000,
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ, SEED = 4, 32, 0


@dataclass(frozen=True)
class Reps:
    warmup: int
    kernels: int
    train: int


FULL = Reps(warmup=2, kernels=9, train=20)
QUICK = Reps(warmup=1, kernels=3, train=3)


def abort(message: str) -> None:
    print(f"ABORT: surgeon and bitsandbytes disagree: {message}", file=sys.stderr)
    sys.exit(1)


def timed(fn) -> Any:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


# -- quantize / dequantize -----------------------------------------------------------------------


def kernel_rows(reps: Reps) -> list[dict[str, Any]]:
    rows = []
    for shape in SHAPES:
        for dtype in DTYPES:
            w = (torch.randn(shape, generator=torch.Generator().manual_seed(SEED)) * 0.02).to(dtype)
            ours = quant.quantize_4bit(w, 64, "nf4", True)
            packed, state = bnb_functional.quantize_4bit(
                w, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            same = (
                torch.equal(ours.packed, packed.view(-1))
                and torch.equal(ours.absmax, state.absmax)
                and torch.equal(ours.nested_absmax, state.state2.absmax)
                and torch.equal(ours.offset, state.offset)
            )
            if not same:
                abort(f"quantized bytes of {shape} {dtype}")
            label = f"{shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
            samples = interleaved(
                {
                    "surgeon": timed(lambda w=w: quant.quantize_4bit(w, 64, "nf4", True)),
                    "bnb": timed(
                        lambda w=w: bnb_functional.quantize_4bit(
                            w, blocksize=64, compress_statistics=True, quant_type="nf4"
                        )
                    ),
                },
                reps.kernels,
                reps.warmup,
            )
            rows.append(_kernel_row("quantize", label, w.numel(), samples))
            out = dtype
            state.dtype = out
            if not torch.equal(ours.dequantize(out), bnb_functional.dequantize_4bit(packed, state)):
                abort(f"dequantized {shape} {dtype}")
            samples = interleaved(
                {
                    "surgeon": timed(lambda s=ours, d=out: s.dequantize(d)),
                    "bnb": timed(lambda p=packed, s=state: bnb_functional.dequantize_4bit(p, s)),
                },
                reps.kernels,
                reps.warmup,
            )
            rows.append(_kernel_row("dequantize", f"{label} out", w.numel(), samples))
            print(f"[{label}] done", flush=True)
    return rows


def _kernel_row(op: str, label: str, n: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    ours, theirs = median_ms(samples["surgeon"]), median_ms(samples["bnb"])
    return {
        "op": op,
        "case": label,
        "surgeon_ms": ours,
        "bnb_ms": theirs,
        "surgeon_mweights_s": n / ours / 1e3,
        "bnb_mweights_s": n / theirs / 1e3,
        "ratio": paired_ratio(samples["surgeon"], samples["bnb"]),
    }


# -- QLoRA train step -------------------------------------------------------------------------------


def small_llama(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    if state is not None:
        model.load_state_dict(state)
    return model


def peft_bnb(state: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> nn.Module:
    model = small_llama(state)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(),
                    requires_grad=False,
                    blocksize=64,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                setattr(module, name, layer.to("cpu"))
    model.is_loaded_in_4bit = True  # PEFT's switch for its bitsandbytes LoRA layers
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION)
    return peft.get_peft_model(model, config)


def qlora_pair(compute_dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    state = copy.deepcopy(small_llama().state_dict())
    theirs = peft_bnb(state, compute_dtype)
    name = str(compute_dtype).removeprefix("torch.")
    spec = surgeon.QLoRA(rank=8, alpha=16, quant=surgeon.NF4(compute_dtype=name))
    ours = surgeon.compile(small_llama(state), spec)
    gen = torch.Generator().manual_seed(SEED + 2)
    lora = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in lora.values():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.02)
        for path, layer in ours.store.items("default"):
            layer.lora_A.copy_(lora[f"base_model.model.{path}.lora_A.default.weight"])
            layer.lora_B.copy_(lora[f"base_model.model.{path}.lora_B.default.weight"])
    for path, layer in ours.model.named_modules():
        if quant.is_quantized(layer):
            other = theirs.base_model.model.get_submodule(path)
            other = getattr(other, "base_layer", other)
            if not torch.equal(layer.weight.view(-1), other.weight.view(-1)):
                abort(f"4-bit bytes of {path}")
    return ours, theirs


class TrainStep:
    def __init__(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.ids, self.labels = model, ids, labels
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4
        )

    def __call__(self) -> float:
        self.model.train()
        start = time.perf_counter()
        logits = self.model(input_ids=self.ids).logits.float()
        F.cross_entropy(logits.flatten(0, 1), self.labels.flatten()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def train_rows(reps: Reps) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(LLAMA["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = torch.randint(LLAMA["vocab_size"], (BATCH, SEQ), generator=gen)
    rows = []
    for compute_dtype in (torch.float32, torch.bfloat16):
        ours, theirs = qlora_pair(compute_dtype)
        if compute_dtype == torch.float32:
            ours.train()
            theirs.train()
            with torch.no_grad():
                a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
            if not torch.allclose(a, b, rtol=0, atol=1e-4):
                abort(f"QLoRA logits differ by {(a - b).abs().max().item():.3g}")
        samples = interleaved(
            {"surgeon": TrainStep(ours, ids, labels), "peft": TrainStep(theirs, ids, labels)},
            reps.train,
            reps.warmup,
        )
        rows.append(
            {
                "compute_dtype": str(compute_dtype).removeprefix("torch."),
                "surgeon_ms": median_ms(samples["surgeon"]),
                "peft_bnb_ms": median_ms(samples["peft"]),
                "ratio": paired_ratio(samples["surgeon"], samples["peft"]),
            }
        )
    return rows


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return benchmark_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reps = QUICK if args.quick else FULL
    start = time.perf_counter()
    kernels = progress("[quantize / dequantize]", kernel_rows, reps)
    train = progress("[QLoRA train step]", train_rows, reps)
    elapsed = time.perf_counter() - start
    print()
    print("NF4 (blocks of 64, double quantization) on the CPU; ratio = median paired surgeon / bnb")
    print(
        format_table(
            ["op", "case", "surgeon ms", "bnb ms", "surgeon Mw/s", "bnb Mw/s", "ratio"],
            [
                [
                    r["op"],
                    r["case"],
                    f"{r['surgeon_ms']:.1f}",
                    f"{r['bnb_ms']:.1f}",
                    f"{r['surgeon_mweights_s']:.0f}",
                    f"{r['bnb_mweights_s']:.0f}",
                    f"{r['ratio']:.2f}",
                ]
                for r in kernels
            ],
        )
    )
    print(f"QLoRA train step, batch {BATCH} x {SEQ}; ratio = surgeon / (PEFT + bitsandbytes)")
    print(
        format_table(
            ["compute dtype", "surgeon ms", "PEFT+bnb ms", "ratio"],
            [
                [
                    r["compute_dtype"],
                    f"{r['surgeon_ms']:.1f}",
                    f"{r['peft_bnb_ms']:.1f}",
                    f"{r['ratio']:.2f}",
                ]
                for r in train
            ],
        )
    )
    print(f"reps: {asdict(reps)}; total {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": machine(bitsandbytes=bnb.__version__, peft=peft.__version__, **asdict(reps)),
            "kernels": kernels,
            "train": train,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
