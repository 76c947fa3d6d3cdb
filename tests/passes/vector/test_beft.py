"""BEFT beyond the conformance suite: its formula, merge into the layer's bias (and into a bias
the merge has to create, where PEFT refuses), PEFT's key names and shapes, PEFT parity on BERT
(biased projections), with selections PEFT's config cannot write and with init_weights=false,
exact half-precision parity merged and unmerged, errors, the rewritten graph."""

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
from surgeon.passes.vector.beft import BEFT


def formula(spec, adapter, base, x):
    """BEFT (Huang et al., 2025): ``W x + b + Δb``, one trained bias entry per output feature."""
    return plain_output(base, x) + adapter.beft_bias.flatten()


peft = pytest.importorskip("peft")


def _perturb(cm, seed: int = 2) -> None:
    add_noise(cm.store.parameters(), seed, 0.3)


def _adapted_linear(bias: bool) -> tuple[surgeon.CompiledModel, nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(5, 6, bias=bias)
    cm = surgeon.compile(One(layer), BEFT(targets=("layer",)))
    _perturb(cm)
    return cm, layer, torch.randn(3, 5)


# -- the math --------------------------------------------------------------------------------------


def test_merge_adds_the_vector_to_the_bias_and_leaves_the_weight():
    cm, layer, x = _adapted_linear(bias=True)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    ((_, adapter),) = cm.store.items("default")
    expected = cm(x)
    cm.merge()
    assert "beft_bias" not in cm.graph.code()
    assert torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer.bias, bias + adapter.beft_bias)
    torch.testing.assert_close(cm(x), expected)
    cm.unmerge()
    torch.testing.assert_close(layer.bias, bias)


def test_merge_into_a_layer_without_bias_creates_one_and_unmerge_removes_it():
    """PEFT refuses to merge here (ValueError); surgeon gives the layer a bias while merged."""
    cm, layer, x = _adapted_linear(bias=False)
    ((_, adapter),) = cm.store.items("default")
    expected = cm(x)
    cm.merge()
    assert torch.equal(layer.bias, adapter.beft_bias) and not layer.bias.requires_grad
    torch.testing.assert_close(cm(x), expected)
    cm.unmerge()
    assert layer.bias is None and "layer.bias" not in cm.model.state_dict()
    torch.testing.assert_close(cm(x), expected)


def test_two_adapters_merge_into_one_created_bias_and_unmerge_in_turn():
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6, bias=False))
    spec = BEFT(targets=("layer",))
    cm = surgeon.compile(model, surgeon.Spec({"a": spec, "b": spec}))
    _perturb(cm)
    cm.set_active(["a", "b"])
    x = torch.randn(3, 5)
    expected = cm(x)
    ((_, a),), ((_, b),) = cm.store.items("a"), cm.store.items("b")
    torch.testing.assert_close(expected, model.layer(x) + a.beft_bias + b.beft_bias)
    cm.merge()
    torch.testing.assert_close(cm(x), expected)
    cm.unmerge()
    assert model.layer.bias is None
    torch.testing.assert_close(cm(x), expected)


def test_merge_and_unload_of_a_model_without_biases_keeps_the_created_ones():
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), BEFT())
    _perturb(cm)
    x = entry.example()
    expected = logits(cm(**x))
    plain = cm.merge_and_unload()
    assert not any("forward" in vars(m) for m in plain.modules())
    assert plain.model.layers[0].self_attn.v_proj.bias is not None
    assert plain.model.layers[0].self_attn.q_proj.bias is None
    torch.testing.assert_close(logits(plain(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_leaves_a_layer_without_bias_as_it_was(tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), BEFT())
    _perturb(cm)
    x = entry.example()
    expected = logits(cm(**x))
    report = surgeon.export_onnx(cm, tmp_path / "model.onnx", x, verify=True)
    assert report.max_abs_diff < 1e-5
    assert cm.model.model.layers[0].self_attn.v_proj.bias is None
    torch.testing.assert_close(logits(cm(**x)), expected)


def test_fresh_bias_is_zero_and_only_it_trains():
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), BEFT(targets=("v_proj", "down_proj")))
    assert all(torch.count_nonzero(p) == 0 for p in cm.store.parameters())
    cm.train()
    logits(cm(**entry.example())).pow(2).mean().backward()
    grads = {n for n, p in cm.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 2 and all(n.endswith("beft_bias") for n in grads)
    # v_proj: 16 outputs (2 kv heads of 8); down_proj: 32
    assert cm.num_trainable() == 2 * (16 + 32)


# -- PEFT -------------------------------------------------------------------------------------------


def test_saved_tensors_have_peft_keys_and_shapes(tmp_path):
    surgeon.compile(ZOO["bert"].model(), BEFT(targets=("value",))).save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    prefix = "base_model.model.bert.encoder.layer"
    assert set(saved) == {f"{prefix}.{i}.attention.self.value.beft_bias" for i in (0, 1)}
    assert saved[f"{prefix}.0.attention.self.value.beft_bias"].shape == (1, 32)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "BEFT" and config["init_weights"] is True


@pytest.mark.parametrize(
    "targets",
    [("value",), pytest.param(("query", "value", "dense"), marks=pytest.mark.slow)],
    ids=["value", "all"],
)
def test_bert_both_ways_with_peft(targets, tmp_path):
    entry = ZOO["bert"]
    x = entry.example()
    cm = surgeon.compile(entry.model(), BEFT(targets=targets))
    _perturb(cm)
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path / "ours")
    loaded = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)

    pm = peft_model(entry.model(), peft.BeftConfig(target_modules=list(targets)))
    pm.save_pretrained(tmp_path / "theirs")
    back = surgeon.load(entry.model(), tmp_path / "theirs")
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-6)


def test_peft_file_with_init_weights_false_loads_its_own_numbers(tmp_path):
    entry = ZOO["bert"]
    config = peft.BeftConfig(target_modules=["value"], init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)  # PEFT's random draw, unperturbed
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "selection",
    [
        pytest.param({"layers": [1]}, marks=pytest.mark.slow),
        {"exclude": ["layers.0.self_attn.v_proj"]},
        pytest.param({"targets": r".*\.o_proj"}, marks=pytest.mark.slow),
    ],
    ids=["layers", "exclude", "regex"],
)
def test_selections_round_trip_so_peft_adapts_the_same_modules(selection, tmp_path):
    entry = ZOO["llama"]
    spec = BEFT(**{"targets": ("v_proj", "o_proj"), **selection})
    cm = surgeon.compile(entry.model(), spec)
    _perturb(cm)
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(entry.model(), tmp_path)
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if hasattr(m, "beft_bias")
    }
    assert adapted == set(cm.store.paths["default"])
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)
    back = surgeon.load(entry.model(), tmp_path)
    assert back.store.paths["default"] == cm.store.paths["default"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly_merged_too(dtype, tmp_path):
    entry = ZOO["bert"]
    targets = ["query", "value", "dense"]
    pm = peft_model(entry.model().to(dtype), peft.BeftConfig(target_modules=targets))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.beft_bias.dtype == torch.float32  # PEFT's default upcast of adapter weights
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        ours, theirs = cm.model.get_submodule(path), pm.get_base_model().get_submodule(path)
        assert torch.equal(ours.bias, theirs.base_layer.bias), path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"target_modules": None}, "target_modules is missing"),
        ({"target_modules": 3}, r"target_modules=3: expected a module name"),
        (
            {"modules_to_save": ["classifier"]},
            r"missing key\(s\), e.g. base_model.model.classifier",
        ),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["bert"]
    surgeon.compile(entry.model(), BEFT(targets=("value",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"targets": []}, r"BEFT.targets=\[\]: expected at least one target"),
        ({"targets": "("}, r"BEFT.targets='\(': not a valid regular expression"),
        ({"layers": -1}, r"BEFT.layers=-1"),
        ({"rank": 4}, r"BEFT has no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        BEFT(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (gpt2_conv1d(), "Conv1D"),
        (nn.Conv2d(2, 2, 1), "Conv2d"),
        (nn.Embedding(5, 4), "Embedding"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which BEFT cannot adapt"):
        surgeon.compile(One(layer), BEFT(targets=("layer",)))


# -- graphs -----------------------------------------------------------------------------------------


GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu);  relu = None
    adapters_default_head_beft_bias = self.adapters.default.head.beft_bias
    add = torch.add(head, adapters_default_head_beft_bias);  head = adapters_default_head_beft_bias = None
    to = add.to(torch.bfloat16);  add = None
    return to"""


def test_golden_graph_adds_the_bias_and_casts_back_to_bfloat16():
    cm = surgeon.compile(ZOO["mlp"].model().to(torch.bfloat16), BEFT(targets=("head",)))
    assert graph_code(cm) == GOLDEN_MLP
