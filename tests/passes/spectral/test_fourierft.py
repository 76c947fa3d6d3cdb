"""FourierFT beyond the conformance suite: spectral positions drawn as PEFT draws them (never
saved: PEFT's files load with PEFT's outputs, and ours in PEFT), the initial coefficients as
PEFT's, per-layer frequencies and seeds, the bias switch, exact half-precision parity merged and
unmerged, the eval-time cache of ΔW, errors (too many frequencies for a layer, bad fields, PEFT
keys refused), the rewritten graph."""

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
from surgeon.passes.spectral.fourierft import FourierFT


def formula(spec, adapter, base, x):
    """FourierFT (Gao et al., 2024): ``W x + b + ΔW x``, ``ΔW[m, n] = scaling / (out · in) ·
    Σ_k c_k cos(2π (r_k m / out + s_k n / in))``: the real part of the inverse 2-D DFT of a grid
    holding the coefficients ``c`` at cells ``(r, s)``, the first cells of a permutation of the
    row-major grid drawn from the seed."""
    fan_in, fan_out = (
        (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
    )
    coefficients = adapter.fourierft_spectrum.double()
    generator = torch.Generator().manual_seed(spec.seed)
    cells = torch.randperm(fan_out * fan_in, generator=generator)[: coefficients.numel()]
    rows, cols = cells // fan_in, cells % fan_in
    m = torch.arange(fan_out, dtype=torch.float64)[:, None, None]
    n = torch.arange(fan_in, dtype=torch.float64)[None, :, None]
    phase = 2 * math.pi * (rows * m / fan_out + cols * n / fan_in)
    delta = spec.scaling * (torch.cos(phase) * coefficients).sum(-1) / (fan_out * fan_in)
    return plain_output(base, x) + x @ delta.t().to(x.dtype)


peft = pytest.importorskip("peft")

GPT2_TARGETS = ["c_attn", "mlp.c_proj"]


def _perturb(cm, seed: int = 2) -> None:
    add_noise(cm.store.parameters(), seed, 0.3)


def _peft_layer(pm, path: str):
    return pm.base_model.model.get_submodule(path)


# -- positions and coefficients as PEFT draws them ---------------------------------------------------


def test_positions_and_initial_coefficients_are_peft_draws():
    """Same seed, same global generator: the same cells (as PEFT's (row, col) indices) and the
    same standard-normal coefficients, layer after layer, a pattern's count included."""
    entry = ZOO["mlp"]
    targets = ["body.0", "body.3", "head"]
    config = peft.FourierFTConfig(
        n_frequency=40, random_loc_seed=9, target_modules=targets, n_frequency_pattern={"head": 7}
    )
    spec = FourierFT(
        n_frequency=40, seed=9, targets=tuple(targets), n_frequency_pattern={"head": 7}
    )
    theirs_base, model = entry.model(), entry.model()  # each build seeds the generator
    torch.manual_seed(4)
    pm = peft_model(theirs_base, config, seed=None)
    torch.manual_seed(4)
    cm = surgeon.compile(model, spec)
    for path, layer in cm.store.items("default"):
        theirs = _peft_layer(pm, path)
        rows, cols = theirs.indices["default"]
        assert torch.equal(layer.positions, rows * layer.in_features + cols), path
        assert torch.equal(layer.fourierft_spectrum, theirs.fourierft_spectrum["default"]), path
    assert dict(cm.store.items("default"))["head"].positions.numel() == 7
    x = entry.example()
    torch.testing.assert_close(cm(**x), pm(**x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_zero_init_starts_as_the_base_layer(conv1d):
    torch.manual_seed(0)
    layer = gpt2_conv1d(5, 6) if conv1d else nn.Linear(5, 6)
    x = torch.randn(3, 5)
    cm = surgeon.compile(One(layer), FourierFT(n_frequency=10, init="zeros", targets=("layer",)))
    ((_, adapter),) = cm.store.items("default")
    assert torch.count_nonzero(adapter.fourierft_spectrum) == 0
    torch.testing.assert_close(cm(x), plain_output(layer, x))


# -- PEFT's files without positions, both ways -----------------------------------------------------


def test_peft_file_holds_no_positions_and_loads_with_peft_outputs(tmp_path):
    """PEFT saves only the coefficients: surgeon redraws the cells from random_loc_seed, per
    layer shape (GPT-2's Conv1D layers, a pattern's count), and gives PEFT's outputs."""
    entry = ZOO["gpt2"]
    config = peft.FourierFTConfig(
        n_frequency=50,
        scaling=20.0,
        random_loc_seed=123,
        target_modules=GPT2_TARGETS,
        n_frequency_pattern={"c_proj": 9},
    )
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert saved and all(k.endswith(".fourierft_spectrum") for k in saved)
    assert saved["base_model.model.transformer.h.0.mlp.c_proj.fourierft_spectrum"].shape == (9,)
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    cm = surgeon.load(entry.model(), tmp_path)
    spec = cm.spec("default")
    assert (spec.seed, spec.scaling, dict(spec.n_frequency_pattern)) == (123, 20.0, {"c_proj": 9})
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


def test_surgeon_file_holds_no_positions_and_peft_loads_our_outputs(tmp_path):
    entry = ZOO["mlp"]
    spec = FourierFT(
        n_frequency=33, scaling=-12.0, seed=-5, targets=("body.0", "head"), init="zeros"
    )
    cm = surgeon.compile(entry.model(), spec)
    _perturb(cm)
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert set(saved) == {f"base_model.model.{p}.fourierft_spectrum" for p in ("body.0", "head")}
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    written = (config["random_loc_seed"], config["init_weights"], config["scaling"])
    assert written == (-5, True, -12.0)
    x = entry.example()
    loaded = peft_loaded(entry.model(), tmp_path)
    for path, layer in cm.store.items("default"):
        rows, cols = _peft_layer(loaded, path).indices["default"]
        assert torch.equal(layer.positions, rows * layer.in_features + cols), path
    torch.testing.assert_close(loaded(**x), cm(**x), rtol=1e-5, atol=1e-5)


def test_bias_switch_trains_and_saves_the_adapted_layers_biases_as_peft(tmp_path):
    entry = ZOO["mlp"]
    config = peft.FourierFTConfig(n_frequency=20, target_modules=["body.3"], bias="fourier_only")
    pm = peft_model(entry.model(), config)
    with torch.no_grad():
        pm.base_model.model.body[3].base_layer.bias.add_(1.0)  # trained, as PEFT saves it
    pm.save_pretrained(tmp_path)
    assert "base_model.model.body.3.base_layer.bias" in load_file(tmp_path / WEIGHTS_NAME)
    cm = surgeon.load(entry.model(), tmp_path)
    trainable = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("store.")} == {"model.body.3.bias"}
    x = entry.example()
    torch.testing.assert_close(cm(**x), pm(**x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly_merged_too(dtype, tmp_path):
    """Coefficients in float32 over a half base (PEFT's upcast), ΔW in float32, the sum rounded
    once; merging adds the float32 ΔW and rounds once, as PEFT's merge."""
    entry = ZOO["mlp"]
    config = peft.FourierFTConfig(n_frequency=40, scaling=30.0, target_modules=["body.0", "head"])
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.fourierft_spectrum.dtype == torch.float32
    x = {"x": entry.example()["x"].to(dtype)}
    out = cm(**x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, pm(**x), rtol=0, atol=0)
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        ours, theirs = cm.model.get_submodule(path), pm.get_base_model().get_submodule(path)
        assert torch.equal(ours.weight, theirs.base_layer.weight), path


# -- the eval-time cache ---------------------------------------------------------------------------


def test_eval_keeps_the_update_until_the_coefficients_change(monkeypatch):
    torch.manual_seed(0)
    cm = surgeon.compile(One(nn.Linear(8, 6)), FourierFT(n_frequency=12, targets=("layer",)))
    ((_, adapter),) = cm.store.items("default")
    built = count_calls(monkeypatch, adapter.update, "compute")
    x = torch.randn(4, 8)
    cm.eval()
    with torch.no_grad():
        first = cm(x)
        torch.testing.assert_close(cm(x), first)
        assert len(built) == 1
        adapter.fourierft_spectrum.add_(1.0)
        assert not torch.allclose(cm(x), first)
        assert len(built) == 2
    cm.train()
    cm(x).sum().backward()  # built again in training, with gradients to the coefficients
    cm(x)
    assert len(built) == 4 and adapter.fourierft_spectrum.grad is not None


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"n_frequency": 31},
            r"FourierFT.n_frequency=31 on layer: its 6 x 5 weight has only 30 entries",
        ),
        (
            {"n_frequency": 4, "n_frequency_pattern": {"lay.*": 40}},
            r"FourierFT.n_frequency_pattern\['lay.\*'\]=40 on layer",
        ),
    ],
    ids=["n_frequency", "pattern"],
)
def test_more_frequencies_than_weight_entries_is_refused_naming_the_field(fields, match):
    model = One(nn.Linear(5, 6))
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(model, FourierFT(targets=("layer",), **fields))
    assert all(p.requires_grad for p in model.parameters())
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n_frequency": 0}, r"FourierFT.n_frequency=0: expected an integer >= 1"),
        ({"scaling": float("nan")}, r"FourierFT.scaling=nan: expected a finite number"),
        ({"seed": 2**64}, r"FourierFT.seed=18446744073709551616: expected an integer from"),
        ({"init": "normal"}, r"FourierFT.init='normal': expected one of 'gaussian', 'zeros'"),
        ({"bias": "lora_only"}, r"FourierFT.bias='lora_only': expected one of"),
        ({"n_frequency_pattern": {"q": 0}}, r"FourierFT.n_frequency_pattern\['q'\]=0"),
        ({"dropout": 0.1}, r"FourierFT has no field 'dropout'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        FourierFT(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which FourierFT cannot adapt"):
        surgeon.compile(One(layer), FourierFT(n_frequency=4, targets=("layer",)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"random_loc_seed": None}, r"random_loc_seed=None: expected an integer"),
        ({"init_weights": "zeros"}, r"init_weights='zeros': expected true or false"),
        ({"bias": "lora_only"}, r"bias='lora_only'.*adapter_config.json key 'bias'"),
        (
            {"n_frequency": 200},
            r"FourierFT.n_frequency=200 on head: its 5 x 24 weight has only 120",
        ),
        ({"target_modules": None}, "target_modules is missing"),
        ({"use_dora": True}, "use_dora=True"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    spec = FourierFT(n_frequency=16, targets=("body.0", "head"))
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the graph ---------------------------------------------------------------------------------------


GOLDEN_BF16 = """\
def forward(self, x):
    layer = self.layer(x)
    adapters_default_layer_update = self.adapters.default.layer.update()
    to = x.to(torch.float32);  x = None
    linear = torch._C._nn.linear(to, adapters_default_layer_update);  to = adapters_default_layer_update = None
    add = torch.add(layer, linear);  layer = linear = None
    to_1 = add.to(torch.bfloat16);  add = None
    return to_1"""


def test_golden_graph_of_a_bfloat16_layer():
    model = One(nn.Linear(8, 6)).to(torch.bfloat16)
    cm = surgeon.compile(model, FourierFT(n_frequency=16, targets=("layer",)))
    assert graph_code(cm) == GOLDEN_BF16
