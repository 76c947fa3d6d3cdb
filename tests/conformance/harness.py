"""What the conformance suite runs every registered method on: the models, the targets a method
takes on each, the cases (method x example x model), each method's card (the oracles its own test
file holds), and the PEFT side of the parity checks.

A method's card is its test file, ``tests/passes/<family>/test_<name>.py``, which must define

* ``formula(spec, adapter, base, x)``: the output of layer ``base`` adapted by ``adapter`` (for a
  method acting on the model call: of model ``base`` on keyword inputs ``x``), written from the
  paper's equation with plain torch, independent of the graph code;

and may define

* ``peft_base(model, compiled)``: the model PEFT's side of a parity check runs on, given a fresh
  copy of the model and our compiled one (QLoRA: the dequantized 4-bit weights), and
  ``our_base(model, spec)``: what to do to a fresh model before ours loads a PEFT file into it
  (QLoRA: store it in 4 bits), and ``PEFT_FORWARD_RUNS_FIRST_ACTIVE_ONLY = True`` where PEFT's
  unmerged forward applies only the first of several active adapters (its own bug; its merge
  folds in all of them, so the check of several adapters compares with PEFT merged), and
  ``call_inputs(spec, inputs)``: arguments the method's calls need besides the model's
  (multitask prompt tuning's ``task_ids``), added to every model input of the suite.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from zoo import EMBEDDING, ZOO, One, ZooEntry, add_noise, gpt2_conv1d, logits, peft_loaded
from zoo import peft_model as zoo_peft_model

import surgeon
from surgeon.spec import METHODS, MethodSpec

TESTS = Path(__file__).resolve().parent.parent
MODELS: dict[str, ZooEntry] = {
    **{name: ZOO[name] for name in ("mlp", "cnn")},
    "llama": dataclasses.replace(
        ZOO["llama"], targets=(*ZOO["llama"].targets, "input_layernorm", "post_attention_layernorm")
    ),
    # GPT-2's token embedding is tied to its output head (merging refuses it): the embedding
    # model covers embeddings
    "gpt2": dataclasses.replace(ZOO["gpt2"], targets=("c_attn", "c_fc", "ln_1", "ln_2")),
    "embedding": EMBEDDING,
}
"""The models every method runs on, with the layers it may target in each: a small MLP, a conv
net, an embedding model, a tiny Llama (RMSNorm) and a tiny GPT-2 (whose attention and MLP are
``Conv1D``; LayerNorm). A method takes the names whose every layer it supports."""
CALL_MODELS = ("llama", "gpt2")
"""Where methods acting on the model call run (they need a transformers model)."""


def family(cls: type[MethodSpec]) -> str:
    return cls.__module__.split(".")[-2]


@cache
def card(cls: type[MethodSpec]) -> ModuleType:
    """The method's test file, imported on its own (its tests are collected by pytest apart)."""
    path = TESTS / "passes" / family(cls) / f"test_{cls.name}.py"
    if not path.exists():
        raise AssertionError(
            f"{cls.__name__} has no test file {path.relative_to(TESTS.parent)}: write its "
            f"formula(spec, adapter, base, x) there"
        )
    spec = importlib.util.spec_from_file_location(f"card_{cls.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _instance(cls: type[MethodSpec]) -> MethodSpec:
    return next(iter(cls.examples(("layer",)).values()))


@cache
def _modules(model_name: str) -> dict[str, list[nn.Module]]:
    """The zoo model's candidate target names and the modules each selects."""
    model = MODELS[model_name].model()
    found = {}
    for name in MODELS[model_name].targets:
        found[name] = [m for p, m in model.named_modules() if p == name or p.endswith("." + name)]
    return found


def targets(cls: type[MethodSpec], model_name: str) -> tuple[str, ...]:
    """The zoo model's target names whose every module the method can adapt (none for a method
    acting on the model call)."""
    if cls.acts_on_call:
        return ()
    spec = _instance(cls)
    return tuple(
        name
        for name, modules in _modules(model_name).items()
        if modules and all(spec.supports(m) for m in modules)
    )


@dataclass(frozen=True)
class Case:
    """One method example on one model."""

    cls: type[MethodSpec]
    example: str
    model: str

    @property
    def id(self) -> str:
        return f"{self.cls.name}-{self.example}-{self.model}"

    @property
    def entry(self) -> ZooEntry:
        return MODELS[self.model]

    def spec(self, seed_targets: tuple[str, ...] | None = None) -> MethodSpec:
        return self.cls.examples(seed_targets or targets(self.cls, self.model))[self.example]

    def compile(self, dtype: torch.dtype = torch.float32, seed: int = 2, **options: Any):
        """The model with this example compiled in and its adapter moved off its initial values."""
        cm = surgeon.compile(self.entry.model().to(dtype), self.spec(), **options)
        perturb(cm, seed)
        return cm

    def inputs(self, seed: int = 1, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        x = {
            k: v.to(dtype) if v.is_floating_point() else v
            for k, v in self.entry.example(seed).items()
        }
        return {**x, **call_inputs(self.cls, self.spec(), x)}

    def base_inputs(self, seed: int = 1) -> dict[str, Any]:
        """`inputs` as the plain model takes them: without the method's own call arguments."""
        return self.entry.example(seed)


def call_inputs(cls: type[MethodSpec], spec: MethodSpec, inputs: dict[str, Any]) -> dict[str, Any]:
    """The arguments the method's calls need besides ``inputs`` (its card's ``call_inputs``)."""
    extra = getattr(card(cls), "call_inputs", None)
    return extra(spec, inputs) if extra is not None else {}


LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (gpt2_conv1d, lambda: torch.randn(2, 3, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 4, 1), lambda: torch.randn(2, 6, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(1, 2, 4, 4, 4)),
    "embedding": (
        lambda: nn.Embedding(11, 6, padding_idx=0),
        lambda: torch.randint(0, 11, (2, 4)),
    ),
}
"""Single layers of every kind a method may adapt, with an input for each."""


@dataclass(frozen=True)
class LayerCase:
    """One method example on one kind of layer (wrapped so its path is ``layer``)."""

    cls: type[MethodSpec]
    example: str
    kind: str

    def spec(self) -> MethodSpec:
        return self.cls.examples(("layer",))[self.example]

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        make_layer, make_input = LAYERS[self.kind]
        torch.manual_seed(0)
        layer = make_layer()
        if getattr(layer, "bias", None) is not None:
            with torch.no_grad():
                layer.bias.normal_()  # GPT-2's Conv1D starts with a zero bias
        return One(layer), make_input()


def layer_cases() -> list:
    import pytest

    out = []
    for cls in sorted(METHODS.values(), key=lambda c: c.name):
        if cls.acts_on_call:
            continue
        for example, spec in cls.examples(("layer",)).items():
            for kind, (make_layer, _) in LAYERS.items():
                if spec.supports(make_layer()):
                    case = LayerCase(cls, example, kind)
                    out.append(pytest.param(case, id=f"{cls.name}-{example}-{kind}"))
    return out


def _models_of(cls: type[MethodSpec]) -> list[str]:
    if cls.acts_on_call:
        return list(CALL_MODELS)
    return [name for name in MODELS if targets(cls, name)]


def cases(
    select: Callable[[Case], bool] = lambda case: True,
    first_model: bool = False,
    prefer: str | None = None,
) -> list:
    """pytest params of every registered method's examples on the models it applies to
    (``first_model``: on the first such model only, ``prefer`` first where it applies).

    The default lane runs every example on the method's first model and its first example on
    every model; the other pairs are marked slow (``-m slow``), so the lane grows by a few
    seconds per method, not by examples x models."""
    import pytest

    out = []
    for cls in sorted(METHODS.values(), key=lambda c: c.name):
        models = sorted(_models_of(cls), key=lambda name: name != prefer)
        first = first_example(cls)
        for example in cls.examples(("layer",)):
            for model in models[:1] if first_model else models:
                case = Case(cls, example, model)
                if select(case):
                    slow = example != first and model != models[0]
                    marks = [pytest.mark.slow] if slow else []
                    out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def methods(select: Callable[[Case], bool] = lambda case: True, prefer: str | None = None) -> list:
    """pytest params of every registered method's first example on its first model (``prefer``
    where it applies)."""

    def first(case: Case) -> bool:
        return select(case) and case.example == first_example(case.cls)

    return cases(first, first_model=True, prefer=prefer)


def first_example(cls: type[MethodSpec]) -> str:
    return next(iter(cls.examples(("layer",))))


def is_layer_method(case: Case) -> bool:
    return not case.cls.acts_on_call


def has_peft(case: Case) -> bool:
    """Whether PEFT has the method: a method PEFT lacks (a paper's variant) still writes PEFT's
    layout, under a type of this project's own that PEFT does not know."""
    return case.cls.peft_type in peft_types() and saves_in_peft_format(case)


@cache
def peft_types() -> frozenset[str]:
    from peft import PeftType

    return frozenset(t.value for t in PeftType)


def peft_cases(
    select: Callable[[Case], bool] = lambda case: True, first_model: bool = False
) -> list:
    """`cases` PEFT has, where PEFT cannot run an example (its own bug, named by the card's
    ``peft_cannot(spec, model_name)``), a strict xfail: the day PEFT runs it, the test says so."""
    import pytest

    out = []
    for param in cases(lambda case: has_peft(case) and select(case), first_model):
        (case,) = param.values
        hook = getattr(card(case.cls), "peft_cannot", None)
        reason = hook(case.spec(), case.model) if hook is not None else None
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=param.id, marks=[*param.marks, *marks]))
    return out


def saves_in_peft_format(case: Case) -> bool:
    try:
        case.spec().to_peft_config(())
    except surgeon.SpecError:
        return False
    return True


# -- adapters away from their initial values ------------------------------------------------


def perturb(model: nn.Module, seed: int = 2, scale: float = 0.2) -> None:
    """`add_noise` on every trainable parameter of an adapter: surgeon's store, or PEFT's
    adapter parameters."""
    params = (
        model.store.parameters()
        if isinstance(model, surgeon.CompiledModel)
        else (p for p in model.parameters() if p.requires_grad)
    )
    add_noise(params, seed, scale)


def output(model: Any, inputs: dict[str, Any]) -> torch.Tensor:
    return logits(model(**inputs))


def train_step(model: Any, inputs: dict[str, Any]) -> None:
    """One forward and backward with a loss every output position counts in."""
    model.train()
    output(model, inputs).float().pow(2).mean().backward()


def without_dropout(model: nn.Module) -> None:
    """The base model's own dropout off: gradients of two implementations must see the same
    inputs (the method's dropouts are its examples' business)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# -- PEFT -------------------------------------------------------------------------------------------


def peft_model(case: Case, spec: MethodSpec, paths: list[str], base: nn.Module) -> Any:
    """PEFT's own model for ``spec``, built from the config ours writes (so PEFT decides what
    the config means), its adapter perturbed like ours."""
    import peft

    config = spec.to_peft_config(paths)
    config.pop("modules_to_save", None)
    if case.cls.acts_on_call:
        config["task_type"] = "CAUSAL_LM"
    return zoo_peft_model(base, peft.get_peft_config(config), seed=5, scale=0.2)


def peft_load(path: Path, base: nn.Module, **kwargs: Any) -> Any:
    return peft_loaded(base, path, **kwargs)


def peft_base(
    case: Case, compiled: surgeon.CompiledModel | None = None, spec: MethodSpec | None = None
) -> nn.Module:
    """The model PEFT's side runs on: the card's ``peft_base`` of a fresh copy and our compiled
    model (``compiled``, or ``spec`` compiled here), else the fresh copy."""
    fresh = case.entry.model()
    hook = getattr(card(case.cls), "peft_base", None)
    if hook is None:
        return fresh
    return hook(fresh, compiled or surgeon.compile(our_base(case, spec), spec))


def our_base(case: Case, spec: MethodSpec) -> nn.Module:
    """A fresh model prepared for loading a PEFT file (the card's ``our_base``)."""
    model = case.entry.model()
    hook = getattr(card(case.cls), "our_base", None)
    return hook(model, spec) if hook is not None else model


def paired_parameters(
    ours: nn.Module, theirs: nn.Module, trained: bool = True
) -> list[tuple[str, nn.Parameter, str, nn.Parameter]]:
    """Our (trainable) parameters, each with PEFT's that holds the same values (same weights on
    both sides, perturbed at random: equal values are the same tensor, maybe in another shape,
    as IA³'s vectors, or dtype). ``trained``: PEFT's trainable parameters are exactly those."""
    mine = [(n, p) for n, p in ours.named_parameters() if p.requires_grad or not trained]
    pool = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad or not trained]
    pairs = []
    for name, param in mine:
        flat = param.detach().flatten().float()
        match = [
            (n, p)
            for n, p in pool
            if p.numel() == param.numel() and torch.equal(p.detach().flatten().float(), flat)
        ]
        assert len(match) == 1, f"{name}: {len(match)} PEFT parameters hold its values"
        pairs.append((name, param, *match[0]))
    if trained:
        assert len(pairs) == len(pool), "PEFT trains parameters ours does not have"
    return pairs
