"""LoRA side by side: surgeon vs PEFT, in one process, interleaved.

Usage::

    python benchmarks/bench_lora.py            # full run (about 1-2 minutes on 2 CPU cores)
    python benchmarks/bench_lora.py --quick    # smoke run, few repetitions
    python benchmarks/bench_lora.py --json results.json

Every ratio is surgeon / PEFT: lower is better, 1.0 is parity (goal <= 1.0, aim 0.8).

Method
------
* Models. A small Llama built from a config (hidden 256, 4 layers, 8 heads, intermediate 688,
  vocab 1000; no downloads) is created once with a fixed seed; surgeon, PEFT and a plain reference
  model each get a fresh instance loaded from the same state dict. LoRA r=8, alpha=16, no dropout,
  on ``q_proj, v_proj`` and, in a second row, on ``all-linear``. PEFT's ``lora_B`` is set to small
  random values (so the adapters are not a no-op) and both factors of every PEFT layer are copied
  into surgeon's: both sides run identical weights on identical inputs (batch 4, seq 64).
* Equivalence, checked before any timing (the script aborts on failure): same targeted layers,
  same trainable-parameter count, same logits (eval, ``no_grad``) and same adapter gradients after
  one backward, each within atol 1e-5.
* Latency. Each repetition runs every contestant once, in an order that rotates from repetition
  to repetition, so drift (thermal, other processes) hits all of them equally; the reported value
  is the median over repetitions ("ratio" = ratio of the medians; "paired" = median of the
  per-repetition ratios, whose two samples ran back to back, so it is the less drift-sensitive
  of the two). Warm-up calls come first; Python's garbage collector runs once and is then
  disabled inside each timed loop (as ``timeit`` does). ``torch``'s thread count is left as is.
  - forward: ``model(**inputs)`` in eval mode under ``torch.no_grad()``, adapters unmerged. The
    plain model (no adapters) runs in the same rotation; the "overhead" column is
    (surgeon - plain) / (PEFT - plain), the ratio of the time the adapters add. A second
    forward row uses a single token (batch 1, seq 1), where Python dispatch dominates.
  - train step: train mode, forward, cross-entropy on random labels (logits in float32),
    backward, ``torch.optim.AdamW`` step over the trainable parameters, ``zero_grad``.
* Training memory, counted rather than sampled (tracemalloc does not see torch's allocations and
  RSS deltas are allocator noise at this size): the bytes of distinct tensor storages that
  autograd saves for backward during the train-step forward (``saved_tensors_hooks``; storages
  that belong to parameters or buffers are not counted, a storage saved twice counts once), plus
  parameters and buffers, gradients of the trainable parameters and AdamW's state. That is what
  is resident when backward starts, plus the gradients: an estimate of the step's peak that
  leaves out short-lived temporaries. The identical count runs on both sides.
* Compile time on a Llama-7B-shaped model (``LlamaConfig()`` defaults) built on the meta device:
  ``surgeon.compile(model, spec)`` vs ``peft.get_peft_model(model, config)``, each on a fresh
  meta model (building it is not timed), in rotation, medians. PEFT works on meta models both
  with its default and with ``low_cpu_mem_usage=True`` (which skips initialising the adapter
  weights); both are timed and each gets its own row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from common import (
    SMALL_LLAMA,
    Timer,
    base_state,
    benchmark_parser,
    cpu_name,
    forward_timer,
    interleaved,
    make_inputs,
    median_ms,
    paired_ratio,
    peft_lora_layers,
    progress,
    share_lora_weights,
    small_llama,  # sets HF_HUB_OFFLINE before transformers is imported
)

warnings.filterwarnings("ignore", category=FutureWarning)

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import surgeon  # noqa: E402

BATCH, SEQ = 4, 64
RANK, ALPHA = 8, 16
SEED = 0
ATOL = 1e-5
TARGET_SETS: dict[str, tuple[str, ...] | str] = {
    "q,v": ("q_proj", "v_proj"),
    "all-linear": "all-linear",
}
COMPILE_TARGETS = ("q_proj", "v_proj")

"""Runs one repetition and returns the seconds it measured."""


@dataclass(frozen=True)
class Reps:
    warmup: int
    forward: int
    train: int
    compile: int


FULL = Reps(warmup=10, forward=200, train=60, compile=15)
QUICK = Reps(warmup=2, forward=10, train=5, compile=3)


@dataclass
class Row:
    """One line of the results table."""

    metric: str
    unit: str
    surgeon: float
    peft: float
    paired: float | None = None  # median over repetitions of surgeon_i / peft_i
    plain: float | None = None  # the model without adapters, forward rows only

    @property
    def ratio(self) -> float:
        return self.surgeon / self.peft

    @property
    def overhead(self) -> float | None:
        """(surgeon - plain) / (peft - plain): the ratio of the time the adapters add."""
        if self.plain is None or self.peft <= self.plain:
            return None
        return (self.surgeon - self.plain) / (self.peft - self.plain)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "overhead": self.overhead}


@dataclass
class Contestants:
    """The same base weights three times: with surgeon's adapters, with PEFT's, and plain."""

    surgeon: surgeon.CompiledModel
    peft: peft.PeftModel
    plain: nn.Module


# -- models and inputs -------------------------------------------------------------------------


def peft_targets(targets: tuple[str, ...] | str) -> list[str] | str:
    return list(targets) if isinstance(targets, tuple) else targets


def make_contestants(state: dict[str, torch.Tensor], targets: tuple[str, ...] | str) -> Contestants:
    spec = surgeon.LoRA(rank=RANK, alpha=ALPHA, targets=targets)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=peft_targets(targets))
    pair = Contestants(
        surgeon=surgeon.compile(small_llama(state), spec),
        peft=peft.get_peft_model(small_llama(state), config),
        plain=small_llama(state),
    )
    share_adapter_weights(pair)
    for model in (pair.surgeon, pair.peft, pair.plain):
        model.eval()
    return pair


@torch.no_grad()
def share_adapter_weights(pair: Contestants) -> None:
    """Give PEFT's lora_B random values, then copy PEFT's A and B into surgeon's layers."""
    ours = dict(pair.surgeon.store.items("default"))
    theirs = peft_lora_layers(pair.peft)
    if set(ours) != set(theirs):
        abort(
            f"targeted layers differ: surgeon-only {set(ours) - set(theirs)}, "
            f"PEFT-only {set(theirs) - set(ours)}"
        )
    share_lora_weights(pair.peft, pair.surgeon, SEED + 2)


# -- equivalence -------------------------------------------------------------------------------


def abort(message: str) -> None:
    print(f"ABORT: surgeon and PEFT disagree: {message}", file=sys.stderr)
    sys.exit(1)


def lm_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def check_equivalent(
    pair: Contestants, inputs: dict[str, torch.Tensor], labels: torch.Tensor, label: str
) -> None:
    """Same trainable count, logits and adapter gradients, or abort."""
    if pair.surgeon.num_trainable() != count_trainable(pair.peft):
        abort(
            f"[{label}] trainable parameters {pair.surgeon.num_trainable()} vs "
            f"{count_trainable(pair.peft)}"
        )
    with torch.no_grad():
        ours, theirs = pair.surgeon(**inputs).logits, pair.peft(**inputs).logits
    if not torch.allclose(ours, theirs, rtol=0, atol=ATOL):
        abort(f"[{label}] logits differ by up to {(ours - theirs).abs().max().item():.3g}")
    lm_loss(pair.surgeon, inputs, labels).backward()
    lm_loss(pair.peft, inputs, labels).backward()
    peft_layers = peft_lora_layers(pair.peft)
    for path, layer in pair.surgeon.store.items("default"):
        other = peft_layers[path]
        for mine, their in (
            (layer.lora_A, other.lora_A["default"].weight),
            (layer.lora_B, other.lora_B["default"].weight),
        ):
            if not torch.allclose(mine.grad, their.grad, rtol=0, atol=ATOL):
                abort(f"[{label}] gradients of {path} differ")
    for model in (pair.surgeon, pair.peft):
        model.zero_grad(set_to_none=True)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- timing ------------------------------------------------------------------------------------


class TrainStep:
    """forward + cross-entropy + backward + AdamW step on one model's trainable parameters."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        self.model = model.train()
        self.inputs = inputs
        self.labels = labels
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def __call__(self) -> float:
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start

    def step(self) -> None:
        lm_loss(self.model, self.inputs, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def forward_row(pair: Contestants, inputs: dict[str, torch.Tensor], reps: Reps, label: str) -> Row:
    timers = {
        "surgeon": forward_timer(pair.surgeon, inputs),
        "peft": forward_timer(pair.peft, inputs),
        "plain": forward_timer(pair.plain, inputs),
    }
    samples = interleaved(timers, reps.forward, reps.warmup)
    ms = {k: median_ms(v) for k, v in samples.items()}
    paired = paired_ratio(samples["surgeon"], samples["peft"])
    return Row(f"forward, eval, {label}", "ms", ms["surgeon"], ms["peft"], paired, ms["plain"])


def train_rows(
    pair: Contestants, inputs: dict[str, torch.Tensor], labels: torch.Tensor, reps: Reps, label: str
) -> list[Row]:
    steps = {
        "surgeon": TrainStep(pair.surgeon, inputs, labels),
        "peft": TrainStep(pair.peft, inputs, labels),
    }
    samples = interleaved(steps, reps.train, reps.warmup)
    ms = {k: median_ms(v) for k, v in samples.items()}
    paired = paired_ratio(samples["surgeon"], samples["peft"])
    memory = {k: train_memory(step) for k, step in steps.items()}
    return [
        Row(f"train step, {label}", "ms", ms["surgeon"], ms["peft"], paired),
        Row(f"train memory, {label}", "MiB", memory["surgeon"].total, memory["peft"].total),
        Row(
            f"  of which saved activations, {label}",
            "MiB",
            memory["surgeon"].activations,
            memory["peft"].activations,
        ),
    ]


def target_set_rows(
    state: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    reps: Reps,
    label: str,
    targets: tuple[str, ...] | str,
) -> list[Row]:
    """Check equivalence, then time forward and train step and count memory for one target set."""
    pair = make_contestants(state, targets)
    check_equivalent(pair, inputs, labels, label)
    print(f"[{label}] equivalent: logits and adapter gradients within atol {ATOL}", flush=True)
    forward = progress(f"[{label}] forward", forward_row, pair, inputs, reps, label)
    one_token = {k: v[:1, :1] for k, v in inputs.items()}
    dispatch = progress(
        f"[{label}] forward 1x1", forward_row, pair, one_token, reps, f"{label}, 1x1 tokens"
    )
    train = progress(f"[{label}] train", train_rows, pair, inputs, labels, reps, label)
    return [forward, dispatch, *train]


# -- memory ------------------------------------------------------------------------------------


@dataclass
class Memory:
    activations: float  # MiB
    total: float  # MiB


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def distinct_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    return sum(n for _, n in {storage_key(t) for t in tensors})


def saved_activation_bytes(step: TrainStep) -> int:
    """Bytes of distinct non-parameter storages autograd saves during one forward."""
    model = step.model
    owned = {storage_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr, nbytes = storage_key(t)
        if ptr not in owned:
            saved[ptr] = max(saved.get(ptr, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, step.inputs, step.labels)
    total = sum(saved.values())
    del loss
    return total


def train_memory(step: TrainStep) -> Memory:
    """Saved activations + parameters/buffers + gradients + AdamW state, in MiB."""
    step.step()  # make sure the optimizer state exists
    activations = saved_activation_bytes(step)
    model = step.model
    weights = distinct_bytes([*model.parameters(), *model.buffers()])
    grads = sum(p.numel() * p.element_size() for p in step.params)
    state = distinct_bytes(
        [v for s in step.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    )
    mib = 2.0**20
    return Memory(activations / mib, (activations + weights + grads + state) / mib)


# -- compile time ------------------------------------------------------------------------------


def meta_llama_7b() -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig())


def compile_timer(apply: Callable[[nn.Module], nn.Module]) -> Timer:
    """Time ``apply`` on a fresh meta 7B model (building and freeing it is not timed)."""

    def run() -> float:
        model = meta_llama_7b()
        start = time.perf_counter()
        result = apply(model)
        elapsed = time.perf_counter() - start
        del result, model
        gc.collect()
        return elapsed

    return run


def compile_rows(reps: Reps, label: str = "q,v") -> list[Row]:
    spec = surgeon.LoRA(rank=RANK, alpha=ALPHA, targets=COMPILE_TARGETS)

    def config() -> peft.LoraConfig:
        return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(COMPILE_TARGETS))

    timers = {
        "surgeon": compile_timer(lambda m: surgeon.compile(m, spec)),
        "peft": compile_timer(lambda m: peft.get_peft_model(m, config())),
        "peft_low_mem": compile_timer(
            lambda m: peft.get_peft_model(m, config(), low_cpu_mem_usage=True)
        ),
    }
    samples = interleaved(timers, reps.compile, warmup=1)
    ms = {k: median_ms(v) for k, v in samples.items()}
    return [
        Row(
            f"compile 7B meta, {label} (PEFT {variant})",
            "ms",
            ms["surgeon"],
            ms[key],
            paired_ratio(samples["surgeon"], samples[key]),
        )
        for key, variant in (("peft", "default"), ("peft_low_mem", "low_cpu_mem"))
    ]


# -- reporting ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "surgeon": surgeon.__version__,
    }


def format_table(rows: list[Row]) -> str:
    header = ("metric", "unit", "surgeon", "peft", "ratio", "paired", "plain", "overhead")
    lines = [
        (
            r.metric,
            r.unit,
            f"{r.surgeon:.3f}",
            f"{r.peft:.3f}",
            f"{r.ratio:.3f}",
            "" if r.paired is None else f"{r.paired:.3f}",
            "" if r.plain is None else f"{r.plain:.3f}",
            "" if r.overhead is None else f"{r.overhead:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines), rule])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return benchmark_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reps = QUICK if args.quick else FULL
    started = time.perf_counter()
    info = machine()
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"reps: {asdict(reps)}; ratio = surgeon / peft (lower is better)", flush=True)

    state = base_state(SEED)
    inputs, labels = make_inputs(BATCH, SEQ, SEED + 1)
    rows: list[Row] = []
    for label, targets in TARGET_SETS.items():
        rows.extend(target_set_rows(state, inputs, labels, reps, label, targets))
    rows.extend(progress("[compile 7B meta]", compile_rows, reps))

    elapsed = time.perf_counter() - started
    print()
    print(format_table(rows))
    print("ratio = median(surgeon) / median(peft); paired = median of per-repetition ratios")
    print(
        "overhead = (surgeon - plain model) / (peft - plain model): forward time added by adapters"
    )
    print(f"total runtime: {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": info,
            "reps": asdict(reps),
            "settings": {
                "llama": SMALL_LLAMA,
                "batch": BATCH,
                "seq": SEQ,
                "rank": RANK,
                "alpha": ALPHA,
            },
            "rows": [r.as_dict() for r in rows],
            "total_seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
