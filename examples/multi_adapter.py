"""Several adapters on one model: switch between them, run a mixed batch (one adapter per row),
turn adapters off, and combine two into a new one.

python examples/multi_adapter.py
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
    spec = surgeon.Spec(
        adapters={
            "support": surgeon.LoRA(rank=8, targets=("query", "value")),
            "reviews": surgeon.LoRA(rank=4, targets=("query", "value")),
        }
    )
    cm = surgeon.compile(model, spec).eval()
    with torch.no_grad():  # stand-ins for two trained adapters
        for p in cm.store.parameters():
            p.normal_(std=0.05)
    batch = tokenizer(["where is my parcel?", "a gripping film"], padding=True, return_tensors="pt")

    with torch.no_grad():
        outputs = {}
        for name in cm.adapters:
            cm.set_active(name)
            outputs[name] = cm(**batch).logits
        with cm.disabled():
            base = cm(**batch).logits
        # a mixed batch: row 0 through "support", row 1 through "reviews", in one forward
        mixed = cm(**batch, adapter_names=["support", "reviews"]).logits
        cm.merge_adapters({"support": 0.5, "reviews": 0.5}, name="both", how="cat")
        cm.set_active("both")
        both = cm(**batch).logits

    for name, logits in outputs.items():
        print(f"{name:8s} logits {logits.tolist()}")
    print(f"{'base':8s} logits {base.tolist()}")
    print(f"{'both':8s} logits {both.tolist()}  (cat of the two at weight 0.5)")
    torch.testing.assert_close(mixed[0], outputs["support"][0])
    torch.testing.assert_close(mixed[1], outputs["reviews"][1])
    print("mixed batch matches each adapter on its own rows")
    print(f"adapters: {cm.adapters}; active: {cm.active}")


if __name__ == "__main__":
    main()
