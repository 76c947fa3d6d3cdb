"""Training throughput: ``surgeon.train`` vs a plain PyTorch loop over PEFT's model, interleaved.

Usage::

    python benchmarks/bench_train.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/bench_train.py --quick    # smoke run, few repetitions
    python benchmarks/bench_train.py --json results.json

Method
------
* Models: the benchmarks' small Llama (see common.py) with the same seeded base weights three
  times; LoRA r=8, alpha=16 on ``q_proj, v_proj``; PEFT's adapter weights (``lora_B`` made
  random) are copied into surgeon's, so both train identical weights.
* Data: 64 samples of 64 random tokens (``input_ids``, ``attention_mask``, ``labels`` =
  ids), the same list for every contestant.
* Step: batch 4, 2 micro-batches of gradient accumulation, AdamW (lr 1e-4, weight decay 0.01),
  clipping at 1.0, linear schedule with 2 warmup steps; forward, loss, backward per micro-batch.
* Contestants, each timed over ``STEPS`` optimizer steps per repetition, repetitions
  interleaved in a rotating order (drift hits all alike), medians reported:
  - ``surgeon.train``: one ``surgeon.train(cm, samples, config)`` call of ``STEPS`` steps
    (progress bar off, logging every ``STEPS``); its set-up (optimizer, schedule, data order)
    is inside the timing, as a user pays it;
  - ``plain loop, PEFT``: ``torch.utils.data.DataLoader`` (shuffled, default collation) over
    the same samples, ``loss / accumulation`` backward, clip, ``optimizer.step()``,
    ``scheduler.step()``, ``zero_grad()`` on PEFT's model, the transformers idiom;
  - ``plain loop, surgeon model``: the same plain loop over surgeon's compiled model, which
    separates the loop's cost from the model's.
* Before timing, one step of ``surgeon.train`` and of the plain PEFT loop over the same
  unshuffled batches must give the same adapter weights (atol 1e-5) or the script aborts.
* Reported: steps per second, and ratios of steps per second (higher is better; 1.0 is parity).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    SMALL_LLAMA,
    base_state,
    format_table,
    interleaved,
    machine,
    paired_ratio,
    small_llama,  # sets HF_HUB_OFFLINE before transformers is imported
)

warnings.filterwarnings("ignore", category=FutureWarning)

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import surgeon  # noqa: E402

SEED = 0
SAMPLES, SEQ, BATCH, ACCUM = 64, 64, 4, 2
LR, WARMUP = 1e-4, 2
RANK, ALPHA = 8, 16
ATOL = 1e-5


@dataclass(frozen=True)
class Reps:
    warmup: int
    reps: int
    steps: int


FULL = Reps(warmup=1, reps=10, steps=4)
QUICK = Reps(warmup=1, reps=2, steps=2)


def samples() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(SMALL_LLAMA["vocab_size"], (SAMPLES, SEQ), generator=gen)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def contestants(state: dict[str, torch.Tensor]) -> tuple[surgeon.CompiledModel, peft.PeftModel]:
    cm = surgeon.compile(small_llama(state), surgeon.LoRA(rank=RANK, alpha=ALPHA))
    pm = peft.get_peft_model(
        small_llama(state),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]),
    )
    gen = torch.Generator().manual_seed(SEED + 2)
    theirs = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    with torch.no_grad():
        for path, layer in cm.store.items("default"):
            b = theirs[path].lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
            layer.lora_A.copy_(theirs[path].lora_A["default"].weight)
            layer.lora_B.copy_(b)
    return cm, pm


def config(steps: int, shuffle: bool = True) -> surgeon.TrainingConfig:
    return surgeon.TrainingConfig(
        learning_rate=LR,
        batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        warmup_steps=WARMUP,
        max_steps=steps,
        shuffle=shuffle,
        logging_steps=steps,
        progress=False,
        distributed="none",
    )


def plain_loop(model: torch.nn.Module, data: list[dict], steps: int, shuffle: bool = True) -> None:
    """The loop a transformers user writes by hand."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, steps)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=shuffle)
    model.train()
    batches = iter(loader)
    for _ in range(steps):
        for _ in range(ACCUM):
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            (model(**batch).loss / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def check_equivalent(state: dict[str, torch.Tensor], data: list[dict]) -> None:
    cm, pm = contestants(state)
    surgeon.train(cm, data, config(1, shuffle=False))
    plain_loop(pm, data, 1, shuffle=False)
    theirs = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    for path, layer in cm.store.items("default"):
        for ours, other in (
            (layer.lora_A, theirs[path].lora_A["default"].weight),
            (layer.lora_B, theirs[path].lora_B["default"].weight),
        ):
            if not torch.allclose(ours, other, atol=ATOL):
                print(f"ABORT: adapters differ after one step at {path}", file=sys.stderr)
                sys.exit(1)
    print(f"equivalent: one step gives the same adapter weights (atol {ATOL})", flush=True)


def timer(run) -> callable:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return timed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run with few repetitions")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    reps = QUICK if args.quick else FULL
    info = machine(peft=peft.__version__)
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    started = time.perf_counter()
    state, data = base_state(SEED), samples()
    check_equivalent(state, data)
    cm, pm = contestants(state)
    cm_plain, _ = contestants(state)
    n = reps.steps
    timers = {
        "surgeon.train": timer(lambda: surgeon.train(cm, data, config(n))),
        "plain loop, PEFT": timer(lambda: plain_loop(pm, data, n)),
        "plain loop, surgeon model": timer(lambda: plain_loop(cm_plain, data, n)),
    }
    samples_s = interleaved(timers, reps.reps, reps.warmup)
    rate = {k: n / statistics.median(v) for k, v in samples_s.items()}
    peft_key = "plain loop, PEFT"
    rows = [
        (
            name,
            f"{rate[name]:.3f}",
            f"{rate[name] / rate[peft_key]:.3f}",
            f"{paired_ratio(samples_s[peft_key], samples_s[name]):.3f}",
        )
        for name in timers
    ]
    print()
    print(format_table(("contestant", "steps/s", "vs PEFT loop", "paired"), rows))
    print(
        f"one step = {ACCUM} micro-batches of {BATCH} x {SEQ} tokens; ratio = steps/s over the "
        f"plain PEFT loop's (higher is better); paired = median of per-repetition ratios"
    )
    elapsed = time.perf_counter() - started
    print(f"total runtime: {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": info,
            "reps": asdict(reps),
            "steps_per_second": rate,
            "ratio_vs_peft_loop": {k: rate[k] / rate[peft_key] for k in rate},
            "total_seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
