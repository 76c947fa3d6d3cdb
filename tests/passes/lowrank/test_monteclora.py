"""MonteCLoRA beyond the conformance suite: a layer built from PEFT's seed draws PEFT's factors,
variational parameters and noise pool; several train steps (the pool refilled from the
generator) give PEFT's gradients with the regulariser (`loss_term`) equal to PEFT's
``_get_monteclora_loss``, entropy on; the regulariser inside ``surgeon.train``; eval as LoRA;
the layers PEFT refuses; monteclora_config keys honoured or refused by name."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from zoo import (
    ZOO,
    One,
    mlp_without_dropout,
    plain_output,
    randomize,
    resume_config,
    train_and_resume,
)

import surgeon
from surgeon.io import method_from_peft_config
from surgeon.passes.lowrank.monteclora import MonteCLoRA


def formula(spec, adapter, base, x):
    """MonteCLoRA (arXiv:2411.04358) outside training is LoRA: ``W x + b + (alpha / r) · B A x``
    (rsLoRA: ``alpha / sqrt(r)``); the Monte Carlo average of A runs in training only."""
    a, b = adapter.lora_A, adapter.lora_B
    r = a.shape[0]
    scale = spec.alpha_pattern.get("layer", spec.alpha) / (math.sqrt(r) if spec.rslora else r)
    return plain_output(base, x) + scale * (x @ a.t() @ b.t())


peft = pytest.importorskip("peft")

FIELDS = {"rank": 4, "alpha": 8, "samples": 3, "buffer_size": 2, "sample_scale": 0.05}
PEFT_CONFIG = {"num_samples": 3, "buffer_size": 2, "sample_scaler": 0.05}


def _seeded_pair(entropy=False):
    """PEFT's model and ours, each built on the MLP from seed 3, their base dropout off and
    their B factors set alike (B starts at zero: A's noise would not reach the output)."""
    entry = ZOO["mlp"]
    base = entry.model()
    torch.manual_seed(3)
    config = peft.LoraConfig(
        r=4,
        target_modules=list(entry.targets),
        monteclora_config={**PEFT_CONFIG, "use_entropy": entropy},
    )
    pm = peft.get_peft_model(base, config)
    ours = entry.model()
    torch.manual_seed(3)
    cm = surgeon.compile(ours, MonteCLoRA(targets=entry.targets, entropy=entropy, **FIELDS))
    for model in (cm, pm):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    torch.manual_seed(4)
    with torch.no_grad():
        for path, adapter in cm.store.items("default"):
            adapter.lora_B.normal_()
            _theirs(pm, path, "lora_B.default.weight").copy_(adapter.lora_B)
    return entry, pm, cm


def _theirs(pm, path, name):
    return pm.get_parameter(f"base_model.model.{path}.{name}")


OURS_AND_PEFTS = (
    ("lora_A", "lora_A.default.weight"),
    ("sampler.std_prior", "lora_monteclora_sampler.default.std_prior"),
    ("sampler.expert_weights_prior", "lora_monteclora_sampler.default.expert_weights_prior"),
)


def test_a_layer_built_from_peft_seed_draws_peft_tensors_and_pool():
    _, pm, cm = _seeded_pair()
    for path, adapter in cm.store.items("default"):
        for mine, theirs in OURS_AND_PEFTS:
            assert torch.equal(adapter.get_parameter(mine), _theirs(pm, path, theirs))
        pool = pm.get_submodule(f"base_model.model.{path}").lora_monteclora_sampler["default"]
        for i, (z, z_wishart, z_mix) in enumerate(adapter.sampler._pool):
            drawn = pool.sampler.buffer[i]
            assert torch.equal(z, drawn["z_mvn"]) and torch.equal(z_mix, drawn["z_dirichlet"])
            assert torch.equal(z_wishart, drawn["z_wishart"])


@pytest.mark.parametrize("entropy", [False, True])
def test_steps_with_the_regulariser_give_peft_gradients(entropy):
    """Three steps on a pool of two (the third refills it from the generator, seeded alike for
    both): outputs, regulariser and every gradient as PEFT's."""
    entry, pm, cm = _seeded_pair(entropy)
    for step in range(3):
        losses = []
        for model, regulariser in (
            (cm, cm.regularization_loss),
            (pm, pm.base_model._get_monteclora_loss),
        ):
            model.train()
            model.zero_grad()
            torch.manual_seed(10 + step)
            out = model(**entry.example(step)).pow(2).mean()
            term = regulariser()
            (out + term).backward()
            losses.append((out, term))
        torch.testing.assert_close(losses[0][0], losses[1][0])
        torch.testing.assert_close(losses[0][1], losses[1][1].float())
        for path, adapter in cm.store.items("default"):
            for mine, theirs in OURS_AND_PEFTS:
                torch.testing.assert_close(
                    adapter.get_parameter(mine).grad,
                    _theirs(pm, path, theirs).grad,
                    rtol=1e-4,
                    atol=1e-6,
                )


def test_eval_is_lora_and_draws_nothing():
    torch.manual_seed(0)
    cm = surgeon.compile(One(nn.Linear(6, 5)), MonteCLoRA(targets=("layer",), **FIELDS)).eval()
    ((_, adapter),) = cm.store.items("default")
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 6)
    torch.testing.assert_close(cm(x), formula(cm.spec("default"), adapter, cm.model.layer, x))
    assert adapter.sampler._next == 0
    assert cm.regularization_loss() is None  # outside training there is no regulariser


def test_surgeon_train_adds_the_regulariser():
    """Two ``surgeon.train`` steps from one seed with kl_weight 1 and 0: the variational
    parameters end apart, only through `loss_term`."""
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(12, generator=generator), torch.randn(5, generator=generator))] * 4
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        max_steps=2,
        warmup_steps=0,
        lr_scheduler="constant",
        shuffle=False,
        progress=False,
        distributed="none",
    )
    ends = []
    for kl_weight in (1.0, 0.0):
        entry = ZOO["mlp"]
        model = entry.model()
        torch.manual_seed(3)
        spec = MonteCLoRA(targets=entry.targets, **{**FIELDS, "kl_weight": kl_weight})
        cm = surgeon.compile(model, spec)
        torch.manual_seed(5)
        surgeon.train(cm, data, config, loss_fn=torch.nn.functional.mse_loss)
        ends.append(torch.cat([layer.sampler.std_prior for _, layer in cm.store.items("default")]))
    assert not torch.allclose(ends[0], ends[1])


@pytest.mark.parametrize(
    "layer", [nn.Embedding(5, 4), nn.Conv2d(3, 4, 1)], ids=["embedding", "conv2d"]
)
def test_layers_peft_refuses_are_not_targets(layer):
    with pytest.raises(surgeon.SpecError, match="layer"):
        surgeon.compile(One(layer), MonteCLoRA(targets=("layer",)))


def _config(**entries):
    config = MonteCLoRA(targets=("q_proj",)).to_peft_config(["q_proj"])
    return {**config, "monteclora_config": {**config["monteclora_config"], **entries}}


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({"num_samples": 0}, r"samples=0.*'monteclora_config'"),
        ({"dirichlet_prior": 0}, r"dirichlet_prior=0.*'monteclora_config'"),
        ({"buffer_size": 2.5}, r"buffer_size=2.5.*'monteclora_config'"),
        ({"use_entropy": 1}, r"entropy=1.*'monteclora_config'"),
        ({"seed": 1}, r"monteclora_config.seed is not a setting of monteclora_config"),
    ],
)
def test_monteclora_config_values_we_cannot_honour_are_refused_by_name(entries, match):
    with pytest.raises(surgeon.SpecError, match=match):
        method_from_peft_config(_config(**entries), "adapter_config.json")


def test_files_choose_monteclora_by_its_key_with_peft_defaults_for_left_out_entries():
    spec = method_from_peft_config({**_config(), "monteclora_config": {"num_samples": 2}}, "here")
    assert type(spec) is MonteCLoRA
    assert (spec.samples, spec.buffer_size, spec.kl_weight, spec.entropy) == (2, 150, 1e-5, False)
    with pytest.raises(surgeon.SpecError, match="monteclora_config"):
        surgeon.LoRA.from_peft_config(_config(), "here")


def test_surgeon_train_resumes_exactly_mid_pool(tmp_path):
    """A pool of three over four steps, stopped after two: the checkpoint holds the pool's
    generator state and position (buffers), so the resumed run draws the third set, then
    refills from the restored generator, as the uninterrupted run did."""
    spec = MonteCLoRA(targets=ZOO["mlp"].targets, **{**FIELDS, "buffer_size": 3, "entropy": True})
    generator = torch.Generator().manual_seed(4)
    data = [(torch.randn(12, generator=generator), torch.randn(5, generator=generator))] * 8

    def compiled(seed: int) -> surgeon.CompiledModel:
        model = mlp_without_dropout()
        torch.manual_seed(0)
        cm = surgeon.compile(model, spec)
        randomize(cm, seed=seed, scale=0.5)
        return cm

    whole = compiled(2)
    train_and_resume(whole, compiled, data, resume_config(shuffle=False), tmp_path)


def test_an_empty_sub_config_is_monteclora_with_peft_defaults():
    """PEFT builds ``monteclora_config: {}`` into its sub-config with defaults: not LoRA."""
    from surgeon.io import method_from_peft_config

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    method = method_from_peft_config({**config, "monteclora_config": {}}, "adapter_config.json")
    assert type(method).__name__ == "MonteCLoRA" and method.samples == 8
