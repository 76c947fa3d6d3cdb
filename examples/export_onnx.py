"""Export a LoRA-adapted model to ONNX, folded into the weights, verified in onnxruntime.

python examples/export_onnx.py [out.onnx]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_minilm_classifier

import surgeon


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier()
    cm = surgeon.compile(model, surgeon.LoRA(rank=8, targets=("query", "value")))
    with torch.no_grad():  # pretend it was trained: non-zero adapters
        for p in cm.store.parameters():
            p.normal_(std=0.02)
    batch = tokenizer(
        ["a short sentence", "and another, longer one"], padding=True, return_tensors="pt"
    )
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "minilm-lora.onnx"
    report = surgeon.export_onnx(cm, out, dict(batch))
    print(report)


if __name__ == "__main__":
    main()
