"""What LoHa and LoKr share (passes/lycoris/common.py), written once for both: the formula where
the conformance suite does not check it (each method's ``FORMULA_CASES``), PEFT's init, rank and
module dropout in training, float32 adapters on half-precision models, PEFT config variants the
methods' examples (and so the conformance suite) leave out."""

from __future__ import annotations

import math

import pytest
import test_loha
import test_lokr
import torch
from torch import nn
from zoo import ZOO, One, logits, peft_loaded, randomize
from zoo import peft_model as zoo_peft_model

import surgeon
from surgeon.passes.lycoris.loha import LoHa
from surgeon.passes.lycoris.lokr import LoKr

CARDS = {LoHa: test_loha, LoKr: test_lokr}
"""Each method's test file: its ``formula``, ``LAYERS``, ``VARIANTS`` and ``FORMULA_CASES``."""
PEFT_NOISE = {LoHa: 0.5, LoKr: 0.3}
"""What `peft_model` adds to PEFT's adapters (LoHa's four factors multiply: small ones would
hide the adapter)."""


def peft_model(cls, entry, seed=5, **config):
    """PEFT's model of ``cls`` built from ``config``, its adapters moved off their init."""
    peft = pytest.importorskip("peft")
    config = peft.get_peft_config({"peft_type": cls.peft_type, **config})
    return zoo_peft_model(entry.model(), config, seed=seed, scale=PEFT_NOISE[cls])


def _layer(cls, kind):
    build, make_x = CARDS[cls].LAYERS[kind]
    torch.manual_seed(0)
    return One(build()), make_x()


def _randomized(model, spec):
    """``model`` compiled with ``spec``, its one adapter given random values, and that adapter."""
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.3)
    ((_, adapter),) = cm.store.items("default")
    return cm, adapter


# -- the formula --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kind, variant",
    [
        pytest.param(cls, kind, variant, id=f"{cls.name}-{variant}-{kind}")
        for cls, card in CARDS.items()
        for kind, variant in card.FORMULA_CASES
    ],
)
def test_output_is_the_formula_and_merge_matches(cls, kind, variant):
    model, x = _layer(cls, kind)
    spec = cls(alpha=5, targets=("layer",), **CARDS[cls].VARIANTS[variant])
    cm, adapter = _randomized(model, spec)
    expected = CARDS[cls].formula(spec, adapter, model.layer, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)


# -- init ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, kind, zeroed",
    [
        pytest.param(
            LoHa(targets=("layer",), **test_loha.VARIANTS["effective-conv-rank-4"]),
            kind,
            {"hada_w2_b"},
            id=f"loha-{kind}",
        )
        for kind in sorted(test_loha.LAYERS)
    ]
    + [
        pytest.param(  # PEFT zeroes LoKr's left factor
            LoKr(targets=("layer",), **test_lokr.VARIANTS[variant]),
            kind,
            {"lokr_w1", "lokr_w1_a"},
            id=f"lokr-{variant}-{kind}",
        )
        for variant in sorted(test_lokr.VARIANTS)
        for kind in sorted(test_lokr.LAYERS)
    ],
)
def test_default_init_is_peft_s_and_leaves_outputs_unchanged(spec, kind, zeroed):
    model, x = _layer(type(spec), kind)
    before = model(x)
    cm = surgeon.compile(model, spec)
    ((_, adapter),) = cm.store.items("default")
    for name, tensor in adapter.peft_tensors().items():
        if name in zeroed:
            assert torch.count_nonzero(tensor) == 0
        else:  # kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
            assert 0 < tensor.abs().max() <= 1 / math.sqrt(tensor[0].numel()) + 1e-6, name
    torch.testing.assert_close(cm(x), before)


# -- dropouts in training -----------------------------------------------------------------------


def _linear_with(spec):
    torch.manual_seed(0)
    model = One(nn.Linear(12, 20))
    cm, adapter = _randomized(model, spec)
    return cm, model.layer, adapter


@pytest.mark.parametrize("cls", [LoHa, LoKr], ids=["loha", "lokr"])
def test_module_dropout_skips_the_whole_adapter_in_training(cls):
    spec = cls(rank=2, targets=("layer",), module_dropout=0.5)
    cm, layer, adapter = _linear_with(spec)
    x = torch.randn(4, 12)
    base, full = layer(x), CARDS[cls].formula(spec, adapter, layer, x)
    cm.train()
    torch.manual_seed(1)
    outcomes = set()
    for _ in range(20):
        out = cm(x)
        skipped, applied = torch.allclose(out, base), torch.allclose(out, full, atol=1e-6)
        assert skipped != applied
        outcomes.add(skipped)
    assert outcomes == {True, False}


@pytest.mark.parametrize(
    "spec, rescaled",
    [
        (LoHa(rank=2, targets=("layer",), rank_dropout=0.5), True),  # PEFT's LoHa always does
        (LoKr(rank=2, targets=("layer",), rank_dropout=0.5), False),
        (LoKr(rank=2, targets=("layer",), rank_dropout=0.5, rank_dropout_scale=True), True),
    ],
    ids=["loha", "lokr", "lokr-rank_dropout_scale"],
)
def test_rank_dropout_drops_output_channels_rescaled_as_peft_does(spec, rescaled):
    cm, layer, adapter = _linear_with(spec)
    x = torch.randn(4, 12)
    delta = CARDS[type(spec)].formula(spec, adapter, layer, x) - layer(x)
    cm.train()
    torch.manual_seed(3)
    ratio = ((cm(x) - layer(x)) / delta).mean(0)  # one factor per output channel
    kept = ratio > 0.5
    assert 0 < kept.sum() < 20
    expected = kept.float() * (20 / kept.sum() if rescaled else 1)
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-4)


# -- PEFT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(LoHa(rank=1, targets=("q_proj", "v_proj")), id="loha-rank1"),
        pytest.param(LoHa(rank=4, targets=("q_proj", "v_proj")), id="loha-rank4"),
        pytest.param(LoKr(rank=2, targets=("q_proj", "v_proj")), id="lokr"),
    ],
)
def test_half_precision_keeps_float32_adapters_and_matches_peft(spec, dtype, tmp_path):
    """Beyond the conformance suite (within 2 eps of the largest output, whatever the forward):
    the adapters stay float32, and a forward that builds ΔW as PEFT does matches PEFT exactly."""
    pytest.importorskip("peft")
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model().to(dtype), spec)
    randomize(cm, scale=0.3)
    # as PEFT's autocast_adapter_dtype
    assert all(p.dtype == torch.float32 for p in cm.store.parameters())
    (_, adapter), *_ = cm.store.items("default")
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model().to(dtype), tmp_path)
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    # LoHa's factored and LoKr's Kronecker forwards round differently from PEFT's ΔW: the
    # half-precision output step bounds it
    forward = "factored_forward" if isinstance(spec, LoHa) else "kron_forward"
    tolerance = 2 * torch.finfo(dtype).eps if getattr(adapter, forward) else 0
    torch.testing.assert_close(out, logits(pm(**x)), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "cls, config",
    [
        pytest.param(cls, config, id=f"{cls.name}-{name}")
        for cls in (LoHa, LoKr)
        for name, config in {
            "layers": {"layers_to_transform": [1]},
            "preset-exclude": {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
        }.items()
    ]
    # LoHa's examples have a random init
    + [pytest.param(LoKr, {"init_weights": False}, id="lokr-random-init")],
)
def test_peft_config_variants_load_with_same_outputs(cls, config, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    entry = ZOO["llama"]
    config = {"target_modules": ["q_proj", "v_proj"], **config}
    pm = peft_model(cls, entry, r=4, alpha=8, **config)
    x = entry.example()
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)
    peft_layers = {
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if isinstance(m, BaseTunerLayer)
    }
    assert set(cm.store.paths["default"]) == peft_layers
