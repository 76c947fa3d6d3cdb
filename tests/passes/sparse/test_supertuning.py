"""Super-Tuning beyond the conformance suite: its formula, the entries chosen as PEFT chooses
them (largest and smallest), files without the chosen indices both ways (float32 and bfloat16,
where ties are many), the config as PEFT writes it (alpha resolved), the low-rank part's dropout,
several adapters composing one weight, exact half-precision parity with PEFT merged and
unmerged, errors, golden rewritten graphs."""

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
from surgeon.passes.sparse.supertuning import SuperTuning


def formula(spec, adapter, base, x):
    """Super-Tuning (arXiv:2607.09287): ``(W + S) x + b + (alpha / r) · B A x``, ``S`` the trained
    values at the chosen entries of W, the low-rank part only with a rank."""
    delta = torch.zeros(base.weight.numel())
    delta[adapter.supertuning_indices.long()] = adapter.supertuning_values
    out = plain_output(base, x, base.weight + delta.view_as(base.weight))
    if spec.rank is None:
        return out
    alpha = 2 * spec.rank if spec.alpha is None else spec.alpha
    return out + alpha / spec.rank * x @ adapter.lora_A.t() @ adapter.lora_B.t()


peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")


def _layers(cm, name: str = "default") -> dict:
    return dict(cm.store.items(name))


def _peft_layer(pm, path: str):
    return pm.base_model.model.get_submodule(path)


# -- the chosen entries ----------------------------------------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
def test_a_fresh_adapter_chooses_peft_entries_with_zero_values(largest):
    entry = ZOO["llama"]
    config = peft.SupertuningConfig(
        target_modules=list(TARGETS), sparsity=0.9, select_top=largest, r=2
    )
    pm = peft_model(entry.model(), config, seed=None)
    spec = SuperTuning(sparsity=0.9, largest=largest, rank=2, targets=TARGETS)
    cm = surgeon.compile(entry.model(), spec)
    for path, layer in _layers(cm).items():
        theirs = _peft_layer(pm, path)
        weight = layer.base.weight
        assert layer.supertuning_indices.dtype == torch.int32
        assert torch.equal(layer.supertuning_indices, theirs.supertuning_indices["default"])
        assert layer.supertuning_indices.numel() == int(weight.numel() * (1 - 0.9))
        chosen = weight.abs().flatten()[layer.supertuning_indices.long()]
        others = weight.abs().flatten().clone()
        others[layer.supertuning_indices.long()] = float("nan")
        kept = others[~others.isnan()]
        assert (chosen.min() >= kept.max()) if largest else (chosen.max() <= kept.min())
        assert not layer.supertuning_values.any() and not layer.lora_B.any()
        assert layer.lora_A.shape == theirs.supertuning_lora_A["default"].weight.shape


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float32, marks=pytest.mark.slow), torch.bfloat16],  # mlp's in the suite
    ids=["fp32", "bf16"],
)
def test_files_without_indices_load_both_ways_with_the_same_outputs(dtype, tmp_path):
    """save_precomputed_indices=false: the file holds values (and the low-rank part) only; a
    load chooses the entries again from the base weight, as PEFT's does (in bfloat16 |W| has
    many ties: they break alike)."""
    entry = ZOO["llama"]
    config = peft.SupertuningConfig(
        target_modules=list(TARGETS),
        sparsity=0.8,
        select_top=False,
        r=2,
        lora_alpha=3,
        save_precomputed_indices=False,
    )
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path / "peft")
    assert not any("indices" in k for k in load_file(tmp_path / "peft" / WEIGHTS_NAME))
    x = entry.example()
    cm = surgeon.load(entry.model().to(dtype), tmp_path / "peft")
    assert cm.spec("default").save_indices is False
    exact = {"rtol": 0, "atol": 0} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), **exact)
    cm.save_adapters(tmp_path / "ours")
    assert not any("indices" in k for k in load_file(tmp_path / "ours" / WEIGHTS_NAME))
    back = peft_loaded(entry.model().to(dtype), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), **exact)


def test_saved_indices_are_used_rather_than_chosen_again(tmp_path):
    from safetensors.torch import save_file

    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), SuperTuning(sparsity=0.5, targets=("head",)))
    add_noise(cm.store.parameters(), 2, 0.3)
    cm.save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.head.supertuning_indices"
    tensors[key] = tensors[key].flip(0)  # other positions than the weight's magnitudes give
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    loaded = surgeon.load(entry.model(), tmp_path)
    assert torch.equal(_layers(loaded)["head"].supertuning_indices, tensors[key])
    torch.testing.assert_close(loaded(**x), peft_loaded(entry.model(), tmp_path)(**x))


# -- the config --------------------------------------------------------------------------------------


def test_the_config_is_written_as_peft_writes_it(tmp_path):
    """alpha left out is PEFT's 2 · r, written resolved; every key PEFT writes, no other."""
    entry = ZOO["mlp"]
    spec = SuperTuning(sparsity=0.9, rank=3, targets=("head",))
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path / "ours")
    config = peft.SupertuningConfig(sparsity=0.9, r=3, target_modules=["head"])
    peft_model(entry.model(), config, seed=None).save_pretrained(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("ours", "peft"))
    assert ours["lora_alpha"] == theirs["lora_alpha"] == 6
    bookkeeping = {"peft_version", "auto_mapping"}
    assert {k: v for k, v in ours.items() if k not in bookkeeping} == {
        k: v for k, v in theirs.items() if k not in bookkeeping
    }
    assert surgeon.load(entry.model(), tmp_path / "peft").spec("default").alpha == 6


def test_a_peft_dropout_without_rank_is_ignored_as_peft_ignores_it(tmp_path):
    entry = ZOO["mlp"]
    config = peft.SupertuningConfig(sparsity=0.5, target_modules=["head"], lora_dropout=0.3)
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").dropout == 0.0
    x = entry.example()
    outputs = []
    for model in (cm, pm):  # training: the MLP's own dropout draws alike, no other
        model.train()
        torch.manual_seed(0)
        outputs.append(model(**x))
    torch.testing.assert_close(*outputs)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"target_modules": None}, "target_modules is missing"),
        (
            {"sparsity": 1.0},
            r"SuperTuning.sparsity=1.0: expected a number >= 0 and < 1.*'sparsity'",
        ),
        ({"r": None, "lora_alpha": 4}, r"SuperTuning.alpha=4 applies to the low-rank part"),
        ({"use_dora": True}, "use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    spec = SuperTuning(sparsity=0.5, rank=2, targets=("head",))
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- the low-rank part, the graph -----------------------------------------------------------------


def test_the_low_rank_dropout_is_live_in_train_mode_and_off_in_eval():
    spec = SuperTuning(sparsity=0.5, rank=4, dropout=0.5, targets=("head",))
    cm = surgeon.compile(ZOO["mlp"].model(), spec)
    add_noise(cm.store.parameters(), 2, 0.3)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


GOLDEN_TWO = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    adapters_a_head_adapted_weight = self.adapters.a.head.adapted_weight()
    adapters_a_head_base_bias = self.adapters.a.head.base_bias
    adapters_b_head_supertuning_indices = self.adapters.b.head.supertuning_indices
    adapters_b_head_supertuning_values = self.adapters.b.head.supertuning_values
    scatter_added = surgeon_passes_sparse_supertuning_scatter_added(adapters_a_head_adapted_weight, adapters_b_head_supertuning_indices, adapters_b_head_supertuning_values);  adapters_a_head_adapted_weight = adapters_b_head_supertuning_indices = adapters_b_head_supertuning_values = None
    linear = torch._C._nn.linear(relu, scatter_added, adapters_a_head_base_bias);  scatter_added = adapters_a_head_base_bias = None
    adapters_a_head_dropout = self.adapters.a.head.dropout(relu)
    adapters_a_head_lora_a = self.adapters.a.head.lora_A
    linear_1 = torch._C._nn.linear(adapters_a_head_dropout, adapters_a_head_lora_a);  adapters_a_head_dropout = adapters_a_head_lora_a = None
    adapters_a_head_lora_b = self.adapters.a.head.lora_B
    linear_2 = torch._C._nn.linear(linear_1, adapters_a_head_lora_b);  linear_1 = adapters_a_head_lora_b = None
    mul = torch.mul(linear_2, 2.0);  linear_2 = None
    add = torch.add(linear, mul);  linear = mul = None
    adapters_b_head_lora_a = self.adapters.b.head.lora_A
    linear_3 = torch._C._nn.linear(relu, adapters_b_head_lora_a);  relu = adapters_b_head_lora_a = None
    adapters_b_head_lora_b = self.adapters.b.head.lora_B
    linear_4 = torch._C._nn.linear(linear_3, adapters_b_head_lora_b);  linear_3 = adapters_b_head_lora_b = None
    mul_1 = torch.mul(linear_4, 1.0);  linear_4 = None
    add_1 = torch.add(add, mul_1);  add = mul_1 = None
    return add_1"""


def test_several_adapters_add_their_entries_to_one_weight_and_their_low_rank_parts_after():
    """PEFT's forward: one matmul with every adapter's entries in the weight, then each low-rank
    part (golden graph); the first adapter's low-rank add stands between, the second finds the
    weight through it. Merging and unmerging keep the outputs."""
    entry = ZOO["mlp"]
    a = SuperTuning(sparsity=0.5, rank=2, dropout=0.1, targets=("head",))
    b = SuperTuning(sparsity=0.7, largest=False, rank=1, alpha=1, targets=("head",))
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": a, "b": b}))
    add_noise(cm.store.parameters(), 2, 0.3)
    cm.set_active(["a", "b"])
    cm.eval()
    assert graph_code(cm) == GOLDEN_TWO
    x = entry.example()["x"]
    head = cm.model.head
    with torch.no_grad(), cm.disabled():
        h = torch.relu(cm.model.body(x))
    expected = head(h)
    for spec, (_, layer) in ((a, *cm.store.items("a")), (b, *cm.store.items("b"))):
        expected = expected + formula(spec, layer, head, h) - head(h)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


GOLDEN_LEAF_BF16 = """\
def forward(self, input):
    input_1 = input
    adapters_default_adapted_weight = self.adapters.default.adapted_weight()
    linear = torch._C._nn.linear(input_1, adapters_default_adapted_weight, None);  adapters_default_adapted_weight = None
    to = input_1.to(torch.float32);  input_1 = None
    adapters_default_lora_a = self.adapters.default.lora_A
    linear_1 = torch._C._nn.linear(to, adapters_default_lora_a);  to = adapters_default_lora_a = None
    adapters_default_lora_b = self.adapters.default.lora_B
    linear_2 = torch._C._nn.linear(linear_1, adapters_default_lora_b);  linear_1 = adapters_default_lora_b = None
    mul = torch.mul(linear_2, 1.5);  linear_2 = None
    to_1 = mul.to(torch.bfloat16);  mul = None
    add = torch.add(linear, to_1);  linear = to_1 = None
    return add"""


def test_golden_graph_of_a_bfloat16_leaf():
    """The layer runs with the adapted weight; the low-rank part in float32, scaled after B and
    cast back before the add, as PEFT orders it."""
    spec = SuperTuning(sparsity=0.9, rank=2, alpha=3)
    cm = surgeon.compile(ZOO["llama"].model().to(torch.bfloat16), spec)
    assert graph_code(cm, "model.layers.0.self_attn.q_proj") == GOLDEN_LEAF_BF16


# -- PEFT parity in half precision -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly_unmerged_and_merged(dtype, tmp_path):
    entry = ZOO["llama"]
    config = peft.SupertuningConfig(target_modules=list(TARGETS), sparsity=0.9, r=2)
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path).eval()
    for layer in _layers(cm).values():
        assert {p.dtype for p in layer.parameters()} == {torch.float32}
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)
    cm.merge()
    pm.merge_adapter()
    for path, layer in _layers(cm).items():
        assert torch.equal(layer.base.weight, _peft_layer(pm, path).base_layer.weight), path
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=0, atol=0)
    cm.unmerge()
    pm.unmerge_adapter()
    for path, layer in _layers(cm).items():
        assert torch.equal(layer.base.weight, _peft_layer(pm, path).base_layer.weight), path


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sparsity": 1.0}, r"SuperTuning.sparsity=1.0: expected a number >= 0 and < 1"),
        ({"sparsity": -0.1}, r"SuperTuning.sparsity=-0.1"),
        ({"rank": 0}, r"SuperTuning.rank=0: expected an integer >= 1"),
        ({"rank": 2, "alpha": 0}, r"SuperTuning.alpha=0: expected a number > 0"),
        ({"alpha": 4}, r"SuperTuning.alpha=4 applies to the low-rank part, which rank=None"),
        ({"dropout": 0.1}, r"SuperTuning.dropout=0.1 applies to the low-rank part"),
        ({"rank": 2, "dropout": 1.0}, r"SuperTuning.dropout=1.0: expected a number >= 0"),
        ({"largest": "yes"}, r"SuperTuning.largest='yes': expected true or false"),
        ({"save_indices": 1}, r"SuperTuning.save_indices=1: expected true or false"),
        ({"select_top": True}, r"SuperTuning has no field 'select_top'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        SuperTuning(**fields)


def test_a_sparsity_that_leaves_no_entry_is_refused():
    with pytest.raises(surgeon.SpecError, match=r"SuperTuning.sparsity=0.99 on layer: leaves none"):
        surgeon.compile(One(nn.Linear(5, 6)), SuperTuning(targets=("layer",)))


@pytest.mark.parametrize(
    ("layer", "name"),
    [(gpt2_conv1d(), "Conv1D"), (nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(
        surgeon.SpecError, match=rf"layer \({name}\), which SuperTuning cannot adapt"
    ):
        surgeon.compile(One(layer), SuperTuning(sparsity=0.5, targets=("layer",)))
