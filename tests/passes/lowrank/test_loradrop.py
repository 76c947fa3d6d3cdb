"""LoRA-drop's card (its formula) and what is its own: the importance ``Σ ‖ΔW x‖²`` against an
independent computation, the paper's selection rule on hand-made importances (ties, threshold
edges, rounding), the spec built from a trained LoRA, the dropped layers' pair shared per shape
(one gradient from all of them), kept layers started from the trained LoRA, files (this
project's own PEFT type, shared pairs once) and errors. PEFT has no LoRA-drop: the conformance
suite runs the rest against the formula alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import One, gpt2_conv1d, load_with_changed_config, plain_output, randomize

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.loradrop import (
    LoRADrop,
    init_kept_from_lora,
    kept_layers,
    lora_output_importance,
    loradrop_spec,
)
from surgeon.spec import METHODS


def _scale(spec) -> float:
    return spec.alpha / (math.sqrt(spec.rank) if spec.rslora else spec.rank)


def formula(spec, adapter, base, x):
    """LoRA-drop (arXiv 2402.07721, §3): ``W x + b + s · B A x`` with ``(A, B)`` the layer's own
    pair if ``spec.keep`` names it, else the pair its shape group's dropped layers share
    (``s = alpha / r``, rsLoRA ``alpha / sqrt(r)``)."""
    a, b = adapter.pair.lora_A, adapter.pair.lora_B
    return plain_output(base, x) + _scale(spec) * (x @ a.t()) @ b.t()


class Stack(nn.Module):
    """Three layers of one shape and one of another."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        make = gpt2_conv1d if conv1d else nn.Linear
        self.a = make(6, 6)
        self.b = make(6, 6)
        self.c = make(6, 6)
        self.d = make(6, 4)

    def forward(self, x):
        for layer in (self.a, self.b, self.c):
            x = torch.tanh(layer(x))
        return self.d(x)


TARGETS = ("a", "b", "c", "d")


def _stack(conv1d: bool = False, **fields) -> tuple[Stack, surgeon.CompiledModel]:
    torch.manual_seed(0)
    model = Stack(conv1d)
    cm = surgeon.compile(model, LoRADrop(**{"rank": 3, "targets": TARGETS, **fields}))
    randomize(cm, scale=0.5)
    return model, cm


def _expected(model: Stack, cm, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    layers = dict(cm.store.items(name))
    spec = cm.spec(name)
    with torch.no_grad(), cm.disabled():
        for path in ("a", "b", "c"):
            x = torch.tanh(formula(spec, layers[path], getattr(model, path), x))
        return formula(spec, layers["d"], model.d, x)


# -- the shared pairs --------------------------------------------------------------------------


def test_kept_layers_have_their_own_pair_and_the_others_share_one_per_shape():
    _, cm = _stack(keep=("b",))
    layers = dict(cm.store.items("default"))
    assert layers["a"].pair is layers["c"].pair
    assert layers["b"].pair is not layers["a"].pair and not layers["b"].pair.shared
    assert layers["d"].pair is not layers["a"].pair  # (6, 4): a shape group of its own
    assert layers["d"].pair.lora_B.shape == (4, 3)
    # a, c share one (6x6) pair, b has its own, d's group has one layer: 3 pairs
    assert cm.num_trainable() == 3 * (3 * 6 + 6 * 3) - (6 - 4) * 3
    assert "(shared by 2 layers)" in str(cm.inspect())


def test_a_fresh_adapter_is_the_base_and_b_starts_at_zero():
    torch.manual_seed(0)
    model = Stack()
    x = torch.randn(3, 6)
    before = model(x)
    cm = surgeon.compile(model, LoRADrop(rank=2, targets=TARGETS, keep=("a",)))
    assert torch.equal(cm(x), before)
    for _, layer in cm.store.items("default"):
        assert torch.count_nonzero(layer.pair.lora_B) == 0
        assert torch.count_nonzero(layer.pair.lora_A) == layer.pair.lora_A.numel()


def test_the_shared_pair_gets_one_gradient_summed_over_its_layers():
    model, cm = _stack(keep=("b",))
    x = torch.randn(5, 6)
    cm(x).square().sum().backward()
    layers = dict(cm.store.items("default"))
    shared = layers["a"].pair
    # the same network with a and c given separate copies of the pair: their gradients add up
    copies = {
        p: (
            shared.lora_A.detach().clone().requires_grad_(),
            shared.lora_B.detach().clone().requires_grad_(),
        )
        for p in ("a", "c")
    }
    s = _scale(cm.spec("default"))
    with cm.disabled():
        h = x
        for path in ("a", "b", "c"):
            base = getattr(model, path)
            a, b = copies.get(path, (layers[path].pair.lora_A, layers[path].pair.lora_B))
            h = torch.tanh(plain_output(base, h) + s * (h @ a.t()) @ b.t())
        pair_d = layers["d"].pair
        out = plain_output(model.d, h) + s * (h @ pair_d.lora_A.t()) @ pair_d.lora_B.t()
    out.square().sum().backward()
    for i, name in enumerate(("lora_A", "lora_B")):
        summed = copies["a"][i].grad + copies["c"][i].grad
        torch.testing.assert_close(getattr(shared, name).grad, summed, rtol=1e-5, atol=1e-5)
        assert copies["a"][i].grad.abs().sum() > 0 and copies["c"][i].grad.abs().sum() > 0


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_kept_and_shared_layers_follow_the_formula_and_merge_to_it(conv1d):
    model, cm = _stack(conv1d, keep=("b", "d"), alpha=5, rslora=True)
    x = torch.randn(4, 6)
    expected = _expected(model, cm, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weights = [getattr(model, p).weight.detach().clone() for p in TARGETS]
    cm.merge()
    assert "lora_A" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    after = [getattr(model, p).weight for p in TARGETS]
    torch.testing.assert_close(after, weights, rtol=0, atol=1e-6)


# -- importance ----------------------------------------------------------------------------------


def _trained_lora(seed: int = 3) -> tuple[Stack, surgeon.CompiledModel]:
    torch.manual_seed(0)
    model = Stack()
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, alpha=3, targets=TARGETS))
    randomize(cm, seed=seed, scale=0.5)  # as after a short training: B no longer zero
    return model, cm


def test_importance_is_the_summed_squared_norm_of_each_lora_output():
    model, cm = _trained_lora()
    generator = torch.Generator().manual_seed(7)
    batches = [torch.randn(4, 3, 6, generator=generator) for _ in range(3)]
    got = lora_output_importance(cm, batches, progress=False)
    # the paper's g_i = Σ_x ‖ΔW_i x_i‖², the inputs x_i taken from the LoRA model written out
    layers = dict(cm.store.items("default"))
    expected = dict.fromkeys(TARGETS, 0.0)
    with torch.no_grad(), cm.disabled():
        for x in batches:
            for path in TARGETS:
                lora = layers[path]
                delta_w = lora.scale * lora.lora_B @ lora.lora_A
                update = x @ delta_w.t()
                expected[path] += float((update**2).sum())
                x = plain_output(getattr(model, path), x) + update
                x = torch.tanh(x) if path != "d" else x
    assert list(got) == list(TARGETS)
    for path in TARGETS:
        assert got[path] == pytest.approx(expected[path], rel=1e-5)


def test_importance_takes_dict_and_tuple_batches_and_leaves_training_mode():
    _, cm = _trained_lora()
    x = torch.randn(2, 6)

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, labels=None):
            return self.inner(x)

    from_tensor = lora_output_importance(cm, [x], progress=False)
    from_tuple = lora_output_importance(cm, [(x, torch.zeros(2))], progress=False)
    assert from_tuple == from_tensor
    torch.manual_seed(0)
    keyword = surgeon.compile(Keyword(Stack()), surgeon.LoRA(rank=2, alpha=3, targets=TARGETS))
    randomize(keyword, seed=3, scale=0.5)
    keyword.train()
    from_dict = lora_output_importance(keyword, [{"x": x, "labels": x}], progress=False)
    assert keyword.training
    assert [from_dict[f"inner.{p}"] for p in TARGETS] == pytest.approx(list(from_tensor.values()))


def test_importance_errors_name_the_problem():
    _, cm = _trained_lora()
    with pytest.raises(surgeon.SpecError, match="no adapter 'other'"):
        lora_output_importance(cm, [torch.randn(2, 6)], adapter="other", progress=False)
    with pytest.raises(surgeon.SpecError, match="never ran on the batches"):
        lora_output_importance(cm, [], progress=False)
    cm.add_adapter("drop", LoRADrop(targets=TARGETS))
    with pytest.raises(surgeon.SpecError, match="adapter 'drop' is LoRADrop; LoRA-drop scores"):
        lora_output_importance(cm, [torch.randn(2, 6)], adapter="drop", progress=False)
    cm.set_active("drop")
    with pytest.raises(surgeon.SpecError, match="adapter 'default' is not active"):
        lora_output_importance(cm, [torch.randn(2, 6)], progress=False)


# -- the selection rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("importances", "threshold", "kept"),
    [
        ({"a": 5, "b": 3, "c": 2}, 0.9, ["a", "b", "c"]),
        ({"a": 5, "b": 3, "c": 2}, 0.8, ["a", "b"]),  # the head reaches T exactly
        ({"a": 5, "b": 3, "c": 2}, 0.81, ["a", "b", "c"]),
        ({"a": 5, "b": 3, "c": 2}, 0.5, ["a"]),
        ({"c": 2, "a": 5, "b": 3}, 0.6, ["a", "b"]),  # sorted by importance, not given order
        ({"a": 5, "b": 3, "c": 2}, 0.0, []),
        ({"a": 5, "b": 3, "c": 2}, 1.0, ["a", "b", "c"]),
        ({"a": 1, "b": 0, "c": 3}, 1.0, ["c", "a"]),  # a layer of no importance is not kept
        ({"a": 1, "b": 2, "c": 2, "d": 1}, 0.3, ["b"]),  # ties keep their given order
        ({"a": 1, "b": 2, "c": 2, "d": 1}, 0.5, ["b", "c"]),
        ({"a": 1, "b": 2, "c": 2, "d": 1}, 0.7, ["b", "c", "a"]),
        ({"a": 0.2, "b": 0.1, "c": 0.7}, 0.9, ["c", "a"]),  # 0.7 + 0.2 rounds below 0.9
        ({"only": 1e-30}, 0.9, ["only"]),
    ],
)
def test_the_papers_selection_rule(importances, threshold, kept):
    assert kept_layers(importances, threshold) == kept


@pytest.mark.parametrize(
    ("importances", "threshold", "match"),
    [
        ({"a": 1}, 1.5, r"threshold=1.5: expected a number >= 0 and <= 1"),
        ({"a": 1}, -0.1, r"threshold=-0.1"),
        ({"a": 1}, True, r"threshold=True"),
        ({"a": 1, "b": -1}, 0.9, r"importance of b is -1; expected a number >= 0"),
        ({"a": float("nan")}, 0.9, r"importance of a is nan"),
        ({"a": 0, "b": 0.0}, 0.9, r"every importance is zero .*train the LoRA"),
    ],
)
def test_bad_importances_or_thresholds_are_refused(importances, threshold, match):
    with pytest.raises(surgeon.SpecError, match=match):
        kept_layers(importances, threshold)


def test_the_spec_carries_the_trained_loras_fields_over():
    lora = surgeon.LoRA(rank=4, alpha=6, rslora=True, dropout=0.1, targets=("q", "v"), layers=1)
    spec = loradrop_spec({"x.q": 1.0, "x.v": 9.0}, 0.9, lora=lora)
    assert spec == LoRADrop(
        rank=4, alpha=6, rslora=True, dropout=0.1, targets=("q", "v"), layers=(1,), keep=("x.v",)
    )
    alone = loradrop_spec({"x.q": 1.0, "x.v": 9.0}, 0.95, rank=2)
    assert alone == LoRADrop(rank=2, targets=("x.q", "x.v"), keep=("x.v", "x.q"))
    with pytest.raises(surgeon.SpecError, match=r"LoRA.rank_pattern=\{'q': 2\} does not carry"):
        loradrop_spec({"x.q": 1.0}, lora=surgeon.LoRA(rank_pattern={"q": 2}, targets=("q",)))


def test_kept_layers_start_from_the_trained_lora_and_the_rest_from_a_fresh_pair():
    _, cm = _trained_lora()
    x = torch.randn(3, 6)
    importances = lora_output_importance(cm, [x], progress=False)
    spec = loradrop_spec(importances, 0.5, lora=cm.spec("default"))
    assert 0 < len(spec.keep) < len(TARGETS)
    cm.add_adapter("loradrop", spec)
    init_kept_from_lora(cm)
    lora, drop = dict(cm.store.items("default")), dict(cm.store.items("loradrop"))
    for path in TARGETS:
        if path in spec.keep:
            assert torch.equal(drop[path].pair.lora_A, lora[path].lora_A)
            assert torch.equal(drop[path].delta_weight(), lora[path].delta_weight())
        else:
            assert drop[path].pair.shared and torch.count_nonzero(drop[path].pair.lora_B) == 0
    cm.add_adapter("narrow", LoRADrop(rank=3, targets=TARGETS, keep=("a",)))
    with pytest.raises(surgeon.SpecError, match=r"a: LoRA rank 2 and scale 1\.5 vs LoRADrop's 3"):
        init_kept_from_lora(cm, loradrop="narrow")


@pytest.mark.slow
def test_the_two_stages_run_through_surgeon_train():
    """Stage 1 trains a LoRA a few steps and scores it; stage 2 trains the LoRA-drop adapter
    (kept layers from the trained LoRA, a fresh shared pair) in the same compiled model."""
    torch.manual_seed(0)
    cm = surgeon.compile(Stack(), surgeon.LoRA(rank=2, alpha=2, targets=TARGETS))
    generator = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, generator=generator), torch.randn(4, generator=generator))] * 8
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=4,
        max_steps=4,
        lr_scheduler="constant",
        progress=False,
        shuffle=False,
        distributed="none",
    )
    surgeon.train(cm, data, config, loss_fn=F.mse_loss)
    batches = [torch.stack([x for x, _ in data])]
    spec = loradrop_spec(
        lora_output_importance(cm, batches, progress=False), lora=cm.spec("default")
    )
    cm.add_adapter("loradrop", spec)
    init_kept_from_lora(cm)
    cm.set_active("loradrop")
    cm.delete_adapter("default")
    shared = next(layer.pair for _, layer in cm.store.items("loradrop") if layer.pair.shared)
    result = surgeon.train(cm, data, config, loss_fn=F.mse_loss)
    assert torch.count_nonzero(shared.lora_B) > 0  # the shared pair trains
    assert result.losses[-1] < result.losses[0]


# -- files ----------------------------------------------------------------------------------------


def test_files_hold_kept_factors_under_their_paths_and_shared_pairs_once(tmp_path):
    spec = LoRADrop(rank=3, alpha=6, targets=TARGETS, keep=("b",))
    model, cm = _stack(alpha=6, keep=("b",))
    x = torch.randn(4, 6)
    expected = cm(x)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_LORADROP"
    assert config["keep_modules"] == ["b"] and config["lora_alpha"] == 6
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert sorted(saved) == [
        "base_model.loradrop_A.6x4",
        "base_model.loradrop_A.6x6",
        "base_model.loradrop_B.6x4",
        "base_model.loradrop_B.6x6",
        "base_model.model.b.lora_A.weight",
        "base_model.model.b.lora_B.weight",
    ]
    torch.manual_seed(9)  # another draw: the loaded values come from the file
    loaded = surgeon.load(Stack(), tmp_path)
    with torch.no_grad():
        for name in TARGETS:  # the same base model
            getattr(loaded.model, name).load_state_dict(getattr(model, name).state_dict())
    assert loaded.spec("default") == spec
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "all"}, "bias='all'"),
        ({"keep_modules": "b"}, r"keep_modules='b': expected a list of module names"),
        ({"keep_modules": ["e"]}, r"LoRADrop.keep: 'e' matches no targeted module"),
        ({"r": 0}, r"LoRADrop.rank=0: expected an integer >= 1 \(adapter_config.json key 'r'\)"),
        ({"use_dora": True}, "use_dora=True"),
    ],
)
def test_configs_surgeon_cannot_honour_are_refused_naming_the_key(change, match, tmp_path):
    surgeon.compile(Stack(), LoRADrop(rank=4, targets=TARGETS)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(Stack(), tmp_path, change)


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"LoRADrop.rank=0: expected an integer >= 1"),
        ({"alpha": 0}, r"LoRADrop.alpha=0"),
        ({"keep": [1]}, r"LoRADrop.keep=\[1\]: expected a list of module names"),
        ({"dropout": 1.0}, r"LoRADrop.dropout=1.0: expected a number >= 0 and < 1"),
        ({"rslora": "yes"}, r"LoRADrop.rslora='yes'"),
        ({"threshold": 0.9}, r"LoRADrop has no field 'threshold'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LoRADrop(**fields)


def test_registered_under_its_name_with_its_own_peft_type():
    assert METHODS["loradrop"] is LoRADrop is surgeon.LoRADrop
    assert LoRADrop.peft_type == "SURGEON_LORADROP"
    spec = surgeon.MethodSpec.from_dict({"method": "loradrop", "keep": "a", "targets": ["a"]})
    assert spec == LoRADrop(keep=("a",), targets=("a",))


@pytest.mark.parametrize(
    ("layer", "name"), [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")]
)
def test_other_layers_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which LoRADrop cannot adapt"):
        surgeon.compile(One(layer), LoRADrop(targets=("layer",)))


def test_half_precision_bases_get_float32_pairs():
    torch.manual_seed(0)
    model = One(nn.Linear(16, 8)).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    cm = surgeon.compile(model, LoRADrop(rank=4, targets=("layer",)))
    pair = dict(cm.store.items("default"))["layer"].pair
    assert pair.lora_A.dtype == pair.lora_B.dtype == torch.float32
    randomize(cm)
    out = cm(x)
    assert out.dtype == torch.bfloat16
    expected = plain_output(model.layer, x).float() + _scale(cm.spec("default")) * F.linear(
        F.linear(x.float(), pair.lora_A), pair.lora_B
    )
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
