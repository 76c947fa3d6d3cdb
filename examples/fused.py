"""The fusion pass: compile with ``fuse=True`` and each LoRA layer runs as one fused op (Triton
kernels on a CUDA GPU, the reference implementation on the CPU). The script checks that fused
and unfused graphs agree (outputs, gradients, a mixed batch of two adapters) and, on a GPU,
times both.

    python examples/fused.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgeon
import surgeon.kernels


def small_llama(device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=1000)  # fmt: skip
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def logits_and_grads(cm, ids):
    cm.zero_grad()
    logits = cm(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in cm.store.layers["chat"].parameters()]


def timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    model = small_llama(device, dtype)
    spec = surgeon.Spec(
        {
            "chat": surgeon.LoRA(rank=8, targets="all-linear"),
            "code": surgeon.LoRA(rank=4, alpha=8, targets=("q_proj", "v_proj")),
        }
    )
    cm = surgeon.compile(model, spec)
    cm.set_active("chat")
    with torch.no_grad():  # B starts at zero: give the adapters something to add
        for p in cm.store.parameters():
            p.normal_(0, 0.02)
    ids = torch.randint(1000, (2, 64), device=device)
    probe = torch.zeros(1, device=device, dtype=dtype)
    print(f"device {device}, {dtype}; fused ops run "
          f"{'Triton kernels' if surgeon.kernels.uses_triton(probe) else 'the reference implementation'}")  # fmt: skip

    unfused = logits_and_grads(cm, ids)
    count = cm.fuse()
    print(f"fused ops: {count} (7 projections x 2 layers)")
    code = cm.graph.code("model.layers.0.self_attn.q_proj")
    print("\n".join(line for line in code.splitlines() if "surgeon." in line)[:300])
    fused = logits_and_grads(cm, ids)
    diff = (fused[0].float() - unfused[0].float()).abs().max().item()
    grad_diff = max(
        (a.float() - b.float()).abs().max().item() for a, b in zip(fused[1], unfused[1])
    )
    print(f"max |fused - unfused|: logits {diff:.2e}, adapter gradients {grad_diff:.2e}")
    tolerance = 5e-2 if gpu else 1e-4
    assert diff < tolerance and grad_diff < tolerance * 10

    names = ["chat", "code"]
    with torch.no_grad():
        mixed = cm(input_ids=ids, adapter_names=names).logits
        cm.set_active("code")
        alone = cm(input_ids=ids[1:]).logits
    mixed_diff = (mixed[1:].float() - alone.float()).abs().max().item()
    print(f"mixed batch (chat, code) row 2 vs code alone: max |diff| = {mixed_diff:.2e}")
    assert mixed_diff < tolerance

    if gpu:
        cm.set_active("chat")
        with torch.no_grad():
            fused_ms = timed(lambda: cm(input_ids=ids), 20)
            cm.fuse(False)
            unfused_ms = timed(lambda: cm(input_ids=ids), 20)
        print(f"forward: fused {fused_ms:.2f} ms, unfused {unfused_ms:.2f} ms")


if __name__ == "__main__":
    main()
