"""The model zoo: small custom models and transformers models built from tiny configs (no downloads).

Every builder is seeded and returns a fresh model in eval mode, so tests may mutate what they get.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Dropout(0.1), nn.Linear(24, 24))
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        h = self.seq(h.flatten(2))
        return self.fc(h.mean(-1))


class FunctionalDropoutMLP(nn.Module):
    """Bakes the training flag into an FX graph: must not be accepted as one region."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(self.fc1(x), p=0.5, training=self.training))


class OptionalMaskBlock(nn.Module):
    """Branches on ``mask is None``: a Proxy is never None, so tracing would freeze one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.proj(x)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    targets: tuple[str, ...]
    hf: bool = False

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def example(self, seed: int = 1) -> dict[str, Any]:
        torch.manual_seed(seed)
        return self.inputs()


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.randint(3, 96, (2, 7))}


ZOO = {
    e.name: e
    for e in [
        ZooEntry("mlp", MLP, lambda: {"x": torch.randn(4, 12)}, ("body.0", "body.3", "head")),
        ZooEntry(
            "cnn", CNN, lambda: {"x": torch.randn(2, 3, 6, 6)}, ("conv1", "conv2", "seq", "fc")
        ),
        ZooEntry(
            "llama", tiny_llama, _ids, ("q_proj", "v_proj", "down_proj", "embed_tokens"), hf=True
        ),
        ZooEntry("gpt2", tiny_gpt2, _ids, ("c_attn", "c_fc", "wte"), hf=True),
        ZooEntry("bert", tiny_bert, _ids, ("query", "value", "dense"), hf=True),
    ]
}


def logits(out: Any) -> torch.Tensor:
    """The main output tensor of any zoo model."""
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def randomize(cm: Any, seed: int = 2, scale: float = 0.1) -> None:
    """Give every adapter parameter random values, so adapters change outputs (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cm.store.parameters():
            p.copy_(
                torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale
            )
