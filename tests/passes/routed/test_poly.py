"""Poly / MHR beyond the conformance suite: the formula with each row's task, PEFT's own init
drawn alike, PEFT parity both ways and train-mode gradients equal to PEFT's under one seed,
task_ids through training samples, generate and a direct model call, the errors, the PEFT
config keys refused, and the router in the rewritten graph."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    assert_same_generation,
    decode_without_cache,
    generate,
    logits,
    padded_ids,
    peft_loaded,
)

import surgeon
from surgeon.io import CONFIG_NAME
from surgeon.passes.routed.poly import Poly


def call_inputs(spec, inputs):
    """One task per row, cycling through the spec's tasks."""
    rows = next(iter(inputs.values())).shape[0]
    return {"task_ids": torch.arange(rows) % spec.tasks}


def formula(spec, adapter, base, x, task_ids=None):
    """Poly (Ponti et al., 2022) / MHR (Caccia et al., 2022): row b of task t gets
    ``W x + x·A_t·B_t / r``; split q of A_t (its rows of the input features) is
    ``Σ_s w_tqs A_qs``, of B_t (its columns of the output features) ``Σ_s w_tqs B_qs``, with
    ``w_tq = sigmoid(l_tq) / Σ_s sigmoid(l_tqs)`` (eval). Tasks cycle as `call_inputs` gives them
    unless ``task_ids`` says."""
    if task_ids is None:
        task_ids = call_inputs(spec, {"x": x})["task_ids"]
    logits = adapter.router_logits.view(spec.tasks, spec.splits, spec.skills)
    rows = []
    for row, task in zip(x, task_ids.tolist()):
        gates = torch.sigmoid(logits[task])
        weights = gates / (gates.sum(-1, keepdim=True) + 1e-12)
        a = torch.cat(
            [
                sum(weights[q, s] * adapter.lora_A[q, s] for s in range(spec.skills))
                for q in range(spec.splits)
            ]
        )
        b = torch.cat(
            [
                sum(weights[q, s] * adapter.lora_B[q, s] for s in range(spec.skills))
                for q in range(spec.splits)
            ],
            dim=1,
        )
        rows.append(base(row) + row @ a @ b / spec.rank)
    return torch.stack(rows)


def _peft_takes_task_ids(model: nn.Module) -> None:
    """``model``'s forward takes ``task_ids`` and hands them to PEFT's Poly layers (what
    PolyModel.forward does; a PeftModel without a task type passes them to the base model
    instead), feeding a 2-D input to them as one token per row (PEFT's bmm takes 3-D only)."""
    from peft.tuners.poly.layer import Linear as PeftPolyLinear

    def forward(self, *args, task_ids=None, **kwargs):
        layers = [m for m in self.modules() if isinstance(m, PeftPolyLinear)]
        flat = set()

        def before(module, args, kwargs):
            x, *rest = args
            if x.dim() == 2:
                flat.add(module)
                x = x.unsqueeze(1)
            return (x, *rest), {**kwargs, "task_ids": task_ids}

        def after(module, args, output):
            return output.squeeze(1) if module in flat else output

        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.callback(layer.register_forward_pre_hook(before, with_kwargs=True).remove)
                stack.callback(layer.register_forward_hook(after).remove)
            return type(self).__mro__[1].forward(self, *args, **kwargs)

    model.__class__ = type(f"TaskIds{type(model).__name__}", (type(model),), {"forward": forward})


def peft_base(model, compiled):
    """The model PEFT's side runs on: the same model, called with task_ids as PEFT's PolyModel
    calls its layers (see `_peft_takes_task_ids`)."""
    _peft_takes_task_ids(model)
    return model


peft = pytest.importorskip("peft")

SPEC = Poly(targets=("q_proj", "v_proj"), rank=2, tasks=3, skills=2, splits=2)


def _ids(batch: int = 3) -> dict[str, torch.Tensor]:
    return {"input_ids": padded_ids(batch, 5, padded=False)["input_ids"]}


def _compiled(spec: Poly = SPEC, seed: int = 4) -> surgeon.CompiledModel:
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    add_noise(cm.store.parameters(), seed, 0.3)
    return cm.eval()


def _peft_config(**changes) -> object:
    fields = {
        "r": 2,
        "n_tasks": 3,
        "n_skills": 2,
        "n_splits": 2,
        "target_modules": ["q_proj", "v_proj"],
    }
    return peft.PolyConfig(**{**fields, **changes})


@pytest.mark.parametrize("splits", [1, 2])
def test_the_formula_holds_per_task_on_2d_and_3d_inputs(splits):
    spec = Poly(targets=("layer",), rank=3, tasks=3, skills=2, splits=splits)
    torch.manual_seed(0)
    model = One(nn.Linear(6, 4))
    cm = surgeon.compile(model, spec).eval()
    add_noise(cm.store.parameters(), 2, 0.5)
    ((_, adapter),) = cm.store.items("default")
    tasks = torch.tensor([2, 0, 1, 2])
    for x in (torch.randn(4, 6), torch.randn(4, 3, 6)):
        expected = formula(spec, adapter, model.layer, x, tasks)
        torch.testing.assert_close(cm(x, task_ids=tasks), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init_weights", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_peft_draws_the_same_init_from_the_same_seed(init_weights):
    """PEFT's init (A Kaiming per skill and split, B zero or Kaiming, router ±1e-3), in its
    order from torch's global generator: the same seed gives the same parameters."""
    torch.manual_seed(11)
    pm = peft.get_peft_model(ZOO["llama"].model(), _peft_config(init_weights=init_weights))
    torch.manual_seed(11)
    cm = surgeon.compile(ZOO["llama"].model(), SPEC.replace(init_weights=init_weights))
    theirs = {k.replace(".default", ""): v for k, v in pm.named_parameters() if v.requires_grad}
    for path, layer in cm.store.items("default"):
        for name, tensor in layer.peft_tensors().items():
            key = f"base_model.model.{path}.{name}"
            assert torch.equal(tensor, theirs[key]), key
    x = {**_ids(), "task_ids": torch.tensor([0, 2, 1])}
    torch.testing.assert_close(logits(cm.eval()(**x)), logits(pm.eval().base_model(**x)))


@pytest.mark.slow  # PEFT parity both ways is the conformance suite's too
def test_peft_file_loads_with_peft_outputs_and_ours_loads_in_peft(tmp_path):
    torch.manual_seed(3)
    pm = peft.get_peft_model(ZOO["llama"].model(), _peft_config(n_splits=1, n_skills=3))
    add_noise([p for p in pm.parameters() if p.requires_grad], 5, 0.3)
    pm.eval().save_pretrained(tmp_path / "peft")
    x = {**_ids(), "task_ids": torch.tensor([1, 2, 0])}
    cm = surgeon.load(ZOO["llama"].model(), tmp_path / "peft").eval()
    spec = cm.spec("default")  # PEFT keeps target_modules as a set: any order
    assert spec.replace(targets=tuple(sorted(spec.targets))) == Poly(
        targets=("q_proj", "v_proj"), rank=2, tasks=3, skills=3
    )
    expected = logits(pm.base_model(**x))
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=0, atol=0)
    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(ZOO["llama"].model(), tmp_path / "ours")
    torch.testing.assert_close(logits(back.base_model(**x)), expected, rtol=0, atol=0)


@pytest.mark.slow
def test_a_seeded_train_step_gives_peft_gradients():
    """Training samples the mixing weights (relaxed Bernoulli) from torch's global generator
    in the order PEFT does: with one seed before each step, the gradients are PEFT's."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(ZOO["llama"].model(), _peft_config())
    add_noise([p for p in pm.parameters() if p.requires_grad], 5, 0.3)
    cm = surgeon.compile(ZOO["llama"].model(), SPEC)
    theirs = {k.replace(".default", ""): v for k, v in pm.named_parameters() if v.requires_grad}
    mine = {
        f"base_model.model.{path}.{name}": tensor
        for path, layer in cm.store.items("default")
        for name, tensor in layer.peft_tensors().items()
    }
    with torch.no_grad():
        for key, tensor in mine.items():
            tensor.copy_(theirs[key])
    x = {**_ids(), "task_ids": torch.tensor([1, 2, 0])}
    for model, run in ((cm, cm), (pm, pm.base_model)):
        model.train()
        torch.manual_seed(9)
        logits(run(**x)).pow(2).mean().backward()
    sampled = logits(cm(**x))  # another draw: training mode is stochastic
    assert not torch.equal(sampled, logits(cm(**x)))
    for key, tensor in mine.items():
        torch.testing.assert_close(tensor.grad, theirs[key].grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_task_ids_reach_the_layers_through_every_call():
    """A direct call of the model, generate (each step) and surgeon.train's samples."""
    cm = _compiled()
    x = padded_ids(2, 5, padded=False)
    tasks = torch.tensor([2, 0])
    direct = logits(cm.model(**x, task_ids=tasks))
    torch.testing.assert_close(direct, logits(cm(**x, task_ids=tasks)))
    assert not torch.allclose(direct, logits(cm(**x, task_ids=torch.tensor([0, 2]))))
    got = generate(cm, x["input_ids"], x["attention_mask"], 3, False, task_ids=tasks)
    expected = decode_without_cache(cm, **x, steps=3, sample=False, task_ids=tasks)
    assert_same_generation(got, expected)
    rows = _ids(4)["input_ids"].tolist()
    samples = [{"input_ids": r, "labels": r, "task_ids": i % 2} for i, r in enumerate(rows)]
    before = {p: layer.router_logits.detach().clone() for p, layer in cm.store.items("default")}
    config = surgeon.TrainingConfig(
        max_steps=1,
        batch_size=4,
        gradient_accumulation_steps=1,
        warmup_steps=0,
        weight_decay=0.0,
        progress=False,
    )
    surgeon.train(cm, samples, config)
    for path, layer in cm.store.items("default"):
        moved = (layer.router_logits.detach() - before[path]).abs().amax(dim=1)
        assert bool((moved[:2] > 0).all()) and moved[2] == 0, path  # tasks 0 and 1 trained


def test_disabled_or_inactive_the_model_still_never_sees_task_ids():
    cm = surgeon.compile(ZOO["mlp"].model(), Poly(targets=("body.0",), tasks=2))
    x = {"x": torch.randn(2, 12), "task_ids": torch.tensor([0, 1])}
    base = ZOO["mlp"].model()(x["x"])
    with cm.disabled():
        torch.testing.assert_close(cm(**x), base)
    cm.set_active(None)
    torch.testing.assert_close(cm(**x), base)


@pytest.mark.parametrize(
    "task_ids, message",
    [
        (None, r"adapter 'default' needs `task_ids`"),
        (torch.tensor([0, 1]), r"task_ids has shape \(2,\), expected \(3,\)"),
        (torch.tensor([0, 3, 1]), r"task_ids \[0, 3, 1\] outside 0..2"),
        (torch.tensor([-1, 0, 1]), r"task_ids \[-1, 0, 1\] outside 0..2"),
        (torch.tensor([0.0, 1.0, 2.0]), "task_ids must hold integer task indices"),
    ],
)
def test_wrong_task_ids_are_spec_errors_naming_them(task_ids, message):
    cm = _compiled()
    extra = {} if task_ids is None else {"task_ids": task_ids}
    with pytest.raises(surgeon.SpecError, match=message):
        cm(**_ids(), **extra)


def test_the_router_shows_in_the_rewritten_graph():
    code = _compiled().graph.code("model.layers.0.self_attn.q_proj")
    assert "call_argument('task_ids', 'default'" in code
    assert ".router(" in code and "poly_update(" in code


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 0}, r"Poly.rank=0: expected an integer >= 1"),
        ({"tasks": 1.5}, r"Poly.tasks=1.5"),
        ({"splits": 0}, r"Poly.splits=0"),
        ({"init_weights": "yes"}, r"Poly.init_weights='yes': expected true or false"),
    ],
)
def test_bad_fields_are_spec_errors(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        Poly(**fields)


def test_layers_whose_features_do_not_split_are_refused():
    spec = Poly(targets=("head",), splits=2)  # head: 24 -> 5 features
    with pytest.raises(surgeon.SpecError, match=r"head \(Linear\), which Poly cannot adapt"):
        surgeon.compile(ZOO["mlp"].model(), spec)


def test_a_poly_type_surgeon_does_not_know_is_refused_by_name(tmp_path):
    _compiled().save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["poly_type"] == "poly" and "layers_to_transform" not in config
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "poly_type": "mhr"}))
    with pytest.raises(surgeon.SpecError, match="poly_type='mhr' is not supported"):
        surgeon.load(ZOO["llama"].model(), tmp_path)
