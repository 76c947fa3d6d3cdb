"""MiSS beyond the conformance suite: the formula with shards that the examples keep small (bat's
wide blocks, mini's several columns), merge and exact unmerge of each form, PEFT parity of
those forms both ways (half precision and merged weights included), bat adapters stacked as
PEFT composes them and refused after another method, dropout drawn as PEFT draws it, the random
init drawn as PEFT draws it, shard rules refused before the model changes, saved shapes, PEFT
keys, errors, the rewritten graph."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.structured.miss import MiSS


def formula(spec, adapter, base, x):
    """MiSS (Kang, 2024): ``W' = W + D``, D repeating the shard S over the weight,
    ``D[o, c] = S[c mod r, o]`` (``mini``: ``S[c mod r, o mod mini_r]``); ``bat``: every r x r
    block ``W_bc + W_bc B_b + B_b``."""
    weight = base.weight
    n_out, n_in = weight.shape
    block = adapter.miss_block
    if spec.init == "bat":
        r = block.shape[-1]
        adapted = weight.clone()
        for b in range(n_out // r):
            for c in range(n_in // r):
                rows, cols = slice(b * r, (b + 1) * r), slice(c * r, (c + 1) * r)
                adapted[rows, cols] = weight[rows, cols] @ (torch.eye(r) + block[b]) + block[b]
        return plain_output(base, x, adapted)
    rank, width = block.shape
    shard = block[:, torch.arange(n_out) % width]  # r x out
    update = shard.t()[:, torch.arange(n_in) % rank]
    return plain_output(base, x, weight + update)


peft = pytest.importorskip("peft")

TARGETS = ("body.0", "body.3")
"""The MLP's layers 12 -> 24 and 24 -> 24 (its head, 24 -> 5, fits rank-1 bat blocks only)."""


def _perturbed(model: nn.Module, spec: MiSS) -> surgeon.CompiledModel:
    cm = surgeon.compile(model, spec).eval()
    add_noise(cm.store.parameters(), 2, 0.2)
    return cm


# -- the math --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        (MiSS(rank=4, init="bat", targets=("layer",)), (8, 12)),
        (MiSS(rank=3, init="mini", mini_rank=4, targets=("layer",)), (7, 12)),
        (MiSS(rank=3, init="random", targets=("layer",)), (7, 5)),
    ],
    ids=["bat-4x4-blocks", "mini-4-columns-padded", "random-padded"],
)
def test_wide_shards_are_the_formula_and_merge_and_unmerge_exactly(spec, sizes):
    torch.manual_seed(0)
    layer = nn.Linear(*sizes)
    weight = layer.weight.detach().clone()
    cm = _perturbed(One(layer), spec)
    ((_, adapter),) = cm.store.items("default")
    x = torch.randn(3, sizes[0])
    expected = formula(spec, adapter, layer, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        MiSS(rank=4, init="bat", targets=TARGETS),
        MiSS(rank=4, init="mini", mini_rank=8, targets=TARGETS),
        pytest.param(MiSS(rank=5, dropout=0.1, targets=TARGETS), marks=pytest.mark.slow),
    ],
    ids=["bat", "mini", "default-padded"],
)
def test_files_load_both_ways_with_peft_outputs(spec, tmp_path):
    entry = ZOO["mlp"]
    x = entry.example()
    cm = _perturbed(entry.model(), spec)
    cm.save_adapters(tmp_path / "ours")
    pm = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(pm(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)

    config = peft.get_peft_config(spec.to_peft_config(cm.store.paths["default"]))
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path / "theirs")
    back = surgeon.load(entry.model(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["default", "bat"])
def test_bfloat16_matches_peft_exactly_merged_weights_too(init, tmp_path):
    entry = ZOO["mlp"]
    spec = MiSS(rank=4, init=init, targets=TARGETS)
    config = peft.get_peft_config(spec.to_peft_config(()))
    pm = peft_model(entry.model().to(torch.bfloat16), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(torch.bfloat16), tmp_path).eval()
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.miss_block.dtype == torch.float32  # PEFT's upcast of adapter weights
    x = {"x": entry.example()["x"].to(torch.bfloat16)}
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=0, atol=0)
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        theirs = pm.get_base_model().get_submodule(path).base_layer.weight
        assert torch.equal(cm.model.get_submodule(path).weight, theirs), path


def test_stacked_bat_adapters_compose_as_peft_and_merge_in_order(tmp_path):
    entry = ZOO["mlp"]
    spec = MiSS(rank=4, init="bat", targets=("body.3",))
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec})).eval()
    add_noise(cm.store.parameters(), 3, 0.2)
    cm.set_active(["a", "b"])
    x = entry.example()
    both = logits(cm(**x))
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(both, logits(pm(**x)), rtol=1e-5, atol=1e-5)
    # the order matters: b adapts the weight a adapted
    cm.set_active(["b", "a"])
    assert not torch.allclose(logits(cm(**x)), both, atol=1e-4)
    cm.set_active(["a", "b"])
    weight = cm.model.body[3].weight.detach().clone()
    cm.merge()
    torch.testing.assert_close(logits(cm(**x)), both, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(cm.model.body[3].weight, weight)


def test_a_bat_adapter_after_another_method_on_the_layer_is_refused():
    torch.manual_seed(0)
    bat = MiSS(rank=2, init="bat", targets=("layer",))
    cm = surgeon.compile(One(nn.Linear(4, 6)), bat, name="bat")
    cm.add_adapter("lora", surgeon.LoRA(rank=2, targets=("layer",)))
    cm.add_adapter("shard", MiSS(rank=2, targets=("layer",)))
    add_noise(cm.store.parameters(), 3, 0.2)
    for before in ("lora", "shard"):
        with pytest.raises(surgeon.SpecError, match=rf"follow only other bat adapters.*{before!r}"):
            cm.set_active([before, "bat"])
    cm.set_active(["bat", "lora", "shard"])  # after it, others add to its output
    x = torch.randn(3, 4)
    expected = cm(x)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_draws_as_peft_in_training_and_is_off_in_eval(tmp_path):
    """PEFT pads the input to whole shards before its dropout: the same draws need the same
    padded shape (the MLP's own dropout draws too, in the same order on both sides)."""
    entry = ZOO["mlp"]
    spec = MiSS(rank=5, dropout=0.5, targets=TARGETS)
    cm = _perturbed(entry.model(), spec)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path)
    x = entry.example()
    evaluated = logits(cm(**x))
    cm.train()
    pm.train()
    torch.manual_seed(7)
    ours = logits(cm(**x))
    torch.manual_seed(7)
    torch.testing.assert_close(ours, logits(pm(**x)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, evaluated, atol=1e-3)


def test_random_init_draws_as_peft(tmp_path):
    entry = ZOO["mlp"]
    spec = MiSS(rank=4, init="random", targets=TARGETS)
    torch.manual_seed(11)
    cm = surgeon.compile(entry.model(), spec)
    torch.manual_seed(11)
    config = peft.get_peft_config(spec.to_peft_config(cm.store.paths["default"]))
    pm = peft_model(entry.model(), config, seed=None)
    theirs = {n: p for n, p in pm.named_parameters() if "miss_block" in n}
    for path, layer in cm.store.items("default"):
        assert torch.equal(layer.miss_block, theirs[f"base_model.model.{path}.miss_block.default"])
    pm.save_pretrained(tmp_path)
    back = surgeon.load(entry.model(), tmp_path)
    assert back.spec("default").init == "random"
    x = entry.example()
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


# -- shards that do not fit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (MiSS(rank=13, targets=TARGETS), r"MiSS.rank=13: body.0 has 12 input features"),
        (
            MiSS(rank=8, init="bat", targets=TARGETS),
            r"MiSS.rank=8: init='bat' cuts body.0's weight \(24 x 12\) into rank x rank blocks",
        ),
        (
            MiSS(rank=2, init="mini", mini_rank=5, targets=TARGETS),
            r"MiSS.mini_rank=5: body.0 has 24 output features, not a multiple of it",
        ),
    ],
    ids=["rank-above-inputs", "bat-blocks", "mini-columns"],
)
def test_shards_that_do_not_fit_are_refused_before_the_model_changes(spec, match):
    model = ZOO["mlp"].model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(model, spec)
    assert not any("forward" in vars(m) for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    config = peft.get_peft_config(spec.to_peft_config(()))
    with pytest.raises(ValueError):  # PEFT refuses the same shards
        peft_model(ZOO["mlp"].model(), config, seed=None)


# -- PEFT's format -----------------------------------------------------------------------------------


def test_saved_blocks_have_peft_keys_and_shapes(tmp_path):
    model = ZOO["mlp"].model()
    specs = {  # bat first: the others may follow it on a layer
        "bat": MiSS(rank=4, init="bat", targets=("body.3",)),
        "plain": MiSS(rank=4, targets=("body.3",)),
        "mini": MiSS(rank=4, init="mini", mini_rank=8, targets=("body.3",)),
    }
    cm = surgeon.compile(model, surgeon.Spec(specs))
    cm.save_adapters(tmp_path)
    key = "base_model.model.body.3.miss_block"
    shapes = {"plain": (4, 24), "mini": (4, 8), "bat": (6, 4, 4)}
    inits = {"plain": True, "mini": "mini", "bat": "bat"}
    for name, shape in shapes.items():
        assert load_file(tmp_path / name / WEIGHTS_NAME)[key].shape == shape
        config = json.loads((tmp_path / name / CONFIG_NAME).read_text())
        assert config["peft_type"] == "MISS" and config["init_weights"] == inits[name]


def test_bias_as_peft_spells_it_trains_the_adapted_layers_biases(tmp_path):
    entry = ZOO["mlp"]
    spec = MiSS(rank=4, targets=("head",), bias="miss_only")
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    cm = load_with_changed_config(entry.model(), tmp_path, {"bias": "MiSS_only"})
    assert cm.spec("default").bias == "miss_only"
    trainable = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    assert trainable == {"head.bias"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"init_weights": "pissa"}, r"init_weights='pissa' is not supported"),
        ({"init_weights": 1}, r"init_weights=1: expected true, false or a string"),
        ({"r": 0}, r"MiSS.rank=0.*adapter_config.json key 'r'"),
        ({"mini_r": 1.5}, r"mini_r=1.5: expected an integer"),
        ({"miss_dropout": 1.0}, r"MiSS.dropout=1.0.*key 'miss_dropout'"),
        ({"bias": "lora"}, r"bias='lora' is not supported"),
        ({"target_modules": None}, r"target_modules is missing"),
        ({"use_dora": True}, r"use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), MiSS(rank=4, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"MiSS.rank=0: expected an integer >= 1"),
        ({"mini_rank": 0}, r"MiSS.mini_rank=0: expected an integer >= 1"),
        ({"init": True}, r"MiSS.init=True: expected one of 'default', 'random', 'bat', 'mini'"),
        ({"dropout": 1.0}, r"MiSS.dropout=1.0: expected a number >= 0 and < 1"),
        (
            {"bias": "lora_only"},
            r"MiSS.bias='lora_only': expected one of 'none', 'all', 'miss_only'",
        ),
        ({"alpha": 8}, r"MiSS has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        MiSS(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(gpt2_conv1d(), "Conv1D"), (nn.Conv2d(4, 4, 1), "Conv2d"), (nn.Embedding(5, 4), "Embedding")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which MiSS cannot adapt"):
        surgeon.compile(One(layer), MiSS(rank=2, targets=("layer",)))


@pytest.mark.parametrize("init", ["bat", "mini"])
def test_bat_and_mini_compile_and_run_on_the_meta_device(init):
    with torch.device("meta"):
        model = One(nn.Linear(8, 12))
    cm = surgeon.compile(model, MiSS(rank=4, init=init, mini_rank=6, targets=("layer",)))
    out = cm(torch.randn(2, 8, device="meta"))
    assert out.is_meta and out.shape == (2, 12)


# -- graphs -----------------------------------------------------------------------------------------


GOLDEN = """\
def forward(self, x):
    layer = self.layer(x)
    adapters_default_layer_miss_block = self.adapters.default.layer.miss_block
    pad = torch.nn.functional.pad(x, (0, 1));  x = None
    to = pad.to(torch.float32);  pad = None
    adapters_default_layer_dropout = self.adapters.default.layer.dropout(to);  to = None
    unflatten = adapters_default_layer_dropout.unflatten(-1, (-1, 2));  adapters_default_layer_dropout = None
    sum_1 = unflatten.sum(-2);  unflatten = None
    matmul = torch.matmul(sum_1, adapters_default_layer_miss_block);  sum_1 = adapters_default_layer_miss_block = None
    add = torch.add(layer, matmul);  layer = matmul = None
    to_1 = add.to(torch.bfloat16);  add = None
    return to_1"""


def test_golden_graph_pads_casts_drops_folds_and_casts_back():
    layer = nn.Linear(5, 6).to(torch.bfloat16)
    cm = surgeon.compile(One(layer), MiSS(rank=2, dropout=0.1, targets=("layer",)))
    assert graph_code(cm) == GOLDEN
