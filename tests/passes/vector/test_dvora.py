"""DVoRA's card (its formula) and what is its own: the formula over layers of different shapes
sharing the projections, the merged weight, the initial magnitude, the norm as a constant in
backward, the eval-mode norm cache, training with dropout as PEFT's DoRA trains, half-precision
merging, files (this project's own PEFT type, projections saved or redrawn from the seed, PEFT's
loader refusing them), spec and config errors, training through `surgeon.train`. PEFT has no
DVoRA: the conformance suite runs the rest against the formula alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    count_calls,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.vector.dvora import DVoRA, DVoRALayer
from surgeon.passes.vector.vera import VeRA
from surgeon.spec import METHODS
from surgeon.train import parameter_groups, trained_parameters


def _dvora_rows(base, adapter, detach_norm: bool = True) -> tuple[torch.Tensor, bool]:
    """``m ⊙ V / ‖V‖`` with ``V = W + Λ_b B Λ_d A`` (A, B sliced to the layer), output features
    first, the norm per output feature over the inputs; and whether the layer stores them last
    (GPT-2's Conv1D)."""
    transposed = not isinstance(base, nn.Linear)
    w = base.weight.t() if transposed else base.weight
    fan_out, fan_in = w.shape
    a = adapter.projections.vera_A[:, :fan_in]
    b = adapter.projections.vera_B[:fan_out]
    v = w.float() + torch.diag(adapter.vera_lambda_b) @ b @ torch.diag(adapter.vera_lambda_d) @ a
    norm = v.norm(dim=1, keepdim=True)
    return adapter.magnitude[:, None] * v / (norm.detach() if detach_norm else norm), transposed


def formula(spec, adapter, base, x):
    """DVoRA (Liu et al., 2024, §5): the layer with its weight replaced by ``m ⊙ V / ‖V‖``,
    ``V = W + Λ_b B Λ_d A``, A and B VeRA's shared projections cut to the layer's sizes."""
    rows, transposed = _dvora_rows(base, adapter)
    return plain_output(base, x, rows.t() if transposed else rows)


peft = pytest.importorskip("peft")


LAYERS = {"linear": lambda: nn.Linear(6, 5), "conv1d_gpt2": lambda: gpt2_conv1d(6, 5)}
"""The layers DVoRA adapts, 6 inputs and 5 outputs each."""


def _single(make=LAYERS["linear"], **fields) -> tuple[nn.Module, surgeon.CompiledModel]:
    torch.manual_seed(0)
    model = One(make())
    cm = surgeon.compile(model, DVoRA(targets=("layer",), **{"rank": 3, **fields}))
    randomize(cm, scale=0.3)
    with torch.no_grad():
        (_, adapter), *_ = cm.store.items("default")
        adapter.magnitude.add_(1.0)  # near the weight's norm, as training keeps it
    return model, cm


def _adapter(cm, name: str = "default") -> DVoRALayer:
    (_, adapter), *_ = cm.store.items(name)
    return adapter


# -- the formula ---------------------------------------------------------------------------------


class Two(nn.Module):
    """Two layers of different shapes sharing one pair of projections."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        make = gpt2_conv1d if conv1d else nn.Linear
        self.a = make(5, 7)
        self.b = make(7, 3)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_layers_of_different_shapes_follow_the_formula_and_merge_to_it(conv1d):
    torch.manual_seed(0)
    model = Two(conv1d)
    x = torch.randn(4, 5)
    cm = surgeon.compile(model, DVoRA(rank=3, targets=("a", "b")))
    randomize(cm, scale=0.5)
    layers = dict(cm.store.items("default"))
    assert layers["a"].projections is layers["b"].projections
    with torch.no_grad(), cm.disabled():
        expected = formula(None, layers["b"], model.b, formula(None, layers["a"], model.a, x))
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weights = [model.a.weight.detach().clone(), model.b.weight.detach().clone()]
    merged = [_dvora_rows(model.a, layers["a"])[0], _dvora_rows(model.b, layers["b"])[0]]
    cm.merge()
    assert "vera_A" not in cm.graph.code()
    for layer, rows in zip((model.a, model.b), merged):
        torch.testing.assert_close(layer.weight, rows.t() if conv1d else rows)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close([model.a.weight, model.b.weight], weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_what_merging_adds():
    model, cm = _single()
    adapter = _adapter(cm)
    torch.testing.assert_close(
        model.layer.weight + adapter.delta_weight(), _dvora_rows(model.layer, adapter)[0]
    )


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_a_fresh_adapter_is_the_identity_with_the_weight_norm_as_magnitude(make):
    torch.manual_seed(0)
    model = One(make())
    x = torch.randn(3, 6)
    before = model(x)
    cm = surgeon.compile(model, DVoRA(rank=4, targets=("layer",)))
    adapter = _adapter(cm)
    rows = model.layer.weight.t() if adapter.kind == "conv1d_gpt2" else model.layer.weight
    torch.testing.assert_close(adapter.magnitude, rows.norm(dim=1))  # one per output feature
    assert adapter.magnitude.shape == (5,)
    assert torch.count_nonzero(adapter.vera_lambda_b) == 0
    assert torch.all(adapter.vera_lambda_d == 0.1)
    assert torch.equal(cm(x), before)


def test_the_projections_are_veras_draws_from_the_seed():
    entry = ZOO["llama"]
    ours = surgeon.compile(entry.model(), DVoRA(rank=4, seed=7))
    vera = surgeon.compile(entry.model(), VeRA(rank=4, seed=7))
    mine, theirs = _adapter(ours).projections, _adapter(vera).projections
    assert torch.equal(mine.vera_A, theirs.vera_A) and torch.equal(mine.vera_B, theirs.vera_B)
    assert not any("vera_A" in n or "vera_B" in n for n, _ in ours.named_parameters())


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_the_norm_gets_no_gradient(make):
    """DoRA §4.3: the norm is a constant in backward; the gradients differ if it were not."""
    model, cm = _single(make)
    adapter = _adapter(cm)
    cm.train()
    x = torch.randn(4, 6)
    target = torch.randn(4, 5)
    params = (adapter.vera_lambda_b, adapter.vera_lambda_d, adapter.magnitude)

    def grads(detach_norm=None):
        if detach_norm is None:
            out = cm(x)
        else:
            rows, transposed = _dvora_rows(model.layer, adapter, detach_norm)
            out = plain_output(model.layer, x, rows.t() if transposed else rows)
        return torch.autograd.grad((out * target).sum(), params)

    ours = grads()
    for g, d in zip(ours, grads(detach_norm=True)):
        torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0], grads(detach_norm=False)[0], atol=1e-4)


# -- the eval-mode norm cache ---------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Counts how often a DVoRA norm is computed."""
    return count_calls(monkeypatch, DVoRALayer, "weight_norm_now")


def test_eval_mode_computes_the_norm_once_until_what_it_depends_on_changes(counted):
    model, cm = _single()
    adapter = _adapter(cm)
    x = torch.randn(3, 6)
    cm.eval()
    counted.clear()
    for _ in range(3):
        cm(x)
    assert len(counted) == 1
    changes = [
        lambda: adapter.vera_lambda_b.mul_(2),
        lambda: adapter.vera_lambda_d.add_(0.5),
        lambda: adapter.projections.vera_A.mul_(-1),
        lambda: model.layer.weight.add_(0.1),
    ]
    for number, change in enumerate(changes, start=2):
        with torch.no_grad():
            change()
        torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
        assert len(counted) == number
    with torch.no_grad():
        adapter.magnitude.mul_(3)  # not part of the norm
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert len(counted) == len(changes) + 1
    cm.train()
    cm(x), cm(x)
    assert len(counted) == len(changes) + 3  # training recomputes it every forward


def test_a_norm_cached_in_inference_mode_still_allows_gradients():
    _, cm = _single()
    adapter = _adapter(cm)
    x = torch.randn(3, 6)
    cm.eval()
    with torch.inference_mode():
        cm(x)
    cm(x).sum().backward()  # would fail on an inference tensor saved for backward
    assert adapter.magnitude.grad is not None


# -- dropout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_training_with_dropout_is_peft_doras_formula(make):
    """As PEFT's DoRA: ``base(x) + (f - 1) ⊙ W·drop(x) + f ⊙ ΔV·drop(x)`` while training, the
    undropped formula in eval."""
    model, cm = _single(make, dropout=0.5)
    adapter = _adapter(cm)
    x = torch.randn(8, 6)
    cm.train()
    torch.manual_seed(3)
    got = cm(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)  # the same mask: the graph's only random draw
    with torch.no_grad():
        w = model.layer.weight.t() if adapter.kind == "conv1d_gpt2" else model.layer.weight
        fan_out, fan_in = w.shape
        a = adapter.projections.vera_A[:, :fan_in]
        b = adapter.projections.vera_B[:fan_out]
        delta = torch.diag(adapter.vera_lambda_b) @ b @ torch.diag(adapter.vera_lambda_d) @ a
        f = adapter.magnitude / (w + delta).norm(dim=1)
        expected = (
            plain_output(model.layer, x) + (f - 1) * (dropped @ w.t()) + f * (dropped @ delta.t())
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, cm(x))  # dropout is live
    cm.eval()
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert not adapter.dropout_correction.training


# -- half precision -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_get_float32_adapters_an_exact_init_and_a_rounding_merge(dtype):
    """As VeRA and DoRA here: float32 vectors, projections and magnitude on a half base (PEFT's
    autocast_adapter_dtype); the fresh adapter leaves the output exactly; merge and unmerge are
    undone up to the dtype's rounding."""
    torch.manual_seed(0)
    model = One(nn.Linear(64, 32)).to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    before = model(x)
    cm = surgeon.compile(model, DVoRA(rank=4, targets=("layer",)))
    adapter = _adapter(cm)
    tensors = [*adapter.parameters(), adapter.projections.vera_A, adapter.projections.vera_B]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert torch.equal(cm(x), before)
    randomize(cm)
    with torch.no_grad():
        adapter.magnitude.add_(1.0)
    original = model.layer.weight.detach().clone()
    expected = cm(x)
    assert expected.dtype == dtype
    cm.merge()
    assert not torch.equal(model.layer.weight, original)
    torch.testing.assert_close(cm(x), expected, rtol=2e-2, atol=2e-2)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, original, rtol=1e-2, atol=1e-3)


# -- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_round_trip_with_or_without_the_projections(save_projection, tmp_path):
    entry = ZOO["llama"]
    spec = DVoRA(rank=4, seed=5, save_projection=save_projection)
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_DVORA"
    assert config["projection_prng_key"] == 5 and config["save_projection"] is save_projection
    saved = load_file(tmp_path / WEIGHTS_NAME)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert saved[f"{q}.dvora_magnitude"].shape == (32,)
    assert saved[f"{q}.vera_lambda_b"].shape == (32,) and saved[f"{q}.vera_lambda_d"].shape == (4,)
    assert ("base_model.vera_A" in saved) is save_projection
    assert ("base_model.vera_B" in saved) is save_projection
    loaded = surgeon.load(entry.model(), tmp_path)
    assert loaded.spec("default") == spec
    mine, theirs = _adapter(loaded).projections, _adapter(cm).projections
    assert torch.equal(mine.vera_A, theirs.vera_A) and torch.equal(mine.vera_B, theirs.vera_B)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=0, atol=0)


def test_vera_and_dvora_files_each_load_as_their_own_method(tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), VeRA(rank=4)).save_adapters(tmp_path / "vera")
    surgeon.compile(entry.model(), DVoRA(rank=4)).save_adapters(tmp_path / "dvora")
    assert type(surgeon.load(entry.model(), tmp_path / "vera").spec("default")) is VeRA
    assert type(surgeon.load(entry.model(), tmp_path / "dvora").spec("default")) is DVoRA


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"r": 0}, r"DVoRA.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"vera_dropout": 1.5}, "adapter_config.json key 'vera_dropout'"),
        ({"d_initial": "big"}, "d_initial='big': expected a number"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), DVoRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"DVoRA.rank=0: expected an integer >= 1"),
        ({"seed": -1}, r"DVoRA.seed=-1: expected an integer >= 0"),
        ({"d_initial": 0}, r"DVoRA.d_initial=0: expected a number > 0"),
        ({"dropout": 1.0}, r"DVoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"save_projection": "yes"}, r"DVoRA.save_projection='yes': expected true or false"),
        ({"targets": ()}, r"DVoRA.targets=\[\]: expected at least one target"),
        ({"magnitude": 1}, r"DVoRA has no field 'magnitude'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        DVoRA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["dvora"] is DVoRA is surgeon.DVoRA
    assert DVoRA.peft_type == "SURGEON_DVORA" and VeRA.peft_type == "VERA"
    spec = surgeon.MethodSpec.from_dict({"method": "dvora", "rank": 4, "targets": ["q_proj"]})
    assert spec == DVoRA(rank=4, targets=("q_proj",))


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_veras_projections_do_not_fit_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which DVoRA cannot adapt"):
        surgeon.compile(One(layer), DVoRA(targets=("layer",)))


# -- training -------------------------------------------------------------------------------------


def test_surgeon_train_moves_the_magnitude_and_vectors_only():
    model = ZOO["llama"].model()
    cm = surgeon.compile(model, DVoRA(rank=4, targets=("q_proj", "v_proj")))
    trained = trained_parameters(cm)
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        max_steps=3,
        weight_decay=0.1,
        progress=False,
        distributed="none",
    )
    groups = parameter_groups(cm, trained, config)
    no_decay = {n for g in groups if g.weight_decay == 0 for n in g.names}
    assert {n for n in trained if n.endswith(".magnitude")} <= no_decay
    assert {n.rsplit(".", 1)[1] for n in trained} == {"magnitude", "vera_lambda_b", "vera_lambda_d"}
    before = {n: t.detach().clone() for n, t in [*cm.named_parameters(), *cm.named_buffers()]}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (4, 7), generator=generator).tolist()
    data = [{"input_ids": row, "attention_mask": [1] * 7, "labels": row} for row in ids]
    result = surgeon.train(cm, data, config)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    moved = {
        n for n, t in [*cm.named_parameters(), *cm.named_buffers()] if not torch.equal(t, before[n])
    }
    assert moved == set(trained)  # every m, λ_b, λ_d moved (λ_d once λ_b left zero)
