"""GLoRA beyond the conformance suite: its formula for the forms the examples leave out, merge
with another adapter changing the weight on the same layer, PEFT's keys, shapes (its zeros
buffers included) and seeded initial values, PEFT parity for those forms and for trained biases,
a mixed batch as PEFT's adapter_names, exact half-precision merges, the eval-time cache, PEFT
config keys refused, layers refused as PEFT refuses them, spec errors, a golden graph."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    peft_loaded,
    peft_model,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.structured.glora import GLoRA


def _term(adapter, name: str) -> torch.Tensor:
    """Term ``name`` (A to E) from the adapter's parameters: ``Xd Xu``, ``X``, or 0."""
    own = {
        n.rsplit("_", 1)[1]: p
        for n, p in adapter.named_parameters(recurse=False)
        if n.startswith(f"glora_{name}_")
    }
    if "Xd" in own:
        return own["Xd"] @ own["Xu"]
    return own.get("X", torch.zeros(()))


def formula(spec, adapter, base, x):
    """GLoRA (Chavan et al., 2023): the layer run with ``W' = W + W ⊙ A + B`` and
    ``b' = b + b ⊙ D + E + W C``."""
    a, b, c, d, e = (_term(adapter, name) for name in "ABCDE")
    weight = base.weight + base.weight * a + b
    if base.bias is None:
        return F.linear(x, weight)
    c = c if c.dim() else torch.zeros(base.in_features, 1)
    bias = base.bias + base.bias * d + e + (base.weight @ c).squeeze(-1)
    return F.linear(x, weight, bias)


peft = pytest.importorskip("peft")

NOISE = 0.3


def _compiled(spec: GLoRA, layer: nn.Module) -> surgeon.CompiledModel:
    cm = surgeon.compile(One(layer), spec).eval()
    add_noise(cm.store.parameters(), scale=NOISE)
    return cm


# -- the math --------------------------------------------------------------------------------------


FORMS = [
    # with the examples, every form of every term
    ("none", "lora", "vector"),
    ("lora", "vector", "none"),
    ("vector", "none", "constant"),
    ("constant", "lora", "vector"),
]


@pytest.mark.parametrize(("weight", "prompt", "bias"), FORMS, ids=["-".join(f) for f in FORMS])
def test_output_is_the_formula_and_merge_folds_weight_and_bias(weight, prompt, bias):
    torch.manual_seed(0)
    layer = nn.Linear(5, 6)
    spec = GLoRA(
        rank=3, targets=("layer",), weight_terms=weight, prompt_term=prompt, bias_terms=bias
    )
    cm = _compiled(spec, layer)
    ((_, adapter),) = cm.store.items("default")
    x = torch.randn(4, 5)
    weights = {n: p.detach().clone() for n, p in layer.named_parameters()}
    expected = formula(spec, adapter, layer, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param, weights[name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_layer_without_bias_has_no_bias_terms():
    """C, D and E exist only where the layer has a bias (PEFT's buffers of zeros elsewhere)."""
    torch.manual_seed(0)
    cm = _compiled(GLoRA(rank=2, targets=("layer",), bias_terms="vector"), nn.Linear(5, 6, False))
    ((_, adapter),) = cm.store.items("default")
    assert {n for n, _ in adapter.named_parameters()} == {
        f"glora_{t}_{p}" for t in "AB" for p in ("Xd", "Xu")
    }
    x = torch.randn(3, 5)
    torch.testing.assert_close(cm(x), formula(None, adapter, cm.model.layer, x))


def test_merge_reads_the_weight_before_another_adapter_changes_it():
    """A LoRA merged into the same layer first must not enter GLoRA's ``W ⊙ A`` (the unmerged
    graph reads the base weight): merging folds the update taken before any adapter merges."""
    torch.manual_seed(0)
    model = One(nn.Linear(6, 4))
    spec = surgeon.Spec(
        {
            "lora": surgeon.LoRA(rank=2, targets=("layer",)),
            "glora": GLoRA(rank=2, targets=("layer",), weight_terms="vector"),
        }
    )
    cm = surgeon.compile(model, spec).eval()
    add_noise(cm.store.parameters(), scale=NOISE)
    cm.set_active(["lora", "glora"])
    x = torch.randn(3, 6)
    expected = cm(x)
    weight, bias = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.layer.bias, bias, rtol=1e-6, atol=1e-6)


def test_the_eval_update_is_kept_until_a_term_changes():
    torch.manual_seed(0)
    layer = nn.Linear(5, 6)
    spec = GLoRA(rank=2, targets=("layer",))
    cm = _compiled(spec, layer)
    ((_, adapter),) = cm.store.items("default")
    x = torch.randn(3, 5)
    with torch.no_grad():
        cm(x)
        kept = adapter.update._kept[1]
        cm(x)
        assert adapter.update._kept[1] is kept  # not computed again
        adapter.glora_A_Xd.add_(0.5)
        torch.testing.assert_close(cm(x), formula(spec, adapter, layer, x))


# -- PEFT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["lora", "none"])
def test_saved_tensors_have_peft_keys_shapes_and_seeded_values(weight, tmp_path):
    """The same keys and shapes as PEFT's file (a term PEFT leaves out is its buffer of zeros),
    and, from the same seed, PEFT's initial values."""
    entry = ZOO["mlp"]
    targets = ["body.0", "head"]
    theirs, ours = entry.model(), entry.model()  # built (seeded) before the draws
    torch.manual_seed(7)
    pm = peft.get_peft_model(
        theirs, peft.GloraConfig(target_modules=targets, r=3, config_A_B=weight)
    )
    pm.save_pretrained(tmp_path / "theirs")
    torch.manual_seed(7)
    cm = surgeon.compile(ours, GLoRA(rank=3, targets=tuple(targets), weight_terms=weight))
    cm.save_adapters(tmp_path / "ours")
    expected = load_file(tmp_path / "theirs" / WEIGHTS_NAME)
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert saved.keys() == expected.keys()
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "GLORA" and config["config_A_B"] == weight


def test_a_file_with_values_in_a_left_out_terms_zeros_is_refused(tmp_path):
    """PEFT's forward adds a left-out term's ``zeros`` buffer: a file with values there would
    load here with other numbers, so it is refused, and the model is left as it was."""
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), GLoRA(rank=2, targets=("head",), weight_terms="none"))
    cm.save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    (key,) = [k for k in tensors if k.endswith("glora_A.zeros")]
    tensors[key] = torch.ones_like(tensors[key])
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = entry.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(surgeon.SpecError, match=r"glora_A\.zeros is not zero"):
        surgeon.load(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("weight", "prompt", "bias"),
    [
        f if f[0] in ("none", "constant") else pytest.param(*f, marks=pytest.mark.slow)
        for f in FORMS
    ],
    ids=["-".join(f) for f in FORMS],
)
def test_mlp_both_ways_with_peft(weight, prompt, bias, tmp_path):
    entry = ZOO["mlp"]
    x = entry.example()
    targets = ("body.0", "body.3", "head")
    fields = {"weight_terms": weight, "prompt_term": prompt, "bias_terms": bias}
    cm = surgeon.compile(entry.model(), GLoRA(rank=2, targets=targets, **fields)).eval()
    add_noise(cm.store.parameters(), scale=NOISE)
    cm.save_adapters(tmp_path / "ours")
    loaded = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(loaded(**x), cm(**x), rtol=1e-5, atol=1e-6)

    config = peft.GloraConfig(
        target_modules=list(targets), r=2, config_A_B=weight, config_C=prompt, config_D_E=bias
    )
    pm = peft_model(entry.model(), config, scale=NOISE)
    pm.save_pretrained(tmp_path / "theirs")
    back = surgeon.load(entry.model(), tmp_path / "theirs")
    torch.testing.assert_close(back(**x), pm(**x), rtol=1e-5, atol=1e-6)


def test_trained_biases_of_the_adapted_layers_go_to_peft(tmp_path):
    """``bias="glora_only"`` trains the adapted layers' own biases (which D and C read too)."""
    entry = ZOO["mlp"]
    spec = GLoRA(rank=2, targets=("body.0", "head"), bias="glora_only")
    cm = surgeon.compile(entry.model(), spec).eval()
    trained = [p for p in cm.parameters() if p.requires_grad]
    assert len(trained) == len(list(cm.store.parameters())) + 2
    add_noise(trained, scale=NOISE)
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.head.base_layer.bias" in saved
    x = entry.example()
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(loaded(**x), cm(**x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_mixed_batch_matches_peft_adapter_names(tmp_path):
    entry = ZOO["mlp"]
    spec = GLoRA(rank=2, targets=("body.0", "head"), weight_terms="vector")
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec})).eval()
    add_noise(cm.store.parameters(), scale=NOISE)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path / "a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    x = entry.example()
    names = ["b", "__base__", "a", "b"]
    expected = pm(**x, adapter_names=["b", "__base__", "default", "b"])
    torch.testing.assert_close(cm(**x, adapter_names=names), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_peft_file_with_random_init_loads_its_weights(tmp_path):
    """``init_weights=false`` only changes the starting values; the file's weights rule."""
    entry = ZOO["mlp"]
    config = peft.GloraConfig(target_modules=["body.0", "head"], r=2, init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)
    pm.save_pretrained(tmp_path)
    x = entry.example()
    expected = pm(**x)
    assert not torch.allclose(expected, entry.model()(**x), atol=1e-4)
    torch.testing.assert_close(surgeon.load(entry.model(), tmp_path)(**x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merges_as_peft_exactly(dtype, tmp_path):
    """Merged, the weights and biases are PEFT's to the bit. Unmerged, PEFT rounds the adapted
    weight ``W + ΔW`` to the dtype and subtracts the base output again; surgeon adds ``ΔW x``
    (closer to float32): the two agree to the dtype's precision (the conformance suite's
    check)."""
    entry = ZOO["mlp"]
    targets = ["body.0", "body.3", "head"]
    config = peft.GloraConfig(target_modules=targets, r=2, config_D_E="vector")
    pm = peft_model(entry.model().to(dtype), config, scale=NOISE)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.glora_A_Xd.dtype == torch.float32  # PEFT's default upcast of adapter weights
    pm.merge_adapter()
    cm.merge()
    for path in targets:
        ours, theirs = cm.model.get_submodule(path), pm.get_base_model().get_submodule(path)
        assert torch.equal(ours.weight, theirs.base_layer.weight), path
        assert torch.equal(ours.bias, theirs.base_layer.bias), path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"config_A_B": "full"}, r"config_A_B='full': expected one of 'lora', 'vector'"),
        ({"config_C": "constant"}, r"config_C='constant': expected one of 'lora', 'vector'"),
        ({"config_D_E": "lora"}, r"config_D_E='lora': expected one of 'vector', 'constant'"),
        ({"bias": "lora_only"}, r"GLoRA.bias='lora_only'.*'bias'"),
        ({"r": 0}, r"GLoRA.rank=0: expected an integer >= 1.*'r'"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), GLoRA(targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- layers refused, spec errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (
            nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4),
            "NonDynamicallyQuantizableLinear",
        ),
        (gpt2_conv1d(4, 6), "Conv1D"),
        (nn.Conv2d(2, 4, 1), "Conv2d"),
        (nn.Embedding(5, 4), "Embedding"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    """PEFT's GLoRA adapts ``nn.Linear`` itself only (its subclasses too are refused)."""
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which GLoRA cannot adapt"):
        surgeon.compile(One(layer), GLoRA(targets=("layer",)))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"GLoRA.rank=0: expected an integer >= 1"),
        ({"weight_terms": "full"}, r"GLoRA.weight_terms='full': expected one of 'lora'"),
        ({"prompt_term": "constant"}, r"GLoRA.prompt_term='constant': expected one of"),
        ({"bias_terms": "lora"}, r"GLoRA.bias_terms='lora': expected one of 'vector'"),
        ({"bias": "lora_only"}, r"GLoRA.bias='lora_only': expected one of 'none', 'all'"),
        ({"targets": []}, r"GLoRA.targets=\[\]: expected at least one target"),
        ({"alpha": 4}, r"GLoRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        GLoRA(**fields)


# -- graphs -------------------------------------------------------------------------------------------


GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu)
    adapters_default_head_update = self.adapters.default.head.update()
    getitem = adapters_default_head_update[1]
    getitem_1 = adapters_default_head_update[0];  adapters_default_head_update = None
    linear = torch._C._nn.linear(relu, getitem_1, getitem);  relu = getitem_1 = getitem = None
    add = torch.add(head, linear);  head = linear = None
    return add"""


def test_golden_graph_adds_one_matmul_with_the_kept_update():
    cm = surgeon.compile(ZOO["mlp"].model(), GLoRA(targets=("head",)))
    assert graph_code(cm) == GOLDEN_MLP
