"""Every adapter method side by side: surgeon vs PEFT, in one process, interleaved.

Usage::

    python benchmarks/bench_methods.py            # full run (about 1-2 minutes on 2 CPU cores)
    python benchmarks/bench_methods.py --quick    # smoke run, few repetitions
    python benchmarks/bench_methods.py --json results.json
    python benchmarks/bench_methods.py --methods FourierFT,C3A   # only these rows

Every ratio is surgeon / PEFT: lower is better, 1.0 is parity.

Method
------
* Models. A small Llama built from a config (``common.SMALL_LLAMA``: hidden 256, 4 layers,
  8 heads, intermediate 688, vocab 1000; no downloads) is created once with a fixed seed; every
  model below is a fresh instance loaded from that state dict. Inputs: batch 4, sequence 32.
* Methods (targets ``q_proj, v_proj`` unless noted), PEFT config first:
  - LoRA: ``LoraConfig(r=8, lora_alpha=16)``, loaded by surgeon as ``LoRA(rank=8, alpha=16)``;
  - DoRA: the same with ``use_dora=True`` (surgeon: ``DoRA(rank=8, alpha=16)``); BD-LoRA: the
    same with ``use_bdlora={"target_modules_bd_b": [q, v], "nblocks": 2}``; KaSA: the same with
    ``kasa_config={}``; VeLoRA and MonteCLoRA: the same with their sub-config's defaults;
  - LoHa: ``LoHaConfig(r=8, alpha=16)`` (``LoHa(rank=8, alpha=16)``);
  - LoKr: ``LoKrConfig(r=8, alpha=16)`` (``LoKr(rank=8, alpha=16)``);
  - IA3: ``IA3Config`` on ``k_proj, v_proj, down_proj``, ``down_proj`` feed-forward;
  - VeRA: ``VeraConfig(r=64)`` (``VeRA(rank=64)``);
  - AdaLoRA: ``AdaLoraConfig(init_r=12, target_r=8, total_step=100)``. Only forward and the
    plain train step are timed: no rank allocation (``update_and_allocate``) runs on either
    side, and PEFT's orthogonal regulariser is not added (the loss is computed outside the
    model, from the logits).
  - OFT: ``OFTConfig(oft_block_size=32)`` (PEFT's defaults: the Cayley-Neumann series, 5
    terms): 3,968 parameters per layer, next to LoRA r=8's 4,096;
  - BOFT: ``BOFTConfig(boft_block_size=8)`` (one butterfly factor: PEFT builds more only with
    its CUDA extension);
  - HRA: ``HRAConfig(r=8)``; RoAd: ``RoadConfig(variant="road_1")``;
  - PSOFT: ``PsoftConfig(r=32)``; OSF: ``OSFConfig()`` (PEFT's default effective rank). The
    regularisers and OSF's gradient projection are not part of the loss or step here (the loss
    is computed outside the model on both sides);
  - BEFT: ``BeftConfig`` on q,v; LN tuning: ``LNTuningConfig`` on every RMSNorm.
  - FourierFT ``n_frequency=1000, scaling=150``; WaveFT ``n_frequency=2592``; C3A
    ``block_size=16`` (4,096 parameters per layer, LoRA r=8's); MiSS ``r=16`` (also
    ``init_weights="bat"``); HiRA ``r=8``; GLoRA ``r=8``; DEFT ``r=8``; GraLoRA ``r=8,
    alpha=16, gralora_k=2``; PVeRA ``r=64``; DeLoRA ``r=8``; VB-LoRA ``r=4, num_vectors=256,
    vector_length=64``; UniLoRA ``r=4, theta_d_length=4096``; SHiRA ``r=8``; Super-Tuning
    ``sparsity=0.99, r=8``; PEANuT ``r=8, depth=1``; RandLoRA ``r=32``; TinyLoRA ``r=2,
    u=64``; FRoD with PEFT's defaults; AdaMSS ``r=100, num_subspaces=5, subspace_rank=1`` (no
    ASA step on either side); Lily ``r=8, stride_A=2, num_B=2``; trainable tokens: 16 rows of
    ``embed_tokens``; Poly ``r=8, n_tasks=2, n_skills=4`` with ``task_ids`` 0,1,0,1 in every
    call; X-LoRA over two LoRA experts (r=8 on q,v) with PEFT's defaults (``xlora_depth=1``,
    softmax; both libraries run the scaling pass and the real pass in every call; PEFT loads
    surgeon's file, as PEFT's own X-LoRA save leaves classifier layers out).
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
* Against LoRA: a last interleaved rotation times the unmerged forward of each library's LoRA,
  DoRA and OFT models (the six above); it reports DoRA / LoRA and OFT / LoRA within each library
  (goals: surgeon's at most 1.3 for both; OFT at LoRA's parameter count, see above).
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
NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


FULL = Reps(warmup=5, forward=150, train=50)
QUICK = Reps(warmup=1, forward=5, train=3)

METHODS: dict[str, Callable[[], peft.PeftConfig]] = {
    "LoRA": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV),
    "DoRA": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV, use_dora=True),
    "BD-LoRA": lambda: peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=QV,
        use_bdlora={"target_modules_bd_b": QV, "nblocks": 2},
    ),
    "KaSA": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV, kasa_config={}),
    "VeLoRA": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=QV, velora_config={}),
    "MonteCLoRA": lambda: peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=QV, monteclora_config={}
    ),
    "LoHa": lambda: peft.LoHaConfig(r=8, alpha=16, target_modules=QV),
    "LoKr": lambda: peft.LoKrConfig(r=8, alpha=16, target_modules=QV),
    "IA3": lambda: peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down_proj"]),
    "VeRA": lambda: peft.VeraConfig(r=64, target_modules=QV),
    "AdaLoRA": lambda: peft.AdaLoraConfig(init_r=12, target_r=8, total_step=100, target_modules=QV),
    "OFT": lambda: peft.OFTConfig(oft_block_size=32, target_modules=QV),
    "BOFT": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=QV),
    "HRA": lambda: peft.HRAConfig(r=8, target_modules=QV),
    "RoAd": lambda: peft.RoadConfig(variant="road_1", target_modules=QV),
    "PSOFT": lambda: peft.PsoftConfig(r=32, target_modules=QV),
    "OSF": lambda: peft.OSFConfig(target_modules=QV),
    "BEFT": lambda: peft.BeftConfig(target_modules=QV),
    "LN tuning": lambda: peft.LNTuningConfig(target_modules=NORMS),
    "FourierFT": lambda: peft.FourierFTConfig(n_frequency=1000, scaling=150.0, target_modules=QV),
    "WaveFT": lambda: peft.WaveFTConfig(n_frequency=2592, target_modules=QV),
    "C3A": lambda: peft.C3AConfig(block_size=16, target_modules=QV),
    "MiSS": lambda: peft.MissConfig(r=16, target_modules=QV),
    "MiSS bat": lambda: peft.MissConfig(r=16, init_weights="bat", target_modules=QV),
    "HiRA": lambda: peft.HiraConfig(r=8, target_modules=QV),
    "GLoRA": lambda: peft.GloraConfig(r=8, target_modules=QV),
    "DEFT": lambda: peft.DeftConfig(r=8, target_modules=QV),
    "GraLoRA": lambda: peft.GraloraConfig(r=8, alpha=16, gralora_k=2, target_modules=QV),
    "PVeRA": lambda: peft.PveraConfig(r=64, target_modules=QV),
    "DeLoRA": lambda: peft.DeloraConfig(r=8, target_modules=QV),
    "VB-LoRA": lambda: peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=64, target_modules=QV),
    "UniLoRA": lambda: peft.UniLoraConfig(r=4, theta_d_length=4096, target_modules=QV),
    "SHiRA": lambda: peft.ShiraConfig(r=8, target_modules=QV),
    "Super-Tuning": lambda: peft.SupertuningConfig(sparsity=0.99, r=8, target_modules=QV),
    "PEANuT": lambda: peft.PeanutConfig(r=8, depth=1, target_modules=QV),
    "RandLoRA": lambda: peft.RandLoraConfig(r=32, target_modules=QV),
    "TinyLoRA": lambda: peft.TinyLoraConfig(r=2, u=64, target_modules=QV),
    "FRoD": lambda: peft.FrodConfig(progressbar=False, target_modules=QV),
    "AdaMSS": lambda: peft.AdamssConfig(r=100, num_subspaces=5, subspace_rank=1, target_modules=QV),
    "Lily": lambda: peft.LilyConfig(r=8, stride_A=2, num_B=2, target_modules=QV),
    "Trainable tokens": lambda: peft.TrainableTokensConfig(
        token_indices=list(range(16)), target_modules=["embed_tokens"]
    ),
}
"""Method -> PEFT config; surgeon's side is whatever ``surgeon.load`` reads from its save."""

POLY_TASKS = torch.tensor([0, 1, 0, 1])
"""Poly's ``task_ids``: one per row of the batch, both libraries' models get them."""


def poly_pair(state: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    config = peft.PolyConfig(
        task_type="CAUSAL_LM", r=8, n_tasks=2, n_skills=4, n_splits=1, target_modules=QV
    )
    ours, theirs = make_pair(state, config)
    return ours, theirs, {"task_ids": POLY_TASKS}


def xlora_pair(state: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Two LoRA experts (r=8 on q,v) saved by PEFT; surgeon's X-LoRA over them, its classifier
    perturbed and saved; PEFT's X-LoRA loads that file (PEFT's own X-LoRA save drops classifier
    layers, so the pair is made in this direction). Both run the scaling pass and the real one."""
    with tempfile.TemporaryDirectory() as tmp:
        experts = []
        for i in range(2):
            lora = peft.get_peft_model(small_llama(state), METHODS["LoRA"]())
            perturb_trainable(lora, SEED + 10 + i, NOISE * 10)
            lora.save_pretrained(f"{tmp}/expert{i}")
            experts.append(f"{tmp}/expert{i}")
        ours = surgeon.compile(no_cache(small_llama(state)), surgeon.XLoRA(experts=tuple(experts)))
        perturb_trainable(ours, SEED + 2, NOISE)
        ours.save_adapters(f"{tmp}/xlora")
        theirs = peft.PeftModel.from_pretrained(no_cache(small_llama(state)), f"{tmp}/xlora")
    return ours.eval(), theirs.eval(), {}


def no_cache(model: nn.Module) -> nn.Module:
    """PEFT's X-LoRA refuses a model whose config keeps a key/value cache."""
    model.config.use_cache = False
    return model


BUILT: dict[str, Callable[[dict[str, torch.Tensor]], tuple[nn.Module, nn.Module, dict]]] = {
    "Poly": poly_pair,
    "X-LoRA": xlora_pair,
}
"""Methods whose pair is built apart (extra call arguments, experts on disk), with the extra
arguments both models take in every call."""


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
    ours: nn.Module,
    theirs: nn.Module,
    plain: nn.Module,
    inputs: dict[str, Any],
    label: str,
    extra: dict[str, Any],
) -> None:
    """``extra``: the adapters' own call arguments, which the plain model does not take."""
    with torch.no_grad():
        a, b = ours(**inputs, **extra).logits, theirs(**inputs, **extra).logits
        base = plain(**inputs).logits
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


AGAINST_LORA = ("DoRA", "OFT")
"""Methods whose unmerged forward is also timed against the same library's LoRA."""


def against_lora(
    models: dict[str, nn.Module], inputs: dict[str, Any], reps: Reps
) -> dict[str, float]:
    """``AGAINST_LORA`` / LoRA unmerged forward within each library, all in one rotation."""
    samples = interleaved(
        {k: forward_timer(m, inputs) for k, m in models.items()}, reps.forward, reps.warmup
    )
    ratios = {
        f"{lib} {name}": paired_ratio(samples[f"{lib} {name}"], samples[f"{lib} LoRA"])
        for name in AGAINST_LORA
        for lib in ("surgeon", "peft")
    }
    return {**ratios, **{f"{k} ms": median_ms(v) for k, v in samples.items()}}


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--methods",
        type=lambda text: text.split(","),
        default=[*METHODS, *BUILT],
        metavar="NAME,...",
        help="only these rows of METHODS (the comparison against LoRA needs LoRA, DoRA and OFT)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS) - set(BUILT))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join([*METHODS, *BUILT])}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reps = QUICK if args.quick else FULL
    start = time.perf_counter()
    state = base_state(SEED)
    inputs, labels = make_inputs(BATCH, SEQ, SEED + 1)
    plain = small_llama(state)
    rows: list[Row] = []
    kept: dict[str, nn.Module] = {}
    for name in args.methods:
        if name in BUILT:
            ours, theirs, extra = BUILT[name](state)
        else:
            (ours, theirs), extra = make_pair(state, METHODS[name]()), {}
        check_equivalent(ours, theirs, plain, inputs, name, extra)
        rows.append(
            progress(
                f"[{name}]",
                method_row,
                name,
                ours,
                theirs,
                {**inputs, **extra},
                labels,
                reps,
                lm_loss,
            )
        )
        if name in ("LoRA", *AGAINST_LORA):
            kept[f"surgeon {name}"], kept[f"peft {name}"] = ours, theirs
    compared = len(kept) == 2 * (1 + len(AGAINST_LORA))
    versus = progress("[against LoRA]", against_lora, kept, inputs, reps) if compared else {}
    elapsed = time.perf_counter() - start

    print()
    print(f"surgeon vs PEFT, batch {BATCH}, seq {SEQ}, ratio = median paired surgeon / PEFT")
    print(rows_table(rows))
    for name in AGAINST_LORA if compared else ():
        print(
            f"{name} / LoRA unmerged forward: surgeon {versus[f'surgeon {name}']:.2f} "
            f"(goal <= 1.3), PEFT {versus[f'peft {name}']:.2f}"
        )
    print("AdaLoRA: forward and plain train step only; no rank allocation on either side.")
    print(f"reps: {asdict(reps)}; total {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": machine(peft=peft.__version__, batch=BATCH, seq=SEQ, **asdict(reps)),
            "rows": [asdict(r) for r in rows],
            "against_lora": versus,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
