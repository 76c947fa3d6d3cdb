"""The LoRA demo: compile a spec onto a real pretrained model, train it a little, inspect, merge,
save, and load the adapter back; every step checks its result.

    make demo            (or: python examples/quickstart.py)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import load_minilm_classifier

import surgeon

# A handful of hand-written sentences (written for this demo; public domain).
TEXTS = [
    ("a wonderful, moving film with a brilliant cast", 1),
    ("i loved every minute of it", 1),
    ("the best meal we have had in years", 1),
    ("friendly staff and a lovely room", 1),
    ("an absolute delight from start to finish", 1),
    ("clever, funny and warm", 1),
    ("a dull, lifeless and boring mess", 0),
    ("i want my money back", 0),
    ("the food was cold and the service rude", 0),
    ("tedious, predictable and far too long", 0),
    ("the worst hotel i have ever stayed in", 0),
    ("broken on arrival and support never answered", 0),
]


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier()
    spec = surgeon.load_spec(Path(__file__).parent / "lora.yaml")
    cm = surgeon.compile(model, spec)
    print(cm.inspect(), "\n")

    batch = tokenizer([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in TEXTS])
    head = [p for n, p in cm.model.named_parameters() if n.startswith("classifier.")]
    for p in head:  # the new classification head trains too
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=3e-3)
    cm.train()
    start = time.perf_counter()
    for _ in (bar := tqdm(range(30), desc="training", unit="step")):
        loss = cm(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    cm.eval()
    with torch.no_grad():
        predicted = cm(**batch).logits.argmax(-1)
        accuracy = (predicted == labels).float().mean().item()
        unmerged = cm(**batch).logits
        cm.merge()
        merged = cm(**batch).logits
        cm.unmerge()
    print(
        f"\ntrained 30 steps in {time.perf_counter() - start:.1f}s; training accuracy {accuracy:.0%}"
    )
    print(f"merged vs unmerged logits: max |diff| = {(merged - unmerged).abs().max():.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        cm.save_adapters(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
        fresh, _ = load_minilm_classifier()
        fresh.classifier.load_state_dict(cm.model.classifier.state_dict())
        reloaded = surgeon.load(fresh, tmp).eval()
        with torch.no_grad():
            diff = (reloaded(**batch).logits - unmerged).abs().max().item()
    print(f"saved adapter: {size / 1024:.0f} KiB; reloaded model matches: max |diff| = {diff:.2e}")
    assert diff < 1e-5 and (merged - unmerged).abs().max() < 1e-4


if __name__ == "__main__":
    main()
