"""Prompt tuning on a real pretrained model: virtual tokens initialised from text with the model's
own tokenizer, trained a little (with the fresh classification head), inspected, saved and loaded
back; every step checks its result.

    python examples/prompt_tuning.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_minilm_classifier, minilm_dir

import surgeon

# A handful of hand-written sentences (written for this demo; public domain).
TEXTS = [
    ("a wonderful, moving film with a brilliant cast", 1),
    ("i loved every minute of it", 1),
    ("friendly staff and a lovely room", 1),
    ("clever, funny and warm", 1),
    ("a dull, lifeless and boring mess", 0),
    ("i want my money back", 0),
    ("the food was cold and the service rude", 0),
    ("tedious, predictable and far too long", 0),
]


STEPS = 10


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier()
    spec = surgeon.PromptTuning(
        num_virtual_tokens=8,
        init_text="is this review positive or negative?",
        tokenizer_path=str(minilm_dir()),
    )
    cm = surgeon.compile(model, spec)
    print(cm.inspect(), "\n")

    batch = tokenizer([t for t, _ in TEXTS], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in TEXTS])
    head = [p for n, p in cm.model.named_parameters() if n.startswith("classifier.")]
    for p in head:  # the new classification head trains too
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=2e-2)
    cm.train()
    start = time.perf_counter()
    for _ in range(STEPS):
        loss = cm(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    cm.eval()
    with torch.no_grad():
        trained = cm(**batch).logits
        accuracy = (trained.argmax(-1) == labels).float().mean().item()
    print(
        f"trained {STEPS} steps in {time.perf_counter() - start:.1f}s; final loss {loss.item():.3f}, "
        f"training accuracy {accuracy:.0%}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        cm.save_adapters(tmp)
        fresh, _ = load_minilm_classifier()
        fresh.classifier.load_state_dict(cm.model.classifier.state_dict())
        reloaded = surgeon.load(fresh, tmp).eval()
        with torch.no_grad():
            diff = (reloaded(**batch).logits - trained).abs().max().item()
    print(f"reloaded prompt matches: max |diff| = {diff:.2e}")
    assert diff < 1e-5 and accuracy == 1.0


if __name__ == "__main__":
    main()
