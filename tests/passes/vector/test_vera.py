"""VeRA beyond the conformance suite: the formula and merge with projections shared by layers
of different shapes, projections drawn as PEFT draws them, shared frozen projections, dropout,
PEFT parity on BERT with and without saved projections, saved projections used as saved, exact
half-precision parity, selectors, errors, projections on the meta device, golden rewritten
graphs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
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
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.vector.vera import VeRA


def formula(spec, adapter, base, x):
    """VeRA (Kopiczko et al., 2024): ``W x + b + λ_b ⊙ (B (λ_d ⊙ (A x)))`` with A, B frozen random
    projections sliced to the layer's sizes."""
    fan_in, fan_out = (
        (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
    )
    a = adapter.projections.vera_A[:, :fan_in]
    b = adapter.projections.vera_B[:fan_out]
    low = ((x @ a.t()) * adapter.vera_lambda_d) @ b.t() * adapter.vera_lambda_b
    return plain_output(base, x) + low


peft = pytest.importorskip("peft")

TARGETS = {
    "llama": ("q_proj", "v_proj", "down_proj"),
    "bert": ("query", "value", "output.dense"),
}


def _projections(cm):
    (_, layer), *_ = cm.store.items("default")
    return layer.projections.vera_A, layer.projections.vera_B


# -- the formula ---------------------------------------------------------------------------------


class Two(nn.Module):
    """Two layers of different shapes: the projections are sized for the larger of each dim."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        make = gpt2_conv1d if conv1d else nn.Linear
        self.a = make(5, 7)
        self.b = make(7, 3)

    def forward(self, x):
        return self.b(self.a(x))


def _vera(x, adapter, a, b):
    """The formula written out, from the full projections: λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))."""
    fan_in, fan_out = x.shape[-1], adapter.vera_lambda_b.numel()
    low = (x @ a[:, :fan_in].t()) * adapter.vera_lambda_d
    return (low @ b[:fan_out].t()) * adapter.vera_lambda_b


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_output_is_the_vera_formula_and_merge_matches(conv1d):
    torch.manual_seed(0)
    model = Two(conv1d)
    x = torch.randn(4, 5)
    cm = surgeon.compile(model, VeRA(rank=3, targets=("a", "b")))
    randomize(cm, scale=0.5)
    a, b = _projections(cm)
    assert a.shape == (3, 7) and b.shape == (7, 3)  # max in: 7 (b), max out: 7 (a)
    layers = dict(cm.store.items("default"))
    with torch.no_grad(), cm.disabled():
        h = model.a(x)
        h = h + _vera(x, layers["a"], a, b)
        expected = model.b(h) + _vera(h, layers["b"], a, b)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weights = [model.a.weight.detach().clone(), model.b.weight.detach().clone()]
    cm.merge()
    assert "vera_A" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close([model.a.weight, model.b.weight], weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


def test_projections_are_peft_kaiming_draws_from_the_seed():
    cm = surgeon.compile(ZOO["llama"].model(), VeRA(rank=4, seed=7, targets=TARGETS["llama"]))
    a, b = _projections(cm)
    assert a.shape == (4, 48) and b.shape == (32, 4)  # down_proj's 48 inputs, q/down's 32 outputs
    generator = torch.Generator().manual_seed(7)  # A first, then B, bound sqrt(6 / fan_in)
    expected_a = torch.empty(4, 48).uniform_(
        -math.sqrt(6 / 48), math.sqrt(6 / 48), generator=generator
    )
    expected_b = torch.empty(32, 4).uniform_(
        -math.sqrt(6 / 4), math.sqrt(6 / 4), generator=generator
    )
    assert torch.equal(a, expected_a) and torch.equal(b, expected_b)
    other = surgeon.compile(ZOO["llama"].model(), VeRA(rank=4, seed=8, targets=TARGETS["llama"]))
    assert not torch.equal(_projections(other)[0], a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fresh_adapter_equals_peft_init(dtype):
    """Projections and vectors as PEFT builds them (in half precision PEFT rounds them through
    the base dtype before upcasting to float32: so must surgeon, or unsaved projections differ)."""
    entry = ZOO["llama"]
    config = peft.VeraConfig(r=4, target_modules=list(TARGETS["llama"]))
    pm = peft_model(entry.model().to(dtype), config, seed=None)
    cm = surgeon.compile(entry.model().to(dtype), VeRA(rank=4, targets=TARGETS["llama"]))
    a, b = _projections(cm)
    assert a.dtype == torch.float32
    assert torch.equal(a, pm.base_model.vera_A["default"])
    assert torch.equal(b, pm.base_model.vera_B["default"])
    for path, layer in cm.store.items("default"):
        theirs = pm.base_model.model.get_submodule(path)
        assert torch.equal(layer.vera_lambda_b, theirs.vera_lambda_b["default"])
        assert torch.equal(layer.vera_lambda_d, theirs.vera_lambda_d["default"])
    if dtype == torch.float32:
        assert torch.count_nonzero(layer.vera_lambda_b) == 0
        assert torch.all(layer.vera_lambda_d == 0.1)
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(entry.model().to(dtype)(**x)))


def test_projections_are_shared_frozen_buffers():
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), VeRA(rank=4, targets=TARGETS["llama"]))
    layers = [layer for _, layer in cm.store.items("default")]
    assert len({id(layer.projections) for layer in layers}) == 1
    assert not any("vera_A" in n or "vera_B" in n for n, _ in cm.named_parameters())
    # per layer only λ_b (out) and λ_d (r) train: q 32, v 16, down 32 outputs
    assert cm.num_trainable() == 2 * ((32 + 4) + (16 + 4) + (32 + 4))
    randomize(cm)
    cm.train()
    logits(cm(**entry.example())).pow(2).mean().backward()
    grads = {n for n, p in cm.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 3 * 2 and all("vera_lambda" in n for n in grads)
    assert _projections(cm)[0].grad is None


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), VeRA(rank=4, targets=("head",), dropout=0.5))
    randomize(cm)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- PEFT parity ---------------------------------------------------------------------------------

# the conformance suite runs the other zoo models; BERT is not among them
PARITY = [("bert", True), ("bert", False)]


@pytest.mark.parametrize(("model_name", "save_projection"), PARITY)
def test_saved_by_surgeon_loads_in_peft_with_same_outputs(model_name, save_projection, tmp_path):
    entry = ZOO[model_name]
    spec = VeRA(rank=6, targets=TARGETS[model_name], save_projection=save_projection, seed=3)
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    x = entry.example()
    expected = logits(cm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert ("base_model.vera_A" in saved) is save_projection
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model_name", "save_projection"), PARITY)
def test_saved_by_peft_loads_in_surgeon_with_same_outputs(model_name, save_projection, tmp_path):
    entry = ZOO[model_name]
    config = peft.VeraConfig(
        r=5,
        target_modules=list(TARGETS[model_name]),
        save_projection=save_projection,
        projection_prng_key=11,
    )
    pm = peft_model(entry.model(), config)
    x = entry.example()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").seed == 11 and cm.spec("default").save_projection is save_projection
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


def test_saved_projections_are_used_rather_than_redrawn(tmp_path):
    entry = ZOO["llama"]
    pm = peft_model(entry.model(), peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"].flip(1)  # not what the seed draws
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = logits(peft_loaded(entry.model(), tmp_path)(**x))
    cm = surgeon.load(entry.model(), tmp_path)
    assert torch.equal(_projections(cm)[0], tensors["base_model.vera_A"])
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda t: t.update({"base_model.vera_A": torch.zeros(4, 31)}),
            r"vera_A has shape \(4, 31\)",
        ),
        (lambda t: t.pop("base_model.vera_B"), r"missing key\(s\), e.g. base_model.vera_B"),
    ],
    ids=["wrong-shape", "missing"],
)
def test_bad_saved_projections_are_refused_and_leave_the_model(edit, match, tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), VeRA(rank=4))
    cm.save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = entry.model()
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.load(model, tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_projection", [True, False])
def test_half_precision_matches_peft_exactly(dtype, save_projection, tmp_path):
    entry = ZOO["llama"]
    config = peft.VeraConfig(
        r=4, target_modules=list(TARGETS["llama"]), save_projection=save_projection
    )
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "selection",
    [
        {"layers": [1]},
        {"exclude": ["layers.0.self_attn.q_proj"]},
        {"targets": "all-linear", "exclude": "mlp"},
    ],
    ids=["layers", "exclude", "preset-exclude"],
)
def test_layers_and_exclusions_are_saved_so_peft_adapts_the_same_modules(selection, tmp_path):
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), VeRA(rank=4, save_projection=False, **selection))
    randomize(cm)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert "exclude_modules" not in config  # PEFT's VeraConfig has no such field
    loaded = peft_loaded(entry.model(), tmp_path)
    adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if hasattr(m, "vera_lambda_b")
    )
    assert adapted == sorted(cm.store.paths["default"])
    x = entry.example()  # without saved projections: PEFT redraws them for the same modules
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)
    back = surgeon.load(entry.model(), tmp_path)
    assert back.store.paths["default"] == cm.store.paths["default"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), VeRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- spec validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"VeRA.rank=0: expected an integer >= 1"),
        ({"seed": -1}, r"VeRA.seed=-1: expected an integer >= 0"),
        ({"seed": 1.5}, r"VeRA.seed=1.5"),
        ({"d_initial": 0}, r"VeRA.d_initial=0: expected a number > 0"),
        ({"dropout": 1.0}, r"VeRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"save_projection": "yes"}, r"VeRA.save_projection='yes': expected true or false"),
        ({"targets": ()}, r"VeRA.targets=\[\]: expected at least one target"),
        ({"alpha": 4}, r"VeRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        VeRA(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which VeRA cannot adapt"):
        surgeon.compile(One(layer), VeRA(targets=("layer",)))


# -- devices, graphs -----------------------------------------------------------------------------


def test_the_projections_follow_the_model_onto_the_meta_device():
    """The suite checks the trainable vectors on the meta device; the shared projections are
    buffers, which it does not see."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        vocab_size=1000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    cm = surgeon.compile(model, VeRA(rank=32))
    a, b = _projections(cm)
    assert a.is_meta and a.shape == (32, 512) and b.shape == (512, 32)
    assert b.is_meta


GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu)
    adapters_default_head_vera_a = self.adapters.default.head.vera_A
    adapters_default_head_vera_b = self.adapters.default.head.vera_B
    adapters_default_head_vera_lambda_d = self.adapters.default.head.vera_lambda_d
    adapters_default_head_vera_lambda_b = self.adapters.default.head.vera_lambda_b
    adapters_default_head_dropout = self.adapters.default.head.dropout(relu);  relu = None
    linear = torch._C._nn.linear(adapters_default_head_dropout, adapters_default_head_vera_a);  adapters_default_head_dropout = adapters_default_head_vera_a = None
    mul = torch.mul(linear, adapters_default_head_vera_lambda_d);  linear = adapters_default_head_vera_lambda_d = None
    linear_1 = torch._C._nn.linear(mul, adapters_default_head_vera_b);  mul = adapters_default_head_vera_b = None
    mul_1 = torch.mul(linear_1, adapters_default_head_vera_lambda_b);  linear_1 = adapters_default_head_vera_lambda_b = None
    add = torch.add(head, mul_1);  head = mul_1 = None
    return add"""

GOLDEN_LEAF_BF16 = """\
def forward(self, input):
    input_1 = input
    base = self.base(input_1)
    adapters_default_vera_a = self.adapters.default.vera_A
    adapters_default_vera_b = self.adapters.default.vera_B
    adapters_default_vera_lambda_d = self.adapters.default.vera_lambda_d
    adapters_default_vera_lambda_b = self.adapters.default.vera_lambda_b
    to = input_1.to(torch.float32);  input_1 = None
    linear = torch._C._nn.linear(to, adapters_default_vera_a);  to = adapters_default_vera_a = None
    mul = torch.mul(linear, adapters_default_vera_lambda_d);  linear = adapters_default_vera_lambda_d = None
    linear_1 = torch._C._nn.linear(mul, adapters_default_vera_b);  mul = adapters_default_vera_b = None
    mul_1 = torch.mul(linear_1, adapters_default_vera_lambda_b);  linear_1 = adapters_default_vera_lambda_b = None
    add = torch.add(base, mul_1);  base = mul_1 = None
    to_1 = add.to(torch.bfloat16);  add = None
    return to_1"""


def test_golden_graph_of_a_whole_model_region_with_dropout():
    cm = surgeon.compile(ZOO["mlp"].model(), VeRA(rank=4, targets=("head",), dropout=0.1))
    assert graph_code(cm, "") == GOLDEN_MLP


def test_golden_graph_of_a_bfloat16_leaf_and_its_projection_slices():
    cm = surgeon.compile(ZOO["llama"].model().to(torch.bfloat16), VeRA(rank=4))
    assert graph_code(cm, "model.layers.0.self_attn.v_proj") == GOLDEN_LEAF_BF16
    # the graph reads views of the shared projections cut to this layer (16 of 32 outputs)
    holder = cm.graph.regions[
        [r.path for r in cm.graph.regions].index("model.layers.0.self_attn.v_proj")
    ].gm
    sliced_b = holder.adapters.default.vera_B
    full_a, full_b = _projections(cm)
    assert sliced_b.shape == (16, 4) and sliced_b.data_ptr() == full_b.data_ptr()
    assert holder.adapters.default.vera_A.shape == full_a.shape == (4, 32)
