"""LoHa against its formula per layer kind and forward path, PEFT both ways on the zoo, init,
dropouts, dtypes, the meta device; golden rewritten graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, One, logits, plain_output, randomize

import surgeon
from surgeon.passes.lycoris.loha import LoHa


def formula(spec, adapter, base, x):
    """LoHa (FedPara): ``W + (W1a W1b ⊙ W2a W2b) · alpha / r``, each side a CP-factored kernel
    with ``effective_conv``."""
    if adapter.cp:
        w1 = _rebuild(adapter.hada_t1, adapter.hada_w1_a, adapter.hada_w1_b)
        w2 = _rebuild(adapter.hada_t2, adapter.hada_w2_a, adapter.hada_w2_b)
    else:
        w1 = adapter.hada_w1_a @ adapter.hada_w1_b
        w2 = adapter.hada_w2_a @ adapter.hada_w2_b
    scale = spec.alpha_pattern.get("layer", spec.alpha) / adapter.hada_w1_b.shape[0]
    return plain_output(base, x, base.weight + (w1 * w2 * scale).reshape(base.weight.shape))


def _rebuild(core, out_factor, in_factor):
    """A CP kernel written out: K[p, c, h, w] = sum_ij core[i, j, h, w] out[i, p] in[j, c]."""
    return (
        core[:, :, None, None]
        * out_factor[:, None, :, None, None, None]
        * in_factor[None, :, None, :, None, None]
    ).sum((0, 1))


def _expected_delta(layer: nn.Module, adapter) -> torch.Tensor:
    """The LoHa formula: (W1a W1b ⊙ W2a W2b) · alpha / r, in the base weight's shape."""
    if adapter.cp:
        w1 = _rebuild(adapter.hada_t1, adapter.hada_w1_a, adapter.hada_w1_b)
        w2 = _rebuild(adapter.hada_t2, adapter.hada_w2_a, adapter.hada_w2_b)
    else:
        w1 = adapter.hada_w1_a @ adapter.hada_w1_b
        w2 = adapter.hada_w2_a @ adapter.hada_w2_b
    return (w1 * w2 * adapter.scale).reshape(layer.weight.shape)


def _expected(layer: nn.Module, adapter, x: torch.Tensor) -> torch.Tensor:
    delta = _expected_delta(layer, adapter)
    if isinstance(layer, nn.Linear):
        return layer(x) + x @ delta.t()
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return layer(x) + conv(
        x, delta, None, layer.stride, layer.padding, layer.dilation, layer.groups
    )


LAYERS = {
    "linear": (lambda: nn.Linear(10, 12), lambda: torch.randn(2, 3, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(6, 4, 1), lambda: torch.randn(2, 6, 5, 5)),
    "conv2d_groups_dilation": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2),
        lambda: torch.randn(2, 4, 8, 8),
    ),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    "conv1d_unbatched": (lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(3, 9)),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("effective_conv", [False, True])
def test_output_is_the_loha_formula_and_merge_matches(kind, rank, effective_conv):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    x = make_x()
    spec = LoHa(rank=rank, alpha=5, targets=("layer",), effective_conv=effective_conv)
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.3)
    ((_, adapter),) = cm.store.items("default")
    assert adapter.scale == pytest.approx(5 / rank)
    assert adapter.cp == (effective_conv and kind.startswith("conv") and kind != "conv2d_1x1")
    # rank 1 is cheap enough to run factored (r² (in + out) < in·out); rank 4 builds ΔW
    assert adapter.factored_forward == (rank == 1 and not adapter.cp and "groups" not in kind)
    expected = _expected(model.layer, adapter, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cm.merge_and_unload()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("effective_conv", [False, True])
def test_shapes_and_keys_are_peft_s(effective_conv):
    cm = surgeon.compile(
        ZOO["cnn"].model(),
        LoHa(rank=2, targets=("conv1", "seq", "fc"), effective_conv=effective_conv),
    )
    shapes = {
        f"{p}.{k}": tuple(t.shape)
        for p, layer in cm.store.items("default")
        for k, t in layer.peft_tensors().items()
    }
    if effective_conv:  # conv1: 3 -> 8, 3x3; seq: 8 -> 8, k=3 (cores are (r, r, k, 1))
        assert shapes["conv1.hada_t1"] == (2, 2, 3, 3) and shapes["conv1.hada_w1_a"] == (2, 8)
        assert shapes["seq.hada_t2"] == (2, 2, 3, 1) and shapes["seq.hada_w2_b"] == (2, 8)
    else:
        assert shapes["conv1.hada_w1_a"] == (8, 2) and shapes["conv1.hada_w1_b"] == (2, 27)
        assert shapes["seq.hada_w2_b"] == (2, 24)
    assert shapes["fc.hada_w1_a"] == (4, 2) and shapes["fc.hada_w2_b"] == (2, 8)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_default_init_is_peft_s_and_leaves_outputs_unchanged(kind):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    x = make_x()
    before = model(x)
    cm = surgeon.compile(model, LoHa(rank=4, targets=("layer",), effective_conv=True))
    ((_, adapter),) = cm.store.items("default")
    for name, tensor in adapter.peft_tensors().items():
        if name == "hada_w2_b":
            assert torch.count_nonzero(tensor) == 0
        else:  # kaiming-uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
            fan_in = tensor[0].numel()
            assert 0 < tensor.abs().max() <= 1 / math.sqrt(fan_in) + 1e-6, name
    torch.testing.assert_close(cm(x), before)


def test_random_init_zeroes_nothing_and_changes_outputs():
    torch.manual_seed(0)
    model = One(nn.Linear(10, 12))
    x = torch.randn(3, 10)
    cm = surgeon.compile(model, LoHa(rank=4, targets=("layer",), init="random"))
    ((_, adapter),) = cm.store.items("default")
    assert all(torch.count_nonzero(t) == t.numel() for t in adapter.peft_tensors().values())
    assert not torch.allclose(cm(x), model.layer(x))


# -- PEFT parity --------------------------------------------------------------------------------

PARITY = {
    "mlp": ("body.0", "body.3", "head"),
    "cnn": ("conv1", "conv2", "seq", "fc"),
    "llama": ("q_proj", "v_proj", "down_proj"),
    "bert": ("query", "value", "dense"),
}


def _peft_model(entry, seed=5, **config):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(entry.model(), peft.LoHaConfig(**config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.mark.parametrize("entry_name", sorted(PARITY))
@pytest.mark.parametrize("rank", [1, 3])
def test_saved_by_surgeon_loads_in_peft_with_same_outputs(entry_name, rank, tmp_path):
    peft = pytest.importorskip("peft")
    entry = ZOO[entry_name]
    spec = LoHa(rank=rank, alpha=4, targets=PARITY[entry_name], effective_conv=True)
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)  # four factors multiply: small ones would hide the adapter
    x = entry.example()
    expected = logits(cm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    cm.save_adapters(tmp_path)
    loaded = peft.PeftModel.from_pretrained(entry.model(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry_name", sorted(PARITY))
@pytest.mark.parametrize("effective_conv", [False, True])
def test_saved_by_peft_loads_in_surgeon_with_same_outputs(entry_name, effective_conv, tmp_path):
    entry = ZOO[entry_name]
    pm = _peft_model(
        entry,
        r=2,
        alpha=6,
        target_modules=list(PARITY[entry_name]),
        use_effective_conv2d=effective_conv,
    )
    x = entry.example()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    assert isinstance(cm.spec("default"), LoHa)
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        {"rank_pattern": {"v_proj": 1}, "alpha_pattern": {"q_proj": 3}},
        {"layers_to_transform": [1]},
        {"init_weights": False},
        {"rank_dropout": 0.3, "module_dropout": 0.2},
        {"target_modules": "all-linear", "exclude_modules": ["o_proj"]},
    ],
    ids=["patterns", "layers", "random-init", "dropouts", "preset-exclude"],
)
def test_peft_config_variants_load_with_same_outputs(config, tmp_path):
    entry = ZOO["llama"]
    config = {"target_modules": ["q_proj", "v_proj"], **config}
    pm = _peft_model(entry, r=4, alpha=8, **config)
    x = entry.example()
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)
    peft_layers = {
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if hasattr(m, "hada_w1_a")
    }
    assert set(cm.store.paths["default"]) == peft_layers


def test_spec_round_trips_through_peft_config():
    spec = LoHa(
        rank=4,
        alpha=2,
        targets=("q_proj",),
        layers=(1,),
        rank_pattern={"q_proj": 2},
        alpha_pattern={"q_proj": 3.0},
        rank_dropout=0.1,
        module_dropout=0.2,
        effective_conv=True,
        init="random",
    )
    config = spec.to_peft_config(["model.layers.1.self_attn.q_proj"])
    assert config["init_weights"] is False and config["use_effective_conv2d"] is True
    # the file's weights replace any init: loaded specs say "default" (hot swaps stay possible)
    assert LoHa.from_peft_config(config, "here") == spec.replace(init="default")


@pytest.mark.parametrize(
    "config, match",
    [
        ({"layers_to_transform": [0], "layers_pattern": "blocks_x"}, "layers_pattern"),
        (
            {"init_weights": "lycoris"},
            r"init_weights='lycoris' is not supported \(supported: true, false\)",
        ),
        ({"target_modules": None}, "target_modules is missing"),
        ({"rank_dropout": 1.0}, "rank_dropout=1.0"),
    ],
)
def test_peft_configs_that_would_load_differently_are_refused(config, match):
    base = {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(surgeon.SpecError, match=match):
        LoHa.from_peft_config({**base, **config}, "adapter_config.json")


def test_gpt2_conv1d_is_not_a_loha_layer_as_in_peft():
    with pytest.raises(surgeon.SpecError, match="cannot adapt"):
        surgeon.compile(ZOO["gpt2"].model(), LoHa(targets=("c_attn",)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [1, 4])
def test_half_precision_matches_peft(dtype, rank, tmp_path):
    peft = pytest.importorskip("peft")
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model().to(dtype), LoHa(rank=rank, targets=("q_proj", "v_proj")))
    randomize(cm)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.hada_w1_a.dtype == torch.float32  # as PEFT's autocast_adapter_dtype
    cm.save_adapters(tmp_path)
    pm = peft.PeftModel.from_pretrained(entry.model().to(dtype), tmp_path).eval()
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    # the factored forward rounds differently from PEFT's ΔW; the half-precision output step bounds it
    tolerance = 0 if not adapter.factored_forward else 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out, logits(pm(**x)), rtol=tolerance, atol=tolerance)


# -- training behaviour ---------------------------------------------------------------------------


def _linear_with(spec):
    torch.manual_seed(0)
    model = One(nn.Linear(10, 12))
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.3)
    ((_, adapter),) = cm.store.items("default")
    return cm, model.layer, adapter


def test_dropouts_are_off_in_eval():
    cm, layer, adapter = _linear_with(
        LoHa(rank=2, targets=("layer",), rank_dropout=0.5, module_dropout=0.5)
    )
    x = torch.randn(4, 10)
    cm.eval()
    torch.testing.assert_close(cm(x), _expected(layer, adapter, x), rtol=1e-5, atol=1e-5)


def test_module_dropout_skips_the_whole_adapter_in_training():
    cm, layer, adapter = _linear_with(LoHa(rank=2, targets=("layer",), module_dropout=0.5))
    x = torch.randn(4, 10)
    base, full = layer(x), _expected(layer, adapter, x)
    cm.train()
    torch.manual_seed(1)
    outcomes = set()
    for _ in range(20):
        out = cm(x)
        skipped, applied = torch.allclose(out, base), torch.allclose(out, full, atol=1e-6)
        assert skipped != applied
        outcomes.add(skipped)
    assert outcomes == {True, False}


def test_rank_dropout_drops_output_channels_and_rescales_by_the_kept_fraction():
    cm, layer, adapter = _linear_with(LoHa(rank=2, targets=("layer",), rank_dropout=0.5))
    x = torch.randn(4, 10)
    delta = _expected(layer, adapter, x) - layer(x)
    cm.train()
    torch.manual_seed(3)
    ratio = ((cm(x) - layer(x)) / delta).mean(0)  # one factor per output channel
    kept = ratio > 0.5
    assert 0 < kept.sum() < 12
    expected = kept.float() * 12 / kept.sum()  # PEFT's LoHa always divides by the mask's mean
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-4)


def test_backward_reaches_only_adapters():
    cm = surgeon.compile(ZOO["llama"].model(), LoHa(rank=2, targets=("q_proj", "v_proj")))
    randomize(cm)
    cm.train()
    logits(cm(**ZOO["llama"].example())).float().pow(2).mean().backward()
    grads = {n for n, p in cm.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("store.") for n in grads)
    assert len(grads) == 2 * 2 * 4  # 2 layers x (q, v) x 4 factors


def test_compiles_on_the_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        vocab_size=1000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    cm = surgeon.compile(model, LoHa(rank=8, targets=("q_proj", "v_proj")))
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.hada_w1_a.is_meta and adapter.hada_w1_a.shape == (512, 8)
    assert adapter.factored_forward
    assert cm.num_trainable() == 4 * 2 * 4 * 8 * 512
    out = cm(input_ids=torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert out.logits.shape == (1, 3, 1000) and out.logits.is_meta


# -- spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("rank", 0, "LoHa.rank=0: expected an integer >= 1"),
        ("alpha", -1, "LoHa.alpha=-1: expected a number > 0"),
        ("rank_dropout", 1.0, r"LoHa.rank_dropout=1.0: expected a number >= 0 and < 1"),
        ("module_dropout", -0.1, "LoHa.module_dropout=-0.1"),
        ("effective_conv", "yes", "LoHa.effective_conv='yes': expected true or false"),
        ("init", "pissa", "LoHa.init='pissa': expected one of 'default', 'random'"),
        ("targets", [], r"LoHa.targets=\[\]: expected at least one target"),
        ("rank_pattern", {"q_proj": 0}, r"LoHa.rank_pattern\['q_proj'\]=0"),
        ("dropout", 0.1, "LoHa has no field 'dropout'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_field_value_and_allowed(field, value, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LoHa(**{field: value})


def test_pattern_keys_must_match_a_target():
    with pytest.raises(surgeon.SpecError, match="rank_pattern: key 'k_proj' matches no targeted"):
        surgeon.compile(ZOO["llama"].model(), LoHa(rank_pattern={"k_proj": 2}))


def test_padding_modes_peft_gets_wrong_are_refused():
    with pytest.raises(surgeon.SpecError, match="padding_mode='reflect'"):
        surgeon.compile(One(nn.Conv2d(3, 4, 3, padding_mode="reflect")), LoHa(targets=("layer",)))


def test_spec_dicts_build_loha():
    spec = surgeon.Spec.from_dict({"method": "loha", "rank": 2, "targets": ["q_proj"]})
    assert spec.adapters["default"] == LoHa(rank=2, targets=("q_proj",))


# -- golden graphs ------------------------------------------------------------------------------

GOLDEN_FACTORED = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2)
    adapters_default_body_3_hada_w1_a = self.adapters.default.body_3.hada_w1_a
    adapters_default_body_3_hada_w1_b = self.adapters.default.body_3.hada_w1_b
    adapters_default_body_3_hada_w2_a = self.adapters.default.body_3.hada_w2_a
    adapters_default_body_3_hada_w2_b = self.adapters.default.body_3.hada_w2_b
    row_kron = surgeon_passes_lycoris_loha_row_kron(adapters_default_body_3_hada_w1_a, adapters_default_body_3_hada_w2_a);  adapters_default_body_3_hada_w1_a = adapters_default_body_3_hada_w2_a = None
    column_kron = surgeon_passes_lycoris_loha_column_kron(adapters_default_body_3_hada_w1_b, adapters_default_body_3_hada_w2_b);  adapters_default_body_3_hada_w1_b = adapters_default_body_3_hada_w2_b = None
    mul = torch.mul(column_kron, 2.0);  column_kron = None
    linear = torch._C._nn.linear(body_2, mul);  body_2 = mul = None
    linear_1 = torch._C._nn.linear(linear, row_kron);  linear = row_kron = None
    adapters_default_body_3_rank_dropout = self.adapters.default.body_3.rank_dropout(linear_1);  linear_1 = None
    adapters_default_body_3_module_dropout = self.adapters.default.body_3.module_dropout(body_3, adapters_default_body_3_rank_dropout);  body_3 = adapters_default_body_3_rank_dropout = None
    relu = torch.relu(adapters_default_body_3_module_dropout);  adapters_default_body_3_module_dropout = None
    head = self.head(relu);  relu = None
    return head"""

GOLDEN_MATERIALISED_CONV = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    conv1 = self.conv1(x)
    adapters_default_conv1_hada_t1 = self.adapters.default.conv1.hada_t1
    adapters_default_conv1_hada_w1_a = self.adapters.default.conv1.hada_w1_a
    adapters_default_conv1_hada_w1_b = self.adapters.default.conv1.hada_w1_b
    adapters_default_conv1_hada_t2 = self.adapters.default.conv1.hada_t2
    adapters_default_conv1_hada_w2_a = self.adapters.default.conv1.hada_w2_a
    adapters_default_conv1_hada_w2_b = self.adapters.default.conv1.hada_w2_b
    hadamard_delta_cp = surgeon_passes_lycoris_loha_hadamard_delta_cp(adapters_default_conv1_hada_t1, adapters_default_conv1_hada_w1_a, adapters_default_conv1_hada_w1_b, adapters_default_conv1_hada_t2, adapters_default_conv1_hada_w2_a, adapters_default_conv1_hada_w2_b, 2.0, (8, 3, 3, 3));  adapters_default_conv1_hada_t1 = adapters_default_conv1_hada_w1_a = adapters_default_conv1_hada_w1_b = adapters_default_conv1_hada_t2 = adapters_default_conv1_hada_w2_a = adapters_default_conv1_hada_w2_b = None
    conv2d = torch.conv2d(x, hadamard_delta_cp, None, (1, 1), (1, 1), (1, 1), 1);  x = hadamard_delta_cp = None
    add = torch.add(conv1, conv2d);  conv1 = conv2d = None
    relu = torch.nn.functional.relu(add, inplace = False);  add = None
    conv2 = self.conv2(relu);  relu = None
    relu_1 = torch.nn.functional.relu(conv2, inplace = False);  conv2 = None
    flatten = relu_1.flatten(2);  relu_1 = None
    seq = self.seq(flatten);  flatten = None
    mean = seq.mean(-1);  seq = None
    fc = self.fc(mean);  mean = None
    return fc"""


def _code(cm, path):
    return cm.graph.code(path).split("\n", 1)[1].strip()


def test_golden_graph_factored_linear_with_dropouts():
    spec = LoHa(rank=2, alpha=4, targets=("body.3",), rank_dropout=0.1, module_dropout=0.2)
    assert _code(surgeon.compile(ZOO["mlp"].model(), spec), "") == GOLDEN_FACTORED


def test_golden_graph_materialised_effective_conv():
    spec = LoHa(rank=2, alpha=4, targets=("conv1",), effective_conv=True)
    assert _code(surgeon.compile(ZOO["cnn"].model(), spec), "") == GOLDEN_MATERIALISED_CONV


def test_graph_shows_no_adapter_nodes_when_merged():
    cm = surgeon.compile(ZOO["mlp"].model(), LoHa(rank=2, targets=("head",)))
    assert "hada_w1_a" in cm.graph.code("")
    cm.merge()
    assert "hada_w1_a" not in cm.graph.code("")


# -- with the rest of the compiler --------------------------------------------------------------


def test_exports_to_onnx_folded_and_verified(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    entry = ZOO["cnn"]
    cm = surgeon.compile(entry.model(), LoHa(rank=2, targets=PARITY["cnn"], effective_conv=True))
    randomize(cm, scale=0.5)
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", entry.example())
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def test_mixed_batch_rows_equal_single_adapter_runs():
    entry = ZOO["llama"]
    cm = surgeon.compile(
        entry.model(),
        surgeon.Spec({"a": LoHa(rank=1, alpha=2), "b": LoHa(rank=4, targets=("q_proj",))}),
    )
    randomize(cm, scale=0.5)
    ids = entry.example()["input_ids"]
    mixed = logits(cm(input_ids=ids, adapter_names=["b", "a"]))
    for row, name in enumerate(["b", "a"]):
        cm.set_active(name)
        torch.testing.assert_close(
            mixed[row], logits(cm(input_ids=ids[row : row + 1]))[0], rtol=1e-5, atol=1e-5
        )
