"""MultiLoRA's card (its formula) and what is its own: the paper's initialisation (zero scaling
factors, random factors in every unit), the first gradients reaching the scales only, dropout,
files (this project's own PEFT type, PEFT's loader refusing them), spec and config errors,
training through `surgeon.train` with exact resumption. PEFT has no MultiLoRA: the conformance
suite runs the rest against the formula alone."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    mlp_without_dropout,
    plain_output,
    randomize,
    resume_config,
    train_and_resume,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.multilora import MultiLoRA, MultiLoRALayer
from surgeon.spec import METHODS
from surgeon.train import trained_parameters


def _units(spec, adapter) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(s_i, A_i, B_i)`` of every unit, cut from the stacked tensors."""
    r = spec.rank
    a, b, s = adapter.multilora_A, adapter.multilora_B, adapter.multilora_scales
    return [(s[i], a[i * r : (i + 1) * r], b[:, i * r : (i + 1) * r]) for i in range(spec.units)]


def _update(spec, adapter) -> torch.Tensor:
    """``ΔW = alpha/r · Σ_i s_i B_i A_i`` (out x in)."""
    return spec.alpha / spec.rank * sum(s * b @ a for s, a, b in _units(spec, adapter))


def formula(spec, adapter, base, x):
    """MultiLoRA (Wang et al., 2023, §3): ``W x + b + alpha/r · Σ_i s_i B_i A_i x``, the layer with
    ``W + ΔW`` as its weight."""
    linear = isinstance(base, nn.Linear)
    w = base.weight if linear else base.weight.t()
    adapted = w + _update(spec, adapter)
    return plain_output(base, x, adapted if linear else adapted.t())


peft = pytest.importorskip("peft")

LAYERS = {"linear": lambda: nn.Linear(6, 5), "conv1d_gpt2": lambda: gpt2_conv1d(6, 5)}
"""The layers MultiLoRA adapts, 6 inputs and 5 outputs each."""

MLP_TARGETS = ("body.0", "head")
"""The zoo MLP's Linear(12, 24) and Linear(24, 5)."""


def _adapter(cm, name: str = "default") -> MultiLoRALayer:
    (_, adapter), *_ = cm.store.items(name)
    return adapter


# -- initialisation and the first step -------------------------------------------------------------


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_scales_start_at_zero_and_every_units_factors_kaiming_uniform(make):
    torch.manual_seed(0)
    model = One(make())
    x = torch.randn(3, 6)
    before = model(x)
    spec = MultiLoRA(rank=4, units=3, targets=("layer",))
    cm = surgeon.compile(model, spec)
    adapter = _adapter(cm)
    assert adapter.multilora_A.shape == (12, 6) and adapter.multilora_B.shape == (5, 12)
    assert torch.count_nonzero(adapter.multilora_scales) == 0
    assert adapter.multilora_scales.shape == (3,)
    for _, a, b in _units(spec, adapter):
        # kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in), fan_in of the unit's own factor
        assert a.abs().max() <= 1 / math.sqrt(6) and a.abs().max() > 0.5 / math.sqrt(6)
        assert b.abs().max() <= 1 / math.sqrt(4) and b.abs().max() > 0.5 / math.sqrt(4)
    first, second = _units(spec, adapter)[:2]
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[2], second[2])
    assert torch.equal(cm(x), before)


def test_the_first_step_moves_the_scales_and_every_unit_gets_a_different_one():
    torch.manual_seed(0)
    model = One(nn.Linear(6, 5))
    cm = surgeon.compile(model, MultiLoRA(rank=2, units=3, targets=("layer",)))
    adapter = _adapter(cm)
    cm.train()
    (cm(torch.randn(4, 6)) * torch.randn(4, 5)).sum().backward()
    scales = adapter.multilora_scales.grad
    assert torch.all(scales != 0) and len(set(scales.tolist())) == 3
    # s = 0 stands between the factors and the output: they start moving on the next step
    assert torch.count_nonzero(adapter.multilora_A.grad) == 0
    assert torch.count_nonzero(adapter.multilora_B.grad) == 0


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_delta_weight_is_what_merging_adds(make):
    torch.manual_seed(0)
    model = One(make())
    spec = MultiLoRA(rank=2, units=3, alpha=5, targets=("layer",))
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    update = _update(spec, adapter)
    expected = update if adapter.kind == "linear" else update.t()
    torch.testing.assert_close(adapter.delta_weight(), expected)


def test_training_with_dropout_drops_the_updates_input_only():
    torch.manual_seed(0)
    model = One(nn.Linear(6, 5))
    spec = MultiLoRA(rank=2, units=2, dropout=0.5, targets=("layer",))
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    x = torch.randn(8, 6)
    cm.train()
    torch.manual_seed(3)
    got = cm(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    with torch.no_grad():
        expected = model.layer(x) + dropped @ _update(spec, adapter).t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cm.eval()
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))


def test_half_precision_bases_get_float32_units():
    model = One(nn.Linear(8, 4)).to(torch.float16)
    cm = surgeon.compile(model, MultiLoRA(rank=2, targets=("layer",)))
    assert {p.dtype for p in cm.store.parameters()} == {torch.float32}
    assert cm(torch.randn(2, 8, dtype=torch.float16)).dtype == torch.float16


# -- files ----------------------------------------------------------------------------------------


def test_files_round_trip_under_our_own_type(tmp_path):
    spec = MultiLoRA(rank=3, units=2, alpha=6, dropout=0.1, targets=MLP_TARGETS)
    cm = surgeon.compile(mlp_without_dropout(), spec).eval()
    randomize(cm, scale=0.5)
    x = ZOO["mlp"].example()
    expected = cm(**x)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_MULTILORA"
    assert (config["r"], config["units"], config["lora_alpha"]) == (3, 2, 6)
    assert config["lora_dropout"] == 0.1
    saved = load_file(tmp_path / WEIGHTS_NAME)
    first = "base_model.model.body.0"
    assert saved[f"{first}.multilora_A"].shape == (6, 12)
    assert saved[f"{first}.multilora_B"].shape == (24, 6)
    assert saved[f"{first}.multilora_scales"].shape == (2,)
    loaded = surgeon.load(mlp_without_dropout(), tmp_path).eval()
    assert loaded.spec("default") == spec
    torch.testing.assert_close(loaded(**x), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multilora")
    surgeon.compile(
        mlp_without_dropout(), MultiLoRA(rank=4, units=2, targets=MLP_TARGETS)
    ).save_adapters(folder)
    return folder


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"r": 0}, r"MultiLoRA.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"units": 0}, r"MultiLoRA.units=0: expected an integer >= 1 \(.* key 'units'\)"),
        ({"lora_dropout": 1.5}, "adapter_config.json key 'lora_dropout'"),
        ({"lora_alpha": "big"}, "lora_alpha='big': expected a number"),
        ({"use_dora": True}, "use_dora=True"),
        ({"units": 3}, r"multilora_scales has shape \(2,\), the model needs \(3,\)"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(mlp_without_dropout(), tmp_path, change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"MultiLoRA.rank=0: expected an integer >= 1"),
        ({"units": 0}, r"MultiLoRA.units=0: expected an integer >= 1"),
        ({"units": 2.0}, r"MultiLoRA.units=2.0: expected an integer >= 1"),
        ({"alpha": -1}, r"MultiLoRA.alpha=-1: expected a number > 0"),
        ({"dropout": 1.0}, r"MultiLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"targets": ()}, r"MultiLoRA.targets=\[\]: expected at least one target"),
        ({"n": 2}, r"MultiLoRA has no field 'n'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        MultiLoRA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["multilora"] is MultiLoRA is surgeon.MultiLoRA
    assert MultiLoRA.peft_type == "SURGEON_MULTILORA"
    spec = surgeon.MethodSpec.from_dict({"method": "multi-lora", "units": 4, "targets": ["q"]})
    assert spec == MultiLoRA(units=4, targets=("q",))


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_layers_other_than_linear_ones_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which MultiLoRA cannot adapt"):
        surgeon.compile(One(layer), MultiLoRA(targets=("layer",)))


# -- training -------------------------------------------------------------------------------------


def test_surgeon_train_moves_every_unit_and_resumes_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(8)
    ]
    spec = MultiLoRA(rank=2, units=3, dropout=0.2, targets=MLP_TARGETS)

    def compiled(seed: int) -> surgeon.CompiledModel:
        torch.manual_seed(0)
        cm = surgeon.compile(mlp_without_dropout(), spec)
        if seed != 0:  # 0: the paper's initialisation (zero scales); others: moved off it
            randomize(cm, seed=seed, scale=0.5)
        return cm

    whole = compiled(0)
    before = {n: p.detach().clone() for n, p in trained_parameters(whole).items()}
    train_and_resume(whole, compiled, data, resume_config(), tmp_path, start=0)
    for name, value in trained_parameters(whole).items():
        assert not torch.equal(value, before[name]), name  # factors too, from step 2 on
