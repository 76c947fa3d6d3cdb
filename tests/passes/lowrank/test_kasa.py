"""KaSA's card (its formula) and what is its own: the base truncated by its smallest singular
values (as PEFT truncates it), the learned diagonal's key, the merged weight, the regulariser
(PEFT's ``_get_kasa_loss``, its gradients, inside `surgeon.train` with exact resume), ``lora_bias``
both ways, how ``kasa_config`` files are told from LoRA's, and the errors. The conformance suite
runs the formula, merging, files, PEFT parity, gradients, devices and dtypes on every example."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    mlp_without_dropout,
    peft_loaded,
    peft_model,
    randomize,
    resume_config,
    train_and_resume,
)

import surgeon
from surgeon.io import method_from_peft_config
from surgeon.passes.lowrank.kasa import KaSA
from surgeon.passes.lowrank.lora import LoRA


def formula(spec, adapter, base, x):
    """KaSA (arXiv:2412.06071, Eq. 7-8): ``W' x + b + (alpha / r) B diag(d) A x``, ``W'`` the
    truncated base the layer now holds (its truncation has its own test)."""
    a, b, d = adapter.lora_A.detach(), adapter.lora_B.detach(), adapter.lora_diag.detach()
    r = a.shape[0]
    scale = spec.alpha_pattern.get("layer", spec.alpha) / (math.sqrt(r) if spec.rslora else r)
    return base(x) + scale * ((x @ a.t()) * d) @ b.t()


peft = pytest.importorskip("peft")

LLAMA = ZOO["llama"]


def _truncated(weight: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    s[s.shape[0] - rank :] = 0
    return ((u * s) @ vh).float()


def test_creation_drops_the_smallest_singular_components_as_peft():
    torch.manual_seed(0)
    model = One(nn.Linear(8, 6))
    original = model.layer.weight.detach().clone()
    surgeon.compile(model, KaSA(rank=2, targets=("layer",)))
    torch.testing.assert_close(model.layer.weight, _truncated(original, 2), rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(model.layer.weight) == 4
    theirs = One(nn.Linear(8, 6))
    theirs.load_state_dict({"layer.weight": original, "layer.bias": model.layer.bias})
    config = peft.LoraConfig(r=2, target_modules=["layer"], kasa_config={})
    pm = peft_model(theirs, config, seed=None)
    torch.testing.assert_close(
        model.layer.weight, pm.base_model.model.layer.base_layer.weight, rtol=0, atol=0
    )


def test_merge_adds_the_diagonal_update_and_leaves_the_truncated_base():
    torch.manual_seed(0)
    model = One(nn.Linear(8, 6))
    cm = surgeon.compile(model, KaSA(rank=3, alpha=6, targets=("layer",)))
    randomize(cm, scale=0.3)
    ((_, layer),) = cm.store.items("default")
    truncated = model.layer.weight.detach().clone()
    a, b, d = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_diag.detach()
    cm.merge()
    torch.testing.assert_close(model.layer.weight, truncated + 2 * b @ torch.diag(d) @ a)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, truncated, rtol=0, atol=1e-6)


def test_the_diagonal_is_saved_as_lora_diag():
    cm = surgeon.compile(LLAMA.model(), KaSA(rank=2, targets=("q_proj",)))
    keys = [k for k in cm.adapter_state_dict() if "layers.0." in k]
    assert sorted(k.rsplit("q_proj.", 1)[1] for k in keys) == [
        "lora_A.weight",
        "lora_B.weight",
        "lora_diag",
    ]


def _regulariser(pm) -> torch.Tensor:
    return pm.base_model._get_kasa_loss()


def test_the_regulariser_is_peft_kasa_loss_with_its_gradients(tmp_path):
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], kasa_config={"beta": 0.3, "gamma": 0.2}
    )
    pm = peft_model(LLAMA.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(LLAMA.model(), tmp_path)
    ours, theirs = cm.regularization_loss(), _regulariser(pm)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    named = dict(pm.named_parameters())
    for path, layer in cm.store.items("default"):
        for name, key in (("lora_diag", "lora_diag"), ("lora_A", "lora_A"), ("lora_B", "lora_B")):
            peft_name = f"base_model.model.{path}.{key}.default" + (
                ".weight" if key != "lora_diag" else ""
            )
            torch.testing.assert_close(getattr(layer, name).grad, named[peft_name].grad)
    assert KaSA(beta=0.0, gamma=0.0).loss_term({}) is None


def _compiled(spec: KaSA, seed: int = 2) -> surgeon.CompiledModel:
    cm = surgeon.compile(mlp_without_dropout(), spec)
    randomize(cm, seed=seed, scale=0.5)
    return cm


def _train_by_hand(cm, data, steps: int, regularised: bool) -> None:
    """`surgeon.train` with `resume_config` written out: AdamW, mean-squared error, the
    regulariser added to each step's loss (or not)."""
    optimizer = torch.optim.AdamW(
        [p for p in cm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0
    )
    cm.train()
    for step in range(steps):
        x, y = (torch.stack(t) for t in zip(*data[2 * step : 2 * step + 2]))
        loss = F.mse_loss(cm(x), y)
        if regularised:
            loss = loss + cm.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.slow
def test_surgeon_train_adds_the_regulariser_and_resumes_exactly(tmp_path):
    spec = KaSA(rank=2, targets=("body.0", "head"), beta=0.5, gamma=0.5)
    generator = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(8)
    ]
    config = resume_config(shuffle=False, weight_decay=0.0, max_grad_norm=None)

    def compiled(seed: int) -> surgeon.CompiledModel:
        return _compiled(spec, seed)

    train_and_resume(compiled(2), compiled, data, config, tmp_path)
    trained = _compiled(spec)
    surgeon.train(trained, data, config, loss_fn=F.mse_loss)
    for regularised in (True, False):
        hand = _compiled(spec)
        _train_by_hand(hand, data, 4, regularised)
        for path, layer in trained.store.items("default"):
            mine = layer.lora_diag.detach()
            theirs = dict(hand.store.items("default"))[path].lora_diag.detach()
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6) is regularised, path


def test_lora_bias_files_load_both_ways(tmp_path):
    config = peft.LoraConfig(
        r=2, target_modules=["body.0", "body.3"], lora_bias=True, kasa_config={"gamma": 0.0}
    )
    pm = peft_model(ZOO["mlp"].model(), config)
    pm.save_pretrained(tmp_path / "peft")
    x = ZOO["mlp"].example()
    cm = surgeon.load(ZOO["mlp"].model(), tmp_path / "peft").eval()
    spec = cm.spec("default")
    assert isinstance(spec, KaSA) and spec.lora_bias and spec.gamma == 0.0
    torch.testing.assert_close(cm(**x), pm(**x), rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(ZOO["mlp"].model(), tmp_path / "ours")
    torch.testing.assert_close(back(**x), cm(**x), rtol=1e-5, atol=1e-6)
    expected = cm(**x)
    cm.merge()
    torch.testing.assert_close(cm(**x), expected, rtol=1e-5, atol=1e-6)


def test_written_config_and_what_claims_it():
    spec = KaSA(rank=2, targets=("q_proj",), beta=0.5)
    config = json.loads(json.dumps(spec.to_peft_config()))
    assert config["peft_type"] == "LORA" and config["kasa_config"] == {"beta": 0.5, "gamma": 1e-3}
    assert method_from_peft_config(config, "here") == spec
    assert type(method_from_peft_config({**config, "kasa_config": None}, "here")) is LoRA
    # an empty sub-config is KaSA with PEFT's defaults, never plain LoRA
    assert method_from_peft_config({**config, "kasa_config": {}}, "here") == spec.replace(beta=1e-4)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"kasa_config": {"beta": 0.1, "delta": 1}}, r"kasa_config\.delta is not a KaSA option"),
        ({"kasa_config": {"beta": "big"}}, r"kasa_config\.beta='big': expected a number"),
        ({"kasa_config": {"gamma": -1}}, r"KaSA\.gamma=-1.*'kasa_config'"),
        ({"init_lora_weights": "olora"}, r"KaSA\.init='olora'.*'init_lora_weights'"),
        ({"use_dora": True}, r"kasa_config=.*selects a variant"),
        ({"use_bdlora": {"nblocks": 2}}, r"selects a variant surgeon does not support"),
    ],
)
def test_config_values_it_cannot_honour_are_spec_errors_naming_the_key(change, match):
    config = KaSA(targets=("q_proj",)).to_peft_config()
    with pytest.raises(surgeon.SpecError, match=match):
        method_from_peft_config({**config, **change}, "adapter_config.json")


def test_errors_and_supported_layers():
    with pytest.raises(surgeon.SpecError, match=r"rank 5 must be below min\(in, out\) = 5"):
        surgeon.compile(One(nn.Linear(5, 6)), KaSA(rank=5, targets=("layer",)))
    spec = KaSA()
    assert spec.supports(nn.Linear(4, 4))
    for layer in (gpt2_conv1d(), nn.Embedding(5, 4), nn.Conv2d(2, 2, 1)):
        assert not spec.supports(layer)


@pytest.mark.parametrize("kasa_first", [True, False], ids=["kasa-then-lora", "lora-then-kasa"])
def test_an_adapter_of_another_method_is_refused_beside_kasa_and_nothing_changes(kasa_first):
    """PEFT's rule: KaSA truncates the base when it is created, so mixing it with adapters of
    another method would make each one's base depend on the order they were added."""
    torch.manual_seed(0)
    model = One(nn.Linear(8, 8))
    kasa, lora = KaSA(rank=2, targets=("layer",)), LoRA(rank=2, targets=("layer",))
    first, second = (kasa, lora) if kasa_first else (lora, kasa)
    cm = surgeon.compile(model, first)
    weight = model.layer.weight.detach().clone()
    with pytest.raises(
        surgeon.SpecError,
        match=rf"adapter 'other' \({type(second).__name__}\) cannot be added beside adapter "
        rf"'default' \({type(first).__name__}\): KaSA truncates the base weights",
    ):
        cm.add_adapter("other", second)
    assert cm.adapters == ["default"]
    assert torch.equal(model.layer.weight, weight)


def test_several_kasa_adapters_share_a_model():
    cm = surgeon.compile(One(nn.Linear(8, 8)), KaSA(rank=2, targets=("layer",)))
    cm.add_adapter("second", KaSA(rank=1, targets=("layer",)))
    assert cm.adapters == ["default", "second"]
