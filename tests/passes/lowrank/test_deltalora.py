"""Delta-LoRA's card (its formula) and what is its own: after each step t > K the accumulated
delta D grows by λ·scale·(B_{t+1}A_{t+1} - B_t A_t), checked against a hand-written loop (the
sum telescopes: D = λ·scale·(B A - B_{K+1} A_{K+1})); stale factors (a new loop) never fold in;
no dropout (a config with one is refused by key); D in the file and the merge; training through
`surgeon.train` with exact resumption. PEFT has no Delta-LoRA: the conformance suite runs the
rest against the formula alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    One,
    TwoLinear,
    gpt2_conv1d,
    load_with_changed_config,
    lora_product,
    plain_output,
    randomize,
    train_and_resume_spec,
)

import surgeon
from surgeon.passes.lowrank.deltalora import DeltaLoRA


def formula(spec, adapter, base, x):
    """Delta-LoRA (Zi et al., 2023): ``(W + D) x + b + scale · B A x`` (no dropout), D the
    weight's accumulated updates ``λ·scale·Δ(B A)``; LoRA's shapes per layer kind."""
    scale = spec.alpha / (math.sqrt(spec.rank) if spec.rslora else spec.rank)
    low = lora_product(base, adapter.lora_A, adapter.lora_B, x)
    return plain_output(base, x, base.weight + adapter.lora_delta.weight) + scale * low


@pytest.mark.parametrize(
    "make_layer, x",
    [
        (lambda: nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
        (lambda: gpt2_conv1d(5, 6), torch.randn(2, 3, 5)),
    ],
)
def test_the_weight_follows_the_change_of_the_product(make_layer, x):
    """Adam, K = 1, λ = 2: D stays zero through step K, then equals λ·scale·(B A - B' A') with
    B' A' the factors after step K; the output stays the formula; merging folds D in."""
    torch.manual_seed(0)
    spec = DeltaLoRA(rank=2, alpha=4, update_ratio=2.0, start_step=1, targets=("layer",))
    cm = surgeon.compile(One(make_layer()), spec)
    ((_, adapter),) = cm.store.items("default")
    optimizer = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn_like(cm(x))
    for step in range(5):
        F.mse_loss(cm(x), target).backward()
        optimizer.step()
        cm.update_ranks(step)
        optimizer.zero_grad()
        if step <= spec.start_step:
            assert not adapter.lora_delta.weight.any()
        if step == spec.start_step:
            start = (adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone())
    now = adapter.product(adapter.lora_A, adapter.lora_B)
    expected = 2.0 * (now - adapter.product(*start))
    torch.testing.assert_close(adapter.lora_delta.weight, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-3
    cm.eval()
    with torch.no_grad():
        wanted = formula(spec, adapter, cm.model.layer, x)
        torch.testing.assert_close(cm(x), wanted)
        cm.merge()
        torch.testing.assert_close(cm(x), wanted, rtol=1e-5, atol=1e-5)


def test_stale_factors_never_fold_in():
    """A loop that starts again (steps from 0, or a skipped step) only takes the factors."""
    cm = surgeon.compile(One(nn.Linear(4, 3)), DeltaLoRA(start_step=0, targets=("layer",)))
    randomize(cm, seed=1)
    ((_, adapter),) = cm.store.items("default")
    cm.update_ranks(5)  # no factors from step 4
    assert not adapter.lora_delta.weight.any()
    with torch.no_grad():
        adapter.lora_B.add_(1.0)
    cm.update_ranks(6)
    assert adapter.lora_delta.weight.any()
    before = adapter.lora_delta.weight.clone()
    with torch.no_grad():
        adapter.lora_B.add_(1.0)
    cm.update_ranks(0)  # a new run
    assert torch.equal(adapter.lora_delta.weight, before)


def test_dropout_is_refused_by_key(tmp_path):
    cm = surgeon.compile(One(nn.Linear(4, 3)), DeltaLoRA(targets=("layer",)))
    cm.save_adapters(tmp_path)
    assert "dropout" not in {f for f in DeltaLoRA.__dataclass_fields__}
    with pytest.raises(surgeon.SpecError, match=r"lora_dropout=0\.1 is not supported"):
        load_with_changed_config(One(nn.Linear(4, 3)), tmp_path, {"lora_dropout": 0.1})
    with pytest.raises(surgeon.SpecError, match="'start_step'"):
        load_with_changed_config(
            One(nn.Linear(4, 3)), tmp_path, {"lora_dropout": 0.0, "start_step": -1}
        )
    with pytest.raises(surgeon.SpecError, match=r"DeltaLoRA\.update_ratio=-1"):
        DeltaLoRA(update_ratio=-1)


def test_the_file_holds_the_delta(tmp_path):
    torch.manual_seed(0)
    cm = surgeon.compile(One(nn.Embedding(7, 4)), DeltaLoRA(rank=2, targets=("layer",))).eval()
    randomize(cm, seed=2)
    ((_, adapter),) = cm.store.items("default")
    with torch.no_grad():
        adapter.lora_delta.weight.normal_()
    x = torch.randint(0, 7, (2, 3))
    cm.save_adapters(tmp_path)
    torch.manual_seed(0)
    loaded = surgeon.load(One(nn.Embedding(7, 4)), tmp_path).eval()
    torch.testing.assert_close(loaded(x), cm(x))
    torch.testing.assert_close(cm(x), formula(cm.spec("default"), adapter, cm.model.layer, x))


def test_surgeon_train_follows_and_resumes_exactly(tmp_path):
    spec = DeltaLoRA(rank=2, start_step=0, targets=("a",))
    whole = train_and_resume_spec(spec, TwoLinear, tmp_path).whole
    assert whole.store.get_buffer("layers.default.a.lora_delta.weight").any()
