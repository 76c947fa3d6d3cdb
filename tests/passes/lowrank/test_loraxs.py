"""LoRA-XS's card (its formula) and what is its own: the frozen factors are W's top singular
triplets, R's initial draw, dropout, files (this project's own PEFT type, the factors saved so a
load on another base keeps the file's update, PEFT's loader refusing them), spec and config
errors, training through `surgeon.train` with exact resumption. PEFT has no LoRA-XS: the
conformance suite runs the rest against the formula alone."""

from __future__ import annotations

import json
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
    mlp_samples,
    mlp_without_dropout,
    plain_output,
    randomize,
    resume_config,
    train_and_resume_spec,
    trained_and_moved,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.loraxs import LoRAXS, LoRAXSLayer
from surgeon.spec import METHODS


def _update(spec, adapter, base) -> torch.Tensor:
    """``ΔW = alpha/r · U_r Σ_r R V_rᵀ`` (out x in) from W's own SVD, taken here."""
    w = base.weight.t() if not isinstance(base, nn.Linear) else base.weight
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    r = spec.rank
    return spec.alpha / r * u[:, :r] @ torch.diag(s[:r]) @ adapter.lora_xs_R @ vh[:r]


def formula(spec, adapter, base, x):
    """LoRA-XS (Bałazy et al., 2024, eq. 2): ``W x + b + alpha/r · U_r Σ_r R V_rᵀ x``, the layer
    with ``W + ΔW`` as its weight."""
    w = base.weight.t() if not isinstance(base, nn.Linear) else base.weight
    adapted = w.float() + _update(spec, adapter, base)
    return plain_output(base, x, adapted if isinstance(base, nn.Linear) else adapted.t())


peft = pytest.importorskip("peft")

LAYERS = {"linear": lambda: nn.Linear(6, 5), "conv1d_gpt2": lambda: gpt2_conv1d(6, 5)}
"""The layers LoRA-XS adapts, 6 inputs and 5 outputs each."""


def _adapter(cm, name: str = "default") -> LoRAXSLayer:
    (_, adapter), *_ = cm.store.items(name)
    return adapter


# -- the factors and R ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_the_factors_are_the_top_singular_triplets_and_only_r_trains(make):
    torch.manual_seed(0)
    model = One(make())
    cm = surgeon.compile(model, LoRAXS(rank=3, targets=("layer",)))
    adapter = _adapter(cm)
    w = model.layer.weight if adapter.kind == "linear" else model.layer.weight.t()
    u, s, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    torch.testing.assert_close(adapter.lora_xs_A, vh[:3])
    torch.testing.assert_close(adapter.lora_xs_B, u[:, :3] * s[:3])
    assert [n for n, _ in adapter.named_parameters()] == ["lora_xs_R"]
    assert adapter.lora_xs_R.shape == (3, 3)
    assert set(adapter.peft_tensors()) == {"lora_xs_A", "lora_xs_B", "lora_xs_R"}
    with torch.no_grad():
        adapter.lora_xs_R.normal_()
    update = _update(cm.spec("default"), adapter, model.layer)  # (out, in)
    torch.testing.assert_close(
        adapter.delta_weight(), update if adapter.kind == "linear" else update.t()
    )


def test_r_starts_as_the_papers_small_gaussian_or_at_zero():
    torch.manual_seed(0)
    model = One(nn.Linear(64, 64))
    x = torch.randn(3, 64)
    before = model(x)
    r = _adapter(surgeon.compile(model, LoRAXS(rank=32, targets=("layer",)))).lora_xs_R.detach()
    assert 0.8e-5 < float(r.std()) < 1.2e-5 and abs(float(r.mean())) < 1e-6
    zero = surgeon.compile(One(nn.Linear(64, 64)), LoRAXS(rank=4, init_std=0, targets=("layer",)))
    assert torch.count_nonzero(_adapter(zero).lora_xs_R) == 0
    assert not LoRAXS(targets=("layer",)).starts_as_base
    assert LoRAXS(init_std=0.0, targets=("layer",)).starts_as_base
    zero.model.layer.load_state_dict(model.layer.state_dict())
    assert torch.equal(zero(x), before)


def test_training_with_dropout_drops_the_updates_input_only():
    torch.manual_seed(0)
    model = One(nn.Linear(6, 5))
    cm = surgeon.compile(model, LoRAXS(rank=3, dropout=0.5, targets=("layer",)))
    randomize(cm, scale=0.5)
    adapter, spec = _adapter(cm), cm.spec("default")
    x = torch.randn(8, 6)
    cm.train()
    torch.manual_seed(3)
    got = cm(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    with torch.no_grad():
        expected = model.layer(x) + dropped @ _update(spec, adapter, model.layer).t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cm.eval()
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))


def test_half_precision_bases_keep_float32_factors_and_r():
    torch.manual_seed(0)
    model = One(nn.Linear(16, 8)).to(torch.bfloat16)
    cm = surgeon.compile(model, LoRAXS(rank=4, targets=("layer",)))
    adapter = _adapter(cm)
    assert {t.dtype for t in adapter.peft_tensors().values()} == {torch.float32}
    vh = torch.linalg.svd(model.layer.weight.float(), full_matrices=False).Vh
    torch.testing.assert_close(adapter.lora_xs_A, vh[:4])
    assert cm(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# -- files ----------------------------------------------------------------------------------------


MLP_TARGETS = ("body.0", "head")
"""The zoo MLP's Linear(12, 24) and Linear(24, 5)."""


def test_files_hold_the_factors_and_a_load_on_another_base_keeps_the_files_update(tmp_path):
    spec = LoRAXS(rank=4, alpha=8, dropout=0.1, targets=MLP_TARGETS)
    cm = surgeon.compile(mlp_without_dropout(), spec).eval()
    randomize(cm, scale=0.5)
    x = ZOO["mlp"].example()
    expected = cm(**x)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_LORA_XS"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["init_std"] == 1e-5
    saved = load_file(tmp_path / WEIGHTS_NAME)
    first = "base_model.model.body.0"
    assert saved[f"{first}.lora_xs_A"].shape == (4, 12)
    assert saved[f"{first}.lora_xs_B"].shape == (24, 4)
    assert saved[f"{first}.lora_xs_R"].shape == (4, 4)
    loaded = surgeon.load(mlp_without_dropout(), tmp_path).eval()
    assert loaded.spec("default") == spec
    torch.testing.assert_close(loaded(**x), expected, rtol=0, atol=0)
    # another base: its own SVD differs; the file's factors, and so its ΔW, are what loads
    other = mlp_without_dropout()
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn_like(param))
    weights = {n: p.detach().clone() for n, p in other.named_parameters()}
    moved = surgeon.load(other, tmp_path).eval()
    original = dict(cm.store.items("default"))
    for path, mine in moved.store.items("default"):
        torch.testing.assert_close(
            mine.delta_weight(), original[path].delta_weight(), rtol=0, atol=0
        )
        own = LoRAXSLayer(other.get_submodule(path), spec)
        assert not torch.allclose(own.lora_xs_B, mine.lora_xs_B, atol=1e-3), path
    moved.merge()
    for path, layer in original.items():
        weight = f"{path}.weight"
        torch.testing.assert_close(
            other.get_submodule(path).weight, weights[weight] + layer.delta_weight()
        )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loraxs")
    surgeon.compile(mlp_without_dropout(), LoRAXS(rank=4, targets=MLP_TARGETS)).save_adapters(
        folder
    )
    return folder


def _copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"r": 0}, r"LoRAXS.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"lora_dropout": 1.5}, "adapter_config.json key 'lora_dropout'"),
        ({"init_std": -1}, r"init_std=-1: expected a number >= 0"),
        ({"lora_alpha": "big"}, "lora_alpha='big': expected a number"),
        ({"use_dora": True}, "use_dora=True"),
        ({"r": 3}, r"lora_xs_R has shape \(4, 4\)"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, saved, tmp_path):
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(mlp_without_dropout(), _copy(saved, tmp_path), change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"LoRAXS.rank=0: expected an integer >= 1"),
        ({"alpha": 0}, r"LoRAXS.alpha=0: expected a number > 0"),
        ({"dropout": 1.0}, r"LoRAXS.dropout=1.0: expected a number >= 0 and < 1"),
        ({"init_std": -0.1}, r"LoRAXS.init_std=-0.1: expected a number >= 0"),
        ({"init_std": float("inf")}, r"LoRAXS.init_std=inf: expected a finite number"),
        ({"targets": ()}, r"LoRAXS.targets=\[\]: expected at least one target"),
        ({"init": "svd"}, r"LoRAXS has no field 'init'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LoRAXS(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["loraxs"] is LoRAXS is surgeon.LoRAXS
    assert LoRAXS.peft_type == "SURGEON_LORA_XS"
    spec = surgeon.MethodSpec.from_dict({"method": "lora-xs", "rank": 4, "targets": ["q_proj"]})
    assert spec == LoRAXS(rank=4, targets=("q_proj",))


def test_a_rank_above_the_weights_is_refused_naming_the_layer():
    with pytest.raises(surgeon.SpecError, match=r"LoRAXS.rank=6 on layer: must be at most .* 5"):
        surgeon.compile(One(nn.Linear(6, 5)), LoRAXS(rank=6, targets=("layer",)))


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_layers_without_a_matrix_weight_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which LoRAXS cannot adapt"):
        surgeon.compile(One(layer), LoRAXS(targets=("layer",)))


# -- training -------------------------------------------------------------------------------------


def test_surgeon_train_moves_r_only_and_resumes_exactly(tmp_path):
    spec = LoRAXS(rank=3, dropout=0.2, targets=MLP_TARGETS)
    config = resume_config()
    _, whole, _, before = train_and_resume_spec(
        spec, mlp_without_dropout, tmp_path, data=mlp_samples(), config=config
    )
    trained, moved = trained_and_moved(whole, before)
    assert trained and all(n.endswith("lora_xs_R") for n in trained)
    assert moved == trained
    for name, buffer in whole.store.named_buffers():
        assert torch.equal(buffer, before[name]), name
