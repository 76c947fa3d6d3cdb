"""Train a LoRA adapter with surgeon.train, checkpoint it, and resume exactly.

A tiny Llama (built from a config: no download) learns to count: every sample is a run of
consecutive token ids, and the model must predict the next one. The script trains with
evaluation and checkpoints, then trains a fresh model from the mid-run checkpoint and checks
that it ends with exactly the same adapter.

    python examples/train.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgeon

VOCAB = 64


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def counting_samples(n: int, seed: int) -> list[dict]:
    """Runs like 17 18 19 20 ... of 6 to 12 tokens; the loss ignores the first two."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(6, 13, (1,), generator=g))
        start = int(torch.randint(1, VOCAB - length, (1,), generator=g))
        ids = list(range(start, start + length))
        samples.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return samples


def main(output_dir: Path) -> None:
    train_data, eval_data = counting_samples(96, seed=1), counting_samples(16, seed=2)
    spec = surgeon.LoRA(rank=8, alpha=16, targets="all-linear", dropout=0.05)
    config = surgeon.TrainingConfig(
        learning_rate=5e-3,
        batch_size=8,
        gradient_accumulation_steps=2,
        epochs=4,
        warmup_steps=4,
        lr_scheduler="cosine",
        output_dir=str(output_dir),
        save_steps=12,
        eval_steps=8,
        logging_steps=4,
    )
    cm = surgeon.compile(tiny_llama(), spec)
    result = surgeon.train(cm, train_data, config, eval_data=eval_data)
    first, last = result.eval_losses[0][1], result.eval_losses[-1][1]
    print(
        f"trained {result.steps} steps: train loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
    )
    print(f"eval loss {first:.3f} -> {last:.3f} (at steps {[s for s, _ in result.eval_losses]})")
    print("checkpoints:", ", ".join(sorted(p.name for p in output_dir.glob("checkpoint-*"))))

    fresh = surgeon.compile(tiny_llama(), spec)
    surgeon.train(
        fresh, train_data, config, eval_data=eval_data, resume_from=output_dir / "checkpoint-12"
    )
    same = all(torch.equal(a, b) for a, b in zip(cm.store.parameters(), fresh.store.parameters()))
    print(f"resumed from checkpoint-12: same adapter as the uninterrupted run: {same}")
    loaded = surgeon.load(tiny_llama(), output_dir / f"checkpoint-{result.steps}").eval()
    prompt = torch.tensor([[20, 21, 22, 23]])
    cm.eval()
    with torch.no_grad():
        predicted = loaded(input_ids=prompt).logits[0, -1].argmax().item()
    print(f"after 20 21 22 23 the trained adapter predicts {predicted}")
    assert same and last < first


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
