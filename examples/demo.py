"""The main job: fine-tune a real pretrained model with LoRA, end to end, checking every step.

On all-MiniLM-L6-v2 (installed from PyPI, no hub download) with a fresh classification head:
compile the spec in examples/lora.yaml, measure accuracy on held-out Amazon review sentences
(examples/data, UCI, CC BY 4.0), train, measure again, show what was grafted where, merge,
export to ONNX and check it in onnxruntime, save the adapter and load it back.

    make demo            (or: python examples/demo.py [output folder])
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_minilm_classifier

import surgeon

HERE = Path(__file__).parent
DATA = HERE / "data" / "amazon_cells_labelled.txt"
TEST_SIZE = 200


def load_reviews() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(sentence, label) pairs, shuffled once with a fixed seed: 800 to train, 200 held out."""
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        text, label = line.rsplit("\t", 1)
        rows.append((text, int(label)))
    random.Random(0).shuffle(rows)
    return rows[TEST_SIZE:], rows[:TEST_SIZE]


def encode(tokenizer, rows: list[tuple[str, int]]) -> list[dict]:
    encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=64)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)
    ]


@torch.no_grad()
def predict(model, tokenizer, rows: list[tuple[str, int]]) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(rows), 50):
        batch = tokenizer([t for t, _ in rows[i : i + 50]], padding=True, return_tensors="pt")
        out.append(model(**batch).logits)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, rows: list[tuple[str, int]]) -> float:
    labels = torch.tensor([y for _, y in rows])
    return (logits.argmax(-1) == labels).float().mean().item()


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="demo-"))
    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = load_minilm_classifier()
    train_rows, test_rows = load_reviews()

    spec = surgeon.load_spec(HERE / "lora.yaml")
    cm = surgeon.compile(model, spec)
    report = cm.inspect()
    print(report.table(), f"\n\n{report.summary()}\n")
    before = accuracy(predict(cm, tokenizer, test_rows), test_rows)
    print(f"held-out accuracy before training: {before:.1%} ({len(test_rows)} sentences)")

    config = surgeon.TrainingConfig(
        learning_rate=2e-3, batch_size=16, gradient_accumulation_steps=1, epochs=1,
        warmup_steps=10, seed=0, logging_steps=10,
    )  # fmt: skip
    result = surgeon.train(cm, encode(tokenizer, train_rows), config)
    logits = predict(cm, tokenizer, test_rows)
    after = accuracy(logits, test_rows)
    share = cm.num_trainable() / cm.num_parameters()
    print(
        f"held-out accuracy after training:  {after:.1%} "
        f"({result.steps} steps, final loss {result.losses[-1]:.3f}; "
        f"trained {cm.num_trainable():,} of {cm.num_parameters():,} parameters = {share:.2%})"
    )

    cm.merge()
    merged = predict(cm, tokenizer, test_rows)
    cm.unmerge()
    print(f"merged vs unmerged logits: max |diff| = {(merged - logits).abs().max():.2e}")

    sample = dict(
        tokenizer(["great phone", "it broke after a week"], padding=True, return_tensors="pt")
    )
    export = surgeon.export_onnx(cm, out_dir / "minilm-reviews.onnx", sample)
    onnx_accuracy = accuracy(onnx_logits(export.path, tokenizer, test_rows), test_rows)
    print(f"ONNX export: {export}")
    print(f"onnxruntime held-out accuracy: {onnx_accuracy:.1%}")

    cm.save_adapters(out_dir / "adapter")
    size = sum(f.stat().st_size for f in (out_dir / "adapter").iterdir())
    fresh, _ = load_minilm_classifier()
    reloaded = surgeon.load(fresh, out_dir / "adapter")
    diff = (predict(reloaded, tokenizer, test_rows) - logits).abs().max().item()
    print(
        f"adapter saved to {out_dir / 'adapter'} ({size / 1024:.0f} KiB); reloaded: max |diff| = {diff:.2e}"
    )
    print(f"done in {time.perf_counter() - start:.0f}s")

    assert after > before + 0.15 and after > 0.8, (before, after)
    assert (merged - logits).abs().max() < 1e-4 and diff < 1e-5
    assert abs(onnx_accuracy - after) <= 1 / len(test_rows)


def onnx_logits(path: Path, tokenizer, rows: list[tuple[str, int]]) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = []
    for i in range(0, len(rows), 50):
        batch = tokenizer([t for t, _ in rows[i : i + 50]], padding=True, return_tensors="np")
        feed = {n: np.asarray(batch[n], dtype=np.int64) for n in names}
        out.append(torch.from_numpy(session.run(None, feed)[0]))
    return torch.cat(out)


if __name__ == "__main__":
    main()
