"""Prompt methods side by side: surgeon vs PEFT, in one process, interleaved.

Usage::

    python benchmarks/bench_prompt.py            # full run (about a minute on 2 CPU cores)
    python benchmarks/bench_prompt.py --quick    # smoke run, few repetitions
    python benchmarks/bench_prompt.py --json results.json

Every ratio is surgeon / PEFT: lower is better, 1.0 is parity.

Method
------
* Model: the small Llama of ``common.SMALL_LLAMA`` (hidden 256, 4 layers; no downloads), one
  seeded state dict loaded into every instance. Inputs: batch 4, sequence 32, labels = inputs.
* Methods, 20 virtual tokens each, PEFT config first (task type CAUSAL_LM):
  - prompt tuning: ``PromptTuningConfig``; surgeon reads PEFT's save (``PromptTuning``);
  - prefix tuning: ``PrefixTuningConfig`` (plain prefixes); surgeon reads PEFT's save;
  - prefix tuning with projection: ``prefix_projection=True, encoder_hidden_size=256``;
    surgeon compiles ``PrefixTuning(projection_dim=256)`` and copies PEFT's encoder weights
    (a saved file holds only the folded prefixes). Both run the encoder while training; under
    ``torch.no_grad`` surgeon reuses its folded prefixes, PEFT (not in inference mode) runs the
    encoder on every call.
  - P-tuning: ``PromptEncoderConfig`` with the MLP encoder and with the LSTM encoder
    (``encoder_hidden_size=256``, 2 LSTM layers); surgeon compiles ``PTuning`` alike and copies
    PEFT's encoder weights (the same caveat on folding under ``torch.no_grad``).
  - multitask prompt tuning: ``MultitaskPromptTuningConfig(num_tasks=4, num_ranks=2)``,
    ``task_ids`` one per row (0..3); surgeon reads PEFT's save;
  - cartridge: ``CartridgeConfig`` (one frozen token); surgeon reads PEFT's save;
  - CPT: ``CPTConfig`` with 20 context token ids, token types 1-4; surgeon reads PEFT's save;
  - LLaMA-Adapter: ``AdaptionPromptConfig(adapter_len=20, adapter_layers=4)`` (every layer of
    the small Llama); surgeon reads PEFT's save.
* Same weights on both sides; trainable parameters get seeded Gaussian noise (std 0.3) first.
  Equivalence is checked before any timing (the script aborts otherwise): same logits within
  atol 1e-4, and the adapters move them by more than that.
* Latency: each repetition runs both contestants once, in rotating order; medians, and the median
  of the per-repetition surgeon / PEFT ratios. Warm-up first, garbage collector off while timing.
  - forward: ``model(**inputs)``, eval mode, ``torch.no_grad()``;
  - train step: train mode, ``model(**inputs, labels=labels).loss`` (the model's own loss over
    the real tokens), backward, AdamW step, ``zero_grad``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from typing import Any

from common import (
    Reps,
    base_state,
    benchmark_parser,
    machine,
    make_inputs,
    method_row,
    perturb_trainable,
    progress,
    rows_table,
    small_llama,
)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import peft  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import surgeon  # noqa: E402

BATCH, SEQ, TOKENS = 4, 32, 20
SEED = 0
ATOL = 1e-4
NOISE = 0.3


FULL = Reps(warmup=5, forward=100, train=40)
QUICK = Reps(warmup=1, forward=5, train=3)


def peft_configs() -> dict[str, peft.PeftConfig]:
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": TOKENS}
    return {
        "prompt tuning": peft.PromptTuningConfig(**common),
        "prefix tuning": peft.PrefixTuningConfig(**common),
        "prefix + projection": peft.PrefixTuningConfig(
            **common, prefix_projection=True, encoder_hidden_size=256
        ),
        "p-tuning mlp": peft.PromptEncoderConfig(**common, encoder_hidden_size=256),
        "p-tuning lstm": peft.PromptEncoderConfig(
            **common, encoder_hidden_size=256, encoder_reparameterization_type="LSTM"
        ),
        "multitask prompt": peft.MultitaskPromptTuningConfig(**common, num_tasks=4, num_ranks=2),
        "cartridge": peft.CartridgeConfig(**common),
        "cpt": peft.CPTConfig(
            task_type="CAUSAL_LM",
            cpt_token_ids=list(range(10, 10 + TOKENS)),
            cpt_tokens_type_mask=[1, 2, 3, 4] * (TOKENS // 4),
        ),
        "llama-adapter": peft.AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=TOKENS, adapter_layers=4
        ),
    }


def call_inputs(config: peft.PeftConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs with the method's own call arguments (multitask prompt tuning's task ids)."""
    if isinstance(config, peft.MultitaskPromptTuningConfig):
        return {**inputs, "task_ids": torch.arange(BATCH) % config.num_tasks}
    return inputs


def make_pair(
    state: dict[str, torch.Tensor], config: peft.PeftConfig
) -> tuple[surgeon.CompiledModel, peft.PeftModel]:
    theirs = peft.get_peft_model(small_llama(state), config)
    perturb_trainable(theirs, SEED + 2, NOISE)
    if getattr(config, "prefix_projection", False):
        spec = surgeon.PrefixTuning(TOKENS, projection_dim=config.encoder_hidden_size)
        ours = surgeon.compile(small_llama(state), spec)
        ours.store.calls["default"].encoder.load_state_dict(
            theirs.prompt_encoder["default"].state_dict()
        )
    elif isinstance(config, peft.PromptEncoderConfig):
        ours = surgeon.compile(small_llama(state), ptuning_spec(config))
        copy_prompt_encoder(theirs.prompt_encoder["default"], ours.store.calls["default"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            theirs.save_pretrained(tmp)
            ours = surgeon.load(small_llama(state), tmp)
    return ours.eval(), theirs.eval()


def ptuning_spec(config: peft.PromptEncoderConfig) -> surgeon.PTuning:
    kind = getattr(
        config.encoder_reparameterization_type, "value", config.encoder_reparameterization_type
    )
    kind = str(kind).lower()
    return surgeon.PTuning(TOKENS, kind, config.encoder_hidden_size, config.encoder_num_layers)


def copy_prompt_encoder(theirs: nn.Module, ours: nn.Module) -> None:
    """PEFT's P-tuning encoder weights into ours: the names match once PEFT's embedding and MLP
    prefix are mapped (its LSTM variant keeps both heads' names)."""
    state = theirs.state_dict()
    lstm = any(k.startswith("lstm_head.") for k in state)
    mapped = {"embeddings": state.pop("embedding.weight")}
    for key, value in state.items():
        mapped["head." + (key if lstm else key.removeprefix("mlp_head."))] = value
    ours.load_state_dict(mapped)


def check_equivalent(
    ours: nn.Module, theirs: nn.Module, plain: nn.Module, inputs, base_inputs, label
) -> None:
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
        base = plain(**base_inputs).logits
    if not torch.allclose(a, b, rtol=0, atol=ATOL):
        print(
            f"ABORT: [{label}] logits differ by {(a - b).abs().max().item():.3g}", file=sys.stderr
        )
        sys.exit(1)
    moved = (b[:, -SEQ:] - base).abs().max().item()
    if moved <= ATOL:
        print(f"ABORT: [{label}] the adapter moves the logits by only {moved:.3g}", file=sys.stderr)
        sys.exit(1)
    print(
        f"[{label}] equivalent: logits within atol {ATOL} (the adapter moves them by {moved:.3g})"
    )


def model_loss(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """The model's own loss: prompt methods shift the labels past the virtual tokens."""
    return model(**inputs, labels=labels).loss


def main(argv: list[str] | None = None) -> None:
    args = benchmark_parser(__doc__).parse_args(argv)
    reps = QUICK if args.quick else FULL
    start = time.perf_counter()
    state = base_state(SEED)
    inputs, _ = make_inputs(BATCH, SEQ, SEED + 1)
    labels = inputs["input_ids"]
    plain = small_llama(state)
    rows = []
    for name, config in peft_configs().items():
        ours, theirs = make_pair(state, config)
        method_inputs = call_inputs(config, inputs)
        check_equivalent(ours, theirs, plain, method_inputs, inputs, name)
        rows.append(
            progress(
                f"[{name}]", method_row, name, ours, theirs, method_inputs, labels, reps, model_loss
            )
        )
    elapsed = time.perf_counter() - start

    print()
    print(
        f"surgeon vs PEFT, batch {BATCH}, seq {SEQ}, {TOKENS} virtual tokens, ratio = surgeon / PEFT"
    )
    print(rows_table(rows))
    print(f"reps: {asdict(reps)}; total {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": machine(peft=peft.__version__, batch=BATCH, seq=SEQ, **asdict(reps)),
            "rows": [asdict(r) for r in rows],
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
