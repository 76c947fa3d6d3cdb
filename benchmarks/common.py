"""Shared by the benchmarks: the small Llama they run, interleaved timing, machine info, tables.

Import it from a benchmark script run as ``python benchmarks/<name>.py`` (the script's folder is
on ``sys.path``). Importing it sets ``HF_HUB_OFFLINE`` and a quiet ``TRANSFORMERS_VERBOSITY``
unless they are set already, so import it before ``transformers``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SMALL_LLAMA = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 688,
    "vocab_size": 1000,
}
"""A Llama small enough to time on a laptop CPU; built from a config, no downloads."""

Timer = Callable[[], float]


def small_llama(
    state: dict[str, torch.Tensor] | None = None, layers: int | None = None
) -> nn.Module:
    """The benchmarks' small Llama (``SMALL_LLAMA``), in eval mode, optionally with given weights
    or another number of layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {**SMALL_LLAMA, "num_hidden_layers": layers or SMALL_LLAMA["num_hidden_layers"]}
    model = LlamaForCausalLM(LlamaConfig(**config))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def base_state(seed: int) -> dict[str, torch.Tensor]:
    """Seeded base weights, so every contestant starts from the same model."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in small_llama().state_dict().items()}


def make_inputs(batch: int, seq: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Seeded token ids (with an all-ones attention mask) and next-token labels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = SMALL_LLAMA["vocab_size"]
    ids = torch.randint(vocab, (batch, seq), generator=gen)
    labels = torch.randint(vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


"""Runs one repetition and returns the seconds it measured."""


# -- timing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect once, then keep Python's garbage collector off for the block (as ``timeit`` does)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def interleaved(timers: dict[str, Timer], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run every timer once per repetition, rotating the order; return each one's samples."""
    names = list(timers)
    for _ in range(warmup):
        for name in names:
            timers[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    with gc_paused():
        for i in range(reps):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(timers[name]())
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median of per-repetition ratios: both samples of a pair ran back to back."""
    return statistics.median(a / b for a, b in zip(ours, theirs))


def forward_timer(model: nn.Module, inputs: dict[str, Any]) -> Timer:
    """Times ``model(**inputs)`` under ``torch.no_grad()``."""

    def run() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model(**inputs)
            return time.perf_counter() - start

    return run


def progress(what: str, measure: Callable[..., Any], *args: Any) -> Any:
    """``measure(*args)``, then print how long it took."""
    start = time.perf_counter()
    result = measure(*args)
    print(f"{what} done in {time.perf_counter() - start:.1f} s", flush=True)
    return result


# -- reporting ---------------------------------------------------------------------------------


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(**versions: Any) -> dict[str, Any]:
    """CPU, platform, torch's thread count and the versions of torch, transformers and surgeon,
    plus ``versions`` (other packages, settings) as given."""
    import transformers

    import surgeon

    return {
        "cpu": cpu_name(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "surgeon": surgeon.__version__,
        **versions,
    }


def format_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Plain-text table: the first column left-aligned, the others right-aligned, rules around."""
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines), rule])


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (``--quick``, ``--json``); a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with few repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    return parser


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int, noise: float) -> None:
    """Add seeded Gaussian noise to the trainable parameters: adapters that start at zero
    would make any two implementations agree trivially."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * noise)


PEFT_PREFIX = "base_model.model."


def peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module path (relative to the wrapped model) -> PEFT LoRA layer."""
    import peft

    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


@torch.no_grad()
def share_lora_weights(peft_model: nn.Module, cm: Any, seed: int, noise: float = 0.02) -> None:
    """Give PEFT's lora_B seeded random values (B starts at zero: the adapters would be a no-op),
    then copy PEFT's A and B into surgeon's ``default`` adapter: both run identical weights."""
    theirs = peft_lora_layers(peft_model)
    gen = torch.Generator().manual_seed(seed)
    for path, layer in cm.store.items("default"):
        b = theirs[path].lora_B["default"].weight
        b.copy_(torch.randn(b.shape, generator=gen) * noise)
        layer.lora_A.copy_(theirs[path].lora_A["default"].weight)
        layer.lora_B.copy_(b)


# -- surgeon and PEFT side by side, one row per method -----------------------------------------


@dataclass(frozen=True)
class Reps:
    warmup: int
    forward: int
    train: int


@dataclass
class Row:
    method: str
    fwd_surgeon_ms: float
    fwd_peft_ms: float
    fwd_ratio: float
    train_surgeon_ms: float
    train_peft_ms: float
    train_ratio: float


Loss = Callable[[nn.Module, dict[str, Any], torch.Tensor], torch.Tensor]
"""(model, inputs, labels) -> the loss a train step backpropagates."""


class TrainStep:
    """forward + loss + backward + AdamW step on one model's trainable parameters."""

    def __init__(self, model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, loss: Loss):
        self.model, self.inputs, self.labels, self.loss = model, inputs, labels, loss
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4
        )

    def __call__(self) -> float:
        self.model.train()
        start = time.perf_counter()
        self.loss(self.model, self.inputs, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.model.eval()
        return elapsed


def method_row(
    name: str,
    ours: nn.Module,
    theirs: nn.Module,
    inputs: dict[str, Any],
    labels: torch.Tensor,
    reps: Reps,
    loss: Loss,
) -> Row:
    """Forward and train step of surgeon's and PEFT's model, interleaved; medians and ratios."""
    fwd = interleaved(
        {"surgeon": forward_timer(ours, inputs), "peft": forward_timer(theirs, inputs)},
        reps.forward,
        reps.warmup,
    )
    train = interleaved(
        {
            "surgeon": TrainStep(ours, inputs, labels, loss),
            "peft": TrainStep(theirs, inputs, labels, loss),
        },
        reps.train,
        reps.warmup,
    )
    return Row(
        name,
        median_ms(fwd["surgeon"]),
        median_ms(fwd["peft"]),
        paired_ratio(fwd["surgeon"], fwd["peft"]),
        median_ms(train["surgeon"]),
        median_ms(train["peft"]),
        paired_ratio(train["surgeon"], train["peft"]),
    )


def rows_table(rows: Sequence[Row]) -> str:
    header = ["method", "fwd surgeon ms", "fwd peft ms", "ratio"]
    header += ["train surgeon ms", "train peft ms", "ratio"]
    lines = [
        [
            r.method,
            f"{r.fwd_surgeon_ms:.2f}",
            f"{r.fwd_peft_ms:.2f}",
            f"{r.fwd_ratio:.2f}",
            f"{r.train_surgeon_ms:.2f}",
            f"{r.train_peft_ms:.2f}",
            f"{r.train_ratio:.2f}",
        ]
        for r in rows
    ]
    return format_table(header, lines)
