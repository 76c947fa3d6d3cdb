"""What is LoKr's own: its forward paths, the part of the formula the conformance suite
(tests/conformance) does not check, PEFT's factorisation, key layout and torch.kron reading, PEFT
both ways on variants the suite's examples lack, init, spec errors, golden graphs, hot swaps.
Tests both LyCORIS methods share are written once, in test_common.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ZOO, One, graph_code, logits, peft_loaded, plain_output, randomize

import surgeon
from surgeon.passes.lycoris.lokr import LoKr, factorization


def formula(spec, adapter, base, x):
    """LoKr: ``W + kron(W1, W2) · alpha / r``: ``ΔW[(i, k), (j, n), ...] = W1[i, j] W2[k, n, ...]``."""
    w1, w2 = _w1(adapter), _w2(adapter, base)
    (big_l, big_m), (big_k, big_n, *kernel) = w1.shape, w2.shape
    ones = (1,) * len(kernel)
    blocks = w1.view(big_l, 1, big_m, 1, *ones) * w2.view(1, big_k, 1, big_n, *kernel)
    if isinstance(base, nn.Conv1d) and hasattr(adapter, "lokr_w2"):
        # PEFT's definition, which its files mean: torch.kron reads W1 as (1, L, M) here (see
        # test_conv1d_with_a_full_w2_follows_peft_s_torch_kron)
        blocks = torch.kron(w1, w2)
    scale = spec.alpha_pattern.get("layer", spec.alpha) / spec.rank_pattern.get("layer", spec.rank)
    return plain_output(base, x, base.weight + (blocks * scale).reshape(base.weight.shape))


def peft_cannot(spec, model_name):
    """PEFT's LoKr crashes on a Conv1d with effective_conv (a view of its CP kernel); there the
    formula is the oracle."""
    if spec.effective_conv and model_name == "cnn":
        return "PEFT's LoKr cannot run effective_conv on a Conv1d"
    return None


def _w1(adapter) -> torch.Tensor:
    if hasattr(adapter, "lokr_w1"):
        return adapter.lokr_w1
    return adapter.lokr_w1_a @ adapter.lokr_w1_b


def _w2(adapter, layer: nn.Module) -> torch.Tensor:
    """W2 as (K, N, *kernel)."""
    if hasattr(adapter, "lokr_w2"):
        return adapter.lokr_w2
    kernel = tuple(getattr(layer, "kernel_size", ()))
    ones = (1,) * len(kernel)
    if adapter.cp:  # W2[p, q, ...] = sum_ij t[i, j, ...] a[i, p] b[j, q]
        (rank, big_k), big_n = adapter.lokr_w2_a.shape, adapter.lokr_w2_b.shape[1]
        core = adapter.lokr_t2.reshape(rank, rank, 1, 1, *kernel)  # Conv1d cores are (r, r, k, 1)
        a = adapter.lokr_w2_a.view(rank, 1, big_k, 1, *ones)
        b = adapter.lokr_w2_b.view(1, rank, 1, big_n, *ones)
        return (core * a * b).sum((0, 1))
    return (adapter.lokr_w2_a @ adapter.lokr_w2_b).reshape(adapter.lokr_w2_a.shape[0], -1, *kernel)


LAYERS = {
    "linear": (lambda: nn.Linear(12, 20), lambda: torch.randn(2, 3, 12)),
    "linear_prime": (lambda: nn.Linear(7, 11), lambda: torch.randn(3, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_unbatched": (lambda: nn.Conv2d(4, 6, 3), lambda: torch.randn(4, 5, 5)),
    "conv2d_1x1": (lambda: nn.Conv2d(8, 4, 1), lambda: torch.randn(2, 8, 5, 5)),
    "conv2d_groups_dilation": (
        lambda: nn.Conv2d(8, 6, 3, groups=2, dilation=2, padding=2),
        lambda: torch.randn(2, 8, 8, 8),
    ),
    "conv1d": (lambda: nn.Conv1d(6, 4, 3, padding=1), lambda: torch.randn(2, 6, 9)),
}
EXTRA_KINDS = ("conv2d_groups_dilation", "conv2d_unbatched", "linear_prime")
"""Layer kinds the conformance suite's layer set lacks."""
# rank 1 makes W2 low-rank, rank 8 full; decompose_both splits W1 too; effective_conv the CP core
VARIANTS = {
    "full": {"rank": 8},
    "low-rank": {"rank": 1},
    "both-factor-4": {"rank": 1, "decompose_both": True, "factor": 4},
    "effective-conv": {"rank": 1, "effective_conv": True},
}
FORMULA_CASES = [
    *[(kind, "both-factor-4") for kind in sorted(set(LAYERS) - set(EXTRA_KINDS))],
    ("linear", "full"),
    ("conv1d", "effective-conv"),
    ("conv2d", "effective-conv"),
    *[(kind, variant) for kind in EXTRA_KINDS for variant in sorted(VARIANTS)],
]
"""The (kind, variant)s test_common.py checks against the formula: the conformance suite's layer
cases build W1 whole, W2 whole (not on a Linear) or low-rank, never a CP core; here what they do
not build on their kinds, and every variant on the kinds they lack. (A Conv1d with a full W2
follows PEFT's own reading: see test_conv1d_with_a_full_w2_follows_peft_s_torch_kron.)"""


@pytest.mark.parametrize(
    "kind, variant",
    [(k, v) for k in sorted(LAYERS) for v in sorted(VARIANTS) if (k, v) != ("conv1d", "full")],
)
def test_forward_path_per_layer_kind(kind, variant):
    cm = surgeon.compile(
        One(LAYERS[kind][0]()), LoKr(alpha=5, targets=("layer",), **VARIANTS[variant])
    )
    ((_, adapter),) = cm.store.items("default")
    assert adapter.scale == pytest.approx(5 / VARIANTS[variant]["rank"])
    assert adapter.kron_forward == ("groups" not in kind)


def test_conv1d_with_a_full_w2_follows_peft_s_torch_kron():
    """PEFT builds a Conv1d's ΔW as torch.kron(W1, W2).reshape(weight shape) with W2 (K, N, k):
    torch.kron reads W1 as (1, L, M), which is not the Kronecker product over (out, in).
    The file format means what PEFT computes, so surgeon computes the same."""
    torch.manual_seed(0)
    model = One(nn.Conv1d(8, 8, 3))
    x = torch.randn(2, 8, 9)
    cm = surgeon.compile(model, LoKr(rank=8, alpha=4, targets=("layer",)))
    randomize(cm, scale=0.3)
    ((_, adapter),) = cm.store.items("default")
    w1, w2 = adapter.lokr_w1, adapter.lokr_w2
    assert w2.shape == (4, 4, 3) and not adapter.kron_forward
    peft_delta = torch.kron(w1, w2).reshape(8, 8, 3) * 0.5
    kronecker = (w1.view(2, 1, 2, 1, 1) * w2.view(1, 4, 1, 4, 3)).reshape(8, 8, 3) * 0.5
    assert not torch.allclose(peft_delta, kronecker)
    expected = plain_output(model.layer, x, model.layer.weight + peft_delta)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factor", [-1, 1, 2, 3, 4, 5, 8, 16])
def test_factorization_is_peft_s(factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 600):
        assert factorization(dimension, factor) == peft_factorization(dimension, factor)


def test_factorization_examples():
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(12, 6) == (6, 2)  # a dividing factor comes first, even when larger


@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("init, zero", [("lycoris", {"lokr_w2", "lokr_w2_b"}), ("random", set())])
def test_other_inits_zero_what_peft_zeroes(rank, init, zero):
    torch.manual_seed(0)
    cm = surgeon.compile(One(nn.Linear(12, 20)), LoKr(rank=rank, targets=("layer",), init=init))
    ((_, adapter),) = cm.store.items("default")
    zeroed = {n for n, t in adapter.peft_tensors().items() if torch.count_nonzero(t) == 0}
    assert zeroed == zero & set(adapter.peft_tensors())


# -- PEFT ---------------------------------------------------------------------------------------

PARITY = {
    "mlp": ("body.0", "body.3", "head"),
    "cnn": ("conv1", "conv2", "seq", "fc"),
    "llama": ("q_proj", "v_proj", "down_proj"),
    "bert": ("query", "value", "dense"),
}


def _peft_model(entry, **config):
    # a sibling test module, imported here: the conformance suite loads this file on its own
    from test_common import peft_model

    return peft_model(LoKr, entry, **config)


@pytest.mark.parametrize(
    "config",
    [
        {"r": 8},
        {"r": 1},
        {"r": 1, "decompose_both": True},
        {"r": 2, "decompose_factor": 4},
        {"r": 1, "use_effective_conv2d": True},
    ],
    ids=["full", "low-rank", "both", "factor-4", "effective-conv"],
)
@pytest.mark.parametrize("entry_name", ["cnn", "llama"])
def test_keys_and_shapes_are_peft_s(entry_name, config, tmp_path):
    from safetensors.torch import load_file

    entry = ZOO[entry_name]
    pm = _peft_model(entry, target_modules=list(PARITY[entry_name]), **config)
    pm.save_pretrained(tmp_path)
    peft_shapes = {
        k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
    }
    spec = LoKr.from_peft_config(
        {"peft_type": "LOKR", "target_modules": PARITY[entry_name], **config}, "here"
    )
    cm = surgeon.compile(entry.model(), spec)
    shapes = {
        f"base_model.model.{p}.{k}": tuple(t.shape)
        for p, layer in cm.store.items("default")
        for k, t in layer.peft_tensors().items()
    }
    assert shapes == peft_shapes


@pytest.mark.parametrize("entry_name", sorted(PARITY))
def test_decompose_both_with_factor_4_matches_peft_both_ways(entry_name, tmp_path):
    """Factor 4 makes W1 big enough to split (the suite's examples, factor 2, keep it whole)."""
    pytest.importorskip("peft")
    entry = ZOO[entry_name]
    x = entry.example()
    base = logits(entry.model()(**x))
    spec = LoKr(rank=1, alpha=4, factor=4, decompose_both=True, targets=PARITY[entry_name])
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.3)
    assert any(hasattr(layer, "lokr_w1_a") for _, layer in cm.store.items("default"))
    expected = logits(cm(**x))
    assert not torch.allclose(expected, base, atol=1e-4)
    cm.save_adapters(tmp_path / "s")
    loaded = peft_loaded(entry.model(), tmp_path / "s")
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-5)
    pm = _peft_model(
        entry,
        r=1,
        alpha=6,
        decompose_factor=4,
        decompose_both=True,
        target_modules=list(PARITY[entry_name]),
    )
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path / "p")
    back = surgeon.load(entry.model(), tmp_path / "p")
    assert isinstance(back.spec("default"), LoKr)
    assert not torch.allclose(expected, base, atol=1e-4)
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-5)


def test_effective_conv_on_conv2d_matches_peft_both_ways(tmp_path):
    pytest.importorskip("peft")
    entry = ZOO["cnn"]
    spec = LoKr(rank=1, alpha=3, targets=("conv1", "conv2", "fc"), effective_conv=True)
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.3)
    ((_, conv1), *_) = cm.store.items("default")
    assert conv1.cp
    x = entry.example()
    cm.save_adapters(tmp_path / "s")
    loaded = peft_loaded(entry.model(), tmp_path / "s")
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)
    pm = _peft_model(entry, r=1, target_modules=["conv1", "conv2", "fc"], use_effective_conv2d=True)
    pm.save_pretrained(tmp_path / "p")
    back = surgeon.load(entry.model(), tmp_path / "p")
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_spec_round_trips_through_peft_config():
    spec = LoKr(
        rank=4,
        alpha=2,
        factor=4,
        targets=("q_proj",),
        decompose_both=True,
        layers=(1,),
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 3.0},
        rank_dropout=0.1,
        rank_dropout_scale=True,
        module_dropout=0.2,
        effective_conv=True,
        init="lycoris",
    )
    config = spec.to_peft_config(["model.layers.1.self_attn.q_proj"])
    assert config["decompose_factor"] == 4 and config["init_weights"] == "lycoris"
    # the file's weights replace any init: loaded specs say "default" (hot swaps stay possible)
    assert LoKr.from_peft_config(config, "here") == spec.replace(init="default")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"layers_to_transform": [0], "layers_pattern": "blocks_x"}, "layers_pattern"),
        ({"init_weights": "gaussian"}, "init_weights='gaussian' is not supported .*'lycoris'"),
        ({"decompose_factor": 0}, "LoKr.factor=0"),
    ],
)
def test_peft_configs_that_would_load_differently_are_refused(config, match):
    base = {"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(surgeon.SpecError, match=match):
        LoKr.from_peft_config({**base, **config}, "adapter_config.json")


# -- spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rank", 0, "LoKr.rank=0: expected an integer >= 1"),
        (
            "factor",
            0,
            r"LoKr.factor=0: expected -1 \(split near the square root\) or an integer >= 1",
        ),
        ("factor", -2, "LoKr.factor=-2"),
        ("factor", True, "LoKr.factor=True"),
        ("decompose_both", "no", "LoKr.decompose_both='no': expected true or false"),
        ("rank_dropout_scale", 1, "LoKr.rank_dropout_scale=1: expected true or false"),
        (
            "init",
            "gaussian",
            "LoKr.init='gaussian': expected one of 'default', 'random', 'lycoris'",
        ),
        ("alpha_pattern", {"q_proj": "x"}, r"LoKr.alpha_pattern\['q_proj'\]='x'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_field_value_and_allowed(field, value, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LoKr(**{field: value})


def test_positional_fields_follow_the_design():
    assert LoKr(4, 8, 2) == LoKr(rank=4, alpha=8, factor=2)


# -- golden graphs ------------------------------------------------------------------------------

GOLDEN_LINEAR = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2)
    adapters_default_body_3_lokr_w1_a = self.adapters.default.body_3.lokr_w1_a
    adapters_default_body_3_lokr_w1_b = self.adapters.default.body_3.lokr_w1_b
    matmul = torch.matmul(adapters_default_body_3_lokr_w1_a, adapters_default_body_3_lokr_w1_b);  adapters_default_body_3_lokr_w1_a = adapters_default_body_3_lokr_w1_b = None
    adapters_default_body_3_lokr_w2_a = self.adapters.default.body_3.lokr_w2_a
    adapters_default_body_3_lokr_w2_b = self.adapters.default.body_3.lokr_w2_b
    matmul_1 = torch.matmul(adapters_default_body_3_lokr_w2_a, adapters_default_body_3_lokr_w2_b);  adapters_default_body_3_lokr_w2_a = adapters_default_body_3_lokr_w2_b = None
    mul = torch.mul(matmul, 2.0);  matmul = None
    unflatten = body_2.unflatten(-1, (4, 6));  body_2 = None
    linear = torch._C._nn.linear(unflatten, matmul_1);  unflatten = matmul_1 = None
    matmul_2 = torch.matmul(mul, linear);  mul = linear = None
    flatten = matmul_2.flatten(-2);  matmul_2 = None
    add = torch.add(body_3, flatten);  body_3 = flatten = None
    relu = torch.relu(add);  add = None
    head = self.head(relu)
    adapters_default_head_lokr_w1_a = self.adapters.default.head.lokr_w1_a
    adapters_default_head_lokr_w1_b = self.adapters.default.head.lokr_w1_b
    matmul_3 = torch.matmul(adapters_default_head_lokr_w1_a, adapters_default_head_lokr_w1_b);  adapters_default_head_lokr_w1_a = adapters_default_head_lokr_w1_b = None
    adapters_default_head_lokr_w2_a = self.adapters.default.head.lokr_w2_a
    adapters_default_head_lokr_w2_b = self.adapters.default.head.lokr_w2_b
    matmul_4 = torch.matmul(adapters_default_head_lokr_w2_a, adapters_default_head_lokr_w2_b);  adapters_default_head_lokr_w2_a = adapters_default_head_lokr_w2_b = None
    mul_1 = torch.mul(matmul_3, 2.0);  matmul_3 = None
    unflatten_1 = relu.unflatten(-1, (4, 6));  relu = None
    matmul_5 = torch.matmul(mul_1, unflatten_1);  mul_1 = unflatten_1 = None
    linear_1 = torch._C._nn.linear(matmul_5, matmul_4);  matmul_5 = matmul_4 = None
    flatten_1 = linear_1.flatten(-2);  linear_1 = None
    add_1 = torch.add(head, flatten_1);  head = flatten_1 = None
    return add_1"""

GOLDEN_CONV = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    conv1 = self.conv1(x)
    adapters_default_conv1_lokr_w1 = self.adapters.default.conv1.lokr_w1
    adapters_default_conv1_lokr_w2 = self.adapters.default.conv1.lokr_w2
    mul = torch.mul(adapters_default_conv1_lokr_w1, 0.5);  adapters_default_conv1_lokr_w1 = None
    kron_conv = surgeon_passes_lycoris_lokr_kron_conv(x, mul, adapters_default_conv1_lokr_w2, (1, 1), (1, 1), (1, 1));  x = mul = adapters_default_conv1_lokr_w2 = None
    add = torch.add(conv1, kron_conv);  conv1 = kron_conv = None
    relu = torch.nn.functional.relu(add, inplace = False);  add = None
    conv2 = self.conv2(relu);  relu = None
    relu_1 = torch.nn.functional.relu(conv2, inplace = False);  conv2 = None
    flatten = relu_1.flatten(2);  relu_1 = None
    seq = self.seq(flatten)
    adapters_default_seq_lokr_w1 = self.adapters.default.seq.lokr_w1
    adapters_default_seq_lokr_w2 = self.adapters.default.seq.lokr_w2
    kron_delta = surgeon_passes_lycoris_lokr_kron_delta(adapters_default_seq_lokr_w1, adapters_default_seq_lokr_w2, 0.5, (8, 8, 3));  adapters_default_seq_lokr_w1 = adapters_default_seq_lokr_w2 = None
    conv1d = torch.conv1d(flatten, kron_delta, None, (2,), (0,), (1,), 1);  flatten = kron_delta = None
    add_1 = torch.add(seq, conv1d);  seq = conv1d = None
    mean = add_1.mean(-1);  add_1 = None
    fc = self.fc(mean);  mean = None
    return fc"""


def test_golden_graph_kronecker_linear():
    spec = LoKr(rank=1, alpha=2, factor=4, targets=("head", "body.3"), decompose_both=True)
    assert graph_code(surgeon.compile(ZOO["mlp"].model(), spec), "") == GOLDEN_LINEAR


def test_golden_graph_kronecker_conv_and_materialised_conv1d():
    spec = LoKr(rank=8, alpha=4, targets=("conv1", "seq"))
    assert graph_code(surgeon.compile(ZOO["cnn"].model(), spec), "") == GOLDEN_CONV


# -- with the rest of the compiler --------------------------------------------------------------


def test_hotswap_with_another_alpha_rescales(tmp_path):
    entry = ZOO["llama"]
    saved = surgeon.compile(entry.model(), LoKr(rank=2, alpha=3))
    randomize(saved, scale=0.3)
    saved.save_adapters(tmp_path)
    cm = surgeon.compile(entry.model(), LoKr(rank=2, alpha=16))
    cm.hotswap_adapter(tmp_path)
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(saved(**x)), rtol=1e-5, atol=1e-5)
