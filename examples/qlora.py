"""The QLoRA demo: load a checkpoint straight into 4 bits with LoRA on top, estimate and train it,
save the adapter, load it back onto the 4-bit model, and merge; every step checks its result.

    python examples/qlora.py

The checkpoint is a small Llama written to a temporary folder first (no download): any
transformers ``save_pretrained`` folder with safetensors works the same way.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common  # noqa: F401  (offline, quiet transformers)
import torch
from tqdm import tqdm

import surgeon


def write_checkpoint(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)


def batches(steps: int, batch: int = 16, length: int = 16):
    """A toy task: each token is followed by (7 * token + 3) mod 128."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = [torch.randint(0, 128, (batch,), generator=gen)]
        for _ in range(length - 1):
            ids.append((7 * ids[-1] + 3) % 128)
        yield torch.stack(ids, dim=1)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, adapter = Path(tmp) / "llama", Path(tmp) / "adapter"
        write_checkpoint(checkpoint)

        quant = surgeon.NF4(compute_dtype="float32")  # bfloat16 is the default; CPUs prefer float32
        spec = surgeon.QLoRA(rank=8, alpha=16, targets="all-linear", quant=quant)
        cm = surgeon.from_pretrained(checkpoint, spec)
        print(cm.inspect(), "\n")
        print(surgeon.estimate_memory(cm.model.config, spec, batch_size=16, seq_len=16), "\n")
        print(cm.graph.code("model.layers.0.self_attn.q_proj"))

        stored = [m for m in cm.model.modules() if isinstance(m, surgeon.quant.Linear4bit)]
        per_weight = sum(m.storage_bytes() for m in stored) / sum(
            m.in_features * m.out_features for m in stored
        )
        print(f"{len(stored)} linear layers in 4 bits: {per_weight:.3f} bytes per weight\n")

        optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
        cm.train()
        start, losses = time.perf_counter(), []
        for ids in (bar := tqdm(batches(40), total=40, desc="training", unit="step")):
            loss = cm(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        cm.eval()
        print(
            f"\ntrained 40 steps in {time.perf_counter() - start:.1f}s: "
            f"loss {losses[0]:.2f} -> {sum(losses[-5:]) / 5:.2f}"
        )

        test = next(batches(1))
        with torch.no_grad():
            expected = cm(input_ids=test).logits
        cm.save_adapters(adapter)
        size = sum(f.stat().st_size for f in adapter.iterdir())
        reloaded = surgeon.load(surgeon.from_pretrained(checkpoint, quant), adapter).eval()
        with torch.no_grad():
            diff = (reloaded(input_ids=test).logits - expected).abs().max().item()
        print(
            f"saved a PEFT LoRA adapter ({size / 1024:.0f} KiB); on the 4-bit model it gives "
            f"the same logits: max |diff| = {diff:.2e}"
        )

        merged = cm.merge_and_unload()
        with torch.no_grad():
            merged_diff = (merged(input_ids=test).logits - expected).abs().max().item()
        print(f"merged into float32 weights: max |diff| = {merged_diff:.2e}")
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], "training did not learn the toy task"
    assert per_weight <= 0.53 and diff == 0.0 and merged_diff < 1e-4


if __name__ == "__main__":
    main()
