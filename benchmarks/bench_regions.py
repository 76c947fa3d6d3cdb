"""Specialised regions side by side: one traced graph vs plain regions vs PEFT, interleaved.

Usage::

    python benchmarks/bench_regions.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/bench_regions.py --quick    # smoke run
    python benchmarks/bench_regions.py --json results.json

Method
------
The benchmarks' small Llama (benchmarks/common.py) with LoRA r=8 on ``all-linear``; four
contestants run identical weights on identical inputs: surgeon specialising (the default: after
its first call the model runs as one traced graph), surgeon with ``specialise=False`` (the
plain regions: one per projection plus the MLP block), PEFT, and the plain model. Outputs are
checked equal (atol 1e-5) before any timing. Each repetition runs every contestant once in a
rotating order; medians are reported, ratios are against PEFT (lower is better).

* forward: batch 4, seq 64, ``no_grad``; with ``use_cache=False``, and with ``use_cache=True``
  and no cache passed (a causal LM's default: the model builds and returns a new cache);
* decode step: batch 1, one new token after a 32-token prompt, with the KV cache (a copy of the
  prompt's cache per call, so every call sees the same state);
* first call: the wall time of a fresh compiled model's first forward (the trace of a new kind
  of call, its check, and its code generation), against the second call; for the small Llama
  and for the same config with 32 layers (the depth of Llama-7B/8B: tracing cost follows the
  number of operations, not their width).
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from typing import Any

import torch
from common import (
    base_state,
    benchmark_parser,
    format_table,
    forward_timer,
    interleaved,
    machine,
    make_inputs,
    median_ms,
    paired_ratio,
    share_lora_weights,
    small_llama,
)

import surgeon
import surgeon.specialise


def contestants(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        small_llama(state), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    models = {"PEFT": peft, "plain model": small_llama(state)}
    for name, specialise in (("specialised", True), ("plain regions", False)):
        cm = surgeon.compile(
            small_llama(state),
            surgeon.LoRA(rank=8, alpha=16, targets="all-linear"),
            specialise=specialise,
        )
        share_lora_weights(peft, cm, seed=3)  # the same seed: the same B for both
        models[name] = cm
    return models


def check_equal(models: dict[str, Any], inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        expected = models["PEFT"](**inputs).logits
        for name in ("specialised", "plain regions"):
            got = models[name](**inputs).logits
            diff = (got - expected).abs().max().item()
            if diff > 1e-5:
                raise SystemExit(f"{name} differs from PEFT by {diff:.3g}: not timing")
    if not models["specialised"].graph.traced():
        raise SystemExit(
            "the specialised model did not trace: " + str(models["specialised"].graph.refused())
        )


def cache_argument(model: Any) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns)."""
    forward = getattr(model, "model", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def decode_timer(model: Any, inputs: dict[str, Any], cache: Any):
    """Times one cached step under no_grad; each call gets its own copy of the prompt's cache
    (copied outside the timing), so every call sees the same state."""
    name = cache_argument(model)

    def run() -> float:
        fresh = copy.deepcopy(cache)
        with torch.no_grad():
            start = time.perf_counter()
            model(**inputs, **{name: fresh})
            return time.perf_counter() - start

    return run


def time_rows(models: dict[str, Any], reps: int) -> list[tuple[str, dict[str, float]]]:
    rows = []
    batch, _ = make_inputs(4, 64, seed=1)
    batch = {**batch, "use_cache": False}
    check_equal(models, batch)
    samples = interleaved({n: forward_timer(m, batch) for n, m in models.items()}, reps, 2)
    rows.append(("forward 4x64, no cache", samples))
    making = {**batch, "use_cache": True}
    samples = interleaved({n: forward_timer(m, making) for n, m in models.items()}, reps, 2)
    rows.append(("forward 4x64, new cache", samples))

    prompt, _ = make_inputs(1, 32, seed=2)
    with torch.no_grad():
        caches = {n: m(**prompt, use_cache=True).past_key_values for n, m in models.items()}
    step = {
        "input_ids": prompt["input_ids"][:, -1:],
        "attention_mask": torch.ones(1, 33, dtype=torch.long),
    }
    timers = {n: decode_timer(m, {**step, "use_cache": True}, caches[n]) for n, m in models.items()}
    rows.append(("decode step, KV cache", interleaved(timers, reps, 2)))
    return rows


def first_call(model: torch.nn.Module) -> tuple[float, float]:
    surgeon.specialise._SHARED.clear()  # a fresh process would not have traced this model yet
    cm = surgeon.compile(model, surgeon.LoRA(rank=8, alpha=16, targets="all-linear"))
    batch, _ = make_inputs(4, 64, seed=1)
    times = []
    for _ in range(2):
        with torch.no_grad():
            start = time.perf_counter()
            cm(**batch, use_cache=False)
            times.append(time.perf_counter() - start)
    return times[0], times[1]


def main() -> None:
    args = benchmark_parser(__doc__).parse_args()
    reps = 5 if args.quick else 30
    state = base_state(seed=0)
    models = contestants(state)
    rows = time_rows(models, reps)
    names = ["specialised", "plain regions", "PEFT", "plain model"]
    table = []
    results: dict[str, Any] = {"machine": machine(), "rows": {}}
    for what, samples in rows:
        peft = samples["PEFT"]
        cells = [what] + [f"{median_ms(samples[n]):.2f}" for n in names]
        cells += [f"{paired_ratio(samples[n], peft):.2f}" for n in ("specialised", "plain regions")]
        table.append(cells)
        results["rows"][what] = {n: median_ms(samples[n]) for n in names}
    header = ["ms (median)", *names, "spec/PEFT", "regions/PEFT"]
    print(format_table(header, table))
    for layers, model in ((4, small_llama(state)), (32, small_llama(layers=32))):
        first, second = first_call(model)
        print(f"first call of a fresh compiled {layers}-layer model: {first * 1e3:.0f} ms "
              f"(second: {second * 1e3:.1f} ms)")  # fmt: skip
        results[f"first_call_ms_{layers}_layers"] = first * 1e3
        results[f"second_call_ms_{layers}_layers"] = second * 1e3
    per_layer = models["specialised"].graph.regions_per_layer()
    print(
        f"regions per decoder layer: specialised {per_layer:.1f}, plain regions "
        f"{models['plain regions'].graph.regions_per_layer():.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
