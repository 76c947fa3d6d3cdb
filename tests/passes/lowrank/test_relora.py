"""ReLoRA's card (its formula) and what is its own: the accumulated delta D in the output, the
merged weight and the file, for every layer kind; merge-and-restart every T steps checked
against a hand-written loop (W0 + D is the sum of the LoRAs merged so far; A redrawn, B zero;
the optimizer's moments pruned by magnitude), the jagged learning-rate factor, spec and config
errors, training through `surgeon.train` with exact
resumption across a restart. PEFT has no ReLoRA: the conformance suite runs the rest against
the formula alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    One,
    gpt2_conv1d,
    load_with_changed_config,
    lora_product,
    plain_output,
    randomize,
    train_and_resume_spec,
)

import surgeon
from surgeon.io import CONFIG_NAME
from surgeon.passes.lowrank.relora import ReLoRA, zero_smallest


def formula(spec, adapter, base, x):
    """ReLoRA (Lialin et al., 2023): ``(W + D) x + b + scale · B A x``, ``scale = alpha / r``
    (rsLoRA: ``alpha / sqrt(r)``), D the LoRAs merged at the restarts so far; LoRA's shapes (on
    a convolution A convolves like the base and B mixes channels; on an embedding A is looked
    up)."""
    scale = spec.alpha / (math.sqrt(spec.rank) if spec.rslora else spec.rank)
    low = lora_product(base, adapter.lora_A, adapter.lora_B, x)
    return plain_output(base, x, base.weight + adapter.lora_delta.weight) + scale * low


LAYERS = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (lambda: gpt2_conv1d(5, 6), lambda: torch.randn(2, 3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv1d_1x1": (lambda: nn.Conv1d(3, 4, 1), lambda: torch.randn(2, 3, 5)),
    "embedding": (lambda: nn.Embedding(11, 6), lambda: torch.randint(0, 11, (2, 4))),
}


def _with_delta(kind: str, spec=None):
    """A compiled single layer with random factors and a random D, its input and adapter."""
    torch.manual_seed(0)
    make_layer, make_input = LAYERS[kind]
    spec = spec or ReLoRA(rank=2, alpha=3, targets=("layer",))
    cm = surgeon.compile(One(make_layer()), spec).eval()
    randomize(cm, seed=3, scale=0.3)
    ((_, adapter),) = cm.store.items("default")
    with torch.no_grad():
        adapter.lora_delta.weight.normal_(std=0.3)
    return cm, make_input(), adapter


@pytest.mark.parametrize("kind", LAYERS)
def test_the_delta_enters_the_output_the_merge_and_the_file(kind, tmp_path):
    cm, x, adapter = _with_delta(kind)
    expected = formula(cm.spec("default"), adapter, cm.model.layer, x)
    torch.testing.assert_close(cm(x), expected)
    cm.save_adapters(tmp_path)
    torch.manual_seed(0)
    loaded = surgeon.load(One(LAYERS[kind][0]()), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


def test_files_are_our_own_type_with_the_delta(tmp_path):
    """(The conformance suite checks that PEFT's loader refuses the type.)"""
    cm, _, _ = _with_delta("linear")
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_RELORA"
    assert (config["restart_every"], config["rewarm_steps"], config["prune_ratio"]) == (
        5000,
        50,
        0.99,
    )
    assert set(cm.adapter_state_dict()) == {
        f"base_model.model.layer.{k}"
        for k in ("lora_A.weight", "lora_B.weight", "lora_delta.weight")
    }


def test_merge_and_restart_every_t_steps_as_a_hand_written_loop():
    """Adam on a linear layer, T = 3: at each restart the LoRA product joins D (W0 + D = the
    LoRAs merged so far), A is drawn again, B is zero, and 99% of A's and B's moments are
    zero, the largest kept; the output never jumps at a restart."""
    torch.manual_seed(0)
    spec = ReLoRA(rank=2, alpha=4, restart_every=3, targets=("layer",))
    cm = surgeon.compile(One(nn.Linear(20, 30)), spec)
    ((_, adapter),) = cm.store.items("default")
    optimizer = torch.optim.Adam([p for p in cm.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(8, 20), torch.randn(8, 30)
    merged = torch.zeros(30, 20)
    for step in range(7):
        F.mse_loss(cm(x), y).backward()
        optimizer.step()
        product = (adapter.lora_B @ adapter.lora_A).detach() * spec.alpha / spec.rank
        a_before = adapter.lora_A.detach().clone()
        moments = {k: v.clone() for k, v in optimizer.state[adapter.lora_A].items()}
        with torch.no_grad():
            before = cm(x)
        cm.update_ranks(step, optimizer)
        optimizer.zero_grad()
        if (step + 1) % 3:
            assert torch.equal(adapter.lora_A, a_before)
            continue
        merged += product
        torch.testing.assert_close(adapter.lora_delta.weight, merged)
        assert not adapter.lora_B.any() and not torch.equal(adapter.lora_A, a_before)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), before, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            pruned, full = optimizer.state[adapter.lora_A][key], moments[key]
            assert int(pruned.count_nonzero()) <= full.numel() // 100 + 1
            kept = pruned != 0
            assert torch.equal(pruned[kept], full[kept])
            assert full[~kept].abs().max() <= full[kept].abs().min()
    assert merged.any()


def test_zero_smallest_keeps_the_largest_share():
    t = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2])
    zero_smallest(t, 0.6)
    assert t.tolist() == [0.0, -3.0, 0.0, 2.0, 0.0]
    zero_smallest(t, 1.0)
    assert not t.any()


def test_the_learning_rate_factor_is_jagged():
    spec = ReLoRA(restart_every=4, rewarm_steps=2, targets=("layer",))
    assert [spec.lr_factor(s) for s in range(12)] == [1, 1, 1, 1, 0, 0.5, 1, 1, 0, 0.5, 1, 1]
    cm = surgeon.compile(One(nn.Linear(3, 3)), spec)
    assert cm.lr_factor(9) == 0.5
    assert ReLoRA(restart_every=4, rewarm_steps=0, targets=("layer",)).lr_factor(4) == 1


def test_a_custom_loop_must_pass_the_optimizer():
    cm = surgeon.compile(One(nn.Linear(3, 3)), ReLoRA(targets=("layer",)))
    with pytest.raises(surgeon.SpecError, match=r"update_ranks\(step, optimizer\)"):
        cm.update_ranks(0)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("restart_every", 0, "expected an integer >= 1"),
        ("rewarm_steps", -1, "expected an integer >= 0"),
        ("prune_ratio", 1.5, "expected a number >= 0 and <= 1"),
        ("dropout", 1.0, "expected a number >= 0 and < 1"),
    ],
)
def test_bad_fields_are_spec_errors(field, value, match):
    with pytest.raises(surgeon.SpecError, match=rf"ReLoRA\.{field}={value!r}: {match}"):
        ReLoRA(**{field: value})


def test_config_values_are_read_and_wrong_ones_name_the_key(tmp_path):
    cm, _, _ = _with_delta("linear")
    cm.save_adapters(tmp_path)
    loaded = load_with_changed_config(One(nn.Linear(5, 6)), tmp_path, {"restart_every": 7})
    assert loaded.spec("default").restart_every == 7
    with pytest.raises(surgeon.SpecError, match="'prune_ratio'"):
        load_with_changed_config(One(nn.Linear(5, 6)), tmp_path, {"prune_ratio": 2})
    with pytest.raises(surgeon.SpecError, match="bias='all' selects a variant"):
        load_with_changed_config(One(nn.Linear(5, 6)), tmp_path, {"bias": "all"})


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = gpt2_conv1d(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_surgeon_train_restarts_and_resumes_exactly_across_a_restart(tmp_path):
    """Restarts after steps 2 and 4 (T = 2) with a one-step re-warm-up; the checkpoint halfway
    falls right after the first restart."""
    spec = ReLoRA(rank=2, restart_every=2, rewarm_steps=2, prune_ratio=0.5, targets=("a", "b"))
    expected, _, fresh, _ = train_and_resume_spec(spec, Stack, tmp_path)
    assert expected.learning_rates == pytest.approx([1e-2, 1e-2, 0.0, 5e-3])
    for name, delta in fresh.store.named_buffers():
        assert delta.any(), name
