"""DeLoRA beyond the conformance suite: PEFT's init under the same torch seed (the column norms
of W included), the bound on the update's norm, the norms taken once and used as a file saves
them, per-layer ranks and bounds, dropout in training as PEFT's, exact half-precision parity,
the eval-time cache of the scaled A, trained biases, LoRA+ groups as PEFT's, the config's keys,
errors, the rewritten graph."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    count_calls,
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
from surgeon.passes.lowrank.delora import DeLoRA, DeLoRALayer


def formula(spec, adapter, base, x):
    """DeLoRA: ``W x + b + (λ / r) B Ξ A diag(‖W_{:,k}‖) x`` with ``Ξ = diag(1 / (‖A_i‖ ‖B^i‖))``
    (the norms of A's rows and B's columns, clamped at 1e-4) and ``‖W_{:,k}‖`` the norms of the
    base weight's columns."""
    a, b = adapter.delora_A, adapter.delora_B
    rank = a.shape[0]
    xi = 1 / (a.norm(dim=1).clamp(min=1e-4) * b.norm(dim=0).clamp(min=1e-4))
    delta = (adapter.delora_lambda / rank) * (b * xi) @ a * base.weight.norm(dim=0)
    return plain_output(base, x) + x @ delta.t()


peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")


def _perturb(cm, seed: int = 2) -> None:
    add_noise(cm.store.parameters(), seed, 0.3)


def _layers(cm, name: str = "default") -> dict[str, DeLoRALayer]:
    return dict(cm.store.items(name))


# -- the init and the math -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
    ids=["fp32", "bf16"],
)
def test_fresh_adapter_equals_peft_init_under_the_same_torch_seed(dtype):
    """A drawn on the CPU in float32 and rounded through the base dtype, B zero, λ filled, the
    column norms taken in the base dtype: all as PEFT makes them."""
    entry = ZOO["llama"]
    config = peft.DeloraConfig(r=4, target_modules=list(TARGETS), delora_lambda=3)
    torch.manual_seed(11)
    pm = peft_model(entry.model().to(dtype), config, seed=None)
    torch.manual_seed(11)
    cm = surgeon.compile(entry.model().to(dtype), DeLoRA(rank=4, lambda_init=3, targets=TARGETS))
    for path, layer in _layers(cm).items():
        theirs = pm.base_model.model.get_submodule(path)
        for name in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"):
            mine = getattr(layer, name)
            assert mine.dtype == torch.float32, (path, name)
            assert torch.equal(mine, getattr(theirs, name)["default"]), (path, name)
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(entry.model().to(dtype)(**x)))


def test_the_update_is_bounded_by_lambda_whatever_a_and_b_are():
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    cm = surgeon.compile(One(layer), DeLoRA(rank=4, lambda_init=2.0, targets=("layer",)))
    ((_, adapter),) = cm.store.items("default")
    norms = layer.weight.detach().norm(dim=0)
    assert torch.equal(adapter.delora_w_norm, norms)
    for scale in (1e-3, 1.0, 1e3):
        with torch.no_grad():
            adapter.delora_A.normal_().mul_(scale)
            adapter.delora_B.normal_().mul_(scale)
        unscaled = adapter.delta_weight() / norms  # (λ / r) B Ξ A
        assert torch.linalg.matrix_norm(unscaled) <= 2.0 + 1e-5
    # rank one with aligned terms reaches the bound
    with torch.no_grad():
        adapter.delora_A.copy_(torch.ones(4, 12))
        adapter.delora_B.copy_(torch.ones(10, 4))
    torch.testing.assert_close(
        torch.linalg.matrix_norm(adapter.delta_weight() / norms), torch.tensor(2.0)
    )


def test_the_column_norms_are_taken_once_and_a_file_s_are_used_as_saved(tmp_path):
    entry = ZOO["llama"]
    pm = peft_model(entry.model(), peft.DeloraConfig(r=4, target_modules=list(TARGETS)))
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.0.mlp.down_proj.delora_w_norm"
    assert tensors[key].shape == (48,)
    tensors[key] = tensors[key].flip(0) * 2  # not the loading model's norms
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = logits(peft_loaded(entry.model(), tmp_path)(**x))
    cm = surgeon.load(entry.model(), tmp_path)
    assert torch.equal(_layers(cm)["model.layers.0.mlp.down_proj"].delora_w_norm, tensors[key])
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


def test_patterns_give_per_layer_ranks_and_starting_bounds(tmp_path):
    spec = DeLoRA(
        rank=2,
        lambda_init=4,
        targets=TARGETS,
        rank_pattern={"down_proj": 5},
        lambda_pattern={r"layers\.1\..*q_proj": 0.5},
    )
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    layers = _layers(cm)
    assert layers["model.layers.0.mlp.down_proj"].delora_A.shape == (5, 48)
    assert layers["model.layers.0.self_attn.q_proj"].delora_B.shape == (32, 2)
    assert layers["model.layers.1.self_attn.q_proj"].delora_lambda.item() == 0.5
    assert layers["model.layers.0.self_attn.q_proj"].delora_lambda.item() == 4
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["rank_pattern"] == {"down_proj": 5}
    assert config["lambda_pattern"] == {r"layers\.1\..*q_proj": 0.5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_with_dropout_matches_peft_under_the_same_torch_seed(dtype, tmp_path):
    """PEFT drops the input in its own dtype and scales it in the adapter's: so does surgeon,
    and the dropout draws the same mask."""
    entry = ZOO["llama"]
    config = peft.DeloraConfig(r=4, target_modules=list(TARGETS), module_dropout=0.3)
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    x = entry.example()
    outputs = []
    for model in (cm, pm):
        model.train()
        torch.manual_seed(0)
        outputs.append(logits(model(**x)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0].float(), logits(pm.eval()(**x)).float(), atol=1e-3)


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)],
    ids=["bf16", "fp16"],
)
def test_half_precision_matches_peft_exactly_both_ways(dtype, tmp_path):
    entry = ZOO["llama"]
    config = peft.DeloraConfig(r=4, target_modules=list(TARGETS))
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path / "theirs")
    x = entry.example()
    cm = surgeon.load(entry.model().to(dtype), tmp_path / "theirs")
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)
    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(entry.model().to(dtype), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), out, rtol=0, atol=0)


@pytest.fixture
def counted(monkeypatch):
    return count_calls(monkeypatch, DeLoRALayer, "scaled_a_now")


def test_inference_scales_a_once_until_a_parameter_changes(counted):
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), DeLoRA(rank=2, targets=("head",))).eval()
    _perturb(cm)
    x = entry.example()
    with torch.no_grad():
        first = cm(**x)
        calls = len(counted)
        torch.testing.assert_close(cm(**x), first)
        assert len(counted) == calls  # kept
        _layers(cm)["head"].delora_lambda.mul_(2)
        assert not torch.allclose(cm(**x), first)
        assert len(counted) == calls + 1  # λ changed: computed again
    cm.train()
    cm(**x)
    cm(**x)
    assert len(counted) >= calls + 3  # training computes it on every call


@pytest.mark.parametrize("bias", ["delora_only", pytest.param("all", marks=pytest.mark.slow)])
def test_trained_biases_are_saved_and_load_in_peft(bias, tmp_path):
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), DeLoRA(rank=2, targets=("head",), bias=bias))
    trained = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    biases = {"head.bias"} if bias == "delora_only" else {"body.0.bias", "body.3.bias", "head.bias"}
    assert trained == biases
    _perturb(cm)
    with torch.no_grad():  # as training would move them
        for name in biases:
            cm.model.get_parameter(name).add_(0.5)
    x = entry.example()
    expected = cm.eval()(**x)
    cm.save_adapters(tmp_path)
    assert "base_model.model.head.base_layer.bias" in load_file(tmp_path / WEIGHTS_NAME)
    torch.testing.assert_close(peft_loaded(entry.model(), tmp_path)(**x), expected)
    torch.testing.assert_close(surgeon.load(entry.model(), tmp_path).eval()(**x), expected)


def test_lora_plus_groups_the_parameters_as_peft():
    """PEFT's LoRA+ raises the learning rate of every parameter named like ``lora_B`` and of
    vectors: delora_B and delora_lambda, not delora_A."""
    from peft.optimizers import create_loraplus_optimizer

    entry = ZOO["mlp"]
    pm = peft_model(entry.model(), peft.DeloraConfig(r=2, target_modules=["head"]), seed=None)
    optimizer = create_loraplus_optimizer(pm, torch.optim.SGD, lr=1.0, loraplus_lr_ratio=4.0)
    raised = {id(p) for g in optimizer.param_groups if g["lr"] == 4.0 for p in g["params"]}
    theirs = {
        n.split(".")[-2]: id(p) in raised for n, p in pm.named_parameters() if p.requires_grad
    }
    layer = _layers(surgeon.compile(entry.model(), DeLoRA(rank=2, targets=("head",))))["head"]
    mine = {n: layer.loraplus_group(n, p) == "B" for n, p in layer.named_parameters()}
    assert mine == theirs == {"delora_A": False, "delora_B": True, "delora_lambda": True}


# -- files and configs --------------------------------------------------------------------------------


def test_a_peft_file_with_init_weights_false_loads_its_own_numbers(tmp_path):
    entry = ZOO["llama"]
    config = peft.DeloraConfig(r=4, target_modules=["q_proj"], init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)  # PEFT's random B, unperturbed
    pm.save_pretrained(tmp_path)
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(surgeon.load(entry.model(), tmp_path)(**x)), expected)


def test_config_keys_map_to_fields_and_peft_reads_them(tmp_path):
    spec = DeLoRA(
        rank=3,
        lambda_init=2.5,
        dropout=0.1,
        bias="delora_only",
        targets=("q_proj", "v_proj"),
        exclude=("layers.0.self_attn.v_proj",),
        rank_pattern={"q_proj": 4},
        lambda_pattern={"v_proj": 6.0},
    )
    surgeon.compile(ZOO["llama"].model(), spec).save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "r", "delora_lambda", "module_dropout")} == {
        "peft_type": "DELORA",
        "r": 3,
        "delora_lambda": 2.5,
        "module_dropout": 0.1,
    }
    assert config["exclude_modules"] == ["layers.0.self_attn.v_proj"]
    assert config["init_weights"] is True
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert (theirs.delora_lambda, theirs.bias, theirs.rank_pattern) == (
        2.5,
        "delora_only",
        {"q_proj": 4},
    )
    assert surgeon.load(ZOO["llama"].model(), tmp_path).spec("default") == spec


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"DeLoRA.bias='lora_only'.*adapter_config.json key 'bias'"),
        ({"delora_lambda": -1}, r"DeLoRA.lambda_init=-1.*adapter_config.json key 'delora_lambda'"),
        ({"rank_pattern": {"nothing_here": 3}}, r"rank_pattern: key 'nothing_here' matches no"),
        ({"lambda_pattern": [1]}, r"lambda_pattern=\[1\]: expected a mapping"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), DeLoRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"DeLoRA.rank=0: expected an integer >= 1"),
        ({"lambda_init": "15"}, r"DeLoRA.lambda_init='15': expected a number >= 0"),
        ({"dropout": 1.0}, r"DeLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"bias": "lora_only"}, r"DeLoRA.bias='lora_only': expected one of 'none', 'all'"),
        ({"rank_pattern": {"q_proj": 0}}, r"DeLoRA.rank_pattern\['q_proj'\]=0"),
        ({"lambda_pattern": {"q_proj": -2}}, r"DeLoRA.lambda_pattern\['q_proj'\]=-2"),
        ({"alpha": 4}, r"DeLoRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        DeLoRA(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (gpt2_conv1d(), "Conv1D"),
        (nn.Conv2d(2, 2, 1), "Conv2d"),
        (nn.Embedding(5, 4), "Embedding"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which DeLoRA cannot adapt"):
        surgeon.compile(One(layer), DeLoRA(targets=("layer",)))


# -- graphs ---------------------------------------------------------------------------------------------

GOLDEN_LEAF_BF16 = """\
def forward(self, input):
    input_1 = input
    base = self.base(input_1)
    adapters_default_scaled_a = self.adapters.default.scaled_a()
    adapters_default_delora_b = self.adapters.default.delora_B
    adapters_default_dropout = self.adapters.default.dropout(input_1);  input_1 = None
    to = adapters_default_dropout.to(torch.float32);  adapters_default_dropout = None
    linear = torch._C._nn.linear(to, adapters_default_scaled_a);  to = adapters_default_scaled_a = None
    linear_1 = torch._C._nn.linear(linear, adapters_default_delora_b);  linear = adapters_default_delora_b = None
    to_1 = linear_1.to(torch.bfloat16);  linear_1 = None
    add = torch.add(base, to_1);  base = to_1 = None
    return add"""


def test_golden_graph_of_a_bfloat16_leaf_with_dropout():
    cm = surgeon.compile(ZOO["llama"].model().to(torch.bfloat16), DeLoRA(rank=4, dropout=0.1))
    assert graph_code(cm, "model.layers.0.self_attn.v_proj") == GOLDEN_LEAF_BF16
