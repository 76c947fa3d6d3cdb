"""UniLoRA beyond the conformance suite: indices and scales drawn as PEFT draws them (balanced,
seeded, over every layer in model order), PEFT files without indices both ways, saved indices
used as saved, the fresh θ_d as PEFT's with the global generator in step, θ_d shared by an
adapter's layers, exact half-precision parity, errors and refused PEFT configs."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import WEIGHTS_NAME
from surgeon.passes.shared.unilora import UniLoRA, balanced_indices


def formula(spec, adapter, base, x):
    """Uni-LoRA (Li et al., 2025): ``W x + b + B A x`` with ``A[i, j] = θ_d[I_A[i, j]] / √n``,
    ``n`` the number of LoRA entries that share θ_d's entry (B alike). On one adapted layer
    these are counted over its own indices."""
    theta = adapter.theta.unilora_theta_d
    index_a, index_b = adapter.unilora_indices_A, adapter.unilora_indices_B
    shared = torch.bincount(torch.cat([index_a.flatten(), index_b.flatten()]))
    a = theta[index_a] / shared[index_a].sqrt()
    b = theta[index_b] / shared[index_b].sqrt()
    return plain_output(base, x) + x @ a.t() @ b.t()


peft = pytest.importorskip("peft")

TARGETS = ["query", "value", "dense"]  # BERT's, in and out of attention (and the pooler)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
BUFFERS = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


def _layers(cm, name="default"):
    return dict(cm.store.items(name))


def _theta(cm, name="default"):
    return next(iter(_layers(cm, name).values())).theta.unilora_theta_d


# -- indices and scales --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "seed"),
    [(100, 42), (64, 0), (1000, 7)],
    ids=["remainder", "divides", "longer-than-the-entries"],
)
def test_indices_and_scales_are_peft_s(length, seed):
    """768 entries over θ_d: 100 (7 or 8 uses each), 64 (12 each), 1000 (some unused)."""
    entry = ZOO["llama"]
    config = peft.UniLoraConfig(
        r=2, theta_d_length=length, proj_seed=seed, target_modules=LLAMA_TARGETS
    )
    pm = peft_model(entry.model(), config, seed=None)
    cm = surgeon.compile(
        entry.model(), UniLoRA(rank=2, theta_d_length=length, seed=seed, targets=LLAMA_TARGETS)
    )
    layers = _layers(cm)
    for path, layer in layers.items():
        theirs = pm.base_model.model.get_submodule(path)
        for name in BUFFERS:
            mine, peft_buffer = getattr(layer, name), getattr(theirs, name)["default"]
            assert mine.dtype == peft_buffer.dtype and torch.equal(mine, peft_buffer), (path, name)
    every = torch.cat(
        [getattr(layer, n).flatten() for layer in layers.values() for n in BUFFERS[:2]]
    )
    uses = torch.bincount(every, minlength=length)
    assert every.numel() == 768 and uses.max() - uses.min() <= 1


def test_balanced_indices_need_numpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(surgeon.SpecError, match="install numpy"):
        balanced_indices(10, 4, 0)


# -- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_name", "targets"),
    [
        ("mlp", ["body.0", "body.3", "head"]),
        pytest.param("bert", TARGETS, marks=pytest.mark.slow),
    ],
)
def test_files_without_indices_go_both_ways_with_the_same_outputs(model_name, targets, tmp_path):
    """The case the seeded draw exists for: θ_d alone in the file, the indices and scales
    drawn again from proj_seed on both sides, over every layer in model order (BERT's many)."""
    entry = ZOO[model_name]
    x = entry.example()
    config = peft.UniLoraConfig(r=3, theta_d_length=200, proj_seed=11, target_modules=targets)
    pm = peft_model(entry.model(), config)
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path / "peft")
    assert list(load_file(tmp_path / "peft" / WEIGHTS_NAME)) == ["base_model.unilora_theta_d"]
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    assert cm.spec("default").seed == 11 and not cm.spec("default").save_indices
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    randomize(cm, scale=0.5)
    ours = logits(cm(**x))
    cm.save_adapters(tmp_path / "ours")
    assert list(load_file(tmp_path / "ours" / WEIGHTS_NAME)) == ["base_model.unilora_theta_d"]
    theirs = logits(peft_loaded(entry.model(), tmp_path / "ours")(**x))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_saved_indices_and_scales_are_used_as_saved(tmp_path):
    entry = ZOO["mlp"]
    config = peft.UniLoraConfig(
        r=2, theta_d_length=30, save_indices=True, target_modules=["body.0", "head"]
    )
    peft_model(entry.model(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.head.unilora_indices_B"
    assert tensors[key].dtype == torch.int64 and tensors[key].shape == (5, 2)
    tensors[key] = tensors[key].flip(0)  # not what the seed draws
    tensors["base_model.model.head.unilora_scales_A"] *= 2
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = peft_loaded(entry.model(), tmp_path)(**x)
    cm = surgeon.load(entry.model(), tmp_path)
    assert torch.equal(_layers(cm)["head"].unilora_indices_B, tensors[key])
    torch.testing.assert_close(cm(**x), expected, rtol=1e-5, atol=1e-6)


# -- θ_d -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "init"),
    [
        (torch.float32, "uniform"),
        (torch.float32, "normal"),
        pytest.param(torch.bfloat16, "uniform", marks=pytest.mark.slow),
    ],
)
def test_the_fresh_theta_is_peft_s_and_the_global_generator_stays_in_step(dtype, init):
    """θ_d is PEFT's first draw; PEFT then draws placeholder indices per layer that it throws
    away: surgeon draws as many, so a second adapter's θ_d is PEFT's too."""
    entry = ZOO["mlp"]
    targets = ["body.0", "body.3", "head"]
    config = peft.UniLoraConfig(
        r=2, theta_d_length=40, init_weights=init == "uniform", target_modules=targets
    )
    base = entry.model().to(dtype)
    torch.manual_seed(5)
    pm = peft_model(base, config, seed=None)
    pm.add_adapter("second", config)
    spec = UniLoRA(rank=2, theta_d_length=40, init=init, targets=targets)
    base = entry.model().to(dtype)
    torch.manual_seed(5)
    cm = surgeon.compile(base, spec)
    cm.add_adapter("second", spec)
    for name in ("default", "second"):
        theta = _theta(cm, name)
        assert theta.dtype == torch.float32
        assert torch.equal(theta, pm.base_model.unilora_theta_d[name]), name
    if init == "uniform":
        assert _theta(cm).abs().max() <= 0.02
    x = entry.example()["x"].to(dtype)
    torch.testing.assert_close(cm(x), pm(x), rtol=0, atol=0)


def test_theta_is_one_parameter_per_adapter_shared_by_its_layers():
    entry = ZOO["mlp"]
    spec = UniLoRA(rank=2, theta_d_length=40, targets=("body.0", "body.3", "head"))
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec}))
    thetas = {
        name: {id(layer.theta.unilora_theta_d) for layer in _layers(cm, name).values()}
        for name in ("a", "b")
    }
    assert all(len(ids) == 1 for ids in thetas.values()) and thetas["a"] != thetas["b"]
    assert cm.num_trainable() == 2 * 40  # indices and scales are fixed buffers
    cm.set_active("a")
    cm.train()
    cm(**entry.example()).pow(2).mean().backward()
    assert {n for n, p in cm.named_parameters() if p.grad is not None} == {
        n for n, _ in cm.named_parameters() if "unilora_theta_d" in n and ".a." in n
    }


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), UniLoRA(dropout=0.5, targets=("head",)))
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_indices", [False, True])
def test_half_precision_matches_peft_exactly(dtype, save_indices, tmp_path):
    entry = ZOO["llama"]
    config = peft.UniLoraConfig(
        r=2, theta_d_length=50, save_indices=save_indices, target_modules=LLAMA_TARGETS
    )
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    for layer in _layers(cm).values():
        assert layer.unilora_scales_A.dtype == torch.float32  # rounded through the base dtype
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"UniLoRA.rank=0: expected an integer >= 1"),
        ({"theta_d_length": 0}, r"UniLoRA.theta_d_length=0: expected an integer >= 1"),
        ({"seed": -1}, r"UniLoRA.seed=-1: expected an integer >= 0"),
        ({"dropout": 1.0}, r"UniLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"save_indices": "yes"}, r"UniLoRA.save_indices='yes': expected true or false"),
        ({"init": "zeros"}, r"UniLoRA.init='zeros': expected one of 'uniform', 'normal'"),
        ({"init_theta_d_bound": 0}, r"UniLoRA.init_theta_d_bound=0: expected a number > 0"),
        ({"bias": "lora_only"}, r"UniLoRA.bias='lora_only': expected one of"),
        ({"proj_seed": 1}, r"UniLoRA has no field 'proj_seed'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        UniLoRA(**fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"bias='lora_only'.*'bias'"),
        ({"unilora_dropout": 1.0}, r"dropout=1.0.*'unilora_dropout'"),
        ({"init_weights": "yes"}, r"init_weights='yes'"),
        ({"proj_seed": -3}, r"seed=-3.*'proj_seed'"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), UniLoRA(targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which UniLoRA cannot adapt"):
        surgeon.compile(One(layer), UniLoRA(targets=("layer",)))
