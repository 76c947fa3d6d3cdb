"""RoSA's card (its formula) and what is its own: the mask chosen after the schedule's warm-up
from gradients of W accumulated over the mask steps (checked against W.grad from autograd over
the same batches, both accumulations), the sparse values waiting for it, the optimizer's moments
restarted there, files carrying the mask and the phase, merging with a chosen mask, exact resume
across the mask step, config keys and fields refused. PEFT has no RoSA: the conformance suite
runs the rest against the formula alone."""

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
    plain_output,
    resume_config,
    train_and_resume,
)

import surgeon
from surgeon.io import CONFIG_NAME
from surgeon.passes.sparse.rosa import RoSA, RoSALayer
from surgeon.spec import METHODS


def _sparse(adapter, shape: tuple[int, int]) -> torch.Tensor:
    """``S`` (out x in): the values at the mask's positions, zero elsewhere."""
    rows, columns = adapter.spa.indices.long()
    dense = torch.zeros(shape, dtype=adapter.spa.values.dtype)
    dense[rows, columns] = adapter.spa.values
    return dense


def formula(spec, adapter, base, x):
    """RoSA (Nikdan et al., 2024, §3): ``W x + b + s · B A x + S x`` with ``s = alpha / r``
    (``alpha / √r`` with rsLoRA) in eval mode."""
    scale = spec.alpha / (math.sqrt(spec.rank) if spec.rslora else spec.rank)
    delta = scale * adapter.lora_B @ adapter.lora_A
    delta = delta + _sparse(adapter, delta.shape)
    if isinstance(base, nn.Linear):
        return plain_output(base, x, base.weight + delta)
    return plain_output(base, x, base.weight + delta.t())  # GPT-2's Conv1D: in x out


class Stack(nn.Module):
    """A Linear and a GPT-2 Conv1D, both adapted."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = gpt2_conv1d(5, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _layers(cm) -> dict[str, RoSALayer]:
    return dict(cm.store.items("default"))


def _out_in_grad(layer: nn.Module) -> torch.Tensor:
    """W's gradient as out x in (the Conv1D stores in x out)."""
    grad = layer.weight.grad
    return grad if isinstance(layer, nn.Linear) else grad.t()


def _compiled(spec: RoSA) -> surgeon.CompiledModel:
    torch.manual_seed(0)
    cm = surgeon.compile(Stack(), spec)
    with torch.no_grad():  # B off zero, so LoRA changes the gradients that reach W
        for layer in _layers(cm).values():
            layer.lora_B.normal_()
    return cm


@pytest.mark.parametrize("accumulation", ["mean_squared", "mean"])
def test_the_mask_is_the_top_density_of_the_accumulated_gradients_of_w(accumulation):
    """Warm-up 1, then 2 steps of 2 backward calls each collect; the mask is the top-d of the
    sum (of squares) of those 4 gradients, which autograd computes here as W.grad."""
    spec = RoSA(
        rank=2, density=0.3, warmup=1, mask_steps=2, accumulation=accumulation, targets=("a", "b")
    )
    cm = _compiled(spec)
    bases = {path: cm.model.get_submodule(path) for path in _layers(cm)}
    for base in bases.values():
        base.weight.requires_grad_(True)  # the oracle's W.grad; RoSA itself never needs it
    optimizer = torch.optim.Adam(cm.store.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    expected = {path: torch.zeros(_layers(cm)[path].spa.shape) for path in bases}
    cm.train()
    for step in range(3):
        for _ in range(2):  # two micro-batches: each backward call is one gradient
            for base in bases.values():
                base.weight.grad = None
            x = torch.randn(3, 6, generator=generator)
            cm(x).pow(2).mean().backward()
            for path, base in bases.items():
                grad = _out_in_grad(base)
                if step >= 1:
                    expected[path] += grad.square() if accumulation == "mean_squared" else grad
        for layer in _layers(cm).values():
            assert torch.equal(layer.spa.values.grad, torch.zeros_like(layer.spa.values))
        optimizer.step()
        if step == 1:  # halfway through the collection: the sums so far
            for path, layer in _layers(cm).items():
                torch.testing.assert_close(layer.spa.collected, expected[path])
        cm.update_ranks(step, optimizer)
        optimizer.zero_grad()
    for path, layer in _layers(cm).items():
        count = layer.spa.values.numel()
        flat = torch.topk(expected[path].abs().flatten(), count).indices.sort().values
        columns = layer.spa.shape[1]
        assert layer.spa.indices.long().tolist() == [
            (flat // columns).tolist(),
            (flat % columns).tolist(),
        ], path
        assert layer.spa.collected is None and not layer.spa.values.any()
        assert layer.spa.values not in optimizer.state  # its moments restart with the mask
    cm(torch.randn(3, 6, generator=generator)).pow(2).mean().backward()
    optimizer.step()
    for layer in _layers(cm).values():  # the values train from the mask on
        assert layer.spa.values.all() and optimizer.state[layer.spa.values]["step"] == 1


def _trained_past_the_mask() -> surgeon.CompiledModel:
    spec = RoSA(rank=2, density=0.3, warmup=1, mask_steps=1, targets=("a", "b"))
    cm = _compiled(spec)
    optimizer = torch.optim.Adam(cm.store.parameters(), lr=1e-1)
    generator = torch.Generator().manual_seed(5)
    cm.train()
    for step in range(3):
        cm(torch.randn(4, 6, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        cm.update_ranks(step, optimizer)
        optimizer.zero_grad()
    return cm.eval()


def test_a_trained_adapter_saves_loads_and_merges_with_its_mask(tmp_path):
    cm = _trained_past_the_mask()
    x = torch.randn(5, 6)
    expected = cm(x)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_ROSA"
    assert (config["schedule"], config["spa_num_grads"], config["grad_acc_mode"], config["d"]) == (
        "wl1",
        1,
        "mean_squared",
        0.3,
    )
    torch.manual_seed(0)
    loaded = surgeon.load(Stack(), tmp_path).eval()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-6)
    for path, layer in _layers(loaded).items():
        mine = _layers(cm)[path]
        assert torch.equal(layer.spa.indices, mine.spa.indices)
        assert layer.spa.has_mask  # the phase comes with the file: training goes on from it
    weights = {n: p.detach().clone() for n, p in cm.model.state_dict().items()}
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
    cm.unmerge()
    for name, value in cm.model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_surgeon_train_resumes_exactly_across_the_mask_step(tmp_path):
    """Three collecting steps, the checkpoint after the second (the gradient sums are in it),
    the mask after the third, the fourth trains the values."""
    spec = RoSA(rank=2, density=0.3, mask_steps=3, targets=("a", "b"))
    generator = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, generator=generator), torch.randn(4, generator=generator))] * 6

    def compiled(seed: int) -> surgeon.CompiledModel:
        torch.manual_seed(0)
        cm = surgeon.compile(Stack(), spec)
        with torch.no_grad():
            for layer in _layers(cm).values():
                layer.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
        return cm

    whole = compiled(2)
    _, fresh = train_and_resume(whole, compiled, data, resume_config(shuffle=False), tmp_path)
    for path, layer in _layers(fresh).items():
        theirs = _layers(whole)[path]
        assert layer.spa.has_mask and torch.equal(layer.spa.indices, theirs.spa.indices)
        assert layer.spa.values.any()


def test_bias_rosa_only_trains_the_adapted_layers_biases():
    cm = surgeon.compile(Stack(), RoSA(density=0.3, bias="rosa_only", targets=("a",)))
    trained = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    assert trained == {"a.bias"}


def test_choosing_the_mask_needs_the_optimizer():
    cm = _compiled(RoSA(rank=2, density=0.3, targets=("a", "b")))
    cm.train()
    cm(torch.randn(3, 6)).sum().backward()
    with pytest.raises(surgeon.SpecError, match=r"RoSA on a: .*pass the optimizer"):
        cm.update_ranks(0)


# -- files and specs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"schedule": "spa_only"}, "schedule='spa_only' is not supported"),
        ({"schedule": "wl"}, "schedule='wl' is not supported"),
        ({"grad_acc_mode": "max"}, "grad_acc_mode='max' is not supported"),
        ({"mask_load_path": "masks/"}, "mask_load_path='masks/' is not supported"),
        ({"mask_save_path": "masks/"}, "mask_save_path='masks/' is not supported"),
        ({"terminate_after_mask_generation": True}, "terminate_after_mask_generation=True"),
        ({"rosa_dtype": "bf16"}, "rosa_dtype='bf16' is not supported"),
        ({"rank_pattern": {"a": 4}}, "rank_pattern=.* is not supported"),
        ({"density_pattern": {"a": 0.1}}, "density_pattern=.* is not supported"),
        ({"d": 0}, r"RoSA.density=0: expected a number > 0 .*\(adapter_config.json key 'd'\)"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"use_dora": True}, "use_dora=True"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    surgeon.compile(Stack(), RoSA(rank=2, density=0.3, targets=("a", "b"))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(Stack(), tmp_path, change)


def test_peft_rosa_schedules_map_to_the_warmup():
    config = RoSA(targets=("q_proj",)).to_peft_config(["q_proj"])
    for schedule, warmup in (("wl64", 64), ("default", 0), ("df", 0), (None, 0)):
        read = RoSA.from_peft_config({**config, "schedule": schedule}, "here")
        assert read.warmup == warmup
    read = RoSA.from_peft_config({**config, "impl": "spmm", "spa_store_transpose": False}, "x")
    assert read == RoSA.from_peft_config(config, "x")  # kernel layouts: the same numbers


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"RoSA.rank=0: expected an integer >= 1"),
        ({"density": 1.5}, r"RoSA.density=1.5: expected a number > 0 and <= 1"),
        ({"warmup": -1}, r"RoSA.warmup=-1: expected an integer >= 0"),
        ({"mask_steps": 0}, r"RoSA.mask_steps=0: expected an integer >= 1"),
        ({"accumulation": "sum"}, r"RoSA.accumulation='sum': expected one of"),
        ({"bias": "lora_only"}, r"RoSA.bias='lora_only': expected one of"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        RoSA(**fields)


def test_a_density_leaving_no_entry_is_refused_naming_the_layer():
    with pytest.raises(surgeon.SpecError, match=r"RoSA.density=0.01 on layer: leaves none"):
        surgeon.compile(One(nn.Linear(3, 3)), RoSA(density=0.01, targets=("layer",)))


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["rosa"] is RoSA is surgeon.RoSA
    assert RoSA.peft_type == "SURGEON_ROSA"


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which RoSA cannot adapt"):
        surgeon.compile(One(layer), RoSA(targets=("layer",)))


def test_the_sparse_term_is_the_dense_product():
    """The sparse product and its backward equal the dense ``S``'s, gradient of x included."""
    cm = _trained_past_the_mask()
    layer = _layers(cm)["a"]
    x = torch.randn(2, 3, 6, requires_grad=True)
    out = layer.spa(x)
    dense = F.linear(x, _sparse(layer, layer.spa.shape))
    torch.testing.assert_close(out, dense)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(dense.sum(), x)
    torch.testing.assert_close(grad, expected)
