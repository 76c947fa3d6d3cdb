"""Every adapter method side by side: surgeon vs PEFT, in one process, interleaved.

Usage::

    python benchmarks/bench_methods.py            # full run (about 1-2 minutes on 2 CPU cores)
    python benchmarks/bench_methods.py --quick    # smoke run, few repetitions
    python benchmarks/bench_methods.py --json results.json

Every ratio is surgeon / PEFT: lower is better, 1.0 is parity.

Method
------
* Models. A small Llama built from a config (``common.SMALL_LLAMA``: hidden 256, 4 layers,
  8 heads, intermediate 688, vocab 1000; no downloads) is created once with a fixed seed; every
  model below is a fresh instance loaded from that state dict. Inputs: batch 4, sequence 32.
* Methods (targets ``q_proj, v_proj`` unless noted), PEFT config first:
  - LoRA: ``LoraConfig(r=8, lora_alpha=16)``, loaded by surgeon as ``LoRA(rank=8, alpha=16)``;
  - DoRA: the same with ``use_dora=True`` (surgeon: ``DoRA(rank=8, alpha=16)``);
  - LoHa: ``LoHaConfig(r=8, alpha=16)`` (``LoHa(rank=8, alpha=16)``);
  - LoKr: ``LoKrConfig(r=8, alpha=16)`` (``LoKr(rank=8, alpha=16)``);
  - IA3: ``IA3Config`` on ``k_proj, v_proj, down_proj``, ``down_proj`` feed-forward;
  - VeRA: ``VeraConfig(r=64)`` (``VeRA(rank=64)``);
  - AdaLoRA: ``AdaLoraConfig(init_r=12, target_r=8, total_step=100)``. Only forward and the
    plain train step are timed: no rank allocation (``update_and_allocate``) runs on either
    side, and PEFT's orthogonal regulariser is not added (the loss is computed outside the
    model, from the logits).
* Same weights on both sides: PEFT builds its model (``get_peft_model``), every trainable
  parameter gets seeded Gaussian noise (std 0.02) added so the adapters are not the identity,
  the adapter is written with ``save_pretrained`` and surgeon reads it back with
  ``surgeon.load`` onto a fresh model with the same base weights.
* Equivalence, checked before any timing (the script aborts on failure): same logits (eval,
  ``no_grad``) within atol 1e-4, and the adapters move the logits by more than that.
* Latency. Each repetition runs both contestants once, in an order that rotates from repetition
  to repetition; the reported value is the median over repetitions ("ratio" = median of the
  per-repetition surgeon / PEFT ratios, whose two samples ran back to back). Warm-up calls come
  first; the garbage collector is off inside each timed loop. ``torch``'s thread count is left
  as is.
  - forward: ``model(**inputs)`` in eval mode under ``torch.no_grad()``, adapters unmerged.
  - train step: train mode, forward, cross-entropy on random labels (logits in float32),
    backward, ``torch.optim.AdamW`` step over the trainable parameters, ``zero_grad``.
* DoRA vs LoRA: a last interleaved rotation times the unmerged forward of surgeon's LoRA and
  DoRA models and PEFT's LoRA and DoRA models (the same four as above); it reports DoRA / LoRA
  within each library (goal: surgeon's at most 1.3).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from common import (
    Reps,
    Row,
    base_state,
    benchmark_parser,
    forward_timer,
    interleaved,
    machine,
    make_inputs,
    median_ms,
    method_row,
    paired_ratio,
    perturb_trainable,
    progress,
    rows_table,
    small_llama,
)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import surgeon  # noqa: E402

BATCH, SEQ = 4, 32
SEED = 0
ATOL = 1e-4
NOISE = 0.02
QV = ["q_proj", "v_proj"]
IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]


FULL = Reps(warmup=5, forward=150, train=50)
QUICK = Reps(warmup=1, forward=5, train=3)

METHODS: dict[str, Callable[[], peft.PeftConfig]] = {
    "LoRA": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV),
    "DoRA": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV, use_dora=True),
    "LoHa": lambda: peft.LoHaConfig(r=8, alpha=16, target_modules=QV),
    "LoKr": lambda: peft.LoKrConfig(r=8, alpha=16, target_modules=QV),
    "IA3": lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down_proj"]),
    "VeRA": lambda: peft.VeraConfig(r=64, target_modules=QV),
    "AdaLoRA": lambda: peft.AdaLoraConfig(init_r=12, target_r=8, total_step=100, target_modules=QV),
}
"""Method -> PEFT config; surgeon's side is whatever ``surgeon.load`` reads from its save."""


# -- models and inputs -------------------------------------------------------------------------


def make_pair(
    state: dict[str, torch.Tensor], config: peft.PeftConfig
) -> tuple[surgeon.CompiledModel, peft.PeftModel]:
    """PEFT's model with perturbed adapters, and surgeon's model loaded from PEFT's save."""
    theirs = peft.get_peft_model(small_llama(state), config)
    perturb_trainable(theirs, SEED + 2, NOISE)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = surgeon.load(small_llama(state), tmp)
    return ours.eval(), theirs.eval()


# -- equivalence -------------------------------------------------------------------------------


def abort(message: str) -> None:
    print(f"ABORT: surgeon and PEFT disagree: {message}", file=sys.stderr)
    sys.exit(1)


def check_equivalent(
    ours: nn.Module, theirs: nn.Module, plain: nn.Module, inputs: dict[str, Any], label: str
) -> None:
    with torch.no_grad():
        a, b, base = ours(**inputs).logits, theirs(**inputs).logits, plain(**inputs).logits
    if not torch.allclose(a, b, rtol=0, atol=ATOL):
        abort(f"[{label}] logits differ by up to {(a - b).abs().max().item():.3g}")
    moved = (b - base).abs().max().item()
    if moved <= ATOL:
        abort(f"[{label}] the adapters move the logits by only {moved:.3g}")
    print(f"[{label}] equivalent: logits within atol {ATOL} (adapters move them by {moved:.3g})")


# -- timing ------------------------------------------------------------------------------------


def lm_loss(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def dora_vs_lora(
    models: dict[str, nn.Module], inputs: dict[str, Any], reps: Reps
) -> dict[str, float]:
    """DoRA / LoRA unmerged forward within each library, all four in one rotation."""
    samples = interleaved(
        {k: forward_timer(m, inputs) for k, m in models.items()}, reps.forward, reps.warmup
    )
    return {
        "surgeon": paired_ratio(samples["surgeon DoRA"], samples["surgeon LoRA"]),
        "peft": paired_ratio(samples["peft DoRA"], samples["peft LoRA"]),
        **{f"{k} ms": median_ms(v) for k, v in samples.items()},
    }


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return benchmark_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reps = QUICK if args.quick else FULL
    start = time.perf_counter()
    state = base_state(SEED)
    inputs, labels = make_inputs(BATCH, SEQ, SEED + 1)
    plain = small_llama(state)
    rows: list[Row] = []
    kept: dict[str, nn.Module] = {}
    for name, config in METHODS.items():
        ours, theirs = make_pair(state, config())
        check_equivalent(ours, theirs, plain, inputs, name)
        rows.append(
            progress(f"[{name}]", method_row, name, ours, theirs, inputs, labels, reps, lm_loss)
        )
        if name in ("LoRA", "DoRA"):
            kept[f"surgeon {name}"], kept[f"peft {name}"] = ours, theirs
    dora = progress("[DoRA vs LoRA]", dora_vs_lora, kept, inputs, reps)
    elapsed = time.perf_counter() - start

    print()
    print(f"surgeon vs PEFT, batch {BATCH}, seq {SEQ}, ratio = median paired surgeon / PEFT")
    print(rows_table(rows))
    print(
        f"DoRA / LoRA unmerged forward: surgeon {dora['surgeon']:.2f} (goal <= 1.3), "
        f"PEFT {dora['peft']:.2f}"
    )
    print("AdaLoRA: forward and plain train step only; no rank allocation on either side.")
    print(f"reps: {asdict(reps)}; total {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": machine(peft=peft.__version__, batch=BATCH, seq=SEQ, **asdict(reps)),
            "rows": [asdict(r) for r in rows],
            "dora_vs_lora": dora,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
