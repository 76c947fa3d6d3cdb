"""PEANuT's card (its formula) and what is PEANuT's own: the activations PEFT's ``act_fn`` names,
bit for bit as transformers computes them, or refused; initial draws as PEFT's from the same
seed, and a PEFT file of random draws loading with PEFT's outputs both ways; merging with the
weight read before other adapters fold in and unmerging bit for bit; half-precision outputs and
merges as PEFT's; the eval-mode cache of the update; PEFT's file layout; refusals (layer types,
configs, fields); the golden graph.
The conformance suite (tests/conformance) runs the formula, merging, files, PEFT parity,
gradients, devices and dtypes on every example."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    count_calls,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon import quant
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.lora import LoRA
from surgeon.passes.structured.peanut import ACTIVATIONS, PEANuT, PEANuTLayer
from surgeon.peft import NEUTRAL_KEYS


def formula(spec, adapter, base, x):
    """PEANuT (Zhong et al., 2024): ``W0 + ΔW`` with ``ΔWᵀ = s · B(f(W0ᵀ))``, where ``f`` is
    ``act(A ·)``, then ``depth`` encoders ``h_i+1 = act(E_i h_i)``, then decoders
    ``g = act(D_j g) + h_(depth-1-j)`` (a skip from the matching encoder's input); Linear layers
    only (weight ``(out, in)``)."""
    act = ACTIVATIONS[adapter.activation]
    w0 = base.weight
    h = act(nn.functional.linear(w0.t().float(), adapter.peanut_A))
    inputs = []
    for encoder in adapter.peanut_encoders:
        inputs.append(h)
        h = act(nn.functional.linear(h, encoder))
    for decoder in adapter.peanut_decoders:
        h = act(nn.functional.linear(h, decoder)) + inputs.pop()
    update = adapter.scaling * nn.functional.linear(h, adapter.peanut_B).t()
    return plain_output(base, x, w0 + update.to(w0.dtype))


peft = pytest.importorskip("peft")


def _single(dtype: torch.dtype = torch.float32, **fields):
    """One Linear with a PEANuT adapter moved off its init."""
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6)).to(dtype)
    x = torch.randn(3, 5).to(dtype)
    spec = PEANuT(**{"rank": 2, "depth": 1, "targets": ("layer",), **fields})
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    ((_, adapter),) = cm.store.items("default")
    return model, cm.eval(), adapter, x


# -- activations -----------------------------------------------------------------------------------


def test_every_activation_computes_transformers_values_bit_for_bit():
    from transformers.activations import ACT2FN

    t = torch.randn(64, dtype=torch.float64).float() * 4
    for name, act in ACTIVATIONS.items():
        assert torch.equal(act(t), ACT2FN[name](t)), name


@pytest.mark.parametrize("act_fn", ["prelu", "gelu_10", "xielu", "no_such"])
def test_activations_surgeon_does_not_compute_are_refused_naming_act_fn(act_fn, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), PEANuT(rank=2, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=rf"activation='{act_fn}'.*key 'act_fn'"):
        load_with_changed_config(entry.model(), tmp_path, {"act_fn": act_fn})


@pytest.mark.parametrize(
    ("depth", "act_fn", "scaling"),
    [
        (1, "silu", -0.7),
        pytest.param(3, "tanh", 2.0, marks=pytest.mark.slow),
        pytest.param(0, "linear", 1.0, marks=pytest.mark.slow),
    ],
)
def test_options_the_examples_leave_out_give_peft_outputs_both_ways(
    depth, act_fn, scaling, tmp_path
):
    entry = ZOO["mlp"]
    config = peft.PeanutConfig(
        r=3, depth=depth, act_fn=act_fn, scaling=scaling, target_modules=["body.0", "head"]
    )
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path / "peft")
    x = entry.example()
    expected = logits(pm(**x))
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    spec = cm.spec("default")
    assert (spec.depth, spec.activation, spec.scaling) == (depth, act_fn, scaling)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-6)


# -- initialisation -------------------------------------------------------------------------------


PEFT_INIT_WEIGHTS = {"default": True, "random": False}


@pytest.mark.parametrize("init", ["default", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fresh_factors_are_peft_s_draws_from_the_same_seed(init, dtype):
    """PEFT builds A, the encoders, the decoders and B as Linears (each drawn), then draws them
    again in that order, zeroing B unless init_weights is false: the same global seed gives the
    same values, rounded through a half-precision base before the float32 upcast."""
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6)).to(dtype)
    config = peft.PeanutConfig(
        r=3, depth=2, target_modules=["layer"], init_weights=PEFT_INIT_WEIGHTS[init]
    )
    torch.manual_seed(3)
    pm = peft_model(copy.deepcopy(model), config, seed=None)
    torch.manual_seed(3)
    cm = surgeon.compile(model, PEANuT(rank=3, depth=2, targets=("layer",), init=init))
    ((_, adapter),) = cm.store.items("default")
    theirs = pm.base_model.model.layer
    ours = adapter.peft_tensors()
    assert len(ours) == 6
    for key, tensor in ours.items():
        container, _, rest = key.partition(".")
        module = getattr(theirs, container)["default"]
        peft_tensor = module[int(rest.split(".")[0])].weight if "coders" in key else module.weight
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, peft_tensor), key
    assert (torch.count_nonzero(adapter.peanut_B) == 0) == (init == "default")


def test_a_randomly_initialised_peft_file_loads_with_peft_outputs_and_back(tmp_path):
    entry = ZOO["mlp"]
    config = peft.PeanutConfig(r=3, depth=1, target_modules=["body.0", "head"], init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)  # PEFT's own random draws, unperturbed
    pm.save_pretrained(tmp_path / "peft")
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    assert cm.spec("default").init == "random"
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["init_weights"] is False
    back = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "init"), [(True, "default"), (False, "random"), (None, "random")]
)
def test_peft_init_weights_values_read_as_peft_uses_them(value, init, tmp_path):
    """PEFT zeroes B only for a truthy init_weights: null draws it."""
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), PEANuT(rank=2, targets=("head",))).save_adapters(tmp_path)
    cm = load_with_changed_config(entry.model(), tmp_path, {"init_weights": value})
    assert cm.spec("default").init == init


# -- merging ----------------------------------------------------------------------------------------


def test_merge_adds_the_network_s_update_and_unmerge_restores_w0_bit_for_bit():
    model, cm, adapter, x = _single()
    w0 = model.layer.weight.detach().clone()
    expected = cm(x)
    torch.testing.assert_close(expected, formula(None, adapter, model.layer, x))
    cm.merge()
    assert "peanut" not in cm.graph.code()
    torch.testing.assert_close(model.layer.weight, w0 + adapter.update_from(w0))
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    assert torch.equal(model.layer.weight, w0)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "others",
    [("peanut", "lora"), ("lora", "peanut"), ("peanut", "peanut")],
    ids=lambda names: "-".join(names),
)
def test_merging_reads_w0_before_other_adapters_on_the_layer_fold_in(others):
    """The unmerged graph applies the network to the base weight as it is; the merge must too,
    whichever adapter of the layer folds in first."""
    specs = {
        "peanut": PEANuT(rank=2, depth=1, targets=("layer",)),
        "lora": LoRA(rank=2, targets=("layer",)),
    }
    torch.manual_seed(0)
    model = One(nn.Linear(6, 5))
    w0 = model.layer.weight.detach().clone()
    spec = surgeon.Spec({f"{name}{i}": specs[name] for i, name in enumerate(others)})
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    cm.set_active(list(spec.adapters))
    x = torch.randn(4, 6)
    expected = cm(x)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    if "lora" in others:  # LoRA unmerges by subtracting: up to rounding
        torch.testing.assert_close(model.layer.weight, w0, rtol=0, atol=1e-6)
    else:
        assert torch.equal(model.layer.weight, w0)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_outputs_and_merged_weights_are_peft_s_exactly(dtype, tmp_path):
    torch.manual_seed(0)
    model = One(nn.Linear(16, 12)).to(dtype)
    config = peft.PeanutConfig(r=3, depth=1, target_modules=["layer"])
    pm = peft_model(copy.deepcopy(model), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(model, tmp_path).eval()
    ((_, adapter),) = cm.store.items("default")
    assert adapter.peanut_A.dtype == torch.float32  # PEFT's default upcast of adapter weights
    x = torch.randn(4, 16).to(dtype)
    with torch.no_grad():
        out = cm(x)
        assert out.dtype == dtype
        assert torch.equal(out, pm(x))
        cm.merge()
        pm.merge_adapter()
        assert torch.equal(model.layer.weight, pm.base_model.model.layer.base_layer.weight)


# -- the forward ------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Counts how often the update ΔW is built from W0."""
    return count_calls(monkeypatch, PEANuTLayer, "update_weight_now")


@torch.no_grad()
def test_eval_mode_builds_the_update_once_until_a_source_changes(counted):
    model, cm, adapter, x = _single()
    counted.clear()
    for _ in range(3):
        cm(x)
    assert len(counted) == 1
    adapter.peanut_decoders[0].mul_(2)
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert len(counted) == 2
    model.layer.weight.mul_(0.5)  # W0 is a source too
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert len(counted) == 3
    cm.merge()
    assert adapter.update_weight._kept is None  # merged, memory does not keep it
    cm.unmerge()
    cm(x)
    assert len(counted) == 4


def test_training_or_autograd_builds_the_update_every_forward(counted):
    _, cm, adapter, x = _single()
    cm.train()
    counted.clear()
    cm(x), cm(x)
    assert len(counted) == 2
    cm.eval()  # eval mode with autograd on: gradients still reach every factor
    cm(x).sum().backward()
    assert len(counted) == 3
    assert all(p.grad is not None for p in adapter.parameters())


# -- files and configs -------------------------------------------------------------------------------


def test_saved_tensors_have_peft_keys_and_shapes(tmp_path):
    spec = PEANuT(rank=3, depth=2, targets=("head",))
    surgeon.compile(ZOO["mlp"].model(), spec).save_adapters(tmp_path)
    saved = {k: tuple(v.shape) for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    prefix = "base_model.model.head."
    out = saved[f"{prefix}peanut_B.weight"][0]
    assert saved == {
        f"{prefix}peanut_A.weight": (3, out),
        f"{prefix}peanut_encoders.0.weight": (3, 3),
        f"{prefix}peanut_encoders.1.weight": (3, 3),
        f"{prefix}peanut_decoders.0.weight": (3, 3),
        f"{prefix}peanut_decoders.1.weight": (3, 3),
        f"{prefix}peanut_B.weight": (out, 3),
    }


def test_config_written_has_peft_s_keys_and_defaults():
    config = PEANuT(targets=("q_proj",)).to_peft_config(["model.layers.0.self_attn.q_proj"])
    assert config == {
        "peft_type": "PEANUT",
        "r": 32,
        "depth": 0,
        "act_fn": "relu",
        "scaling": 1.0,
        "target_modules": ["q_proj"],
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_weights": True,
        "modules_to_save": None,
    }
    defaults = peft.PeanutConfig(target_modules=["q_proj"]).to_dict()
    assert all(defaults[key] == value for key, value in config.items() if key != "target_modules")
    assert {key for key in defaults if key not in config} <= NEUTRAL_KEYS  # every key is read


@pytest.mark.slow
def test_layers_and_exclusions_are_saved_so_peft_adapts_the_same_modules(tmp_path):
    entry = ZOO["llama"]
    spec = PEANuT(rank=2, depth=1, targets=("q_proj", "v_proj"), layers=1, exclude=("v_proj",))
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm)
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(entry.model(), tmp_path)
    adapted = [
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if isinstance(m, peft.tuners.peanut.PeanutLayer)
    ]
    assert adapted == cm.store.paths["default"] == ["model.layers.1.self_attn.q_proj"]
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)
    assert surgeon.load(entry.model(), tmp_path).spec("default") == spec


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [gpt2_conv1d, lambda: nn.Conv2d(3, 4, 3), lambda: nn.Embedding(10, 4)],
    ids=["gpt2-conv1d", "conv2d", "embedding"],
)
def test_layers_other_than_linear_are_refused_as_peft_does(layer):
    with pytest.raises(surgeon.SpecError, match=r"which PEANuT cannot adapt"):
        surgeon.compile(One(layer()), PEANuT(targets=("layer",)))


def test_bases_stored_in_4_bits_are_refused():
    """PEFT's PEANuT adapts plain Linears only; its update reads W0 on every forward."""
    model = ZOO["mlp"].model()
    quant.quantize_model(model, surgeon.NF4(compute_dtype="float32"), layers=("head",))
    with pytest.raises(surgeon.SpecError, match=r"PEANuT cannot adapt layers stored in 4 bits"):
        surgeon.compile(model, PEANuT(rank=2, targets=("head",)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"init_weights": "gaussian"}, r"init_weights='gaussian': expected true or false"),
        ({"depth": -1}, r"PEANuT.depth=-1: expected an integer >= 0 .*key 'depth'"),
        ({"r": 2.5}, r"r=2.5: expected an integer"),
        ({"scaling": "1"}, r"scaling='1': expected a number"),
        ({"act_fn": None}, r"act_fn=None: expected a string"),  # PEFT refuses it too
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
        ({"use_dora": True}, "use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), PEANuT(rank=2, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"PEANuT.rank=0: expected an integer >= 1"),
        ({"depth": -1}, r"PEANuT.depth=-1: expected an integer >= 0"),
        ({"activation": "gelu_10"}, r"PEANuT.activation='gelu_10': expected one of 'relu'"),
        ({"scaling": float("inf")}, r"PEANuT.scaling=inf: expected a finite number"),
        ({"init": "gaussian"}, r"PEANuT.init='gaussian': expected one of 'default', 'random'"),
        ({"dropout": 0.1}, r"PEANuT has no field 'dropout'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        PEANuT(**fields)


# -- graphs ---------------------------------------------------------------------------------------


GOLDEN_BF16 = """\
def forward(self, x):
    layer = self.layer(x)
    to = x.to(torch.float32);  x = None
    adapters_default_layer_update_weight = self.adapters.default.layer.update_weight()
    linear = torch._C._nn.linear(to, adapters_default_layer_update_weight);  to = adapters_default_layer_update_weight = None
    to_1 = linear.to(torch.bfloat16);  linear = None
    add = torch.add(layer, to_1);  layer = to_1 = None
    return add"""


def test_golden_graph_of_a_half_precision_linear():
    _, cm, _, _ = _single(torch.bfloat16)
    assert graph_code(cm) == GOLDEN_BF16
