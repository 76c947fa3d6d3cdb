"""HiRA's card (its formula) and what is HiRA's own: merging with the weight read before other
adapters fold in and unmerging bit for bit, half-precision merges as PEFT's, initial draws as
PEFT's for every init and layer kind, PEFT's ``init_weights`` values, the eval-mode cache of the
effective weight, per-token embedding rows, dropout placement, gradients as PEFT's where the
conformance suite does not train (embeddings with a padding index, convolutions), PEFT's file
layout, refusals (grouped or non-zero-padded convolutions, 4-bit bases, PEFT's rank_pattern,
configs), golden graphs.
The conformance suite (tests/conformance) runs the formula, merging, files, PEFT parity,
gradients, devices and dtypes on every example."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    EMBEDDING,
    ZOO,
    One,
    count_calls,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon import quant
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.lora import LoRA
from surgeon.passes.structured.hira import HiRA, HiRALayer


def formula(spec, adapter, base, x):
    """HiRA (Huang et al., 2025): the layer with its weight ``W0`` replaced by
    ``W0 + W0 ⊙ (B A)``, ``B A`` taken per kernel position on convolutions; GPT-2's Conv1D and
    embeddings store the weight transposed (input features first)."""
    a, b = adapter.hira_A, adapter.hira_B
    product = torch.einsum("or,r...->o...", b.flatten(1), a)
    if not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        product = product.t()
    weight = base.weight
    return plain_output(base, x, weight + weight * product)


peft = pytest.importorskip("peft")


LAYERS = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (gpt2_conv1d, lambda: torch.randn(2, 3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "embedding": (lambda: nn.Embedding(11, 6, padding_idx=0), lambda: torch.randint(0, 11, (2, 4))),
}


def _single(kind: str, dtype: torch.dtype = torch.float32, **fields):
    """One layer of ``kind`` with a HiRA adapter moved off its init."""
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build()).to(dtype)
    x = make_x()
    x = x.to(dtype) if x.is_floating_point() else x
    cm = surgeon.compile(model, HiRA(rank=2, targets=("layer",), **fields))
    randomize(cm, scale=0.5)
    ((_, adapter),) = cm.store.items("default")
    return model, cm.eval(), adapter, x


def _modulated(layer: nn.Module, adapter: HiRALayer, w0: torch.Tensor) -> torch.Tensor:
    """``W0 + W0 ⊙ (B A)`` laid out as the layer's weight, written out."""
    product = torch.einsum("or,r...->o...", adapter.hira_B.flatten(1), adapter.hira_A)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        product = product.t()
    return w0 + w0 * product


# -- merging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_merge_writes_w0_plus_w0_times_ba_and_unmerge_restores_it_bit_for_bit(kind):
    model, cm, adapter, x = _single(kind)
    w0 = model.layer.weight.detach().clone()
    expected = cm(x)
    torch.testing.assert_close(expected, formula(None, adapter, model.layer, x))
    cm.merge()
    assert "hira" not in cm.graph.code()
    torch.testing.assert_close(model.layer.weight, _modulated(model.layer, adapter, w0))
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    assert torch.equal(model.layer.weight, w0)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "others",
    [("hira", "lora"), ("lora", "hira"), ("hira", "hira")],
    ids=lambda names: "-".join(names),
)
def test_merging_reads_w0_before_other_adapters_on_the_layer_fold_in(others):
    """The unmerged graph multiplies by the base weight as it is; the merge must too, whichever
    adapter of the layer folds in first."""
    specs = {"hira": HiRA(rank=2, targets=("layer",)), "lora": LoRA(rank=2, targets=("layer",))}
    torch.manual_seed(0)
    model = One(nn.Linear(6, 5))
    w0 = model.layer.weight.detach().clone()
    spec = surgeon.Spec({f"{name}{i}": specs[name] for i, name in enumerate(others)})
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    cm.set_active(list(spec.adapters))
    x = torch.randn(4, 6)
    expected = cm(x)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    if "lora" in others:  # LoRA unmerges by subtracting: up to rounding
        torch.testing.assert_close(model.layer.weight, w0, rtol=0, atol=1e-6)
    else:
        assert torch.equal(model.layer.weight, w0)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_outputs_and_merged_weights_are_peft_s_exactly(dtype, tmp_path):
    torch.manual_seed(0)
    model = One(nn.Linear(16, 12)).to(dtype)
    pm = peft_model(copy.deepcopy(model), peft.HiraConfig(r=3, target_modules=["layer"]))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(model, tmp_path).eval()
    ((_, adapter),) = cm.store.items("default")
    assert adapter.hira_A.dtype == torch.float32  # PEFT's default upcast of adapter weights
    x = torch.randn(4, 16).to(dtype)
    assert torch.equal(cm(x), pm(x))
    w0 = model.layer.weight.detach().clone()
    cm.merge()
    pm.merge_adapter()
    assert torch.equal(model.layer.weight, pm.base_model.model.layer.base_layer.weight)
    cm.unmerge()
    assert torch.equal(model.layer.weight, w0)


def test_merge_and_unload_gives_plain_layers_with_the_same_outputs():
    cm = surgeon.compile(EMBEDDING.model(), HiRA(rank=2, targets=("emb", "proj")))
    randomize(cm)
    x = EMBEDDING.example()
    expected = cm(**x)
    layers = [layer for _, layer in cm.store.items("default")]
    plain = cm.merge_and_unload()
    assert not any("forward" in vars(m) for m in plain.modules())
    assert all(layer._restore is None for layer in layers)  # no copy of the weight held on to
    torch.testing.assert_close(plain(**x), expected, rtol=1e-5, atol=1e-5)


# -- initialisation -------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["default", "gaussian", "random"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fresh_factors_are_peft_s_draws_from_the_same_seed(kind, init):
    """PEFT draws both factors with randn, then re-initialises them (A kaiming or, ``gaussian``
    on linear layers, normal with std 1/r; B zero; embeddings A zero and B normal; ``random``
    keeps the draws): the same global seed gives the same values, rounded through a half-precision
    base before the float32 upcast."""
    dtype = torch.bfloat16 if kind == "linear" else torch.float32
    torch.manual_seed(0)
    model = One(LAYERS[kind][0]()).to(dtype)
    init_weights = {"default": True, "gaussian": "gaussian", "random": False}[init]
    config = peft.HiraConfig(r=2, target_modules=["layer"], init_weights=init_weights)
    torch.manual_seed(3)
    pm = peft_model(copy.deepcopy(model), config, seed=None)
    torch.manual_seed(3)
    cm = surgeon.compile(model, HiRA(rank=2, targets=("layer",), init=init))
    ((_, adapter),) = cm.store.items("default")
    theirs = pm.base_model.model.layer
    prefix = "hira_embedding_" if kind == "embedding" else "hira_"
    assert adapter.hira_A.dtype == torch.float32
    assert torch.equal(adapter.hira_A, getattr(theirs, f"{prefix}A")["default"])
    assert torch.equal(adapter.hira_B, getattr(theirs, f"{prefix}B")["default"])
    if init != "random":
        assert torch.count_nonzero(adapter.hira_A if kind == "embedding" else adapter.hira_B) == 0


def test_a_randomly_initialised_peft_file_loads_with_peft_outputs_and_back(tmp_path):
    entry = ZOO["mlp"]
    config = peft.HiraConfig(r=3, target_modules=["body.0", "head"], init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)  # PEFT's own random draws, unperturbed
    pm.save_pretrained(tmp_path / "peft")
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    assert cm.spec("default").init == "random"
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert saved["init_weights"] is False
    back = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "init"),
    [(True, "default"), (False, "random"), (None, "random"), ("Gaussian", "gaussian")],
)
def test_peft_init_weights_values_read_as_peft_uses_them(value, init, tmp_path):
    """PEFT compares "gaussian" case-insensitively and draws at random for null (falsy)."""
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), HiRA(rank=2, targets=("head",))).save_adapters(tmp_path)
    cm = load_with_changed_config(entry.model(), tmp_path, {"init_weights": value})
    assert cm.spec("default").init == init


# -- the forward ------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Counts how often an effective weight ``W0 ⊙ B A`` is built."""
    return count_calls(monkeypatch, HiRALayer, "effective_weight_now")


@torch.no_grad()
def test_eval_mode_builds_the_effective_weight_once_until_a_source_changes(counted):
    model, cm, adapter, x = _single("linear")
    counted.clear()
    for _ in range(3):
        cm(x)
    assert len(counted) == 1
    adapter.hira_B.mul_(2)
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert len(counted) == 2
    model.layer.weight.mul_(0.5)  # W0 is a source too
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert len(counted) == 3
    cm.merge()
    assert adapter.effective_weight._kept is None  # merged, memory does not keep it
    cm.unmerge()
    cm(x)
    assert len(counted) == 4


def test_training_or_autograd_builds_the_effective_weight_every_forward(counted):
    _, cm, adapter, x = _single("conv2d")
    cm.train()
    counted.clear()
    cm(x), cm(x)
    assert len(counted) == 2
    cm.eval()  # eval mode with autograd on: gradients still reach A and B
    cm(x).sum().backward()
    assert len(counted) == 3 and adapter.hira_A.grad is not None


def test_embeddings_look_up_their_tokens_rows_without_building_the_table(counted):
    model, cm, adapter, x = _single("embedding")
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert not counted


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    model, cm, adapter, x = _single("linear", dropout=0.5)
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


def test_embeddings_apply_no_dropout_as_peft():
    _, cm, adapter, x = _single("embedding", dropout=0.5)
    assert adapter.dropout is None
    cm.train()
    torch.testing.assert_close(cm(x), cm(x))


def test_a_conv3d_kernel_starting_1x1_is_adapted_where_peft_fails():
    """PEFT's update for Conv3d kernels whose first two sizes are 1 squeezes the wrong dims
    and fails; surgeon computes ``B A`` per kernel position there as everywhere."""
    torch.manual_seed(0)
    model = One(nn.Conv3d(2, 3, (1, 1, 2)))
    x = torch.randn(1, 2, 3, 3, 4)
    pm = peft_model(copy.deepcopy(model), peft.HiraConfig(r=2, target_modules=["layer"]))
    with pytest.raises(RuntimeError, match="must match the size"):
        pm(x)
    cm = surgeon.compile(model, HiRA(rank=2, targets=("layer",))).eval()
    randomize(cm, scale=0.5)
    ((_, adapter),) = cm.store.items("default")
    torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))


# -- PEFT parity where the conformance suite does not train ------------------------------------


@pytest.mark.parametrize(
    ("entry", "targets"),
    [
        (EMBEDDING, ["emb", "proj"]),
        pytest.param(ZOO["cnn"], ["conv1", "conv2", "seq"], marks=pytest.mark.slow),
        pytest.param(ZOO["gpt2"], ["c_attn", "c_fc"], marks=pytest.mark.slow),
    ],
    ids=["embedding", "cnn", "gpt2"],
)
def test_a_train_step_gives_peft_gradients(entry, targets, tmp_path):
    """Embeddings: PEFT's lookup ignores the padding index, so padding tokens (id 0 in the
    inputs) reach A and B too."""
    pm = peft_model(entry.model(), peft.HiraConfig(r=3, target_modules=targets, hira_dropout=0.0))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    x = entry.example()
    for model in (cm, pm):
        model.train()
        for module in model.modules():  # the base model's own dropout (GPT-2's) off
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        logits(model(**x)).pow(2).mean().backward()
    theirs = {
        n.removeprefix("base_model.model.").replace(".default", "").replace("embedding_", ""): p
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    for path, layer in cm.store.items("default"):
        for name in ("hira_A", "hira_B"):
            torch.testing.assert_close(
                getattr(layer, name).grad, theirs[f"{path}.{name}"].grad, rtol=1e-4, atol=1e-6
            )


@pytest.mark.slow
def test_layers_and_exclusions_are_saved_so_peft_adapts_the_same_modules(tmp_path):
    entry = ZOO["llama"]
    spec = HiRA(rank=2, targets=("q_proj", "v_proj"), layers=1, exclude=("v_proj",))
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm)
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(entry.model(), tmp_path)
    adapted = [
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if isinstance(m, peft.tuners.hira.HiraLayer)
    ]
    assert adapted == cm.store.paths["default"] == ["model.layers.1.self_attn.q_proj"]
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)
    assert surgeon.load(entry.model(), tmp_path).spec("default") == spec


def test_saved_tensors_have_peft_keys_and_shapes(tmp_path):
    cm = surgeon.compile(EMBEDDING.model(), HiRA(rank=3, targets=("emb", "proj")))
    cm.save_adapters(tmp_path)
    saved = {k: tuple(v.shape) for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    assert saved == {
        "base_model.model.emb.hira_embedding_A": (3, 20),
        "base_model.model.emb.hira_embedding_B": (8, 3),
        "base_model.model.proj.hira_A": (3, 8),
        "base_model.model.proj.hira_B": (6, 3),
    }
    cm = surgeon.compile(ZOO["cnn"].model(), HiRA(rank=2, targets=("conv1", "seq")))
    cm.save_adapters(tmp_path)
    saved = {k: tuple(v.shape) for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    assert saved["base_model.model.conv1.hira_A"] == (2, 3, 3, 3)
    assert saved["base_model.model.conv1.hira_B"] == (8, 2, 1, 1)
    assert saved["base_model.model.seq.hira_A"] == (2, 8, 3)


# -- refusals -----------------------------------------------------------------------------------------


def test_grouped_convolutions_are_refused_as_peft_does():
    with pytest.raises(surgeon.SpecError, match=r"layer \(Conv2d\), which HiRA cannot adapt"):
        surgeon.compile(One(nn.Conv2d(4, 4, 3, groups=2)), HiRA(targets=("layer",)))


def test_convolutions_padding_other_than_with_zeros_are_refused():
    layer = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    with pytest.raises(surgeon.SpecError, match=r"HiRA on layer: .*padding_mode='circular'"):
        surgeon.compile(One(layer), HiRA(targets=("layer",)))


def test_bases_stored_in_4_bits_are_refused():
    model = ZOO["mlp"].model()
    quant.quantize_model(model, surgeon.NF4(compute_dtype="float32"), layers=("head",))
    with pytest.raises(surgeon.SpecError, match=r"HiRA cannot adapt layers stored in 4 bits"):
        surgeon.compile(model, HiRA(rank=2, targets=("head",)))


def test_peft_applies_rank_pattern_only_to_a_second_adapter_on_a_layer_so_it_is_refused():
    """The day PEFT's HiRA gives the first adapter its pattern's rank too, this test says so and
    surgeon can honour rank_pattern as LoRA does."""
    config = peft.HiraConfig(r=2, target_modules=["head"], rank_pattern={"head": 3})
    pm = peft_model(ZOO["mlp"].model(), config, seed=None)
    pm.add_adapter("second", config)
    factors = pm.base_model.model.head.hira_A
    assert factors["default"].shape[0] == 2 and factors["second"].shape[0] == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"init_weights": "pissa"}, r"init_weights='pissa' is not supported"),
        ({"init_weights": 3}, r"init_weights=3: expected true, false or a string"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
        ({"rank_pattern": {"head": 3}}, r"rank_pattern=\{'head': 3\} is not supported"),
        ({"r": 2.5}, r"r=2.5: expected an integer"),
        ({"use_dora": True}, "use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), HiRA(rank=2, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"HiRA.rank=0: expected an integer >= 1"),
        ({"dropout": 1.0}, r"HiRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"init": "pissa"}, r"HiRA.init='pissa': expected one of 'default', 'gaussian'"),
        ({"targets": ()}, r"HiRA.targets=\[\]: expected at least one target"),
        ({"alpha": 4}, r"HiRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        HiRA(**fields)


def test_config_written_has_peft_s_keys_and_defaults():
    config = HiRA(targets=("q_proj",)).to_peft_config(["model.layers.0.self_attn.q_proj"])
    assert config == {
        "peft_type": "HIRA",
        "r": 32,
        "target_modules": ["q_proj"],
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "hira_dropout": 0.0,
        "init_weights": True,
        "rank_pattern": {},
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    defaults = peft.HiraConfig(target_modules=["q_proj"]).to_dict()
    assert all(defaults[key] == value for key, value in config.items() if key != "target_modules")


# -- graphs ---------------------------------------------------------------------------------------


GOLDEN_LINEAR = """\
def forward(self, x):
    layer = self.layer(x)
    adapters_default_layer_dropout = self.adapters.default.layer.dropout(x);  x = None
    adapters_default_layer_effective_weight = self.adapters.default.layer.effective_weight()
    linear = torch._C._nn.linear(adapters_default_layer_dropout, adapters_default_layer_effective_weight);  adapters_default_layer_dropout = adapters_default_layer_effective_weight = None
    add = torch.add(layer, linear);  layer = linear = None
    return add"""

GOLDEN_EMBEDDING_BF16 = """\
def forward(self, x):
    layer = self.layer(x)
    adapters_default_layer_base_weight = self.adapters.default.layer.base_weight
    embedding = torch.nn.functional.embedding(x, adapters_default_layer_base_weight);  adapters_default_layer_base_weight = None
    adapters_default_layer_hira_a = self.adapters.default.layer.hira_A
    t = adapters_default_layer_hira_a.t();  adapters_default_layer_hira_a = None
    embedding_1 = torch.nn.functional.embedding(x, t);  x = t = None
    adapters_default_layer_hira_b = self.adapters.default.layer.hira_B
    linear = torch._C._nn.linear(embedding_1, adapters_default_layer_hira_b);  embedding_1 = adapters_default_layer_hira_b = None
    mul = torch.mul(embedding, linear);  embedding = linear = None
    add = torch.add(layer, mul);  layer = mul = None
    to = add.to(torch.bfloat16);  add = None
    return to"""


def test_golden_graph_of_a_linear_with_dropout():
    _, cm, _, _ = _single("linear", dropout=0.1)
    assert graph_code(cm) == GOLDEN_LINEAR


def test_golden_graph_of_a_half_precision_embedding():
    _, cm, _, _ = _single("embedding", torch.bfloat16)
    assert graph_code(cm) == GOLDEN_EMBEDDING_BF16
