"""FRoD beyond the conformance suite: the shared bases and sparse positions built as PEFT builds
them (per category, sorted, one seeded generator), PEFT files without them both ways, saved
ones used as saved, the random init drawn as PEFT draws it, a fresh adapter rebuilding W,
dropout, errors and refused PEFT configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    randomize,
)

import surgeon
from surgeon.io import WEIGHTS_NAME
from surgeon.passes.shared.frod import FRoD, category_of


def formula(spec, adapter, base, x):
    """FRoD: ``W' x + b`` with ``W' = U (Λ + S) Vᵀ``, S the sparse matrix holding the trained
    values at the category's positions."""
    projection = adapter.projection
    dim = projection.frod_V.shape[0]
    s = torch.zeros(dim, dim)
    rows, cols = projection.frod_s_indices
    s[rows, cols] = adapter.frod_lambda_s_values
    adapted = adapter.frod_U @ (torch.diag(adapter.frod_lambda_l) + s) @ projection.frod_V.T
    return x @ adapted.T + (base.bias if base.bias is not None else 0)


peft = pytest.importorskip("peft")

MLP_TARGETS = ["body.0", "body.3", "head"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _layers(cm, name="default"):
    return dict(cm.store.items(name))


def _config(**fields):
    return peft.FrodConfig(progressbar=False, **fields)


# -- the shared bases and positions -----------------------------------------------------------------


def test_categories_are_peft_s():
    assert category_of("model.layers.0.self_attn.q_proj") == "self_attn_q_proj"
    assert category_of("encoder.layer.0.attention.output.dense") == "attention_output"
    assert category_of("encoder.layer.0.output.dense") == "output_dense"
    assert category_of("h.0.c_attn") == "c_attn"
    assert category_of("head") == "head"


@pytest.mark.parametrize(
    ("model_name", "targets", "rate"),
    [
        ("mlp", MLP_TARGETS, 0.3),
        pytest.param("llama", LLAMA_TARGETS, 0.01, marks=pytest.mark.slow),
    ],
)
def test_bases_positions_and_factors_are_peft_s(model_name, targets, rate):
    """The MLP: tall weights (QR) and a wide one (SVD), blocks from indices and positions;
    Llama: categories over two blocks each. Positions drawn category after category, in
    sorted order, from one generator."""
    entry = ZOO[model_name]
    config = _config(sparse_rate=rate, projection_prng_key=7, target_modules=targets)
    pm = peft_model(entry.model(), config, seed=None)
    cm = surgeon.compile(entry.model(), FRoD(sparse_rate=rate, seed=7, targets=targets))
    layers = _layers(cm)
    for path, layer in layers.items():
        theirs = pm.base_model.model.get_submodule(path)
        p = layer.projection
        assert torch.equal(p.frod_V, theirs.frod_V["default"]), path
        assert torch.equal(p.frod_s_indices, theirs.frod_s_indices["default"]), path
        assert torch.equal(p.frod_s_size, theirs.frod_s_size["default"]), path
        assert torch.equal(layer.frod_U, theirs.frod_U["default"]), path
        assert torch.equal(layer.frod_lambda_l, theirs.frod_lambda_l["default"]), path
    categories = {category_of(path) for path in layers}
    assert len({id(layer.projection) for layer in layers.values()}) == len(categories)


def test_a_fresh_adapter_rebuilds_the_weight():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), FRoD(targets=MLP_TARGETS))
    model = entry.model()
    for path, layer in _layers(cm).items():
        weight = model.get_submodule(path).weight
        torch.testing.assert_close(layer.adapted_weight(torch.float32), weight)


def test_alone_the_rebuilt_weight_replaces_the_base_call_in_the_graph():
    """One FRoD adapter computes ``W' x + b`` itself: the base layer's own call, whose result
    nothing reads, is not in the graph (PEFT skips it too); stacked, the base output is used."""
    entry = ZOO["mlp"]
    alone = surgeon.compile(entry.model(), FRoD(targets=("head",)))
    assert "self.head(" not in graph_code(alone)
    stacked = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=("head",)))
    stacked.add_adapter("frod", FRoD(targets=("head",)))
    stacked.set_active(["default", "frod"])
    assert "self.head(" in graph_code(stacked)


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_name", "targets"),
    [
        ("mlp", MLP_TARGETS),
        pytest.param("llama", LLAMA_TARGETS, marks=pytest.mark.slow),
    ],
)
def test_files_without_projections_go_both_ways_with_the_same_outputs(
    model_name, targets, tmp_path
):
    """The case the rebuilt bases exist for: only Λ and S's values in the file, the bases
    rebuilt from the weights and the positions drawn again from the seed on both sides."""
    entry = ZOO[model_name]
    x = entry.example()
    config = _config(
        sparse_rate=0.2, projection_prng_key=11, save_projection=False, target_modules=targets
    )
    pm = peft_model(entry.model(), config)
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert all(k.endswith(("frod_lambda_l", "frod_lambda_s_values")) for k in saved)
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    assert cm.spec("default").seed == 11 and not cm.spec("default").save_projection
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    randomize(cm, scale=0.3)
    ours = logits(cm(**x))
    cm.save_adapters(tmp_path / "ours")
    assert load_file(tmp_path / "ours" / WEIGHTS_NAME).keys() == saved.keys()
    theirs = logits(peft_loaded(entry.model(), tmp_path / "ours")(**x))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_saved_projections_are_used_as_saved(tmp_path):
    """A file's basis and positions replace the rebuilt ones (U stays the one built at
    creation, as in PEFT)."""
    entry = ZOO["mlp"]
    config = _config(sparse_rate=0.2, target_modules=MLP_TARGETS)
    peft_model(entry.model(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.frod_V.head"].shape == (24, 24)
    assert tensors["base_model.frod_s_indices.head"].dtype == torch.int64
    assert torch.equal(tensors["base_model.frod_s_size.body_0"], torch.tensor([12, 12]))
    tensors["base_model.frod_V.head"] *= 1.1
    tensors["base_model.frod_s_indices.body_3"] = tensors["base_model.frod_s_indices.body_3"].flip(
        0
    )
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = peft_loaded(entry.model(), tmp_path)(**x)
    cm = surgeon.load(entry.model(), tmp_path)
    layers = _layers(cm)
    assert torch.equal(layers["head"].projection.frod_V, tensors["base_model.frod_V.head"])
    torch.testing.assert_close(cm(**x), expected, rtol=1e-5, atol=1e-6)


# -- inits and dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
)
def test_the_random_init_is_peft_s(dtype):
    """init_weights=False: S's values and Λ's noise drawn from the global generator, layer
    after layer, in the base dtype; a second adapter's draws follow on (float32)."""
    entry = ZOO["mlp"]
    config = _config(sparse_rate=0.2, init_weights=False, target_modules=MLP_TARGETS)
    base = entry.model().to(dtype)  # the zoo's builders seed the global generator
    torch.manual_seed(5)
    pm = peft_model(base, config, seed=None)
    pm.add_adapter("second", config)
    spec = FRoD(sparse_rate=0.2, init="random", targets=MLP_TARGETS)
    base = entry.model().to(dtype)
    torch.manual_seed(5)
    cm = surgeon.compile(base, spec)
    cm.add_adapter("second", spec)
    # PEFT creates a later adapter of a CPU half-precision layer in float32 (the dtype of the
    # adapter already there), not in the base dtype: there only the first one's draws match
    names = ("default", "second") if dtype == torch.float32 else ("default",)
    for name in names:
        for path, layer in _layers(cm, name).items():
            theirs = pm.base_model.model.get_submodule(path)
            for param in ("frod_lambda_l", "frod_lambda_s_values"):
                mine, peft_param = getattr(layer, param), getattr(theirs, param)[name]
                assert mine.dtype == peft_param.dtype == torch.float32
                assert torch.equal(mine, peft_param), (name, path, param)
    x = entry.example()["x"].to(dtype)
    torch.testing.assert_close(cm(x), pm(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("save_projection", [False, True])
def test_half_precision_matches_peft_exactly(dtype, save_projection, tmp_path):
    entry = ZOO["llama"]
    config = _config(sparse_rate=0.1, save_projection=save_projection, target_modules=LLAMA_TARGETS)
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    for layer in _layers(cm).values():
        assert layer.frod_U.dtype == layer.projection.frod_V.dtype == dtype
        assert layer.frod_lambda_l.dtype == torch.float32
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), FRoD(dropout=0.5, targets=("head",)))
    randomize(cm)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"seed": 1.5}, r"FRoD.seed=1.5: expected an integer"),
        ({"sparse_rate": 1.5}, r"FRoD.sparse_rate=1.5: expected a number >= 0 and <= 1"),
        ({"regularization_alpha": -1}, r"FRoD.regularization_alpha=-1: expected a number >= 0"),
        ({"save_projection": "yes"}, r"FRoD.save_projection='yes': expected true or false"),
        ({"dropout": 1.0}, r"FRoD.dropout=1.0: expected a number >= 0 and < 1"),
        ({"init": "zeros"}, r"FRoD.init='zeros': expected one of 'default', 'random'"),
        ({"bias": "lora_only"}, r"FRoD.bias='lora_only': expected one of"),
        ({"projection_prng_key": 1}, r"FRoD has no field 'projection_prng_key'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        FRoD(**fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"bias='lora_only'.*'bias'"),
        ({"frod_dropout": 1.0}, r"dropout=1.0.*'frod_dropout'"),
        ({"sparse_rate": 2}, r"sparse_rate=2.*'sparse_rate'"),
        ({"init_weights": "yes"}, r"init_weights='yes'"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), FRoD(targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_options_without_numbers_load(tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), FRoD(targets=("head",))).save_adapters(tmp_path)
    change = {"progressbar": False, "runtime_offload_base_weight": True}
    cm = load_with_changed_config(entry.model(), tmp_path, change)
    assert cm.spec("default") == FRoD(targets=("head",))


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which FRoD cannot adapt"):
        surgeon.compile(One(layer), FRoD(targets=("layer",)))
