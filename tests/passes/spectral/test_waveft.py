"""WaveFT beyond the conformance suite: the inverse transform against an explicit product of
synthesis matrices and against PEFT's own ``waverec2d``, the filters against PEFT's, every family
on odd and tiny layers against PEFT's update, positions drawn as PEFT draws them (files hold none:
they load both ways), proportional allocation and patterns as PEFT, the bias modes, the eval
cache, errors, PEFT config values refused, a golden graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
)

import surgeon
from surgeon.io import WEIGHTS_NAME
from surgeon.passes.spectral.waveft import (
    LOW_PASS,
    WaveFT,
    inverse_dwt_2d,
    spectral_positions,
    synthesis_filters,
    synthesis_kernels,
)


def _synthesis_matrix(taps: tuple[float, ...], n: int) -> torch.Tensor:
    """The synthesis operator of one filter on ``n`` coefficients, as a (2n - L + 2, n) matrix:
    column p holds the filter starting at sample 2p, with the first L - 2 samples cut."""
    length = len(taps)
    matrix = torch.zeros(2 * n - length + 2, n, dtype=torch.float64)
    for t in range(matrix.shape[0]):
        for p in range(n):
            k = t + length - 2 - 2 * p
            if 0 <= k < length:
                matrix[t, p] = taps[k]
    return matrix


def _quadrature_mirror(low: tuple[float, ...]) -> tuple[float, ...]:
    """The high-pass filter of an orthogonal wavelet: ``h[k] = (-1)^k g[L - 1 - k]``."""
    return tuple((-1) ** k * low[len(low) - 1 - k] for k in range(len(low)))


def reference_idwt(grid: torch.Tensor, wavelet: str) -> torch.Tensor:
    """The inverse 2-D transform as a matrix product ``[M_lo | M_hi] S' [M_lo | M_hi]ᵀ`` (rows on
    the left, columns on the right), ``S'`` being ``S`` with its off-diagonal quadrants swapped:
    PEFT's top-right quadrant is high-pass down the rows, its bottom-left across the columns."""
    low = LOW_PASS[wavelet]
    high = _quadrature_mirror(low)
    height, width = grid.shape[0] // 2, grid.shape[1] // 2
    rows = torch.cat([_synthesis_matrix(low, height), _synthesis_matrix(high, height)], dim=1)
    cols = torch.cat([_synthesis_matrix(low, width), _synthesis_matrix(high, width)], dim=1)
    top_left, top_right = grid[:height, :width], grid[:height, width:]
    bottom_left, bottom_right = grid[height:, :width], grid[height:, width:]
    swapped = torch.cat(
        [torch.cat([top_left, bottom_left], dim=1), torch.cat([top_right, bottom_right], dim=1)]
    )
    return rows @ swapped.double() @ cols.T


def formula(spec, adapter, base, x):
    """WaveFT (Bilican et al., 2025): ``W x + b + scaling · IDWT₂(S) x``, S zero but for the
    trained coefficients at the first n entries of a seeded permutation of the out x in
    positions, padded by ``L/2 - 1`` (one more at the end of an odd dimension); the transform's
    first out rows and in columns. Without the transform (``idwt=False``), S itself."""
    fan_in, fan_out = (
        (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
    )
    spectrum = adapter.waveft_spectrum.detach().double()
    generator = torch.Generator().manual_seed(spec.seed)
    flat = torch.randperm(fan_out * fan_in, generator=generator)[: spectrum.numel()]
    coefficients = torch.zeros(fan_out, fan_in, dtype=torch.float64)
    coefficients[flat // fan_in, flat % fan_in] = spectrum
    update = coefficients
    if spec.idwt:
        pad = len(LOW_PASS[spec.wavelet]) // 2 - 1
        grid = F.pad(coefficients, (pad, pad + fan_in % 2, pad, pad + fan_out % 2))
        update = reference_idwt(grid, spec.wavelet)[:fan_out, :fan_in]
    return plain_output(base, x) + spec.scaling * (x.double() @ update.T).to(x.dtype)


peft = pytest.importorskip("peft")

from peft.tuners.waveft.layer import WaveFTLinear  # noqa: E402
from peft.tuners.waveft.wavelet import Wavelet  # noqa: E402
from peft.tuners.waveft.waverec2d import waverec2d  # noqa: E402

FAMILIES = sorted(LOW_PASS)


def _spectrum(cm, path: str = "layer") -> torch.Tensor:
    return dict(cm.store.items("default"))[path].waveft_spectrum


# -- the transform ---------------------------------------------------------------------------------


def test_the_filters_are_peft_filters_to_the_last_bit():
    assert len(FAMILIES) == 23
    for name in FAMILIES:
        theirs = Wavelet(name)
        low, high = synthesis_filters(name)
        assert list(low) == list(theirs.rec_lo) and list(high) == list(theirs.rec_hi), name
        assert high == _quadrature_mirror(low)


def _kernels(wavelet: str) -> torch.Tensor:
    return synthesis_kernels(wavelet, torch.float64, torch.device("cpu"))


@pytest.mark.parametrize("wavelet", FAMILIES)
def test_the_inverse_transform_is_the_product_of_synthesis_matrices(wavelet):
    taps = len(LOW_PASS[wavelet])
    grid = torch.randn(2 * taps + 4, 2 * taps + 10, dtype=torch.float64)
    ours = inverse_dwt_2d(grid, _kernels(wavelet))
    assert ours.shape == (grid.shape[0] - taps + 2, grid.shape[1] - taps + 2)
    torch.testing.assert_close(ours, reference_idwt(grid, wavelet), rtol=0, atol=1e-12)


@pytest.mark.parametrize("wavelet", ["db1", "db4", "sym7", "coif1", "coif4"])
def test_the_inverse_transform_is_peft_waverec2d(wavelet):
    grid = torch.randn(30, 44, dtype=torch.float64)
    rows, cols = 15, 22
    # PEFT's sub-bands: approximation top-left; then top-right, bottom-left, bottom-right
    details = (grid[:rows, cols:], grid[rows:, :cols], grid[rows:, cols:])
    theirs = waverec2d((grid[:rows, :cols], details), wavelet)
    torch.testing.assert_close(inverse_dwt_2d(grid, _kernels(wavelet)), theirs, rtol=0, atol=1e-12)


def _peft_layer(layer: nn.Module, n: int, **config) -> WaveFTLinear:
    config = peft.WaveFTConfig(n_frequency=n, target_modules=["layer"], **config)
    return WaveFTLinear(layer, "default", config, n_frequency=n)


@pytest.mark.parametrize(
    "wavelets",
    [
        pytest.param(("db1", "db4", "sym5", "coif1", "coif4"), id="some"),
        pytest.param(FAMILIES, id="all", marks=pytest.mark.slow),
    ],
)
def test_odd_and_tiny_layers_get_peft_update(wavelets):
    """Odd sizes pad one more row or column; a 1 x 3 layer is smaller than every filter."""
    for make in (lambda: nn.Linear(5, 6), lambda: nn.Linear(9, 7), lambda: nn.Linear(3, 1)):
        for wavelet in wavelets:
            layer = make()
            n = min(9, layer.in_features * layer.out_features)
            spec = WaveFT(n_frequency=n, wavelet=wavelet, seed=3, targets=("layer",))
            adapter = spec.create_layers(One(layer), ["layer"])["layer"]
            add_noise([adapter.waveft_spectrum])
            theirs = _peft_layer(make(), n, wavelet_family=wavelet, random_loc_seed=3)
            theirs.waveft_spectrum["default"].data.copy_(adapter.waveft_spectrum)
            torch.testing.assert_close(
                adapter.delta_weight(), theirs.get_delta_weight("default"), msg=wavelet
            )


def test_a_gpt2_conv1d_merges_its_update_transposed_as_peft():
    conv = gpt2_conv1d(7, 4)
    cm = surgeon.compile(One(conv), WaveFT(n_frequency=11, wavelet="sym3", targets=("layer",)))
    add_noise([_spectrum(cm)])
    config = peft.WaveFTConfig(n_frequency=11, wavelet_family="sym3", fan_in_fan_out=True)
    theirs = WaveFTLinear(gpt2_conv1d(7, 4), "default", config, n_frequency=11)
    theirs.base_layer.weight.data.copy_(conv.weight)
    theirs.waveft_spectrum["default"].data.copy_(_spectrum(cm))
    cm.merge()
    theirs.merge()
    torch.testing.assert_close(conv.weight, theirs.base_layer.weight)


# -- positions: drawn from the seed, never saved ----------------------------------------------------


def test_positions_are_peft_draws_per_layer():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), WaveFT(n_frequency=30, seed=11, targets=("body.3", "head")))
    config = peft.WaveFTConfig(
        n_frequency=30, random_loc_seed=11, target_modules=["body.3", "head"]
    )
    pm = peft_model(entry.model(), config, seed=None)
    for path, adapter in cm.store.items("default"):
        theirs = pm.base_model.model.get_submodule(path).waveft_indices["default"]
        drawn = spectral_positions(11, adapter.fan_out, adapter.fan_in, 30)
        assert torch.equal(drawn, theirs), path
        width = adapter.grid[1]
        assert torch.equal(adapter.positions // width, theirs[0])  # db1: no margin
        assert torch.equal(adapter.positions % width, theirs[1])


# each case a wavelet and seed none of the examples has
FILES = [
    pytest.param("sym4", True, 11, id="sym4"),
    pytest.param("db1", False, 0, id="no-idwt", marks=pytest.mark.slow),
]
TARGETS = ["body.3", "head"]


@pytest.mark.parametrize(("wavelet", "idwt", "seed"), FILES)
def test_a_peft_file_without_positions_loads_with_peft_outputs(wavelet, idwt, seed, tmp_path):
    entry = ZOO["mlp"]
    config = peft.WaveFTConfig(
        n_frequency=25,
        scaling=4.0,
        wavelet_family=wavelet,
        use_idwt=idwt,
        random_loc_seed=seed,
        target_modules=TARGETS,
    )
    pm = peft_model(entry.model(), config)
    x = entry.example()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert sorted(saved) == [f"base_model.model.{t}.waveft_spectrum" for t in TARGETS]
    cm = surgeon.load(entry.model(), tmp_path)
    spec = cm.spec("default")
    assert (spec.wavelet, spec.idwt, spec.seed) == (wavelet, idwt, seed)
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("wavelet", "idwt", "seed"), FILES)
def test_our_file_without_positions_loads_in_peft_with_our_outputs(wavelet, idwt, seed, tmp_path):
    entry = ZOO["mlp"]
    spec = WaveFT(
        n_frequency=25, scaling=4.0, wavelet=wavelet, idwt=idwt, seed=seed, targets=tuple(TARGETS)
    )
    cm = surgeon.compile(entry.model(), spec)
    add_noise(cm.store.parameters(), scale=0.3)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert sorted(saved) == [f"base_model.model.{t}.waveft_spectrum" for t in TARGETS]
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-5)


# -- how many coefficients each layer gets ----------------------------------------------------------


def test_proportional_shares_are_peft_s_and_a_pattern_beside_them_is_ignored_as_peft(tmp_path):
    """A budget of 3 x 7 over q (32 x 32), v (32 -> 16), down (48 -> 32) of layer 1: shares
    7, 3.5 and 10.5, rounded as PEFT rounds (10.5 half to even: 10). PEFT ignores the pattern under
    proportional_parameters, and so does loading its file."""
    entry = ZOO["llama"]
    config = peft.WaveFTConfig(
        n_frequency=7,
        proportional_parameters=True,
        n_frequency_pattern={"q_proj": 3},
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[1],
        wavelet_family="db2",
    )
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").proportional and not cm.spec("default").n_frequency_pattern
    sizes = {p: a.waveft_spectrum.numel() for p, a in cm.store.items("default")}
    theirs = {p: pm.base_model.model.get_submodule(p).waveft_n_frequency["default"] for p in sizes}
    assert (
        sizes
        == theirs
        == {
            "model.layers.1.self_attn.q_proj": 7,
            "model.layers.1.self_attn.v_proj": 4,
            "model.layers.1.mlp.down_proj": 10,
        }
    )
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_proportional_gives_every_layer_at_least_one_coefficient():
    spec = WaveFT(n_frequency=1, proportional=True)
    counts = spec.n_frequencies({"big": (100, 100), "small": (1, 2)})
    assert counts == {"big": 2, "small": 1}  # round(2 x 10000 / 10002) = 2, round(0.0004) -> 1


# -- bias, eval cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["none", "all", "waveft_only"])
def test_bias_modes_choose_trainable_base_biases(bias):
    cm = surgeon.compile(ZOO["mlp"].model(), WaveFT(n_frequency=8, targets=("head",), bias=bias))
    trainable = {n.removeprefix("model.") for n, p in cm.named_parameters() if p.requires_grad}
    expected = {
        "none": set(),
        "all": {"body.0.bias", "body.3.bias", "head.bias"},
        "waveft_only": {"head.bias"},
    }
    assert {n for n in trainable if not n.startswith("store.")} == expected[bias]


def test_a_peft_file_with_trained_biases_loads_with_peft_outputs(tmp_path):
    entry = ZOO["mlp"]
    config = peft.WaveFTConfig(
        n_frequency=20, target_modules=["body.3", "head"], bias="waveft_only"
    )
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    assert "base_model.model.head.base_layer.bias" in load_file(tmp_path / WEIGHTS_NAME)
    cm = surgeon.load(entry.model(), tmp_path)
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_eval_keeps_the_update_until_the_coefficients_change():
    cm = surgeon.compile(One(nn.Linear(8, 6)), WaveFT(n_frequency=10, targets=("layer",)))
    ((_, adapter),) = cm.store.items("default")
    computed = []
    compute = adapter.update.compute
    adapter.update.compute = lambda: computed.append(1) or compute()
    x = torch.randn(3, 8)
    cm.eval()
    with torch.no_grad():
        first = cm(x)
        assert torch.equal(cm(x), first) and len(computed) == 1
        _spectrum(cm).add_(0.5)
        changed = cm(x)
        assert len(computed) == 2 and not torch.allclose(changed, first)
        cm(x)
        assert len(computed) == 2
    cm.train()
    cm(x).sum().backward()  # training: a fresh update every call, which gradients reach
    cm(x)
    assert len(computed) == 4 and _spectrum(cm).grad is not None


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n_frequency": 0}, r"WaveFT.n_frequency=0: expected an integer >= 1"),
        ({"scaling": 0}, r"WaveFT.scaling=0: expected a number > 0"),
        ({"wavelet": "haar"}, r"WaveFT.wavelet='haar': expected one of 'db1'"),
        ({"wavelet": "db11"}, r"wavelet='db11': PEFT's config accepts it but PEFT 0.21 holds no"),
        ({"wavelet": "coif5"}, r"wavelet='coif5': .* 48 taps where its padding expects coif5's 30"),
        ({"idwt": 1}, r"WaveFT.idwt=1: expected true or false"),
        ({"seed": -1}, r"WaveFT.seed=-1: expected an integer >= 0"),
        ({"bias": "lora_only"}, r"WaveFT.bias='lora_only': expected one of 'none', 'all'"),
        ({"n_frequency_pattern": {"q_proj": 0}}, r"n_frequency_pattern\['q_proj'\]=0"),
        (
            {"proportional": True, "n_frequency_pattern": {"q_proj": 4}},
            r"proportional=True decides every layer's n_frequency",
        ),
        ({"rank": 4}, r"WaveFT has no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        WaveFT(**fields)


def test_more_coefficients_than_a_layer_has_weights_is_refused_naming_it():
    model = One(nn.Linear(5, 6))
    with pytest.raises(surgeon.SpecError, match=r"layer gets 31 coefficients, more than its 6 x 5"):
        surgeon.compile(model, WaveFT(n_frequency=31, targets=("layer",)))
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (nn.Embedding(5, 4), "Embedding"),
        (nn.Conv2d(2, 2, 1), "Conv2d"),
        (nn.Conv1d(2, 2, 1), "Conv1d"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which WaveFT cannot adapt"):
        surgeon.compile(One(layer), WaveFT(n_frequency=1, targets=("layer",)))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"wavelet_family": "sym12"}, r"sym12.*adapter_config.json key 'wavelet_family'"),
        ({"wavelet_family": "coif5"}, r"coif5.*adapter_config.json key 'wavelet_family'"),
        ({"bias": "lora_only"}, r"bias='lora_only'"),
        ({"n_frequency": 999}, r"gets 999 coefficients"),
        ({"use_dora": True}, r"use_dora=True"),
        ({"target_modules": None}, r"target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), WaveFT(n_frequency=8, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_init_weights_false_loads_the_file_values(tmp_path):
    """PEFT's random start is what the file's coefficients replace."""
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), WaveFT(n_frequency=8, targets=("head",)))
    add_noise(cm.store.parameters())
    cm.save_adapters(tmp_path)
    loaded = load_with_changed_config(entry.model(), tmp_path, {"init_weights": False})
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)))


# -- the graph ------------------------------------------------------------------------------------

GOLDEN_LEAF_BF16 = """\
def forward(self, input):
    input_1 = input
    base = self.base(input_1)
    adapters_default_update = self.adapters.default.update()
    to = input_1.to(torch.float32);  input_1 = None
    linear = torch._C._nn.linear(to, adapters_default_update);  to = adapters_default_update = None
    add = torch.add(base, linear);  base = linear = None
    to_1 = add.to(torch.bfloat16);  add = None
    return to_1"""


def test_golden_graph_of_a_bfloat16_leaf():
    """The update (a float32 module call, kept in eval) and one matmul; the input goes to float32
    and the sum back to bfloat16, as PEFT casts."""
    cm = surgeon.compile(ZOO["llama"].model().to(torch.bfloat16), WaveFT(n_frequency=10))
    assert graph_code(cm, "model.layers.0.self_attn.v_proj") == GOLDEN_LEAF_BF16
    ((_, adapter), *_) = cm.store.items("default")
    assert adapter.waveft_spectrum.dtype == torch.float32
