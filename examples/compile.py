"""Compile: graft LoRA into a real pretrained model from a spec file, and check what changed.

python examples/compile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_minilm_classifier

import surgeon


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier()
    batch = tokenizer(["compile me", "a second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model.eval()(**batch).logits

    spec = surgeon.load_spec(Path(__file__).parent / "lora.yaml")  # or surgeon.LoRA(...)
    cm = surgeon.compile(model, spec).eval()
    with torch.no_grad():
        after = cm(**batch).logits  # the model's own signature
    print(cm.inspect())
    print(f"\nmodel type: {cm.config.model_type}; adapters: {cm.adapters}; active: {cm.active}")
    # LoRA's B starts at zero: the compiled model computes exactly what the base model did
    print(f"outputs before vs after compile: max |diff| = {(after - before).abs().max():.2e}")
    assert torch.equal(before, after)
    frozen = all(not p.requires_grad for n, p in cm.model.named_parameters() if "adapters" not in n)
    print(f"base weights frozen: {frozen}; trainable parameters: {cm.num_trainable():,}")
    lora = 6 * 2 * 2 * 8 * 384  # 6 layers x (query, value) x (A, B) x rank 8 x width 384
    head = 384 * 2 + 2  # the classifier's trained copy (modules_to_save)
    assert frozen and cm.num_trainable() == lora + head


if __name__ == "__main__":
    main()
