"""NOLA's card (its formula) and what is its own: random bases drawn from the seed and shared by
the layers of one shape, the fresh adapter, merging over layers of different shapes, the eval
cache of A and B, half precision, files (this project's own PEFT type, the bases never saved
but regenerated from the file's seed, PEFT's loader refusing them), spec and config errors,
training through `surgeon.train` with exact resumption. PEFT has no NOLA: the conformance suite
runs the rest against the formula alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
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
    train_and_resume_spec,
    trained_and_moved,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.shared.nola import NOLA, NOLALayer
from surgeon.spec import METHODS
from surgeon.train import trained_parameters


def _delta_rows(adapter) -> torch.Tensor:
    """``(alpha/r) · B A`` (out x in), ``A = Σ_i c_i A_i``, ``B = Σ_j d_j B_j``."""
    bases = adapter.bases
    a = sum(c * basis for c, basis in zip(adapter.nola_alpha, bases.nola_A_bases))
    b = sum(d * basis for d, basis in zip(adapter.nola_beta, bases.nola_B_bases))
    return adapter.scale * b @ a


def formula(spec, adapter, base, x):
    """NOLA (arXiv 2310.02556, Eq. 2-3): ``W x + b + (alpha/r) · B A x`` with A and B linear
    combinations of the layer's shape's random bases, by the layer's trained coefficients."""
    assert adapter.scale == spec.alpha / spec.rank
    assert adapter.bases.nola_A_bases.shape[0] == spec.num_basis_A
    assert adapter.bases.nola_B_bases.shape[0] == spec.num_basis_B
    return plain_output(base, x) + x @ _delta_rows(adapter).t()


def _bases(seed: int, rank: int, shapes, num_a: int, num_b: int) -> list[torch.Tensor]:
    """The draws the module docstring describes, written out: one generator, shape after shape,
    A bases uniform in ±1/√num_basis_A then B bases uniform in ±1/√num_basis_B (the authors'
    code, github.com/UCDvision/NOLA, ``GenerateParams``)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for fan_in, fan_out in shapes:
        for shape, count in (((num_a, rank, fan_in), num_a), ((num_b, fan_out, rank), num_b)):
            draw = torch.rand(shape, generator=generator) * 2 - 1
            out.append(draw * (1 / math.sqrt(count)))
    return out


class Stack(nn.Module):
    """Two layers of one shape and one of another."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        make = gpt2_conv1d if conv1d else nn.Linear
        self.a = make(6, 6)
        self.b = make(6, 6)
        self.c = make(6, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


SPEC = NOLA(rank=3, num_basis_A=4, num_basis_B=5, seed=11, alpha=6, targets=("a", "b", "c"))


def _stack(conv1d: bool = False, spec: NOLA = SPEC) -> tuple[Stack, surgeon.CompiledModel]:
    torch.manual_seed(0)
    model = Stack(conv1d)
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    return model, cm


def _layers(cm, name: str = "default") -> dict[str, NOLALayer]:
    return dict(cm.store.items(name))


# -- the bases and the fresh adapter -------------------------------------------------------------


def test_the_bases_are_the_seeds_draws_shared_by_the_layers_of_one_shape():
    _, cm = _stack()
    layers = _layers(cm)
    assert layers["a"].bases is layers["b"].bases is not layers["c"].bases
    expected = _bases(11, 3, [(6, 6), (6, 4)], 4, 5)
    drawn = [layers[p].bases.get_buffer(n) for p in "ac" for n in ("nola_A_bases", "nola_B_bases")]
    for got, want in zip(drawn, expected):
        assert torch.equal(got, want)
    assert not any("bases" in n for n, _ in cm.named_parameters())
    trained = trained_parameters(cm)
    assert len(trained) == 6
    assert {n.rsplit(".", 1)[1] for n in trained} == {"nola_alpha", "nola_beta"}
    assert "(shared by" not in str(cm.inspect())  # the bases are buffers: nothing shared trains


def test_a_fresh_adapter_is_the_identity_and_its_a_coefficients_are_drawn():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(3, 6)
    before = model(x)
    cm = surgeon.compile(model, SPEC)
    assert torch.equal(cm(x), before)
    adapter = _layers(cm)["a"]
    assert torch.count_nonzero(adapter.nola_beta) == 0
    assert adapter.nola_alpha.abs().max() <= 1 / math.sqrt(4)
    assert torch.count_nonzero(adapter.nola_alpha) == 4


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_layers_of_different_shapes_follow_the_formula_and_merge_to_it(conv1d):
    model, cm = _stack(conv1d)
    layers = _layers(cm)
    x = torch.randn(4, 6)
    with torch.no_grad(), cm.disabled():
        h = torch.tanh(formula(SPEC, layers["a"], model.a, x))
        h = torch.tanh(formula(SPEC, layers["b"], model.b, h))
        expected = formula(SPEC, layers["c"], model.c, h)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weights = [m.weight.detach().clone() for m in (model.a, model.b, model.c)]
    cm.merge()
    assert "factors" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    after = [m.weight for m in (model.a, model.b, model.c)]
    torch.testing.assert_close(after, weights, rtol=0, atol=1e-6)


def test_eval_mode_mixes_a_and_b_once_until_a_coefficient_or_basis_changes(monkeypatch):
    counted = count_calls(monkeypatch, NOLALayer, "mixed_factors")
    torch.manual_seed(0)
    model = One(nn.Linear(6, 5))
    cm = surgeon.compile(model, SPEC.replace(targets=("layer",)))
    randomize(cm, scale=0.5)
    adapter = _layers(cm)["layer"]
    x = torch.randn(3, 6)
    cm.eval()
    counted.clear()
    with torch.no_grad():
        for _ in range(3):
            cm(x)
        assert len(counted) == 1
        for number, change in enumerate(
            [lambda: adapter.nola_beta.mul_(2), lambda: adapter.bases.nola_A_bases.mul_(-1)],
            start=2,
        ):
            change()
            torch.testing.assert_close(cm(x), formula(SPEC, adapter, model.layer, x))
            assert len(counted) == number
    cm.train()
    cm(x), cm(x)
    assert len(counted) == 5  # training mixes them on every call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_get_float32_coefficients_and_bases(dtype):
    torch.manual_seed(0)
    model = One(nn.Linear(16, 8)).to(dtype)
    x = torch.randn(3, 16, dtype=dtype)
    before = model(x)
    cm = surgeon.compile(model, SPEC.replace(targets=("layer",)))
    adapter = _layers(cm)["layer"]
    held = [adapter.nola_alpha, adapter.nola_beta, *adapter.bases.buffers()]
    assert all(t.dtype == torch.float32 for t in held)
    expected = _bases(11, 3, [(16, 8)], 4, 5)[0].to(dtype).float()  # rounded through the base's
    assert torch.equal(adapter.bases.nola_A_bases, expected)
    assert torch.equal(cm(x), before)
    randomize(cm)
    expected = cm(x)
    assert expected.dtype == dtype
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=2e-2, atol=2e-2)


# -- files ---------------------------------------------------------------------------------------


def _saved(tmp_path, seed: int = 5):
    entry = ZOO["llama"]
    spec = NOLA(rank=4, num_basis_A=6, num_basis_B=7, seed=seed, alpha=8)
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    cm.save_adapters(tmp_path)
    return entry, spec, cm


def test_a_file_holds_the_coefficients_only_and_loads_with_the_bases_regenerated(tmp_path):
    entry, spec, cm = _saved(tmp_path)
    x = entry.example()
    expected = logits(cm(**x))
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_NOLA" and config["basis_seed"] == 5
    assert (config["num_basis_A"], config["num_basis_B"], config["r"]) == (6, 7, 4)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {k.rsplit(".", 1)[1] for k in saved} == {"nola_alpha", "nola_beta"}
    assert saved[f"{q}.nola_alpha"].shape == (6,) and saved[f"{q}.nola_beta"].shape == (7,)
    torch.manual_seed(123)  # another global generator state: only the seed may decide the bases
    loaded = surgeon.load(entry.model(), tmp_path)
    assert loaded.spec("default") == spec
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=0, atol=0)


def test_a_different_seed_in_the_file_gives_the_files_own_bases(tmp_path):
    entry, spec, cm = _saved(tmp_path)
    x = entry.example()
    loaded = load_with_changed_config(entry.model(), tmp_path, {"basis_seed": 9})
    assert loaded.spec("default") == spec.replace(seed=9)
    fresh = surgeon.compile(entry.model(), spec.replace(seed=9))
    for (path, mine), (_, theirs) in zip(_layers(loaded).items(), _layers(fresh).items()):
        for name, basis in mine.bases.named_buffers():
            assert torch.equal(basis, theirs.bases.get_buffer(name)), (path, name)
        assert not torch.equal(mine.bases.nola_A_bases, _layers(cm)[path].bases.nola_A_bases)
        assert torch.equal(mine.nola_beta, _layers(cm)[path].nola_beta)  # the file's
    assert not torch.allclose(logits(loaded(**x)), logits(cm(**x)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"basis_seed": 2**64}, r"NOLA.seed=\d+: .*\(adapter_config.json key 'basis_seed'\)"),
        ({"num_basis_A": 0}, r"NOLA.num_basis_A=0.*\(adapter_config.json key 'num_basis_A'\)"),
        ({"num_basis_B": 3}, r"nola_beta has shape \(7,\), the model needs \(3,\)"),
        ({"nola_dropout": "x"}, "nola_dropout='x': expected a number"),
        ({"use_dora": True}, "use_dora=True"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    entry, _, _ = _saved(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"NOLA.rank=0: expected an integer >= 1"),
        ({"num_basis_A": 0}, r"NOLA.num_basis_A=0: expected an integer >= 1"),
        ({"num_basis_B": 1.5}, r"NOLA.num_basis_B=1.5: expected an integer"),
        ({"seed": "7"}, r"NOLA.seed='7': expected an integer from"),
        ({"alpha": float("inf")}, r"NOLA.alpha=inf"),
        ({"dropout": 1.0}, r"NOLA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"targets": ()}, r"NOLA.targets=\[\]: expected at least one target"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        NOLA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["nola"] is NOLA is surgeon.NOLA
    assert NOLA.peft_type == "SURGEON_NOLA"
    spec = surgeon.MethodSpec.from_dict({"method": "nola", "num_basis_A": 8, "targets": ["a"]})
    assert spec == NOLA(num_basis_A=8, targets=("a",))


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which NOLA cannot adapt"):
        surgeon.compile(One(layer), NOLA(targets=("layer",)))


# -- training ------------------------------------------------------------------------------------


def test_surgeon_train_moves_the_coefficients_only_and_resumes_exactly(tmp_path):
    _, whole, _, before = train_and_resume_spec(SPEC, Stack, tmp_path)
    assert all(torch.equal(b, before[n]) for n, b in whole.store.named_buffers())
    coefficients, moved = trained_and_moved(whole, before)
    assert coefficients and moved == coefficients
