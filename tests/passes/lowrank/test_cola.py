"""COLA's card (its formula) and what is its own: the chain checked against a hand-written loop
(at each boundary W0 + D is the sum of the links' LoRAs, the next LoRA starts fresh and the
optimizer forgets its state; after the last link no more restarts), D in the file, the
optimizer required, training through `surgeon.train` with exact resumption across a boundary.
PEFT has no COLA: the conformance suite runs the rest against the formula alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import One, TwoLinear, lora_product, plain_output, train_and_resume_spec

import surgeon
from surgeon.passes.lowrank.cola import COLA


def formula(spec, adapter, base, x):
    """COLA (Xia et al., 2024): ``(W + D) x + b + scale · B A x``, D the links merged so far;
    LoRA's shapes per layer kind."""
    scale = spec.alpha / (math.sqrt(spec.rank) if spec.rslora else spec.rank)
    low = lora_product(base, adapter.lora_A, adapter.lora_B, x)
    return plain_output(base, x, base.weight + adapter.lora_delta.weight) + scale * low


def test_the_chain_as_a_hand_written_loop(tmp_path):
    """Three links of two steps: boundaries after steps 1 and 3 only."""
    torch.manual_seed(0)
    spec = COLA(rank=2, alpha=4, chain_length=3, link_steps=2, targets=("layer",))
    cm = surgeon.compile(One(nn.Linear(6, 5)), spec)
    ((_, adapter),) = cm.store.items("default")
    optimizer = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    merged, boundaries = torch.zeros(5, 6), []
    for step in range(8):
        F.mse_loss(cm(x), y).backward()
        optimizer.step()
        product = (adapter.lora_B @ adapter.lora_A).detach() * spec.alpha / spec.rank
        a_before = adapter.lora_A.detach().clone()
        cm.update_ranks(step, optimizer)
        optimizer.zero_grad()
        if torch.equal(adapter.lora_A, a_before):
            assert adapter.lora_A in optimizer.state
            continue
        boundaries.append(step)
        merged += product
        torch.testing.assert_close(adapter.lora_delta.weight, merged)
        assert not adapter.lora_B.any()
        assert adapter.lora_A not in optimizer.state and adapter.lora_B not in optimizer.state
    assert boundaries == [1, 3]
    cm.eval()
    cm.save_adapters(tmp_path)
    torch.manual_seed(0)
    loaded = surgeon.load(One(nn.Linear(6, 5)), tmp_path).eval()
    wanted = formula(spec, adapter, cm.model.layer, x)
    torch.testing.assert_close(loaded(x), wanted)
    cm.merge()
    torch.testing.assert_close(cm(x), wanted, rtol=1e-5, atol=1e-5)


def test_a_custom_loop_must_pass_the_optimizer():
    cm = surgeon.compile(One(nn.Linear(3, 3)), COLA(targets=("layer",)))
    with pytest.raises(surgeon.SpecError, match=r"update_ranks\(step, optimizer\)"):
        cm.update_ranks(0)


@pytest.mark.parametrize("field", ["chain_length", "link_steps"])
def test_bad_fields_are_spec_errors(field):
    with pytest.raises(surgeon.SpecError, match=rf"COLA\.{field}=0: expected an integer >= 1"):
        COLA(**{field: 0})


def test_surgeon_train_resumes_exactly_across_a_boundary(tmp_path):
    spec = COLA(rank=2, chain_length=2, link_steps=2, targets=("a",))
    whole = train_and_resume_spec(spec, TwoLinear, tmp_path).whole
    assert whole.store.get_buffer("layers.default.a.lora_delta.weight").any()
