"""Training throughput: ``surgeon.train`` vs a plain PyTorch loop over PEFT's model, interleaved.

Usage::

    python benchmarks/bench_train.py            # full run (about a minute on 2 idle CPU cores)
    python benchmarks/bench_train.py --quick    # smoke run, few repetitions
    python benchmarks/bench_train.py --json results.json

Method
------
* Models: the benchmarks' small Llama (see common.py) with the same seeded base weights three
  times; LoRA r=8, alpha=16 on ``q_proj, v_proj``; PEFT's adapter weights (``lora_B`` made
  random) are copied into surgeon's, so both train identical weights.
* Data: 64 samples of random tokens (``input_ids``, ``attention_mask``, ``labels`` = ids), the
  same list for every contestant.
* Step: 2 micro-batches of gradient accumulation, AdamW (lr 1e-4, weight decay 0.01), clipping
  at 1.0, linear schedule with 2 warmup steps; forward, loss, backward per micro-batch.
* Two settings: ``small`` (the small Llama, batch 4 x 64 tokens: compute-bound) and ``tiny``
  (hidden 32, 2 layers, batch 2 x 8 tokens, one torch thread: dispatch-bound, so any Python the
  training loop adds per step shows).
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

import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from common import (
    SMALL_LLAMA,
    benchmark_parser,
    format_table,
    interleaved,
    machine,
    paired_ratio,
    peft_lora_layers,
    share_lora_weights,
    small_llama,  # sets HF_HUB_OFFLINE before transformers is imported
)

warnings.filterwarnings("ignore", category=FutureWarning)

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import surgeon  # noqa: E402

SEED = 0
SAMPLES, ACCUM = 64, 2
LR, WARMUP = 1e-4, 2
RANK, ALPHA = 8, 16
ATOL = 1e-5
PEFT_LOOP = "plain loop, PEFT"


@dataclass(frozen=True)
class Setting:
    name: str
    llama: dict[str, Any]
    batch: int
    seq: int
    steps: int  # optimizer steps per timed repetition (full run)
    threads: int | None = None  # torch threads; None: leave as is
    reps: int = 20
    quick: dict[str, int] = field(default_factory=lambda: {"reps": 2, "steps": 2})

    def model(self, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        if self.llama == SMALL_LLAMA:
            return small_llama(state)
        model = LlamaForCausalLM(LlamaConfig(**self.llama))
        if state is not None:
            model.load_state_dict(state)
        return model.eval()


TINY_LLAMA = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "vocab_size": 96,
}
SETTINGS = [
    Setting("small", SMALL_LLAMA, batch=4, seq=64, steps=4),
    Setting("tiny", TINY_LLAMA, batch=2, seq=8, steps=20, threads=1),
]


def samples(setting: Setting) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(setting.llama["vocab_size"], (SAMPLES, setting.seq), generator=gen)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]


def base_state(setting: Setting) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    return {k: v.clone() for k, v in setting.model().state_dict().items()}


def contestants(
    setting: Setting, state: dict[str, torch.Tensor]
) -> tuple[surgeon.CompiledModel, peft.PeftModel]:
    """surgeon's and PEFT's LoRA on the same base weights, with the same adapter weights."""
    cm = surgeon.compile(setting.model(state), surgeon.LoRA(rank=RANK, alpha=ALPHA))
    pm = peft.get_peft_model(
        setting.model(state),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]),
    )
    share_lora_weights(pm, cm, SEED + 2)
    return cm, pm


def config(setting: Setting, steps: int, shuffle: bool = True) -> surgeon.TrainingConfig:
    return surgeon.TrainingConfig(
        learning_rate=LR,
        batch_size=setting.batch,
        gradient_accumulation_steps=ACCUM,
        warmup_steps=WARMUP,
        max_steps=steps,
        shuffle=shuffle,
        logging_steps=steps,
        progress=False,
        distributed="none",
    )


def plain_loop(
    model: torch.nn.Module, data: list[dict], batch: int, steps: int, shuffle: bool = True
) -> None:
    """The loop a transformers user writes by hand."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, steps)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=shuffle)
    model.train()
    batches = iter(loader)
    for _ in range(steps):
        for _ in range(ACCUM):
            inputs = next(batches, None)
            if inputs is None:
                batches = iter(loader)
                inputs = next(batches)
            (model(**inputs).loss / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def check_equivalent(setting: Setting, state: dict[str, torch.Tensor], data: list[dict]) -> None:
    cm, pm = contestants(setting, state)
    surgeon.train(cm, data, config(setting, 1, shuffle=False))
    plain_loop(pm, data, setting.batch, 1, shuffle=False)
    theirs = peft_lora_layers(pm)
    for path, layer in cm.store.items("default"):
        for ours, other in (
            (layer.lora_A, theirs[path].lora_A["default"].weight),
            (layer.lora_B, theirs[path].lora_B["default"].weight),
        ):
            if not torch.allclose(ours, other, atol=ATOL):
                print(f"ABORT: adapters differ after one step at {path}", file=sys.stderr)
                sys.exit(1)
    print(f"[{setting.name}] equivalent: one step, same adapter weights (atol {ATOL})", flush=True)


def timer(run: Callable[[], Any]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return timed


def measure(setting: Setting, quick: bool) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if setting.threads:
        torch.set_num_threads(setting.threads)
    try:
        state, data = base_state(setting), samples(setting)
        check_equivalent(setting, state, data)
        cm, pm = contestants(setting, state)
        cm_plain, _ = contestants(setting, state)
        n = setting.quick["steps"] if quick else setting.steps
        reps = setting.quick["reps"] if quick else setting.reps
        b = setting.batch
        timers = {
            "surgeon.train": timer(lambda: surgeon.train(cm, data, config(setting, n))),
            PEFT_LOOP: timer(lambda: plain_loop(pm, data, b, n)),
            "plain loop, surgeon model": timer(lambda: plain_loop(cm_plain, data, b, n)),
        }
        taken = interleaved(timers, reps, warmup=1 if quick else 2)
    finally:
        torch.set_num_threads(threads)
    rate = {k: n / statistics.median(v) for k, v in taken.items()}
    return {
        "setting": asdict(setting),
        "steps_per_rep": n,
        "reps": reps,
        "steps_per_second": rate,
        "ratio_vs_peft_loop": {k: rate[k] / rate[PEFT_LOOP] for k in rate},
        "paired_vs_peft_loop": {k: paired_ratio(taken[PEFT_LOOP], taken[k]) for k in taken},
    }


def main(argv: list[str] | None = None) -> None:
    args = benchmark_parser(__doc__).parse_args(argv)
    info = machine(peft=peft.__version__)
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    started = time.perf_counter()
    results = [measure(setting, args.quick) for setting in SETTINGS]
    rows = [
        (
            f"{r['setting']['name']}: {name}",
            f"{rate:.2f}",
            f"{r['ratio_vs_peft_loop'][name]:.3f}",
            f"{r['paired_vs_peft_loop'][name]:.3f}",
        )
        for r in results
        for name, rate in r["steps_per_second"].items()
    ]
    print()
    print(format_table(("setting: contestant", "steps/s", "vs PEFT loop", "paired"), rows))
    print(
        f"one step = {ACCUM} micro-batches; small: batch 4 x 64 tokens, tiny: 2 x 8 tokens on "
        f"1 thread; ratio = steps/s over the plain PEFT loop's (higher is better); paired = "
        f"median of per-repetition ratios"
    )
    elapsed = time.perf_counter() - started
    print(f"total runtime: {elapsed:.1f} s")
    if args.json:
        payload = {"machine": info, "results": results, "total_seconds": elapsed}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
