"""Lily beyond the conformance suite: projectors and experts shared as PEFT shares them (by
target entry and shape, in runs of stride_A) and drawn as PEFT draws them, files and gradients
both ways with that sharing, the router's mix over the whole batch, mixed batches, merging
refused, errors and refused PEFT configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import WEIGHTS_NAME
from surgeon.passes.shared.lily import Lily


def formula(spec, adapter, base, x):
    """Lily (Zhong et al., 2024): ``W x + b + s · (A x) Σ_e p_e B_e`` with ``p`` the router's
    softmax over the experts, averaged over every token of the batch."""
    a, experts, router = adapter.lily_A.weight, adapter.lily_B.weight, adapter.lily_router
    hidden = x @ a.t()
    p = torch.softmax(hidden @ router.t(), dim=-1).reshape(-1, spec.num_b).mean(0)
    mixed = (p[:, None, None] * experts.reshape(spec.num_b, spec.rank, -1)).sum(0)
    return plain_output(base, x) + spec.scaling * (hidden @ mixed)


peft = pytest.importorskip("peft")


class Block(nn.Module):
    """q and k share a shape (a regex groups them together), v and o have others."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 4)
        self.o = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(self.v(torch.tanh(self.q(x)) * self.k(x)))


class Stack(nn.Module):
    """Five blocks (20 linear layers: as many as make PEFT shorten a list of targets) under
    ``model.layers``, where PEFT counts layer indices."""

    def __init__(self, depth: int = 5) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.model.layers:
            x = block(x)
        return x


def _stack(depth: int = 5) -> Stack:
    torch.manual_seed(0)
    return Stack(depth).eval()


def _x() -> torch.Tensor:
    return torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))


def _peft_key(name: str) -> str:
    return name.replace(".default", "")


def _sharing(named_factors) -> list[int]:
    """For each (path, factor) in order, the index of the first path using the same factor."""
    first: dict[int, int] = {}
    return [first.setdefault(id(f), i) for i, (_, f) in enumerate(named_factors)]


# -- sharing and init, as PEFT's -----------------------------------------------------------------

SELECTIONS = {
    # q and k: each its own group; runs of 2 (q0 q1 | q2 q3 | q4) share A, all share B
    "names": dict(targets=("q", "k", "o"), stride_a=2),
    # one regex: q and k (same shape) form one group in model order q0 k0 q1 k1 ...
    "regex": dict(targets=r"model\.layers\.\d\.(q|k|v)", stride_a=3),
    "layers": dict(targets=("q", "v"), layers=(1, 2, 4), stride_a=2),
    # a regex with layers is written as 8 paths: every layer its own group
    "paths": dict(targets=r".*\.(q|k|v|o)", layers=(1, 2), stride_a=2),
    # 20 paths: PEFT shortens them to q, k, v, o and shares by those
    "20-paths": dict(targets=r".*\.(q|k|v|o)", layers=(0, 1, 2, 3, 4), stride_a=2),
    # PEFT expands all-linear into the 20 paths and shortens them alike
    "all-linear": dict(targets="all-linear", stride_a=3),
}


@pytest.mark.parametrize(
    "selection",
    [
        pytest.param(name, marks=[] if name == "names" else [pytest.mark.slow])
        for name in SELECTIONS
    ],
)
def test_the_fresh_adapter_is_peft_s_for_the_same_seed_shared_alike(selection):
    spec = Lily(rank=3, num_b=3, init="kaiming", **SELECTIONS[selection])
    paths = spec.select(_stack())
    model = _stack()
    torch.manual_seed(7)
    cm = surgeon.compile(model, spec)
    base = _stack()
    torch.manual_seed(7)
    pm = peft_model(base, peft.get_peft_config(spec.to_peft_config(paths)), seed=None)
    ours = dict(cm.store.items("default"))
    theirs = {p: pm.base_model.model.get_submodule(p) for p in paths}
    assert list(ours) == paths and len(paths) > 1
    written = spec.to_peft_config(paths)["target_modules"]
    assert (written == sorted(paths)) is (selection in ("paths", "20-paths"))
    for factor in ("lily_A", "lily_B"):
        mine = _sharing((p, getattr(layer, factor)) for p, layer in ours.items())
        peft_side = _sharing((p, getattr(m, factor)["default"]) for p, m in theirs.items())
        assert mine == peft_side, factor
    state = {_peft_key(k): v for k, v in peft.get_peft_model_state_dict(pm).items()}
    mine = cm.adapter_state_dict()
    assert mine.keys() == state.keys()
    for key, value in mine.items():
        assert torch.equal(value, state[key]), key
    x = _x()
    torch.testing.assert_close(cm(x), pm(x), rtol=0, atol=0)


def test_shared_factors_are_one_parameter_trained_by_every_layer_using_it():
    spec = Lily(rank=2, targets=("q", "k"), stride_a=2)
    cm = surgeon.compile(_stack(), spec)
    layers = [layer for _, layer in cm.store.items("default")]
    q = layers[0::2]
    assert q[0].lily_A is q[1].lily_A and q[2].lily_A is not q[1].lily_A
    assert all(layer.lily_B is q[0].lily_B for layer in q)
    assert q[0].lily_B is not layers[1].lily_B  # k has its own
    # A: 3 runs per name (8 x 2), B: 1 per name (2*2 x 8), a router (2 x 2) per layer
    assert cm.num_trainable() == 2 * (3 * 16 + 32) + 10 * 4
    randomize(cm)
    cm.train()
    cm(_x()).pow(2).mean().backward()
    assert all(p.grad is not None for p in cm.store.parameters())


def test_a_path_ending_with_two_entries_is_refused_as_peft_s_grouping_is_then_random():
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.block = nn.Module()
            self.block.q_proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.block.q_proj(self.proj(x))

    with pytest.raises(surgeon.SpecError, match=r"block.q_proj ends with several entries"):
        surgeon.compile(Proj(), Lily(rank=2, targets=("q_proj", "proj")))


# -- files and gradients both ways, with sharing ---------------------------------------------


@pytest.mark.slow  # the default lane has them on Llama (conformance), A and B shared
@pytest.mark.parametrize("selection", ["names", "regex"])
def test_files_go_both_ways_with_shared_factors(selection, tmp_path):
    spec = Lily(rank=3, num_b=2, scaling=0.7, **SELECTIONS[selection])
    cm = surgeon.compile(_stack(), spec)
    randomize(cm, scale=0.4)
    x = _x()
    expected = cm(x)
    cm.save_adapters(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert len(saved) == 3 * len(spec.select(_stack()))  # every layer's A, B and router
    torch.testing.assert_close(peft_loaded(_stack(), tmp_path / "ours")(x), expected)

    config = peft.get_peft_config(spec.to_peft_config(spec.select(_stack())))
    pm = peft_model(_stack(), config, seed=5, scale=0.3)
    pm.save_pretrained(tmp_path / "peft")
    loaded = surgeon.load(_stack(), tmp_path / "peft").eval()
    torch.testing.assert_close(loaded(x), pm(x), rtol=1e-5, atol=1e-6)


def test_a_train_step_gives_peft_s_gradients_on_shared_factors(tmp_path):
    """A shared factor's gradient sums over the layers that use it, as PEFT's."""
    spec = Lily(rank=3, num_b=3, **SELECTIONS["names"])
    config = peft.get_peft_config(spec.to_peft_config(spec.select(_stack(3))))
    pm = peft_model(_stack(3), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_stack(3), tmp_path)
    x = _x()
    for model in (cm, pm):
        model.train()
        model(x).pow(2).mean().backward()
    theirs = {_peft_key(n): p for n, p in pm.named_parameters(remove_duplicate=False)}
    layers = cm.store.items("default")
    for path, layer in layers:
        for suffix, mine in layer.peft_tensors().items():
            their = theirs[f"base_model.model.{path}.{suffix}"]
            torch.testing.assert_close(mine.grad, their.grad, rtol=1e-4, atol=1e-6)
    assert len(layers) == 9


# -- the router's mix -----------------------------------------------------------------------


def test_the_mix_is_averaged_over_the_whole_batch_as_peft_s():
    """One row's output depends on the other rows (PEFT's router pools every token)."""
    cm = surgeon.compile(One(nn.Linear(6, 5)), Lily(rank=3, num_b=3, targets=("layer",)))
    randomize(cm, scale=0.8)
    x = torch.randn(4, 6)
    together = cm(x)
    alone = cm(x[:1])
    assert not torch.allclose(together[:1], alone, atol=1e-5)
    ((_, adapter),) = cm.store.items("default")
    spec = cm.spec("default")
    torch.testing.assert_close(alone, formula(spec, adapter, cm.model.layer, x[:1]))


def test_a_mixed_batch_mixes_each_adapter_over_its_own_rows():
    """PEFT has no mixed batches for Lily; here each adapter's rows are its batch: a row gets
    what its adapter gives it with the adapter's rows alone."""
    spec = Lily(rank=3, num_b=3, targets=("q", "o"), stride_a=2)
    cm = surgeon.compile(_stack(3), surgeon.Spec({"a": spec, "b": spec}))
    randomize(cm, scale=0.4)
    x = _x()
    names = ["a", "b", "a"]
    mixed = cm(x, adapter_names=names)
    for name, rows in (("a", [0, 2]), ("b", [1])):
        cm.set_active(name)
        torch.testing.assert_close(mixed[rows], cm(x[rows]), rtol=1e-5, atol=1e-6)


# -- merging --------------------------------------------------------------------------------------


def test_another_adapter_on_the_same_layers_still_merges_alone():
    """Merging Lily is refused (the conformance suite checks that); LoRA beside it merges."""
    cm = surgeon.compile(_stack(3), Lily(rank=2, targets=("q", "v")), name="lily")
    cm.add_adapter("lora", surgeon.LoRA(rank=2, targets=("q",)))
    randomize(cm)
    cm.set_active(["lora", "lily"])
    x = _x()
    expected = cm(x)
    with pytest.raises(surgeon.SpecError, match="cannot merge adapter 'lily'"):
        cm.merge()
    cm.merge(["lora"])
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"Lily.rank=0: expected an integer >= 1"),
        ({"stride_a": 0}, r"Lily.stride_a=0: expected an integer >= 1"),
        ({"num_b": 1}, r"Lily.num_b=1: expected an integer >= 2"),
        ({"scaling": float("inf")}, r"Lily.scaling=inf: expected a finite number"),
        ({"init": "gaussian"}, r"Lily.init='gaussian': expected one of 'zeros', 'kaiming'"),
        ({"stride_A": 2}, r"Lily has no field 'stride_A'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        Lily(**fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num_B": 1}, r"num_b=1.*'num_B'"),
        ({"stride_A": 0}, r"stride_a=0.*'stride_A'"),
        ({"r": 2.5}, r"r=2.5: expected an integer"),
        ({"init_weights": "gaussian"}, r"init_weights='gaussian': expected true or false"),
        (
            {"layers_to_transform": [0], "layers_pattern": "decoders"},
            r"layers_pattern=.decoders. is not supported",
        ),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), Lily(rank=2, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_init_weights_false_is_kaiming_experts_both_ways(tmp_path):
    entry = ZOO["mlp"]
    spec = Lily(rank=2, init="kaiming", targets=("head",))
    assert spec.to_peft_config(["head"])["init_weights"] is False
    assert not spec.starts_as_base
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    assert surgeon.load(entry.model(), tmp_path).spec("default") == spec


@pytest.mark.parametrize(
    "layer",
    [gpt2_conv1d(), nn.Conv2d(2, 2, 1), nn.Embedding(5, 4)],
    ids=["conv1d_gpt2", "conv2d", "embedding"],
)
def test_layers_peft_cannot_adapt_are_refused(layer):
    assert not Lily().supports(layer)
    with pytest.raises(surgeon.SpecError, match="which Lily cannot adapt"):
        surgeon.compile(One(layer), Lily(rank=2, targets=("layer",)))
