"""DEFT beyond the conformance suite: the rank capped at out_features with alpha's scale, the init
drawn as PEFT draws it, PEFT files with alpha 0, QR and PaRa on GPT-2's Conv1D both ways, the
layer's output reused for ``W x`` (and ``W`` read where it cannot be), merge with another method
on the same layer, dropout drawn as PEFT draws it, bfloat16 merged weights as PEFT's, saved
shapes, PEFT keys, errors, the projection kept in eval, the meta device, the rewritten graph."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.structured import deft
from surgeon.passes.structured.deft import DEFT


def formula(spec, adapter, base, x):
    """DEFT (Kumar et al., 2025): ``W' = (I - P_proj) W + s·Q R`` with ``Q = P``,
    ``P_proj = P relu(P)ᵀ`` (relu) or Q from the QR of P, ``P_proj = Q Qᵀ`` (qr);
    ``s = alpha / r``; PaRa: no ``Q R`` term."""
    transposed = not isinstance(base, nn.Linear)  # GPT-2's Conv1D stores W as in x out
    weight = base.weight.t() if transposed else base.weight
    p = adapter.deft_P
    if spec.decomposition == "qr":
        q = torch.linalg.qr(p).Q
        projector = q @ q.t()
    else:
        q, projector = p, p @ torch.relu(p).t()
    adapted = (torch.eye(weight.shape[0]) - projector) @ weight
    if not spec.para:
        scale = spec.alpha / p.shape[1] if spec.alpha else 1.0
        adapted = adapted + scale * q @ adapter.deft_R
    return plain_output(base, x, adapted.t() if transposed else adapted)


peft = pytest.importorskip("peft")


def _perturbed(model: nn.Module, spec, seed: int = 2) -> surgeon.CompiledModel:
    cm = surgeon.compile(model, spec).eval()
    add_noise(cm.store.parameters(), seed, 0.2)
    return cm


def _one_linear(n_in: int = 6, n_out: int = 5) -> One:
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.bias.normal_()
    return One(layer)


# -- the math --------------------------------------------------------------------------------------


def test_the_rank_is_capped_at_out_features_with_alpha_over_the_capped_rank(tmp_path):
    model = _one_linear(6, 3)
    spec = DEFT(rank=8, alpha=12, targets=("layer",))
    cm = _perturbed(model, spec)
    ((_, adapter),) = cm.store.items("default")
    assert adapter.deft_P.shape == (3, 3) and adapter.deft_R.shape == (3, 6)
    assert adapter.scale == 4.0
    x = torch.randn(4, 6)
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x), rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_one_linear(6, 3), tmp_path)
    torch.testing.assert_close(pm(x), cm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        DEFT(rank=4, targets=("body.0", "head")),
        DEFT(rank=4, decomposition="qr", alpha=8, targets=("body.0", "head")),
        DEFT(rank=4, init="random", init_scale=3.0, targets=("body.0", "head")),
        DEFT(rank=4, para=True, targets=("body.0", "head")),
    ],
    ids=["identity", "identity-qr-alpha", "random", "para"],
)
def test_init_draws_as_peft(spec):
    entry = ZOO["mlp"]
    torch.manual_seed(11)
    cm = surgeon.compile(entry.model(), spec)
    torch.manual_seed(11)
    pm = peft_model(entry.model(), peft.get_peft_config(spec.to_peft_config(())), seed=None)
    theirs = dict(pm.named_parameters())
    for path, layer in cm.store.items("default"):
        for name, param in layer.peft_tensors().items():
            assert torch.equal(param, theirs[f"base_model.model.{path}.{name}.default"]), name
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_a_peft_file_with_alpha_zero_loads_unscaled_as_peft_reads_it(tmp_path):
    entry = ZOO["mlp"]
    config = peft.DeftConfig(r=4, alpha=0, target_modules=["body.0", "head"])
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path).eval()
    assert cm.spec("default").alpha is None
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        DEFT(rank=4, decomposition="qr", alpha=8, targets=("c_attn", "c_fc")),
        DEFT(rank=4, para=True, targets=("c_attn", "c_fc")),
    ],
    ids=["qr", "para"],
)
def test_gpt2_conv1d_files_load_both_ways_with_peft_outputs(spec, tmp_path):
    entry = ZOO["gpt2"]
    x = entry.example()
    cm = _perturbed(entry.model(), spec)
    cm.save_adapters(tmp_path / "ours")
    pm = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(pm(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)
    pm = peft_model(entry.model(), peft.get_peft_config(spec.to_peft_config(())))
    pm.save_pretrained(tmp_path / "theirs")
    back = surgeon.load(entry.model(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_after_another_method_w_x_comes_from_the_weight_and_merge_reads_it_first():
    """``W x`` is the layer's output minus its bias for the first adapter and for DEFT adapters
    after DEFT ones; after a LoRA's output it is computed from W. Merging reads W before the
    LoRA folds in, as the unmerged graph sees it."""
    model = _one_linear()
    lora, spec = surgeon.LoRA(rank=2, targets=("layer",)), DEFT(rank=3, targets=("layer",))
    cm = surgeon.compile(model, surgeon.Spec({"lora": lora, "a": spec, "b": spec}))
    add_noise(cm.store.parameters(), 3, 0.2)
    cm.eval()
    x = torch.randn(4, 6)
    layers = {name: adapter for name in ("lora", "a", "b") for _, adapter in cm.store.items(name)}
    base = model.layer(x)

    def update(name):
        return formula(spec, layers[name], model.layer, x) - base

    lora_term = layers["lora"].scale * x @ layers["lora"].lora_A.t() @ layers["lora"].lora_B.t()
    cm.set_active(["a", "b"])
    assert "base_weight" not in graph_code(cm)  # b reuses the product a took from the output
    torch.testing.assert_close(cm(x), base + update("a") + update("b"), rtol=1e-5, atol=1e-5)
    cm.set_active(["lora", "a"])
    assert "base_weight" in graph_code(cm)
    expected = base + lora_term + update("a")
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weight = model.layer.weight.detach().clone()
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=1e-5, atol=1e-6)


def test_dropout_draws_as_peft_on_the_injection_only_in_training(tmp_path):
    entry = ZOO["mlp"]
    spec = DEFT(rank=4, dropout=0.5, targets=("body.0", "body.3", "head"))
    cm = _perturbed(entry.model(), spec)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path)
    x = entry.example()
    evaluated = logits(cm(**x))
    cm.train()
    pm.train()
    torch.manual_seed(7)
    ours = logits(cm(**x))
    torch.manual_seed(7)
    torch.testing.assert_close(ours, logits(pm(**x)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, evaluated, atol=1e-3)


@pytest.mark.parametrize("spec", [DEFT(rank=4), DEFT(rank=4, para=True)], ids=["deft", "para"])
def test_bfloat16_merged_weights_are_peft_s(spec, tmp_path):
    entry = ZOO["mlp"]
    spec = spec.replace(targets=("body.0", "body.3", "head"))
    pm = peft_model(entry.model().to(torch.bfloat16), peft.get_peft_config(spec.to_peft_config(())))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(torch.bfloat16), tmp_path).eval()
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        theirs = pm.get_base_model().get_submodule(path).base_layer.weight
        assert torch.equal(cm.model.get_submodule(path).weight, theirs), path


def test_eval_without_gradients_keeps_the_projection_until_p_changes(monkeypatch):
    calls = []
    projection = deft.projection
    monkeypatch.setattr(deft, "projection", lambda *a: calls.append(1) or projection(*a))
    cm = _perturbed(_one_linear(), DEFT(rank=3, decomposition="qr", targets=("layer",)))
    x = torch.randn(2, 6)
    calls.clear()
    with torch.no_grad():
        first = cm(x)
        cm(x)
        assert len(calls) == 1
        ((_, adapter),) = cm.store.items("default")
        adapter.deft_P.add_(0.1)
        assert not torch.allclose(cm(x), first)
    assert len(calls) == 2
    cm(x)  # gradients on: computed again for autograd
    assert len(calls) == 3


# -- PEFT's format -----------------------------------------------------------------------------------


def test_saved_tensors_have_peft_keys_and_shapes(tmp_path):
    specs = {
        "deft": DEFT(rank=4, targets=("layer",)),
        "para": DEFT(rank=4, para=True, targets=("layer",)),
    }
    surgeon.compile(One(gpt2_conv1d(32, 96)), surgeon.Spec(specs)).save_adapters(tmp_path)
    prefix = "base_model.model.layer"
    saved = load_file(tmp_path / "deft" / WEIGHTS_NAME)
    assert saved[f"{prefix}.deft_P"].shape == (96, 4)  # Conv1D 32 -> 96
    assert saved[f"{prefix}.deft_R"].shape == (4, 32)
    assert not any(k.endswith("deft_R") for k in load_file(tmp_path / "para" / WEIGHTS_NAME))
    config = json.loads((tmp_path / "para" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "DEFT" and config["para"] is True
    assert config["fan_in_fan_out"] is False  # PEFT sets it per layer type


def test_peft_options_that_do_not_change_the_numbers_load(tmp_path):
    entry = ZOO["mlp"]
    cm = _perturbed(entry.model(), DEFT(rank=4, targets=("head",)))
    cm.save_adapters(tmp_path)
    loaded = load_with_changed_config(entry.model(), tmp_path, {"fan_in_fan_out": True})
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"decomposition_method": "svd"},
            r"DEFT.decomposition='svd': expected one of 'relu', 'qr'.*key 'decomposition_method'",
        ),
        ({"init_weights": "gaussian"}, r"init_weights='gaussian': expected true or false"),
        ({"alpha": "8"}, r"alpha='8': expected a number, or null"),
        ({"alpha": -2}, r"DEFT.alpha=-2: expected a number > 0.*key 'alpha'"),
        ({"init_scale": -1.0}, r"DEFT.init_scale=-1.0: expected a number >= 0.*key 'init_scale'"),
        ({"para": 1}, r"para=1: expected true or false"),
        ({"r": 0}, r"DEFT.rank=0.*key 'r'"),
        ({"deft_dropout": 1.0}, r"DEFT.dropout=1.0.*key 'deft_dropout'"),
        ({"bias": "lora_only"}, r"DEFT.bias='lora_only'.*key 'bias'"),
        ({"target_modules": None}, r"target_modules is missing"),
        ({"use_dora": True}, r"use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), DEFT(rank=4, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"DEFT.rank=0: expected an integer >= 1"),
        ({"decomposition": "svd"}, r"DEFT.decomposition='svd': expected one of 'relu', 'qr'"),
        ({"alpha": 0}, r"DEFT.alpha=0: expected a number > 0"),
        ({"para": "yes"}, r"DEFT.para='yes': expected true or false"),
        ({"dropout": -0.1}, r"DEFT.dropout=-0.1: expected a number >= 0 and < 1"),
        ({"init": "identity"}, r"DEFT.init='identity': expected one of 'default', 'random'"),
        ({"init_scale": -1}, r"DEFT.init_scale=-1: expected a number >= 0"),
        (
            {"bias": "lora_only"},
            r"DEFT.bias='lora_only': expected one of 'none', 'all', 'deft_only'",
        ),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        DEFT(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (nn.Conv1d(4, 4, 1), "Conv1d"),
        (nn.Conv2d(4, 4, 1), "Conv2d"),
        (nn.Embedding(5, 4), "Embedding"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which DEFT cannot adapt"):
        surgeon.compile(One(layer), DEFT(targets=("layer",)))


@pytest.mark.parametrize("spec", [DEFT(decomposition="qr"), DEFT(para=True)], ids=["qr", "para"])
def test_qr_and_para_compile_and_run_on_the_meta_device(spec):
    with torch.device("meta"):
        model = One(gpt2_conv1d(6, 10))
    cm = surgeon.compile(model, spec.replace(targets=("layer",)))
    out = cm(torch.randn(2, 6, device="meta"))
    assert out.is_meta and out.shape == (2, 10)


# -- graphs -----------------------------------------------------------------------------------------


GOLDEN = """\
def forward(self, x):
    layer = self.layer(x)
    adapters_default_layer_projection = self.adapters.default.layer.projection()
    getitem = adapters_default_layer_projection[0]
    getitem_1 = adapters_default_layer_projection[1];  adapters_default_layer_projection = None
    to = layer.to(torch.float32);  layer = None
    to_1 = x.to(torch.float32);  x = None
    adapters_default_layer_base_bias = self.adapters.default.layer.base_bias
    to_2 = adapters_default_layer_base_bias.to(torch.float32);  adapters_default_layer_base_bias = None
    sub = torch.sub(to, to_2);  to_2 = None
    matmul = torch.matmul(sub, getitem_1);  sub = getitem_1 = None
    adapters_default_layer_deft_r = self.adapters.default.layer.deft_R
    linear = torch._C._nn.linear(to_1, adapters_default_layer_deft_r);  to_1 = adapters_default_layer_deft_r = None
    sub_1 = torch.sub(linear, matmul);  linear = matmul = None
    linear_1 = torch._C._nn.linear(sub_1, getitem);  sub_1 = getitem = None
    add = torch.add(to, linear_1);  to = linear_1 = None
    to_3 = add.to(torch.bfloat16);  add = None
    return to_3"""


def test_golden_graph_reuses_the_layer_output_in_float32():
    model = _one_linear().to(torch.bfloat16)
    cm = surgeon.compile(model, DEFT(rank=3, targets=("layer",)))
    assert graph_code(cm) == GOLDEN
