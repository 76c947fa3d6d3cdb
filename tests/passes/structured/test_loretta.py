"""LoRETTA's card (its formula) and what is its own: the factorisation rule and the cores' shapes,
the init (a fresh adapter is the base layer), outputs and merged weights on layers whose sizes
factor unevenly, GPT-2's Conv1D, dropout, half precision, files (this project's own PEFT type,
PEFT's loader refusing them), spec and config errors, training through `surgeon.train` with
exact resumption. PEFT has no LoRETTA: the conformance suite runs the rest against the formula
alone."""

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
from surgeon.passes.structured.loretta import LoRETTA, LoRETTALayer
from surgeon.spec import METHODS


def _tt_matrix(cores: list[torch.Tensor]) -> torch.Tensor:
    """The TT matrix of ``cores`` (each ``(r, m, n, r')``, the outer ranks 1), contracted core by
    core into ``(m_1 ⋯ m_d) x (n_1 ⋯ n_d)``, the first core's indices the most significant."""
    matrix = cores[0].double()[0]  # (m, n, r)
    for core in cores[1:]:
        m, n, _ = matrix.shape
        merged = torch.einsum("abr,rcds->acbds", matrix, core.double())
        matrix = merged.reshape(m * core.shape[1], n * core.shape[2], core.shape[3])
    return matrix[..., 0]


def _update(spec, adapter) -> torch.Tensor:
    """``(alpha / rank) · ΔW`` (out x in), ΔW the TT matrix of the adapter's cores."""
    cores = [getattr(adapter, f"loretta_core_{k}") for k in range(spec.cores)]
    return spec.alpha / spec.rank * _tt_matrix([c.detach() for c in cores])


def formula(spec, adapter, base, x):
    """LoRETTA_rep (Yang et al., 2024, §3): ``W x + b + (alpha / rank) ΔW x``, ΔW a tensor-train
    matrix: the layer with ``W + (alpha / rank) ΔW`` as its weight."""
    rows = base.weight if isinstance(base, nn.Linear) else base.weight.t()
    adapted = rows.double() + _update(spec, adapter)
    weight = adapted if isinstance(base, nn.Linear) else adapted.t()
    return plain_output(base, x, weight.to(x.dtype))


peft = pytest.importorskip("peft")


def _adapter(cm, name: str = "default") -> LoRETTALayer:
    (_, adapter), *_ = cm.store.items(name)
    return adapter


# -- the factorisation and the cores -------------------------------------------------------------


@pytest.mark.parametrize(
    ("fan_in", "fan_out", "cores", "in_factors", "out_factors"),
    [
        (32, 32, 3, (4, 4, 2), (4, 4, 2)),
        (24, 96, 2, (6, 4), (12, 8)),
        (5, 6, 2, (5, 1), (3, 2)),  # a prime size: a factor of 1
        (48, 7, 3, (4, 4, 3), (7, 1, 1)),
    ],
)
def test_sizes_factor_by_the_rule_and_the_last_core_starts_at_zero(
    fan_in, fan_out, cores, in_factors, out_factors
):
    torch.manual_seed(0)
    model = One(nn.Linear(fan_in, fan_out))
    x = torch.randn(3, fan_in)
    before = model(x)
    cm = surgeon.compile(model, LoRETTA(rank=3, cores=cores, targets=("layer",)))
    adapter = _adapter(cm)
    assert (adapter.in_factors, adapter.out_factors) == (in_factors, out_factors)
    ranks = [1, *[3] * (cores - 1), 1]
    names = [f"loretta_core_{k}" for k in range(cores)]
    assert [n for n, _ in adapter.named_parameters()] == names
    assert set(adapter.peft_tensors()) == set(names)
    for k, name in enumerate(names):
        core = getattr(adapter, name)
        assert core.shape == (ranks[k], out_factors[k], in_factors[k], ranks[k + 1])
        assert bool(torch.count_nonzero(core) == 0) is (k == cores - 1)
    assert torch.equal(cm(x), before)


SHAPES = [(12, 24, 3, 2), (5, 6, 2, 3), (32, 48, 3, 1), (9, 20, 4, 2)]
"""(in, out, cores, rank): even and uneven factors, factors of 1, rank 1."""


@pytest.mark.parametrize(("fan_in", "fan_out", "cores", "rank"), SHAPES)
def test_outputs_and_merged_weights_are_the_tt_matrix_update(fan_in, fan_out, cores, rank):
    torch.manual_seed(0)
    model = One(nn.Linear(fan_in, fan_out))
    spec = LoRETTA(rank=rank, cores=cores, alpha=2.0, targets=("layer",))
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    x = torch.randn(2, 3, fan_in)
    expected = formula(spec, adapter, model.layer, x)
    torch.testing.assert_close(cm(x), expected)
    torch.testing.assert_close(adapter.delta_weight(), _update(spec, adapter).float())
    weight = model.layer.weight.detach().clone()
    cm.merge()
    torch.testing.assert_close(cm(x), expected)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)


def test_gpt2_conv1d_gets_the_update_in_its_in_by_out_layout():
    torch.manual_seed(0)
    model = One(gpt2_conv1d(12, 18))
    spec = LoRETTA(rank=2, targets=("layer",))
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    x = torch.randn(2, 4, 12)
    expected = formula(spec, adapter, model.layer, x)
    torch.testing.assert_close(cm(x), expected)
    assert adapter.delta_weight().shape == (12, 18)
    cm.merge()
    torch.testing.assert_close(cm(x), expected)


def test_training_with_dropout_drops_the_updates_input_only():
    torch.manual_seed(0)
    model = One(nn.Linear(12, 24))
    spec = LoRETTA(rank=2, cores=2, dropout=0.5, targets=("layer",))
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    adapter = _adapter(cm)
    x = torch.randn(8, 12)
    cm.train()
    torch.manual_seed(3)
    got = cm(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    with torch.no_grad(), cm.disabled():
        expected = model.layer(x) + dropped @ _update(spec, adapter).float().t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    cm.eval()
    torch.testing.assert_close(cm(x), formula(spec, adapter, model.layer, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_keep_the_cores_in_float32(dtype):
    torch.manual_seed(0)
    model = One(nn.Linear(16, 8)).to(dtype)
    x = torch.randn(2, 16, dtype=dtype)
    before = model(x)
    cm = surgeon.compile(model, LoRETTA(rank=2, targets=("layer",)))
    adapter = _adapter(cm)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert torch.equal(cm(x), before)
    randomize(cm, scale=0.5)
    assert cm(x).dtype == dtype


# -- files ----------------------------------------------------------------------------------------


MLP_TARGETS = ("body.0", "head")
"""The zoo MLP's Linear(12, 24) and Linear(24, 5)."""


def test_files_hold_the_cores_under_our_own_type_and_load_back(tmp_path):
    spec = LoRETTA(rank=3, cores=2, alpha=6.0, dropout=0.1, targets=MLP_TARGETS)
    cm = surgeon.compile(mlp_without_dropout(), spec).eval()
    randomize(cm, scale=0.5)
    x = ZOO["mlp"].example()
    expected = cm(**x)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_LORETTA"
    assert (config["r"], config["tt_cores"], config["lora_alpha"]) == (3, 2, 6.0)
    assert config["lora_dropout"] == 0.1
    saved = load_file(tmp_path / WEIGHTS_NAME)
    body, head = "base_model.model.body.0", "base_model.model.head"
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        f"{body}.loretta_core_0": (1, 6, 4, 3),  # 24 = 6 · 4 out, 12 = 4 · 3 in
        f"{body}.loretta_core_1": (3, 4, 3, 1),
        f"{head}.loretta_core_0": (1, 5, 6, 3),  # 5 = 5 · 1 out, 24 = 6 · 4 in
        f"{head}.loretta_core_1": (3, 1, 4, 1),
    }
    loaded = surgeon.load(mlp_without_dropout(), tmp_path).eval()
    assert loaded.spec("default") == spec
    torch.testing.assert_close(loaded(**x), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loretta")
    surgeon.compile(mlp_without_dropout(), LoRETTA(rank=2, targets=MLP_TARGETS)).save_adapters(
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
        ({"use_dora": True}, "use_dora=True"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"r": 0}, r"LoRETTA.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"tt_cores": 1}, r"LoRETTA.cores=1: expected an integer >= 2"),
        ({"tt_cores": "3"}, "tt_cores='3': expected an integer"),
        ({"lora_alpha": 0}, "adapter_config.json key 'lora_alpha'"),
        ({"lora_dropout": 1.5}, "adapter_config.json key 'lora_dropout'"),
        ({"r": 3}, r"loretta_core_0 has shape"),
        ({"tt_cores": 2}, r"loretta_core_\d"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, saved, tmp_path):
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(mlp_without_dropout(), _copy(saved, tmp_path), change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"LoRETTA.rank=0: expected an integer >= 1"),
        ({"cores": 1}, r"LoRETTA.cores=1: expected an integer >= 2"),
        ({"cores": 2.5}, r"LoRETTA.cores=2.5: expected an integer >= 2"),
        ({"alpha": 0}, r"LoRETTA.alpha=0: expected a number > 0"),
        ({"dropout": 1.0}, r"LoRETTA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"targets": ()}, r"LoRETTA.targets=\[\]: expected at least one target"),
        ({"tensor_rank": 5}, r"LoRETTA has no field 'tensor_rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LoRETTA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["loretta"] is LoRETTA is surgeon.LoRETTA
    assert LoRETTA.peft_type == "SURGEON_LORETTA"
    assert (LoRETTA().rank, LoRETTA().cores, LoRETTA().alpha) == (4, 3, 4.0)
    spec = surgeon.MethodSpec.from_dict({"method": "loretta", "cores": 2, "targets": ["q_proj"]})
    assert spec == LoRETTA(cores=2, targets=("q_proj",))


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which LoRETTA cannot adapt"):
        surgeon.compile(One(layer), LoRETTA(targets=("layer",)))


# -- training -------------------------------------------------------------------------------------


def test_surgeon_train_moves_every_core_and_resumes_exactly(tmp_path):
    spec = LoRETTA(rank=2, dropout=0.2, targets=MLP_TARGETS)
    config = resume_config()
    _, whole, _, before = train_and_resume_spec(
        spec, mlp_without_dropout, tmp_path, data=mlp_samples(), config=config
    )
    trained, moved = trained_and_moved(whole, before)
    assert len(trained) == 6 and all(".loretta_core_" in n for n in trained)
    assert moved == trained
