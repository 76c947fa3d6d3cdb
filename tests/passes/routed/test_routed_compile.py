"""What every routed method shares: its router runs under ``torch.compile`` (forward and
backward equal to the eager graphs)."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, logits

import surgeon
from surgeon.spec import METHODS


def _routed() -> list[str]:
    return sorted(n for n, cls in METHODS.items() if cls.__module__.endswith(f"routed.{n}"))


def _call_arguments(name: str, rows: int) -> dict[str, torch.Tensor]:
    return {"task_ids": torch.arange(rows) % 2} if name == "poly" else {}


MODELS = {"xlora": "llama"}
"""The zoo model each routed method runs on here: the MLP (cheap to compile) unless it needs a
transformers model (X-LoRA's classifier reads the hidden states)."""


def _compiled(name: str) -> tuple[surgeon.CompiledModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    entry = ZOO[MODELS.get(name, "mlp")]
    spec = next(iter(METHODS[name].examples(entry.targets[:2]).values()))
    cm = surgeon.compile(entry.model(), spec)
    with torch.no_grad():
        for p in cm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # routers and factors away from their init
    x = entry.example()
    return cm, {**x, **_call_arguments(name, next(iter(x.values())).shape[0])}


def test_every_routed_method_is_covered():
    assert _routed() == ["arrow", "mole", "poly", "xlora"]


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in MODELS else n for n in _routed()],
)
def test_torch_compile_gives_the_eager_outputs_and_gradients(name):
    cm, x = _compiled(name)
    cm.eval()  # no sampled mixing or dropout: both runs draw alike
    trained = [p for p in cm.parameters() if p.requires_grad]
    eager = logits(cm(**x))
    want = torch.autograd.grad(eager.square().sum(), trained)
    got = logits(torch.compile(cm, backend="aot_eager")(**x))
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got.square().sum(), trained), want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
