"""GraLoRA beyond the conformance suite (whose single test layers no grid divides): its formula
on Linear and GPT-2 Conv1D layers for several k, hybrid ranks, merge; the grid's rank beyond r;
PEFT's keys, shapes and seeded initial values; PEFT parity with k = 4, a hybrid part and
layers_to_transform; dropout drawn as PEFT draws it; exact half-precision parity, merged too;
shape rules refused naming the field and the layer; PEFT config keys refused; spec errors; a
golden graph (two batched matmuls, no loop over blocks)."""

from __future__ import annotations

import json
import warnings

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
from surgeon.passes.structured.gralora import GraLoRA


def grid_delta(spec, adapter) -> torch.Tensor:
    """The update as an (out, in) matrix, block by block: block (j, n) maps input block n to
    output block j through slice j of input block n's factor A_n and slice n of output block
    j's factor B_j (each r/k wide), plus the hybrid ``B_h A_h``, times ``alpha / (r + hybrid_r)``."""
    k, sub = spec.k, spec.rank // spec.k
    a, b = adapter.gralora_A, adapter.gralora_B  # (k, in/k, r), (k, r, out/k)
    in_block, out_block = a.shape[1], b.shape[2]
    delta = torch.zeros(k * out_block, k * in_block)
    for j in range(k):
        for n in range(k):
            block = a[n][:, j * sub : (j + 1) * sub] @ b[j][n * sub : (n + 1) * sub]
            delta[j * out_block : (j + 1) * out_block, n * in_block : (n + 1) * in_block] = block.T
    if spec.hybrid_rank:
        delta = delta + adapter.gralora_B_general @ adapter.gralora_A_general
    return delta * spec.alpha / (spec.rank + spec.hybrid_rank)


def formula(spec, adapter, base, x):
    """GraLoRA (Jung et al., 2025): ``W x + b + scale · (G + B_h A_h) x``, ``G`` a k x k grid of
    rank-r/k blocks."""
    return plain_output(base, x) + x @ grid_delta(spec, adapter).T


peft = pytest.importorskip("peft")

NOISE = 0.3


def _layer(kind: str, in_features: int = 12, out_features: int = 24) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        return gpt2_conv1d(in_features, out_features)
    return nn.Linear(in_features, out_features)


def _compiled(spec: GraLoRA, layer: nn.Module) -> surgeon.CompiledModel:
    cm = surgeon.compile(One(layer), spec).eval()
    add_noise(cm.store.parameters(), scale=NOISE)
    return cm


# -- the math --------------------------------------------------------------------------------------


GRIDS = [(2, 4, 0), (3, 3, 2), (1, 2, 0), (4, 8, 1)]
"""(k, rank, hybrid_rank)"""


@pytest.mark.parametrize(
    ("k", "rank", "hybrid"), GRIDS, ids=[f"k{g[0]}-r{g[1]}-h{g[2]}" for g in GRIDS]
)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_is_the_formula_and_merge_folds_it(kind, k, rank, hybrid):
    layer = _layer(kind)
    spec = GraLoRA(rank=rank, alpha=5, k=k, hybrid_rank=hybrid, targets=("layer",))
    cm = _compiled(spec, layer)
    ((_, adapter),) = cm.store.items("default")
    x = torch.randn(2, 3, 12)
    weight = layer.weight.detach().clone()
    expected = formula(spec, adapter, layer, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=1e-6, atol=1e-6)


def test_the_grid_reaches_rank_k_times_r():
    """LoRA's parameter count at rank r, and rank k·r: each block is rank r/k on its own."""
    spec = GraLoRA(rank=3, alpha=2, k=3, targets=("layer",))
    cm = _compiled(spec, _layer("linear", 12, 12))
    ((_, adapter),) = cm.store.items("default")
    assert sum(p.numel() for p in adapter.parameters()) == 3 * (12 + 12)
    assert torch.linalg.matrix_rank(grid_delta(spec, adapter)) == 3 * 3


def test_dropout_is_drawn_as_peft_draws_it_grid_then_hybrid():
    """In training, PEFT drops the input once for the grid and once more for the hybrid part
    (two masks); the same seed gives the same outputs."""
    entry = ZOO["mlp"]
    targets = ["body.0", "body.3"]
    config = peft.GraloraConfig(
        target_modules=targets, r=4, alpha=3, gralora_k=2, hybrid_r=2, gralora_dropout=0.5
    )
    pm = peft_model(entry.model(), config, scale=NOISE)
    spec = GraLoRA(rank=4, alpha=3, k=2, hybrid_rank=2, dropout=0.5, targets=tuple(targets))
    cm = surgeon.compile(entry.model(), spec)
    with torch.no_grad():
        for path, layer in cm.store.items("default"):
            theirs = pm.get_base_model().get_submodule(path)
            layer.gralora_A.copy_(theirs.gralora_A["default"])
            layer.gralora_B.copy_(theirs.gralora_B["default"])
            layer.gralora_A_general.copy_(theirs.gralora_A_general["default"].weight)
            layer.gralora_B_general.copy_(theirs.gralora_B_general["default"].weight)
    x = entry.example()
    outputs = []
    for model in (cm, pm):
        model.get_submodule("body.2" if model is cm else "base_model.model.body.2").p = 0.0
        model.train()
        torch.manual_seed(3)
        outputs.append(model(**x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    cm.eval()
    assert not torch.allclose(cm(**x), outputs[0], atol=1e-3)


# -- PEFT ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hybrid", [0, 2])
def test_saved_tensors_have_peft_keys_shapes_and_seeded_values(hybrid, tmp_path):
    entry = ZOO["llama"]
    targets = ["q_proj", "v_proj"]
    theirs, ours = entry.model(), entry.model()  # built (seeded) before the draws
    torch.manual_seed(7)
    config = peft.GraloraConfig(target_modules=targets, r=4, alpha=6, hybrid_r=hybrid)
    peft.get_peft_model(theirs, config).save_pretrained(tmp_path / "theirs")
    torch.manual_seed(7)
    spec = GraLoRA(rank=4, alpha=6, hybrid_rank=hybrid, targets=tuple(targets))
    surgeon.compile(ours, spec).save_adapters(tmp_path / "ours")
    expected = load_file(tmp_path / "theirs" / WEIGHTS_NAME)
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert saved.keys() == expected.keys()
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
    v_proj = "base_model.model.model.layers.0.self_attn.v_proj"
    assert saved[f"{v_proj}.gralora_A"].shape == (2, 16, 4)  # (k, in/k, r)
    assert saved[f"{v_proj}.gralora_B"].shape == (2, 4, 8)  # (k, r, out/k)
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert (config["peft_type"], config["gralora_k"], config["hybrid_r"]) == ("GRALORA", 2, hybrid)


@pytest.mark.slow
def test_llama_both_ways_with_peft_k4_hybrid_and_layers(tmp_path):
    entry = ZOO["llama"]
    x = entry.example()
    targets = ("q_proj", "v_proj", "down_proj")
    spec = GraLoRA(rank=4, alpha=7, k=4, hybrid_rank=3, targets=targets, layers=(1,))
    cm = surgeon.compile(entry.model(), spec).eval()
    add_noise(cm.store.parameters(), scale=NOISE)
    cm.save_adapters(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["layers_to_transform"] == [1]
    loaded = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)

    config = peft.GraloraConfig(
        target_modules=list(targets), r=4, alpha=7, gralora_k=4, hybrid_r=3, layers_to_transform=[1]
    )
    pm = peft_model(entry.model(), config, scale=NOISE)
    pm.save_pretrained(tmp_path / "theirs")
    back = surgeon.load(entry.model(), tmp_path / "theirs")
    assert back.store.paths["default"] == cm.store.paths["default"]
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "model_name"),
    [
        (torch.bfloat16, "mlp"),
        (torch.float16, "mlp"),
        pytest.param(torch.float16, "gpt2", marks=pytest.mark.slow),
    ],
    ids=["bf16", "fp16", "fp16-gpt2"],
)
def test_half_precision_matches_peft_exactly_merged_too(dtype, model_name, tmp_path):
    entry = ZOO[model_name]
    targets = {"mlp": ["body.0", "body.3"], "gpt2": ["c_attn", "c_fc"]}[model_name]
    config = peft.GraloraConfig(target_modules=targets, r=4, hybrid_r=2)
    pm = peft_model(entry.model().to(dtype), config, scale=NOISE)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.gralora_A.dtype == torch.float32  # PEFT's default upcast of adapter weights
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in entry.example().items()}
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        ours, theirs = cm.model.get_submodule(path), pm.get_base_model().get_submodule(path)
        assert torch.equal(ours.weight, theirs.base_layer.weight), path


@pytest.mark.slow
def test_peft_file_with_random_init_loads_its_weights(tmp_path):
    """``init_weights=false`` only changes the starting values; the file's weights rule."""
    entry = ZOO["llama"]
    config = peft.GraloraConfig(target_modules=["q_proj"], r=4, hybrid_r=1, init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)
    pm.save_pretrained(tmp_path)
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    back = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"gralora_k": 3}, r"GraLoRA.k=3: rank 4 is not a multiple of it.*'gralora_k'"),
        ({"gralora_k": 0}, r"GraLoRA.k=0: expected an integer >= 1.*'gralora_k'"),
        ({"r": 32, "gralora_k": 32}, r"GraLoRA.k=32: it does not divide .*v_proj \(32x16\)"),
        ({"hybrid_r": -1}, r"GraLoRA.hybrid_rank=-1: expected an integer >= 0.*'hybrid_r'"),
        ({"bias": "lora_only"}, r"GraLoRA.bias='lora_only'.*'bias'"),
        ({"gralora_dropout": 1.0}, r"GraLoRA.dropout=1.0.*'gralora_dropout'"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    spec = GraLoRA(rank=4, targets=("v_proj",))
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- layers refused, spec errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("in_features", "out_features"), [(5, 6), (6, 9)], ids=["in", "out"])
def test_layers_k_does_not_divide_are_refused_naming_k_and_the_layer(in_features, out_features):
    model = One(nn.Linear(in_features, out_features))
    with pytest.raises(
        surgeon.SpecError,
        match=rf"GraLoRA.k=2: it does not divide the input and output features of layer "
        rf"\({in_features}x{out_features}\)",
    ):
        surgeon.compile(model, GraLoRA(rank=2, targets=("layer",)))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="divisible by gralora_k"):
        warnings.simplefilter("ignore")
        peft.get_peft_model(model, peft.GraloraConfig(target_modules=["layer"], r=2))


def test_a_preset_reaching_an_uneven_layer_is_refused_too():
    """The MLP's head has 5 outputs: all-linear takes it, so GraLoRA refuses (as PEFT would)."""
    with pytest.raises(surgeon.SpecError, match=r"head \(24x5\)"):
        surgeon.compile(ZOO["mlp"].model(), GraLoRA(rank=2, targets="all-linear"))


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (nn.Conv2d(2, 4, 1), "Conv2d"),
        (nn.Conv1d(2, 4, 1), "Conv1d"),
        (nn.Embedding(6, 4), "Embedding"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which GraLoRA cannot adapt"):
        surgeon.compile(One(layer), GraLoRA(rank=2, targets=("layer",)))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 6, "k": 4}, r"GraLoRA.k=4: rank 6 is not a multiple of it"),
        ({"k": 0}, r"GraLoRA.k=0: expected an integer >= 1"),
        ({"rank": 0}, r"GraLoRA.rank=0: expected an integer >= 1"),
        ({"hybrid_rank": -1}, r"GraLoRA.hybrid_rank=-1: expected an integer >= 0"),
        ({"alpha": 0}, r"GraLoRA.alpha=0: expected a number > 0"),
        ({"dropout": 1.0}, r"GraLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"bias": "lora_only"}, r"GraLoRA.bias='lora_only': expected one of 'none', 'all'"),
        ({"targets": []}, r"GraLoRA.targets=\[\]: expected at least one target"),
        ({"gralora_k": 2}, r"GraLoRA has no field 'gralora_k'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        GraLoRA(**fields)


# -- graphs -------------------------------------------------------------------------------------------


GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2)
    adapters_default_body_3_gralora_a = self.adapters.default.body_3.gralora_A
    adapters_default_body_3_gralora_b = self.adapters.default.body_3.gralora_B
    grid_product = surgeon_passes_structured_gralora_grid_product(body_2, adapters_default_body_3_gralora_a, adapters_default_body_3_gralora_b);  body_2 = adapters_default_body_3_gralora_a = adapters_default_body_3_gralora_b = None
    mul = torch.mul(grid_product, 2.0);  grid_product = None
    add = torch.add(body_3, mul);  body_3 = mul = None
    relu = torch.relu(add);  add = None
    head = self.head(relu);  relu = None
    return head"""


def test_golden_graph_is_one_grid_call_not_a_loop_over_blocks():
    cm = surgeon.compile(ZOO["mlp"].model(), GraLoRA(rank=4, alpha=8, targets=("body.3",)))
    assert graph_code(cm) == GOLDEN_MLP
