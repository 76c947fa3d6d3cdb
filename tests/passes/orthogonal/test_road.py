"""RoAd beyond the conformance suite: its formula for every variant and group size, merge folding
the weight and the bias (and unmerge undoing it, a singular pair included), PEFT's parameter
shapes and init, PEFT parity for variants and group sizes the examples lack, exact
half-precision parity, layers refused by size or type as PEFT refuses them, PEFT config keys,
spec errors, a golden rewritten graph (elementwise: no matrix per call)."""

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
from surgeon.passes.orthogonal.road import RoAd


def formula(spec, adapter, base, x):
    """RoAd (Liao et al., 2024): the outputs ``h = W x + b`` taken in pairs ``(h_i, h_j)``, ``j =
    i + g/2`` within each group of ``g = group_size`` outputs; each pair becomes

        h'_i = alpha_1 cos(theta_1) h_i - alpha_2 sin(theta_2) h_j
        h'_j = alpha_3 sin(theta_3) h_i + alpha_4 cos(theta_4) h_j

    ``road_1``: one (alpha, theta) per pair (alpha R(theta) h); ``road_2``: one per output row;
    ``road_4``: one per entry of the 2x2 block."""
    h = plain_output(base, x)
    theta, alpha = adapter.road_theta, adapter.road_alpha
    g = spec.group_size
    half = g // 2
    out = h.clone()
    for start in range(0, h.shape[-1], g):
        for k in range(half):
            i, j = start + k, start + k + half
            (a1, t1), (a2, t2), (a3, t3), (a4, t4) = (
                (alpha[n], theta[n]) for n in _pair_indices(spec.variant, start, k, g)
            )
            out[..., i] = a1 * t1.cos() * h[..., i] - a2 * t2.sin() * h[..., j]
            out[..., j] = a3 * t3.sin() * h[..., i] + a4 * t4.cos() * h[..., j]
    return out


def _pair_indices(variant: str, start: int, k: int, g: int) -> tuple[int, int, int, int]:
    """Where PEFT stores the four (alpha, theta) of the pair ``k`` of the group at ``start``: the
    entries [i, i], [i, j], [j, i], [j, j] of its 2x2 block."""
    half = g // 2
    if variant == "road_1":  # out/2 values: one per pair, group after group
        n = start // 2 + k
        return n, n, n, n
    i, j = start + k, start + k + half
    if variant == "road_2":  # out values: one per output (row)
        return i, i, j, j
    # road_4: 2 out values; per group, g for the diagonal, then g for the off-diagonal
    diagonal, off = 2 * start, 2 * start + g
    return diagonal + k, off + k, off + k + half, diagonal + k + half


peft = pytest.importorskip("peft")

VARIANTS = ("road_1", "road_2", "road_4")
NOISE = 0.4
"""Angles start at zero and scales at one: noise this large moves both (scales around one)."""


# -- the formula, merge and unmerge -------------------------------------------------------------


@pytest.mark.parametrize("group_size", [2, 4, 8, 24])
@pytest.mark.parametrize("variant", VARIANTS)
def test_output_is_the_formula_and_merge_folds_weight_and_bias(variant, group_size):
    torch.manual_seed(0)
    model = One(nn.Linear(5, 24))
    x = torch.randn(2, 3, 5)
    weight, bias = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    spec = RoAd(targets=("layer",), variant=variant, group_size=group_size)
    cm = surgeon.compile(model, spec)
    add_noise(cm.store.parameters(), scale=NOISE)
    ((_, adapter),) = cm.store.items("default")
    with torch.no_grad():
        expected = formula(spec, adapter, model.layer, x)
        rotated_bias = formula(spec, adapter, model.layer, torch.zeros(5))  # W 0 + b = b
    assert not torch.allclose(expected, model.layer(x), atol=1e-3)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    assert "road" not in cm.graph.code()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.layer.bias, rotated_bias, rtol=1e-6, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.layer.bias, bias, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)


def test_pairs_are_rotated_within_groups_as_documented():
    """Group size 4 on 8 outputs, road_1: pairs (0, 2), (1, 3), (4, 6), (5, 7); a quarter turn
    with scale 2 on pair (1, 3) alone maps (h_1, h_3) to (-2 h_3, 2 h_1)."""
    model = One(nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model.layer.weight.copy_(torch.eye(8))
    cm = surgeon.compile(model, RoAd(targets=("layer",), group_size=4))
    ((_, adapter),) = cm.store.items("default")
    with torch.no_grad():
        adapter.road_theta[1] = torch.pi / 2
        adapter.road_alpha[1] = 2.0
    h = torch.arange(1.0, 9.0)
    expected = h.clone()
    expected[1], expected[3] = -2 * h[3], 2 * h[1]
    torch.testing.assert_close(cm(h), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_parameters_have_peft_shapes_and_values(variant):
    entry = ZOO["llama"]
    targets = ["q_proj", "v_proj"]  # 32 and 16 outputs
    cm = surgeon.compile(entry.model(), RoAd(targets=tuple(targets), variant=variant, group_size=8))
    config = peft.RoadConfig(target_modules=targets, variant=variant, group_size=8)
    pm = peft_model(entry.model(), config, seed=None)
    per_output = {"road_1": 0.5, "road_2": 1, "road_4": 2}[variant]
    for path, layer in cm.store.items("default"):
        theirs = pm.base_model.model.get_submodule(path)
        assert layer.road_theta.shape == (int(per_output * layer.base.out_features),)
        assert torch.equal(layer.road_theta, theirs.road_theta["default"])
        assert torch.equal(layer.road_alpha, theirs.road_alpha["default"])
    assert torch.count_nonzero(layer.road_theta) == 0 and torch.all(layer.road_alpha == 1)


def test_unmerge_after_a_singular_pair_keeps_the_weights_finite():
    torch.manual_seed(0)
    model = One(nn.Linear(3, 4))
    cm = surgeon.compile(model, RoAd(targets=("layer",), group_size=4))
    add_noise(cm.store.parameters(), scale=NOISE)
    ((_, adapter),) = cm.store.items("default")
    with torch.no_grad():
        adapter.road_alpha[0] = 0  # pair (0, 2) collapses to zero
    weight = model.layer.weight.detach().clone()
    cm.merge()
    cm.unmerge()
    assert torch.isfinite(model.layer.weight).all() and torch.isfinite(model.layer.bias).all()
    assert torch.count_nonzero(model.layer.weight[[0, 2]]) == 0
    torch.testing.assert_close(model.layer.weight[[1, 3]], weight[[1, 3]])


GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    adapters_default_body_0_road_theta = self.adapters.default.body_0.road_theta
    adapters_default_body_0_road_alpha = self.adapters.default.body_0.road_alpha
    rotation_coefficients = surgeon_passes_orthogonal_road_rotation_coefficients('road_1', 4, adapters_default_body_0_road_theta, adapters_default_body_0_road_alpha);  adapters_default_body_0_road_theta = adapters_default_body_0_road_alpha = None
    getitem = rotation_coefficients[0]
    getitem_1 = rotation_coefficients[1];  rotation_coefficients = None
    rotate_pairs = surgeon_passes_orthogonal_road_rotate_pairs(body_0, getitem, getitem_1, 4);  body_0 = getitem = getitem_1 = None
    body_1 = getattr(self.body, "1")(rotate_pairs);  rotate_pairs = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu);  relu = None
    return head"""


def test_the_unmerged_graph_is_elementwise():
    """No rotation matrix is built per call: the angles become two coefficient vectors and the
    output is rotated pairwise (a golden graph)."""
    cm = surgeon.compile(ZOO["mlp"].model(), RoAd(targets=("body.0",), group_size=4))
    code = graph_code(cm)
    assert code == GOLDEN_MLP


# -- PEFT parity ---------------------------------------------------------------------------------

# what the examples (road_1 and road_4 in groups of 4, road_2 in groups of 2) lack: road_2 in
# larger groups (BERT's intermediate layers hold three), road_1 and road_4 in other sizes, a
# group spanning a whole layer
PARITY = [
    ("bert", "road_2", 16, ("dense",)),
    ("bert", "road_1", 32, ("query", "value")),
    ("llama", "road_4", 2, ("q_proj", "v_proj", "down_proj")),
    ("llama", "road_1", 2, ("q_proj", "down_proj")),
    ("llama", "road_4", 16, ("q_proj", "v_proj")),
]
PARITY_IDS = [f"{m}-{v}-g{g}" for m, v, g, _ in PARITY]


@pytest.mark.parametrize(("model_name", "variant", "group_size", "targets"), PARITY, ids=PARITY_IDS)
def test_saved_by_surgeon_loads_in_peft_with_same_outputs(
    model_name, variant, group_size, targets, tmp_path
):
    entry = ZOO[model_name]
    spec = RoAd(targets=targets, variant=variant, group_size=group_size)
    cm = surgeon.compile(entry.model(), spec)
    add_noise(cm.store.parameters(), scale=NOISE)
    x = entry.example()
    expected = logits(cm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "ROAD"
    assert (config["variant"], config["group_size"]) == (variant, group_size)
    loaded = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("model_name", "variant", "group_size", "targets"), PARITY, ids=PARITY_IDS)
def test_saved_by_peft_loads_in_surgeon_with_same_outputs(
    model_name, variant, group_size, targets, tmp_path
):
    entry = ZOO[model_name]
    config = peft.RoadConfig(target_modules=list(targets), variant=variant, group_size=group_size)
    pm = peft_model(entry.model(), config, scale=NOISE)
    x = entry.example()
    expected = logits(pm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    spec = cm.spec("default")
    assert (spec.variant, spec.group_size) == (variant, group_size)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        ours, theirs = cm.model.get_submodule(path), pm.get_base_model().get_submodule(path)
        torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-6, atol=1e-6)
        if ours.bias is not None:
            torch.testing.assert_close(ours.bias, theirs.base_layer.bias, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly(dtype, tmp_path):
    entry = ZOO["bert"]
    config = peft.RoadConfig(target_modules=["dense"], variant="road_4", group_size=16)
    pm = peft_model(entry.model().to(dtype), config, scale=NOISE)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.road_theta.dtype == torch.float32  # PEFT's default upcast of adapter weights
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)
    pm.merge_adapter()
    cm.merge()
    for path in cm.store.paths["default"]:
        ours, theirs = cm.model.get_submodule(path), pm.get_base_model().get_submodule(path)
        assert torch.equal(ours.weight, theirs.base_layer.weight)
        assert torch.equal(ours.bias, theirs.base_layer.bias)


def test_a_mixed_batch_matches_peft_adapter_names(tmp_path):
    entry = ZOO["llama"]
    spec = RoAd(targets=("q_proj", "v_proj", "down_proj"), variant="road_2", group_size=8)
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec}))
    add_noise(cm.store.parameters(), scale=NOISE)
    cm.eval().save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path / "a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    x = {"input_ids": torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(1))}
    names = ["b", "__base__", "a"]
    expected = logits(pm(**x, adapter_names=["b", "__base__", "default"]))
    torch.testing.assert_close(logits(cm(**x, adapter_names=names)), expected, rtol=1e-5, atol=1e-5)


def test_peft_file_with_random_init_loads_its_weights(tmp_path):
    """``init_weights=false`` only changes the starting values; the file's weights rule."""
    entry = ZOO["llama"]
    config = peft.RoadConfig(target_modules=["q_proj"], group_size=8, init_weights=False)
    pm = peft_model(entry.model(), config, seed=None)
    pm.save_pretrained(tmp_path)
    x = entry.example()
    cm = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_layers_and_exclusions_are_saved_as_the_chosen_paths(tmp_path):
    """RoadConfig has neither layers_to_transform nor exclude_modules: PEFT gets the paths."""
    entry = ZOO["llama"]
    spec = RoAd(targets=("q_proj", "v_proj"), group_size=8, layers=1, exclude=("v_proj",))
    cm = surgeon.compile(entry.model(), spec)
    add_noise(cm.store.parameters(), scale=NOISE)
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert "layers_to_transform" not in config and "exclude_modules" not in config
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert set(saved) == {
        f"base_model.model.model.layers.1.self_attn.q_proj.road_{n}" for n in ("theta", "alpha")
    }
    loaded = peft_loaded(entry.model(), tmp_path)
    x = entry.example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"variant": "road_3"}, r"variant='road_3': expected one of 'road_1', 'road_2', 'road_4'"),
        ({"group_size": 3}, r"RoAd.group_size=3: expected an even integer.*'group_size'"),
        ({"group_size": "8"}, r"group_size='8': expected an integer"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"group_size": 64}, r"RoAd.group_size=64: the output features of .*q_proj \(32\)"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), RoAd(targets=("q_proj",), group_size=8)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- layers refused --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_features", "group_size"), [(6, 4), (5, 2), (24, 16)], ids=["6-by-4", "odd", "24-by-16"]
)
def test_outputs_that_do_not_fill_whole_groups_are_refused_as_peft_refuses(
    out_features, group_size
):
    model = One(nn.Linear(3, out_features))
    with pytest.raises(
        surgeon.SpecError,
        match=rf"RoAd.group_size={group_size}: the output features of layer \({out_features}\) "
        r"are not a multiple of it",
    ):
        surgeon.compile(model, RoAd(targets=("layer",), group_size=group_size))
    with warnings.catch_warnings(), pytest.raises(ValueError, match="divisible by group_size"):
        warnings.simplefilter("ignore")
        peft.get_peft_model(model, peft.RoadConfig(target_modules=["layer"], group_size=group_size))


def test_a_preset_reaching_an_ungrouped_layer_is_refused_too():
    """The MLP's head has 5 outputs: all-linear takes it, so RoAd refuses (as PEFT would)."""
    with pytest.raises(surgeon.SpecError, match=r"head \(5\)"):
        surgeon.compile(ZOO["mlp"].model(), RoAd(targets="all-linear", group_size=4))


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (gpt2_conv1d(4, 6), "Conv1D"),
        (nn.Conv2d(2, 4, 1), "Conv2d"),
        (nn.Embedding(5, 4), "Embedding"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which RoAd cannot adapt"):
        surgeon.compile(One(layer), RoAd(targets=("layer",), group_size=2))


# -- spec validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"variant": "road_3"}, r"RoAd.variant='road_3': expected one of 'road_1', 'road_2'"),
        ({"variant": 1}, r"RoAd.variant=1: expected one of"),
        ({"group_size": 3}, r"RoAd.group_size=3: expected an even integer"),
        ({"group_size": 0}, r"RoAd.group_size=0: expected an integer >= 2"),
        ({"group_size": True}, r"RoAd.group_size=True: expected an integer >= 2"),
        ({"targets": []}, r"RoAd.targets=\[\]: expected at least one target"),
        ({"layers": -1}, r"RoAd.layers=-1"),
        ({"rank": 4}, r"RoAd has no field 'rank'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        RoAd(**fields)
