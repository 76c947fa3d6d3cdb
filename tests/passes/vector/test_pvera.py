"""PVeRA beyond the conformance suite: the projections drawn as PEFT draws them (2r rows of A,
r columns of B), PEFT's init, the mean in eval and the reparameterised sample in training (from
torch's generator or a seeded one per layer, as PEFT's), sampling at inference, files saved
without projections both ways, saved projections used as saved, merging the mean, a resumed
training run drawing the noise an uninterrupted one draws, trained biases, the config's keys,
errors, the rewritten graph."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    graph_code,
    load_with_changed_config,
    logits,
    mlp_without_dropout,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.vector.pvera import PVeRA


def _sizes(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    return tuple(base.weight.shape)  # GPT-2's Conv1D stores (in, out)


def formula(spec, adapter, base, x):
    """PVeRA in eval (no sampling at inference): the mean of the sample,
    ``W x + b + λ_b ⊙ (B (λ_d[:r] ⊙ (A[:r] x)))``, A's first r rows projecting onto the mean."""
    fan_in, fan_out = _sizes(base)
    r = spec.rank
    a = adapter.projections.pvera_A[:r, :fan_in]
    b = adapter.projections.pvera_B[:fan_out]
    mean = (x @ a.t()) * adapter.pvera_lambda_d[:r]
    return plain_output(base, x) + (mean @ b.t()) * adapter.pvera_lambda_b


def sampled(adapter, base, x, noise):
    """PVeRA while training: ``z = μ + ε ⊙ exp(½ log σ²)`` with ``(μ, log σ²) = λ_d ⊙ (A x)``
    (A's first r rows, then its last r), the output ``W x + b + λ_b ⊙ (B z)``."""
    fan_in, fan_out = _sizes(base)
    h = (x @ adapter.projections.pvera_A[:, :fan_in].t()) * adapter.pvera_lambda_d
    mean, log_variance = h.chunk(2, dim=-1)
    z = mean + noise * torch.exp(0.5 * log_variance)
    low = (z @ adapter.projections.pvera_B[:fan_out].t()) * adapter.pvera_lambda_b
    return plain_output(base, x) + low


peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")


def _projections(cm):
    (_, layer), *_ = cm.store.items("default")
    return layer.projections.pvera_A, layer.projections.pvera_B


def _perturb(cm, seed: int = 2) -> None:
    add_noise(cm.store.parameters(), seed, 0.3)


def _one_linear(**fields) -> tuple[surgeon.CompiledModel, nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(5, 6)
    cm = surgeon.compile(One(layer), PVeRA(rank=3, targets=("layer",), **fields))
    _perturb(cm)
    return cm, layer, torch.randn(4, 5)


# -- the projections and the init ----------------------------------------------------------------


def test_projections_are_peft_kaiming_draws_from_the_seed():
    cm = surgeon.compile(ZOO["llama"].model(), PVeRA(rank=4, seed=7, targets=TARGETS))
    a, b = _projections(cm)
    # A: 2r rows (mean, log-variance) x down_proj's 48 inputs; B: q/down's 32 outputs x r
    assert a.shape == (8, 48) and b.shape == (32, 4)
    generator = torch.Generator().manual_seed(7)  # A first, then B, bound sqrt(6 / fan_in)
    bound_a, bound_b = math.sqrt(6 / 48), math.sqrt(6 / 4)
    assert torch.equal(a, torch.empty(8, 48).uniform_(-bound_a, bound_a, generator=generator))
    assert torch.equal(b, torch.empty(32, 4).uniform_(-bound_b, bound_b, generator=generator))


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
    ids=["fp32", "bf16"],
)
def test_fresh_adapter_equals_peft_init(dtype):
    """In half precision PEFT rounds the projections and λ_d through the base dtype before
    upcasting them to float32: so must surgeon, or unsaved projections differ."""
    entry = ZOO["llama"]
    config = peft.PveraConfig(r=4, target_modules=list(TARGETS), d_initial=0.3)
    pm = peft_model(entry.model().to(dtype), config, seed=None)
    cm = surgeon.compile(entry.model().to(dtype), PVeRA(rank=4, d_initial=0.3, targets=TARGETS))
    a, b = _projections(cm)
    assert a.dtype == torch.float32
    assert torch.equal(a, pm.base_model.pvera_A["default"])
    assert torch.equal(b, pm.base_model.pvera_B["default"])
    for path, layer in cm.store.items("default"):
        theirs = pm.base_model.model.get_submodule(path)
        assert torch.equal(layer.pvera_lambda_b, theirs.pvera_lambda_b["default"])
        assert torch.equal(layer.pvera_lambda_d, theirs.pvera_lambda_d["default"])
        assert layer.pvera_lambda_d.shape == (8,) and not layer.pvera_lambda_b.any()
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(entry.model().to(dtype)(**x)))


# -- the mean in eval, the sample in training ------------------------------------------------------


def test_eval_gives_the_mean_and_training_the_reparameterised_sample():
    cm, layer, x = _one_linear()
    ((_, adapter),) = cm.store.items("default")
    spec = cm.spec("default")
    cm.eval()
    torch.testing.assert_close(cm(x), formula(spec, adapter, layer, x), rtol=1e-5, atol=1e-6)
    cm.train()
    torch.manual_seed(0)
    got = cm(x)
    torch.manual_seed(0)  # PEFT's randn_like: torch's generator, one draw of the sample's shape
    expected = sampled(adapter, layer, x, torch.randn(4, 3))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cm(x), got)  # the next call draws other noise


def test_seeded_noise_is_the_seeded_generators_and_ignores_torchs():
    cm, layer, x = _one_linear(noise_seed=5)
    ((_, adapter),) = cm.store.items("default")
    cm.train()
    generator = torch.Generator().manual_seed(5)
    for step in range(2):  # the layer's generator goes on where it stopped
        torch.manual_seed(step)
        expected = sampled(adapter, layer, x, torch.randn(4, 3, generator=generator))
        torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "noise_seed",
    # the suite's train step covers the seeded noise's first step
    [None, pytest.param(3, marks=pytest.mark.slow)],
    ids=["torch-generator", "seeded"],
)
def test_training_draws_the_noise_peft_draws(noise_seed, tmp_path):
    """Under the same torch seed (or the same generator_seed), step after step; the first call
    is also where the compiler checks its new graph by dry runs, which must draw nothing."""
    entry = ZOO["llama"]
    config = peft.PveraConfig(r=4, target_modules=list(TARGETS), generator_seed=noise_seed)
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").noise_seed == noise_seed
    x = entry.example()
    for step in range(2):
        outputs = []
        for model in (cm, pm):
            model.train()
            torch.manual_seed(step)
            outputs.append(logits(model(**x)))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], logits(pm.eval()(**x)), atol=1e-4)


def test_sampling_at_inference_samples_in_eval_as_peft(tmp_path):
    entry = ZOO["llama"]
    config = peft.PveraConfig(
        r=4, target_modules=list(TARGETS), sample_at_inference=True, generator_seed=8
    )
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path).eval()
    assert cm.spec("default").sample_at_inference
    x = entry.example()
    first = logits(cm(**x))
    torch.testing.assert_close(first, logits(pm(**x)), rtol=1e-5, atol=1e-6)
    second = logits(cm(**x))
    torch.testing.assert_close(second, logits(pm(**x)), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second, atol=1e-4)


def test_merging_folds_the_mean_and_warns_where_eval_samples():
    cm, layer, x = _one_linear(sample_at_inference=True, noise_seed=1)
    ((_, adapter),) = cm.store.items("default")
    weight = layer.weight.detach().clone()
    mean = formula(cm.spec("default"), adapter, layer, x)
    cm.eval()
    assert not torch.allclose(cm(x), mean)
    with pytest.warns(UserWarning, match="merges its mean, as PEFT does"):
        cm.merge()
    torch.testing.assert_close(cm(x), mean, rtol=1e-5, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-6)


# -- training runs -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("noise_seed", [None, 3], ids=["torch-generator", "seeded"])
def test_a_resumed_run_draws_the_noise_an_uninterrupted_run_draws(noise_seed, tmp_path):
    """The seeded generators' states are buffers of the layers: checkpoints keep them (torch's
    own generator is kept by the checkpoint's random state)."""
    spec = PVeRA(rank=4, noise_seed=noise_seed, targets=("body.0", "head"))
    generator = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(8)
    ]
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=4,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=None,
        lr_scheduler="constant",
        shuffle=False,
        progress=False,
        distributed="none",
    )

    def compiled(seed: int) -> surgeon.CompiledModel:
        cm = surgeon.compile(mlp_without_dropout(), spec)
        randomize(cm, seed=seed, scale=0.5)
        return cm

    whole = compiled(2)
    expected = surgeon.train(whole, data, config, loss_fn=F.mse_loss)
    run = tmp_path / "run"
    surgeon.train(
        compiled(2), data, config.replace(max_steps=2, output_dir=str(run)), loss_fn=F.mse_loss
    )
    fresh = compiled(9)  # other values: the checkpoint must restore them all
    result = surgeon.train(
        fresh, data, config.replace(output_dir=str(run)), resume_from=run, loss_fn=F.mse_loss
    )
    assert result.losses == expected.losses
    for (path, mine), (_, theirs) in zip(
        fresh.store.items("default"), whole.store.items("default")
    ):
        assert torch.equal(mine.pvera_lambda_d, theirs.pvera_lambda_d), path
        assert torch.equal(mine.pvera_lambda_b, theirs.pvera_lambda_b), path
        if noise_seed is not None:
            state = mine.reparameterisation.noise_state
            assert torch.equal(state, theirs.reparameterisation.noise_state), path


# -- files ---------------------------------------------------------------------------------------------


def test_a_peft_file_without_projections_loads_with_peft_outputs(tmp_path):
    """PEFT saves no projections: surgeon redraws them from projection_prng_key."""
    entry = ZOO["llama"]
    config = peft.PveraConfig(
        r=5, target_modules=list(TARGETS), save_projection=False, projection_prng_key=11
    )
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    assert not any("pvera_A" in k for k in load_file(tmp_path / WEIGHTS_NAME))
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").seed == 11 and not cm.spec("default").save_projection
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


def test_our_file_without_projections_loads_in_peft_with_our_outputs(tmp_path):
    """surgeon saves no projections: PEFT redraws them from projection_prng_key."""
    entry = ZOO["llama"]
    spec = PVeRA(rank=5, seed=11, save_projection=False, targets=TARGETS)
    cm = surgeon.compile(entry.model(), spec)
    _perturb(cm)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert not any("pvera_A" in k for k in saved)
    assert saved["base_model.model.model.layers.0.mlp.down_proj.pvera_lambda_d"].shape == (10,)
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_saved_projections_are_used_rather_than_redrawn(tmp_path):
    entry = ZOO["llama"]
    pm = peft_model(entry.model(), peft.PveraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.pvera_A"].shape == (8, 32)
    tensors["base_model.pvera_A"] = tensors["base_model.pvera_A"].flip(1)  # not the seed's
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = logits(peft_loaded(entry.model(), tmp_path)(**x))
    cm = surgeon.load(entry.model(), tmp_path)
    assert torch.equal(_projections(cm)[0], tensors["base_model.pvera_A"])
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["pvera_only", pytest.param("all", marks=pytest.mark.slow)])
def test_trained_biases_are_saved_and_load_in_peft(bias, tmp_path):
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), PVeRA(rank=2, targets=("head",), bias=bias))
    trained = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    biases = {"head.bias"} if bias == "pvera_only" else {"body.0.bias", "body.3.bias", "head.bias"}
    assert trained == biases
    _perturb(cm)
    with torch.no_grad():  # as training would move them
        for name in biases:
            cm.model.get_parameter(name).add_(0.5)
    x = entry.example()
    expected = cm.eval()(**x)
    cm.save_adapters(tmp_path)
    assert "base_model.model.head.base_layer.bias" in load_file(tmp_path / WEIGHTS_NAME)
    torch.testing.assert_close(peft_loaded(entry.model(), tmp_path)(**x), expected)
    torch.testing.assert_close(surgeon.load(entry.model(), tmp_path).eval()(**x), expected)


def test_config_keys_map_to_fields_and_peft_reads_them(tmp_path):
    spec = PVeRA(
        rank=6,
        seed=4,
        d_initial=0.2,
        dropout=0.1,
        save_projection=False,
        sample_at_inference=True,
        noise_seed=9,
        bias="pvera_only",
        targets=("head",),
    )
    surgeon.compile(ZOO["mlp"].model(), spec).save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert {k: config[k] for k in ("peft_type", "r", "projection_prng_key", "d_initial")} == {
        "peft_type": "PVERA",
        "r": 6,
        "projection_prng_key": 4,
        "d_initial": 0.2,
    }
    assert config["pvera_dropout"] == 0.1 and config["save_projection"] is False
    assert config["sample_at_inference"] is True and config["generator_seed"] == 9
    assert "exclude_modules" not in config  # PEFT's PveraConfig has no such field
    theirs = peft.PeftConfig.from_pretrained(tmp_path)
    assert (theirs.r, theirs.generator_seed, theirs.bias) == (6, 9, "pvera_only")
    assert surgeon.load(ZOO["mlp"].model(), tmp_path).spec("default") == spec


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"PVeRA.bias='lora_only'.*adapter_config.json key 'bias'"),
        ({"generator_seed": -1}, r"PVeRA.noise_seed=-1.*adapter_config.json key 'generator_seed'"),
        ({"generator_seed": 1.5}, r"generator_seed=1.5: expected an integer, or null"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), PVeRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"PVeRA.rank=0: expected an integer >= 1"),
        ({"seed": -1}, r"PVeRA.seed=-1: expected an integer >= 0"),
        ({"noise_seed": "7"}, r"PVeRA.noise_seed='7': expected an integer >= 0"),
        ({"d_initial": 0}, r"PVeRA.d_initial=0: expected a number > 0"),
        ({"dropout": 1.0}, r"PVeRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"sample_at_inference": 1}, r"PVeRA.sample_at_inference=1: expected true or false"),
        ({"bias": "vera_only"}, r"PVeRA.bias='vera_only': expected one of 'none', 'all'"),
        ({"alpha": 4}, r"PVeRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        PVeRA(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which PVeRA cannot adapt"):
        surgeon.compile(One(layer), PVeRA(targets=("layer",)))


# -- graphs ----------------------------------------------------------------------------------------------

GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu)
    adapters_default_head_pvera_a = self.adapters.default.head.pvera_A
    adapters_default_head_pvera_b = self.adapters.default.head.pvera_B
    adapters_default_head_pvera_lambda_d = self.adapters.default.head.pvera_lambda_d
    adapters_default_head_pvera_lambda_b = self.adapters.default.head.pvera_lambda_b
    adapters_default_head_dropout = self.adapters.default.head.dropout(relu);  relu = None
    linear = torch._C._nn.linear(adapters_default_head_dropout, adapters_default_head_pvera_a);  adapters_default_head_dropout = adapters_default_head_pvera_a = None
    mul = torch.mul(linear, adapters_default_head_pvera_lambda_d);  linear = adapters_default_head_pvera_lambda_d = None
    adapters_default_head_reparameterisation = self.adapters.default.head.reparameterisation(mul);  mul = None
    linear_1 = torch._C._nn.linear(adapters_default_head_reparameterisation, adapters_default_head_pvera_b);  adapters_default_head_reparameterisation = adapters_default_head_pvera_b = None
    mul_1 = torch.mul(linear_1, adapters_default_head_pvera_lambda_b);  linear_1 = adapters_default_head_pvera_lambda_b = None
    add = torch.add(head, mul_1);  head = mul_1 = None
    return add"""


def test_golden_graph_of_a_whole_model_region_with_dropout():
    cm = surgeon.compile(ZOO["mlp"].model(), PVeRA(rank=4, targets=("head",), dropout=0.1))
    assert graph_code(cm) == GOLDEN_MLP
