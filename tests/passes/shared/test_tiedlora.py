"""Tied-LoRA's card (its formula) and what is its own: factors tied across the layers of one
shape, the configurations (what trains, what is held, the fresh adapter, the paper's parameter
counts), merging over layers of different shapes, half precision, files (this project's own
PEFT type, frozen factors saved, PEFT's loader refusing them), spec and config errors, training
through `surgeon.train` with exact resumption. PEFT has no Tied-LoRA: the conformance suite
runs the rest against the formula alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    plain_output,
    randomize,
    train_and_resume_spec,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.shared.tiedlora import TiedLoRA
from surgeon.spec import METHODS
from surgeon.train import trained_parameters


def _delta_rows(adapter) -> torch.Tensor:
    """``(alpha/r) · diag(v) B diag(u) A`` (out x in), a frozen u or v being all ones."""
    a, b = adapter.factors.tiedlora_A, adapter.factors.tiedlora_B
    u = adapter.tiedlora_u if adapter.tiedlora_u is not None else torch.ones(a.shape[0])
    v = adapter.tiedlora_v if adapter.tiedlora_v is not None else torch.ones(b.shape[0])
    return adapter.scale * torch.diag(v) @ b @ torch.diag(u) @ a


def formula(spec, adapter, base, x):
    """Tied-LoRA (arXiv 2311.09578, §2): ``W x + b + (alpha/r) · Λ_v B Λ_u A x`` with A, B the
    factors of the layer's shape, shared by the adapter's layers of that shape; alpha = r (scale
    1) unless given."""
    assert adapter.scale == (1.0 if spec.alpha is None else spec.alpha / spec.rank)
    return plain_output(base, x) + x @ _delta_rows(adapter).t()


class Stack(nn.Module):
    """One projection in two layers (``blocks.0.layer``, ``blocks.1.layer``), another of the
    same shape (``gate``) and a head of another shape (``head``)."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        make = gpt2_conv1d if conv1d else nn.Linear
        self.blocks = nn.ModuleList(One(make(6, 6)) for _ in range(2))
        self.gate = make(6, 6)
        self.head = make(6, 4)

    def forward(self, x):
        for module in (*self.blocks, self.gate):
            x = torch.tanh(module(x))
        return self.head(x)


TARGETS = ("layer", "gate", "head")
PATHS = ("blocks.0.layer", "blocks.1.layer", "gate", "head")


def _stack(conv1d: bool = False, **fields) -> tuple[Stack, surgeon.CompiledModel]:
    torch.manual_seed(0)
    model = Stack(conv1d)
    cm = surgeon.compile(model, TiedLoRA(targets=TARGETS, **{"rank": 3, **fields}))
    randomize(cm, scale=0.5)
    return model, cm


def _expected(model: Stack, cm, x: torch.Tensor) -> torch.Tensor:
    layers = dict(cm.store.items("default"))
    spec = cm.spec("default")
    with torch.no_grad(), cm.disabled():
        for path in PATHS[:-1]:
            x = torch.tanh(formula(spec, layers[path], model.get_submodule(path), x))
        return formula(spec, layers["head"], model.head, x)


# -- tying and the configurations ------------------------------------------------------------------


def test_one_projection_across_layers_shares_a_and_b_and_each_layer_has_its_vectors():
    _, cm = _stack()
    first, second, gate, head = (dict(cm.store.items("default"))[p] for p in PATHS)
    assert first.factors is second.factors
    assert first.factors.key == "blocks.*.layer"
    # the paper ties across layers only: another projection of the same shape has its own pair
    assert gate.factors is not first.factors and gate.factors is not head.factors
    assert first.factors.tiedlora_A.shape == (3, 6)
    assert head.factors.tiedlora_B.shape == (4, 3)
    assert first.tiedlora_u is not second.tiedlora_u
    assert head.tiedlora_v.shape == (4,)
    assert "(shared by 2 layers)" in str(cm.inspect())


def test_layers_of_one_projection_with_other_widths_get_a_pair_per_width():
    model = nn.Sequential(One(nn.Linear(6, 6)), One(nn.Linear(6, 8)), One(nn.Linear(8, 8)))
    cm = surgeon.compile(model, TiedLoRA(rank=2, targets=("layer",)))
    keys = [layer.factors.key for _, layer in cm.store.items("default")]
    assert keys == ["*.layer.6x6", "*.layer.6x8", "*.layer.8x8"]


CONFIGURATIONS = {
    # config: (trains, the factor that starts at zero)
    "TL6": ("ABuv", "B"),
    "TL5": ("AB", "B"),
    "Buv": ("Buv", "B"),
    "Auv": ("Auv", "v"),
    "uv": ("uv", "v"),
    "Au": ("Au", "u"),
    "A": ("A", "A"),
}


@pytest.mark.parametrize("config", sorted(CONFIGURATIONS))
def test_each_configuration_trains_its_tensors_and_starts_as_the_base(config):
    trains, zero = CONFIGURATIONS[config]
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(3, 6)
    before = model(x)
    cm = surgeon.compile(model, TiedLoRA(rank=3, config=config, targets=TARGETS))
    assert torch.equal(cm(x), before)
    names = {n.rsplit(".", 1)[1] for n in trained_parameters(cm)}
    assert names == {f"tiedlora_{t}" for t in trains}
    adapter = dict(cm.store.items("default"))["blocks.0.layer"]
    held = {
        "A": adapter.factors.tiedlora_A,
        "B": adapter.factors.tiedlora_B,
        "u": adapter.tiedlora_u if adapter.tiedlora_u is not None else torch.ones(3),
        "v": adapter.tiedlora_v if adapter.tiedlora_v is not None else torch.ones(6),
    }
    for factor, value in held.items():
        if factor == zero:
            assert torch.count_nonzero(value) == 0, factor
        elif factor in "uv":
            assert torch.all(value == 1), factor
        else:  # drawn, trained or not: a frozen B is a random projection
            assert torch.count_nonzero(value) == value.numel(), factor
    # shared tensors count once: 3 pairs (blocks, gate, head), plus the vectors of 4 layers
    sizes = {"A": 3 * 6 * 3, "B": 6 * 3 * 2 + 4 * 3, "u": 3 * 4, "v": 6 * 3 + 4}
    assert cm.num_trainable() == sum(sizes[t] for t in trains)


class FusedQKV(nn.Module):
    """The paper's setting: L layers, each adapting one fused d -> 3d QKV projection."""

    def __init__(self, layers: int, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(One(nn.Linear(d, 3 * d)) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)[..., : x.shape[-1]]
        return x


@pytest.mark.parametrize(("config", "count"), [("TL5", "4dr"), ("TL6", "4dr + L(r + 3d)")])
def test_the_papers_configurations_train_its_parameter_counts(config, count):
    """Table 1 of arXiv 2311.09578: TL5 trains 4dr, TL6 4dr + L(r + 3d) (LoRA: 4Ldr)."""
    layers, d, r = 5, 12, 3
    model = FusedQKV(layers, d)
    cm = surgeon.compile(model, TiedLoRA(rank=r, config=config, targets=("layer",)))
    expected = {"TL5": 4 * d * r, "TL6": 4 * d * r + layers * (r + 3 * d)}[config]
    assert cm.num_trainable() == expected, count


@pytest.mark.parametrize("config", ["TL1", "TL2", "TL3", "TL4"])
def test_the_papers_unchecked_rows_are_refused_pointing_to_the_letters(config):
    with pytest.raises(surgeon.SpecError, match=rf"config='{config}'.*not mapped.*config='Buv'"):
        TiedLoRA(config=config)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_tied_layers_follow_the_formula_and_merge_to_it(conv1d):
    model, cm = _stack(conv1d, alpha=5)
    x = torch.randn(4, 6)
    expected = _expected(model, cm, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weights = [model.get_submodule(p).weight.detach().clone() for p in PATHS]
    cm.merge()
    assert "tiedlora_A" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    after = [model.get_submodule(p).weight for p in PATHS]
    torch.testing.assert_close(after, weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_bases_get_float32_factors_and_vectors(dtype):
    torch.manual_seed(0)
    model = One(nn.Linear(16, 8)).to(dtype)
    x = torch.randn(3, 16, dtype=dtype)
    before = model(x)
    cm = surgeon.compile(model, TiedLoRA(rank=4, config="Buv", targets=("layer",)))
    adapter = dict(cm.store.items("default"))["layer"]
    held = [adapter.factors.tiedlora_A, adapter.factors.tiedlora_B, adapter.tiedlora_u]
    assert all(t.dtype == torch.float32 for t in held)
    assert torch.equal(cm(x), before)
    randomize(cm)
    expected = cm(x)
    assert expected.dtype == dtype
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=2e-2, atol=2e-2)


# -- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["TL5", "TL6"])
def test_files_round_trip_with_shared_factors_once_and_trained_vectors(config, tmp_path):
    entry = ZOO["llama"]
    spec = TiedLoRA(rank=4, alpha=6, config=config)
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    saved_config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved_config["peft_type"] == "SURGEON_TIED_LORA"
    assert saved_config["tied_config"] == config and saved_config["lora_alpha"] == 6
    saved = load_file(tmp_path / WEIGHTS_NAME)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    shared = sorted(k for k in saved if k.startswith("base_model.tiedlora_"))
    assert shared == [
        "base_model.tiedlora_A.model.layers.*.self_attn.q_proj",
        "base_model.tiedlora_A.model.layers.*.self_attn.v_proj",
        "base_model.tiedlora_B.model.layers.*.self_attn.q_proj",
        "base_model.tiedlora_B.model.layers.*.self_attn.v_proj",
    ]
    assert (f"{q}.tiedlora_u" in saved) is (config == "TL6")
    assert (f"{q}.tiedlora_v" in saved) is (config == "TL6")
    loaded = surgeon.load(
        entry.model(), tmp_path
    )  # another global RNG state: A comes from the file
    assert loaded.spec("default") == spec
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"target_modules": None}, "target_modules is missing"),
        (
            {"tied_config": "TL7"},
            r"TiedLoRA.config='TL7'.*\(adapter_config.json key 'tied_config'\)",
        ),
        ({"tied_config": "TL2"}, r"TiedLoRA.config='TL2'.*not mapped"),
        ({"lora_alpha": "8"}, r"lora_alpha='8': expected a number, or null"),
        ({"r": 0}, r"TiedLoRA.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"lora_dropout": 1.5}, "adapter_config.json key 'lora_dropout'"),
        ({"use_dora": True}, "use_dora=True"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), TiedLoRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_a_file_with_another_configuration_does_not_fit(tmp_path):
    """A TL5 file holds no vectors; read as TL6 the model wants them."""
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), TiedLoRA(rank=4, config="TL5")).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match="tiedlora_u"):
        load_with_changed_config(entry.model(), tmp_path, {"tied_config": "TL6"})


# -- the spec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"TiedLoRA.rank=0: expected an integer >= 1"),
        ({"config": "tl6"}, r"TiedLoRA.config='tl6': expected 'TL5', 'TL6' or the letters"),
        ({"config": ""}, r"TiedLoRA.config='': expected 'TL5', 'TL6' or the letters"),
        ({"config": "AAu"}, r"TiedLoRA.config='AAu': .*each once"),
        ({"config": 6}, r"TiedLoRA.config=6: expected a string"),
        ({"alpha": float("nan")}, r"TiedLoRA.alpha=nan"),
        ({"dropout": 1.0}, r"TiedLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"targets": ()}, r"TiedLoRA.targets=\[\]: expected at least one target"),
        ({"seed": 1}, r"TiedLoRA has no field 'seed'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        TiedLoRA(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["tiedlora"] is TiedLoRA is surgeon.TiedLoRA
    assert TiedLoRA.peft_type == "SURGEON_TIED_LORA"
    spec = surgeon.MethodSpec.from_dict({"method": "tiedlora", "config": "Bv", "targets": ["a"]})
    assert spec == TiedLoRA(config="Bv", targets=("a",))
    assert spec.trains == {"B", "v"} and TiedLoRA().trains == set("ABuv")


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which TiedLoRA cannot adapt"):
        surgeon.compile(One(layer), TiedLoRA(targets=("layer",)))


# -- training ---------------------------------------------------------------------------------------


def test_surgeon_train_resumes_exactly_and_leaves_a_frozen_a_alone(tmp_path):
    spec = TiedLoRA(rank=3, config="Buv", targets=TARGETS)
    _, whole, _, before = train_and_resume_spec(spec, Stack, tmp_path)
    frozen = before["layers.default.blocks_0_layer.factors.tiedlora_A"]
    layer = dict(whole.store.items("default"))["blocks.0.layer"]
    assert torch.equal(layer.factors.tiedlora_A, frozen)
