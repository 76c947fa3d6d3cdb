"""VeLoRA beyond the conformance suite: the approximate gradient of A written out by hand, the
saved activations smaller than LoRA's (bytes, through saved_tensors_hooks), each projection
choice against PEFT (gradients over several steps, files both ways), eval and no-grad calls as
plain LoRA, the layers PEFT refuses, and velora_config keys honoured or refused by name."""

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
    add_noise,
    gpt2_conv1d,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
    resume_config,
    train_and_resume,
)

import surgeon
from surgeon.io import CONFIG_NAME
from surgeon.passes.lowrank.velora import VeLoRA


def formula(spec, adapter, base, x):
    """VeLoRA (Miles et al., 2024, arXiv:2405.17991) changes only what backward keeps: the
    output is LoRA's, ``W x + b + (alpha / r) · B A x`` (rsLoRA: ``alpha / sqrt(r)``)."""
    a, b = adapter.lora_A, adapter.lora_B
    r = a.shape[0]
    scale = spec.alpha_pattern.get("layer", spec.alpha) / (math.sqrt(r) if spec.rslora else r)
    return plain_output(base, x) + scale * (x @ a.t() @ b.t())


peft = pytest.importorskip("peft")


def _layer(fields=None, features=10):
    torch.manual_seed(0)
    spec = VeLoRA(**{"rank": 3, "targets": ("layer",), "groups": 4, **(fields or {})})
    cm = surgeon.compile(One(nn.Linear(features, 6)), spec)
    add_noise(cm.store.parameters(), seed=1)
    ((_, adapter),) = cm.store.items("default")
    return cm.train(), adapter


def test_a_gradient_is_built_from_each_sub_token_projected_on_the_batch_mean():
    """groups=4 on 10 features: sub-tokens of 3 (two zeros of padding); v the normalised mean
    sub-token; A's gradient is g^T x̂, x̂ the sub-tokens' projections on v times v (times the
    reconstruction scale); the gradient reaching x is exact."""
    cm, adapter = _layer({"reconstruction_scale": 0.5})
    x = torch.randn(2, 5, 10, requires_grad=True)
    cm(x).pow(2).sum().backward()
    tokens = F.pad(x.detach(), (0, 2)).reshape(10, 4, 3)
    v = tokens.reshape(-1, 3).mean(0)
    v = v / v.norm()
    torch.testing.assert_close(adapter.projection.direction, v)
    rebuilt = ((tokens @ v).unsqueeze(-1) * v).reshape(10, 12)[:, :10] * 0.5
    h = x.detach() @ adapter.lora_A.detach().t()
    out = cm.model.layer(x.detach()) + adapter.scale * h @ adapter.lora_B.detach().t()
    g = (2 * out * adapter.scale) @ adapter.lora_B.detach()  # dL/dh
    torch.testing.assert_close(adapter.lora_A.grad, g.reshape(10, 3).t() @ rebuilt)
    x_exact = x.detach().requires_grad_()
    formula(cm.spec("default"), adapter, cm.model.layer, x_exact).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_exact.grad)


def test_eval_and_no_grad_calls_are_plain_lora_and_leave_the_projection_alone():
    cm, adapter = _layer()
    x = torch.randn(3, 10)
    expected = formula(cm.spec("default"), adapter, cm.model.layer, x)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), expected)
    torch.testing.assert_close(cm.eval()(x), expected)
    assert not adapter.projection.direction.any()  # batch_average: set by training batches only


def _saved_bytes(cm, x):
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cm(x).sum().backward()
    return sum(sizes)


def test_backward_keeps_fewer_activation_bytes_than_lora():
    """On 256 features cut in 8 groups, A's backward keeps 8 numbers a token instead of 256
    (plus A and the 32-long v, which it saves itself): what autograd saves is under a quarter
    of LoRA's (here 6 KiB against 33 KiB, most of LoRA's being the input)."""
    x = torch.randn(2, 16, 256)
    saved = {}
    for method in (
        surgeon.LoRA(rank=4, targets=("layer",)),
        VeLoRA(rank=4, targets=("layer",), groups=8),
    ):
        cm = surgeon.compile(One(nn.Linear(256, 32)), method).train()
        saved[method.name] = _saved_bytes(cm, x)
    assert saved["lora"] > x.numel() * x.element_size()
    assert saved["velora"] < saved["lora"] / 4


def _pair(projection, build, targets, tmp_path, fields=None):
    """PEFT's VeLoRA model (perturbed, saved) and ours loaded from its file."""
    fields = {"num_groups": 3, "init_type": projection, **(fields or {})}
    config = peft.LoraConfig(r=2, target_modules=list(targets), velora_config=fields)
    pm = peft_model(build(), config, seed=5, scale=0.2)
    pm.save_pretrained(tmp_path)
    return pm, surgeon.load(build(), tmp_path)


@pytest.mark.parametrize(
    "projection",
    # batch_average's first step is the conformance suite's; its later steps run in the slow lane
    [pytest.param("batch_average", marks=pytest.mark.slow), "batch_average_once", "random"],
)
def test_steps_give_peft_gradients_for_every_projection(projection, tmp_path):
    """Three train steps on different batches (v re-averaged each batch, once, or the file's
    random one): PEFT's gradients every step. The file holds v, so ours starts from PEFT's."""
    entry = ZOO["mlp"]
    pm, cm = _pair(projection, entry.model, entry.targets, tmp_path)
    spec = cm.spec("default")
    assert (spec.projection, spec.groups) == (projection, 3)
    theirs = dict(pm.named_parameters())
    for seed in range(3):
        for model in (cm, pm):
            model.train()
            model.zero_grad()
            model(**entry.example(seed)).pow(2).mean().backward()
        for path, adapter in cm.store.items("default"):
            for factor in ("lora_A", "lora_B"):
                their = theirs[f"base_model.model.{path}.{factor}.default.weight"]
                mine = getattr(adapter, factor)
                torch.testing.assert_close(mine.grad, their.grad, rtol=1e-4, atol=1e-6)
    for path, adapter in cm.store.items("default"):
        theirs = pm.get_submodule(f"base_model.model.{path}").lora_velora_embed["default"]
        torch.testing.assert_close(adapter.projection.direction, theirs)


def _conv1d():
    torch.manual_seed(0)
    return One(gpt2_conv1d(6, 5))


def test_our_file_loads_in_peft_with_our_outputs_and_projection(tmp_path):
    """GPT-2's Conv1D, a random v: PEFT reads our velora_config and v (lora_velora_embed)."""
    spec = VeLoRA(rank=2, targets=("layer",), groups=2, projection="random")
    cm = surgeon.compile(_conv1d(), spec)
    add_noise(cm.store.parameters())
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["velora_config"] == {"num_groups": 2, "scale": 1.0, "init_type": "random"}
    pm = peft_loaded(_conv1d(), tmp_path)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(pm(x), cm.eval()(x))
    ((_, adapter),) = cm.store.items("default")
    direction = adapter.projection.direction
    assert direction.shape == (3,) and torch.isclose(direction.norm(), torch.tensor(1.0))
    torch.testing.assert_close(pm.base_model.model.layer.lora_velora_embed["default"], direction)


@pytest.mark.parametrize(
    "layer", [nn.Embedding(5, 4), nn.Conv2d(3, 4, 1)], ids=["embedding", "conv2d"]
)
def test_layers_peft_refuses_are_not_targets(layer):
    with pytest.raises(surgeon.SpecError, match="layer"):
        surgeon.compile(One(layer), VeLoRA(targets=("layer",)))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"groups": 0}, r"groups=0"),
        ({"reconstruction_scale": 0}, r"reconstruction_scale=0"),
        ({"projection": "mean"}, r"projection='mean'"),
    ],
)
def test_bad_fields_are_refused(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        VeLoRA(**fields)


def _config(**velora):
    config = VeLoRA(targets=("q_proj",)).to_peft_config(["q_proj"])
    return {**config, "velora_config": {**config["velora_config"], **velora}}


@pytest.mark.parametrize(
    ("velora", "match"),
    [
        ({"num_groups": 1.5}, r"groups=1.5.*'velora_config'"),
        ({"scale": -1}, r"reconstruction_scale=-1.*'velora_config'"),
        ({"init_type": "svd"}, r"projection='svd'.*'velora_config'"),
        ({"rank": 2}, r"velora_config.rank is not a setting of velora_config"),
    ],
)
def test_velora_config_values_we_cannot_honour_are_refused_by_name(velora, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.io.method_from_peft_config(_config(**velora), "adapter_config.json")


def test_files_choose_velora_by_its_key_and_left_out_entries_take_peft_defaults():
    """A LoRA file with velora_config is VeLoRA's (plain LoRA refuses it); entries left out are
    PEFT's defaults; with MonteCLoRA's key also on it is nobody's."""
    read = surgeon.io.method_from_peft_config
    spec = read({**_config(), "velora_config": {"scale": 1.0}}, "here")
    assert type(spec) is VeLoRA
    assert (spec.groups, spec.reconstruction_scale, spec.projection) == (64, 1.0, "batch_average")
    assert type(read({**_config(), "velora_config": None}, "here")) is surgeon.LoRA
    with pytest.raises(surgeon.SpecError, match="velora_config"):
        surgeon.LoRA.from_peft_config(_config(), "here")
    with pytest.raises(surgeon.SpecError, match="selects a variant"):
        read({**_config(), "monteclora_config": {"num_samples": 2}}, "here")


def test_surgeon_train_resumes_exactly_with_a_projection_averaged_once(tmp_path):
    """The checkpoint keeps v and that it was averaged (buffers): the resumed run does not
    average again on its first batch, as the uninterrupted run did not."""
    spec = VeLoRA(rank=3, targets=ZOO["mlp"].targets, groups=5, projection="batch_average_once")
    generator = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(8)
    ]

    def compiled(seed: int) -> surgeon.CompiledModel:
        model = ZOO["mlp"].model()
        model.body[2].p = 0.0
        cm = surgeon.compile(model, spec)
        randomize(cm, seed=seed, scale=0.5)
        return cm

    whole = compiled(2)
    train_and_resume(whole, compiled, data, resume_config(shuffle=False), tmp_path)


def test_an_empty_sub_config_is_velora_with_peft_defaults():
    """PEFT builds ``velora_config: {}`` into its sub-config with defaults: VeLoRA, not LoRA."""
    from surgeon.io import method_from_peft_config

    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    method = method_from_peft_config({**config, "velora_config": {}}, "adapter_config.json")
    assert type(method).__name__ == "VeLoRA" and method.groups == 64
    assert type(method_from_peft_config(config, "adapter_config.json")).__name__ == "LoRA"
