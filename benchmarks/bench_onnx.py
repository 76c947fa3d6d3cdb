"""ONNX export side by side: onnxruntime on the merged export vs PyTorch eager, in one process.

Usage::

    python benchmarks/bench_onnx.py            # full run (about 1 minute on 2 CPU cores)
    python benchmarks/bench_onnx.py --quick    # smoke run, few repetitions
    python benchmarks/bench_onnx.py --json results.json
    python benchmarks/bench_onnx.py --ort-spinning   # onnxruntime's session options all default

Three contestants run the same LoRA-adapted model on the same tokens; every ratio is
onnxruntime / PyTorch: lower is better, 1.0 is parity.

Method
------
* Model. A small Llama built from a config (hidden 256, 4 layers, 8 heads, intermediate 688,
  vocab 1000; no downloads), created with a fixed seed and compiled with
  ``surgeon.LoRA(rank=8, alpha=16, targets=("q_proj", "v_proj"))``. Every adapter parameter is
  set to seeded random values (std 0.02) so the adapters are not a no-op; the script checks that
  they move the logits by far more than the tolerance below.
* Contestants, all in eval mode, all on the CPU, inference only (no KV cache):
  - onnxruntime: ``surgeon.export_onnx(cm, path, {"input_ids": ids}, verify=True)`` writes the
    model with the adapters folded into the weights (dynamic batch and sequence axes; the
    example has batch 8, since a size of 1 would pin an axis); its report is printed. One
    ``onnxruntime.InferenceSession`` on ``CPUExecutionProvider`` serves both batch sizes; timed
    call: ``session.run(None, {"input_ids": array})`` on a numpy array made beforehand. Session
    options are onnxruntime's defaults (it picks its own thread count, graph optimisations on)
    except one: ``session.intra_op.allow_spinning = 0``. By default onnxruntime's worker threads
    keep spinning on the CPU for a while after ``run`` returns; in one process, interleaved, that
    spinning steals the cores from whichever PyTorch contestant runs next and inflated its
    latency up to 2x on a 2-core machine (making onnxruntime look twice as good as it is).
    ``--ort-spinning`` restores the pure defaults, to see that effect.
  - eager merged: a deep copy of the compiled model, taken before the export, turned into a plain
    ``transformers`` model by ``merge_and_unload()``; timed call: ``plain(input_ids=ids,
    use_cache=False)`` under ``torch.no_grad()``.
  - eager unmerged: the compiled model with its adapters live; timed call: ``cm(input_ids=ids,
    use_cache=False)`` under ``torch.no_grad()``.
* Equivalence, checked before any timing at every batch size (the script aborts on failure): the
  three logits agree pairwise within atol 1e-4.
* Latency, at batch 1 and batch 8, sequence 64. Each repetition runs every contestant once, in an
  order that rotates from repetition to repetition, so drift (thermal, other processes) hits all
  of them equally; the reported value is the median over repetitions ("ratio" = ratio of the
  medians; "paired" = median of the per-repetition ratios, whose two samples ran close together,
  so it is the less drift-sensitive of the two). Warm-up calls come first; Python's garbage
  collector runs once and is then disabled inside each timed loop (as ``timeit`` does).
  ``torch``'s thread count is left as is, and so is onnxruntime's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import (
    SMALL_LLAMA,
    Timer,
    benchmark_parser,
    format_table,
    forward_timer,
    interleaved,
    machine,
    median_ms,
    paired_ratio,
    progress,
)

warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import surgeon  # noqa: E402

BATCHES = (1, 8)
SEQ = 64
RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "v_proj")
SEED = 0
ATOL = 1e-4
PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Reps:
    warmup: int
    forward: int


FULL = Reps(warmup=10, forward=250)
QUICK = Reps(warmup=2, forward=10)


@dataclass
class Row:
    """One line of the results table: medians in ms, ratios onnxruntime / PyTorch."""

    metric: str
    ort: float
    merged: float
    unmerged: float
    paired_merged: float  # median over repetitions of ort_i / merged_i
    paired_unmerged: float  # median over repetitions of ort_i / unmerged_i

    @property
    def ratio_merged(self) -> float:
        return self.ort / self.merged

    @property
    def ratio_unmerged(self) -> float:
        return self.ort / self.unmerged

    @property
    def merged_vs_unmerged(self) -> float:
        return self.merged / self.unmerged

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "unit": "ms",
            "ratio_merged": self.ratio_merged,
            "ratio_unmerged": self.ratio_unmerged,
            "merged_vs_unmerged": self.merged_vs_unmerged,
        }


@dataclass
class Contestants:
    """The same adapted model three ways: exported to onnxruntime, merged eager, unmerged eager."""

    session: ort.InferenceSession
    merged: nn.Module
    unmerged: surgeon.CompiledModel


# -- models and inputs -------------------------------------------------------------------------


def adapted_llama() -> surgeon.CompiledModel:
    """The small Llama with LoRA on q,v and seeded random (non-zero) adapter weights, in eval."""
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).eval()
    cm = surgeon.compile(model, surgeon.LoRA(rank=RANK, alpha=ALPHA, targets=TARGETS))
    gen = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        for p in cm.store.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return cm.eval()


def make_ids() -> dict[int, torch.Tensor]:
    """batch size -> token ids (batch, SEQ)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return {b: torch.randint(SMALL_LLAMA["vocab_size"], (b, SEQ), generator=gen) for b in BATCHES}


def export(cm: surgeon.CompiledModel, folder: Path, example: torch.Tensor) -> Any:
    report = surgeon.export_onnx(
        cm, folder / "llama-lora.onnx", {"input_ids": example}, verify=True
    )
    print(f"export report: {report}", flush=True)
    print(f"export max_abs_diff (onnxruntime vs PyTorch): {report.max_abs_diff:.3g}", flush=True)
    return report


def session_options(spinning: bool) -> ort.SessionOptions:
    """onnxruntime's defaults; without ``spinning``, idle worker threads sleep at once."""
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def make_contestants(folder: Path, spinning: bool) -> tuple[Contestants, Any]:
    """Export to ``folder``; the merged copy is taken from the compiled model before the export."""
    cm = adapted_llama()
    plain = copy.deepcopy(cm).merge_and_unload().eval()
    report = progress("[export + verify]", export, cm, folder, make_ids()[max(BATCHES)])
    session = ort.InferenceSession(
        str(report.path), session_options(spinning), providers=[PROVIDER]
    )
    return Contestants(session=session, merged=plain, unmerged=cm), report


# -- equivalence -------------------------------------------------------------------------------


def abort(message: str) -> None:
    print(f"ABORT: the contestants disagree: {message}", file=sys.stderr)
    sys.exit(1)


def torch_inputs(ids: torch.Tensor) -> dict[str, Any]:
    return {"input_ids": ids, "use_cache": False}


def ort_feeds(ids: torch.Tensor) -> dict[str, np.ndarray]:
    return {"input_ids": ids.numpy()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_equivalent(c: Contestants, ids: torch.Tensor) -> dict[str, float]:
    """Pairwise max |logits difference| of the three contestants, or abort if any exceeds ATOL."""
    with torch.no_grad():
        merged = c.merged(**torch_inputs(ids)).logits
        unmerged = c.unmerged(**torch_inputs(ids)).logits
        with c.unmerged.disabled():
            base = c.unmerged(**torch_inputs(ids)).logits
    (onnx_logits,) = c.session.run(None, ort_feeds(ids))
    onnx_logits = torch.from_numpy(onnx_logits)
    label = f"batch {ids.shape[0]}"
    if onnx_logits.shape != unmerged.shape:
        abort(f"[{label}] onnxruntime logits {tuple(onnx_logits.shape)} vs {tuple(unmerged.shape)}")
    diffs = {
        "ort-merged": max_diff(onnx_logits, merged),
        "ort-unmerged": max_diff(onnx_logits, unmerged),
        "merged-unmerged": max_diff(merged, unmerged),
    }
    for pair, diff in diffs.items():
        if not diff <= ATOL:
            abort(f"[{label}] {pair} logits differ by up to {diff:.3g} (atol {ATOL})")
    effect = max_diff(unmerged, base)
    if not effect > 100 * ATOL:
        abort(f"[{label}] the adapters move the logits by only {effect:.3g}: a near no-op")
    print(
        f"[{label}] equivalent within atol {ATOL}: "
        + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
        + f" (adapters move the logits by up to {effect:.2g})",
        flush=True,
    )
    return {**diffs, "adapter_effect": effect}


# -- timing ------------------------------------------------------------------------------------


def ort_timer(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Timer:
    def run() -> float:
        start = time.perf_counter()
        session.run(None, feeds)
        return time.perf_counter() - start

    return run


def forward_row(c: Contestants, ids: torch.Tensor, reps: Reps) -> Row:
    timers = {
        "ort": ort_timer(c.session, ort_feeds(ids)),
        "merged": forward_timer(c.merged, torch_inputs(ids)),
        "unmerged": forward_timer(c.unmerged, torch_inputs(ids)),
    }
    samples = interleaved(timers, reps.forward, reps.warmup)
    ms = {k: median_ms(v) for k, v in samples.items()}
    return Row(
        f"forward, batch {ids.shape[0]}x{SEQ}",
        ms["ort"],
        ms["merged"],
        ms["unmerged"],
        paired_ratio(samples["ort"], samples["merged"]),
        paired_ratio(samples["ort"], samples["unmerged"]),
    )


# -- reporting ---------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    header = (
        "metric (ms)",
        "onnxruntime",
        "eager merged",
        "eager unmerged",
        "ort/merged",
        "paired",
        "ort/unmerged",
        "paired",
        "merged/unmerged",
    )
    lines = [
        (
            r.metric,
            f"{r.ort:.3f}",
            f"{r.merged:.3f}",
            f"{r.unmerged:.3f}",
            f"{r.ratio_merged:.3f}",
            f"{r.paired_merged:.3f}",
            f"{r.ratio_unmerged:.3f}",
            f"{r.paired_unmerged:.3f}",
            f"{r.merged_vs_unmerged:.3f}",
        )
        for r in rows
    ]
    return format_table(header, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--ort-spinning",
        action="store_true",
        help="leave onnxruntime's thread spinning on (its default; skews the PyTorch timings)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    reps = QUICK if args.quick else FULL
    started = time.perf_counter()
    info = machine(
        onnxruntime=ort.__version__,
        onnx=onnx.__version__,
        ort_provider=PROVIDER,
        ort_threads="default",
        ort_spinning=args.ort_spinning,
    )
    print(", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"reps: {asdict(reps)}; ratio = onnxruntime / PyTorch (lower is better)", flush=True)

    ids = make_ids()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        contestants, report = make_contestants(Path(tmp), args.ort_spinning)
        equivalence = {b: check_equivalent(contestants, ids[b]) for b in BATCHES}
        rows = [
            progress(f"[batch {b}] forward", forward_row, contestants, ids[b], reps)
            for b in BATCHES
        ]

    elapsed = time.perf_counter() - started
    print()
    print(table(rows))
    print(
        "ort/merged, ort/unmerged = ratio of the medians; paired = median of per-repetition ratios"
    )
    print("merged/unmerged = eager merged / eager unmerged: what merging buys in PyTorch")
    print(f"total runtime: {elapsed:.1f} s")
    if args.json:
        payload = {
            "machine": info,
            "reps": asdict(reps),
            "settings": {
                "llama": SMALL_LLAMA,
                "batches": list(BATCHES),
                "seq": SEQ,
                "rank": RANK,
                "alpha": ALPHA,
                "targets": list(TARGETS),
                "atol": ATOL,
            },
            "export": {
                "provider": report.provider,
                "max_abs_diff": report.max_abs_diff,
                "file_bytes": report.file_bytes,
                "nodes": report.nodes,
                "verified_shapes": {k: list(v) for k, v in report.verified_shapes.items()},
            },
            "equivalence": {str(b): d for b, d in equivalence.items()},
            "rows": [r.as_dict() for r in rows],
            "total_seconds": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
