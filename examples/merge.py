"""Merge: fold an adapter into the weights (reversibly, or for good) and check the outputs agree.

python examples/merge.py
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
    cm = surgeon.compile(model, surgeon.LoRA(rank=8, targets=("query", "key", "value"))).eval()
    with torch.no_grad():  # a stand-in for a trained adapter
        for p in cm.store.parameters():
            p.normal_(std=0.05)
    batch = tokenizer(["fold me in", "and me too"], padding=True, return_tensors="pt")

    with torch.no_grad():
        unmerged = cm(**batch).logits
        cm.merge()  # in place, reversible: the adapters stop running, the weights hold them
        merged = cm(**batch).logits
        print(
            f"merged: {cm.merged}; max |merged - unmerged| = {(merged - unmerged).abs().max():.2e}"
        )
        cm.unmerge()
        restored = cm(**batch).logits
        print(f"unmerged again: max |diff| = {(restored - unmerged).abs().max():.2e}")
        plain = cm.merge_and_unload()  # a plain transformers model, no surgeon inside
        final = plain(**batch).logits
    print(
        f"merge_and_unload -> {type(plain).__name__}: max |diff| = {(final - unmerged).abs().max():.2e}"
    )
    assert not any("adapters" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(final, unmerged, atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    main()
