"""SHiRA beyond the conformance suite: its formula, the random mask drawn as PEFT's (seeded and
unseeded), custom masks from a function saved as indices and loaded without it both ways, the
adapted weight kept in eval, several adapters composing one weight, exact half-precision parity
with PEFT merged and unmerged, errors, golden rewritten graphs."""

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
from surgeon.passes.sparse.shira import SHiRA


def formula(spec, adapter, base, x):
    """SHiRA (Bhardwaj et al., 2024): ``(W + ΔW) x + b`` with ``ΔW`` the trained values at the
    mask's positions and zero elsewhere."""
    rows, columns = adapter.shira_indices.long()
    delta = torch.zeros_like(base.weight)
    delta[rows, columns] = adapter.shira_weight
    return plain_output(base, x, base.weight + delta)


peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "down_proj")


def _layers(cm, name: str = "default") -> dict:
    return dict(cm.store.items(name))


def _peft_layer(pm, path: str):
    return pm.base_model.model.get_submodule(path)


def magnitude_mask(layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
    """A custom mask in PEFT's mask-function form: the r·(in + out) entries of largest |W|."""
    weight = layer.weight.detach()
    count = r * sum(weight.shape)
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    mask[weight.abs().flatten().topk(count).indices] = 1
    return mask.view_as(weight)


# -- the mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, 3])
def test_a_fresh_adapter_has_peft_random_mask_and_zero_values(seed):
    """The mask is drawn as PEFT draws it (a CPU permutation, seeded or from the generator's
    default seed), in row-major order, r·(in + out) entries: PEFT's fresh model holds the same."""
    entry = ZOO["llama"]
    config = peft.ShiraConfig(r=2, target_modules=list(TARGETS), random_seed=seed)
    pm = peft_model(entry.model(), config, seed=None)
    cm = surgeon.compile(entry.model(), SHiRA(rank=2, seed=seed, targets=TARGETS))
    for path, layer in _layers(cm).items():
        theirs = _peft_layer(pm, path)
        assert layer.shira_indices.dtype == torch.int32
        assert torch.equal(layer.shira_indices, theirs.shira_indices["default"]), path
        assert torch.equal(layer.shira_weight, theirs.shira_weight["default"]), path
        assert layer.shira_weight.numel() == 2 * sum(layer.base.weight.shape)
        assert not layer.shira_weight.any()
    rows, columns = layer.shira_indices.long()
    flat = rows * layer.base.in_features + columns
    assert torch.equal(flat, flat.sort().values)  # row-major, as PEFT reads its mask
    q = [layer for path, layer in _layers(cm).items() if path.endswith("q_proj")]
    # a generator of its own per layer: layers of one shape share their mask, as in PEFT
    assert torch.equal(q[0].shira_indices, q[1].shira_indices)


def test_the_seed_decides_the_mask():
    entry = ZOO["mlp"]
    masks = [
        _layers(surgeon.compile(entry.model(), SHiRA(rank=1, seed=s, targets=("head",))))[
            "head"
        ].shira_indices
        for s in (None, 1, 2)
    ]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


# -- custom masks --------------------------------------------------------------------------------


def _custom_peft_config(**fields) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notice about a mask_type it does not know
        config = peft.ShiraConfig(mask_type="magnitude", **fields)
    config.mask_fn = magnitude_mask
    return config


def test_a_custom_mask_is_saved_as_indices_and_loads_without_its_function_both_ways(tmp_path):
    entry = ZOO["mlp"]
    targets = ("body.3", "head")
    spec = SHiRA(rank=1, mask_type="magnitude", mask_fn=magnitude_mask, targets=targets)
    cm = surgeon.compile(entry.model(), spec)
    for layer in _layers(cm).values():
        expected = torch.stack(torch.where(magnitude_mask(layer.base, 1) == 1)).int()
        assert torch.equal(layer.shira_indices, expected)
    add_noise(cm.store.parameters(), 2, 0.3)
    x = entry.example()
    expected = cm(**x)
    cm.save_adapters(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["mask_type"] == "magnitude" and "mask_fn" not in config
    assert "base_model.model.head.shira_indices" in load_file(tmp_path / "ours" / WEIGHTS_NAME)
    back = surgeon.load(entry.model(), tmp_path / "ours")
    assert back.spec("default").mask_fn is None
    torch.testing.assert_close(back(**x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(peft_loaded(entry.model(), tmp_path / "ours")(**x), expected)
    # PEFT's own custom-mask file
    theirs = peft_model(entry.model(), _custom_peft_config(r=1, target_modules=list(targets)))
    theirs.save_pretrained(tmp_path / "peft")
    loaded = surgeon.load(entry.model(), tmp_path / "peft")
    torch.testing.assert_close(loaded(**x), theirs(**x), rtol=1e-5, atol=1e-6)


def test_a_custom_mask_type_builds_a_new_adapter_only_with_its_function(tmp_path):
    entry = ZOO["mlp"]
    with pytest.raises(surgeon.SpecError, match=r"mask_type='magnitude' names a custom mask"):
        surgeon.compile(entry.model(), SHiRA(rank=1, mask_type="magnitude", targets=("head",)))
    spec = SHiRA(rank=1, mask_type="magnitude", mask_fn=magnitude_mask, targets=("head",))
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    loaded = surgeon.load(entry.model(), tmp_path)
    # the spec read from the file built the layers its indices filled; it builds no new one
    with pytest.raises(surgeon.SpecError, match="pass mask_fn"):
        surgeon.compile(entry.model(), loaded.spec("default"))


@pytest.mark.parametrize(
    ("mask_fn", "match"),
    [
        (lambda layer, r: torch.ones_like(layer.weight), r"the mask has 120 ones; .* = 29"),
        (lambda layer, r: torch.ones(3, 3), r"returned \(3, 3\), expected a \(5, 24\) mask"),
        (lambda layer, r: None, r"returned NoneType"),
    ],
    ids=["count", "shape", "not-a-tensor"],
)
def test_a_mask_function_must_give_peft_mask(mask_fn, match):
    spec = SHiRA(rank=1, mask_type="custom", mask_fn=mask_fn, targets=("head",))
    with pytest.raises(surgeon.SpecError, match=rf"SHiRA.mask_fn on head: {match}"):
        surgeon.compile(ZOO["mlp"].model(), spec)


# -- the graph and the eval-time weight --------------------------------------------------------------


def test_the_adapted_weight_is_kept_in_eval_until_the_values_change():
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6))
    cm = surgeon.compile(model, SHiRA(rank=1, targets=("layer",))).eval()
    adapter = _layers(cm)["layer"]
    add_noise([adapter.shira_weight])
    x = torch.randn(3, 5)
    with torch.no_grad():
        first = cm(x)
        kept = adapter.adapted_weight._kept[1]
        cm(x)
        assert adapter.adapted_weight._kept[1] is kept
        adapter.shira_weight.add_(1.0)  # an in-place change moves the version: recomputed
        torch.testing.assert_close(cm(x), formula(None, adapter, model.layer, x))
    assert not torch.allclose(first, cm(x))


GOLDEN_TWO = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    adapters_a_head_adapted_weight = self.adapters.a.head.adapted_weight()
    adapters_a_head_base_bias = self.adapters.a.head.base_bias
    adapters_b_head_shira_indices = self.adapters.b.head.shira_indices
    adapters_b_head_shira_weight = self.adapters.b.head.shira_weight
    sparse_added = surgeon_passes_sparse_shira_sparse_added(adapters_a_head_adapted_weight, adapters_b_head_shira_indices, adapters_b_head_shira_weight);  adapters_a_head_adapted_weight = adapters_b_head_shira_indices = adapters_b_head_shira_weight = None
    linear = torch._C._nn.linear(relu, sparse_added, adapters_a_head_base_bias);  relu = sparse_added = adapters_a_head_base_bias = None
    return linear"""


def test_several_adapters_add_their_entries_to_one_weight():
    """One matmul, as PEFT's forward: the second adapter adds its entries to the weight the
    first one adapted (golden graph); merging and unmerging keep the outputs."""
    entry = ZOO["mlp"]
    spec = SHiRA(rank=1, targets=("head",))
    cm = surgeon.compile(
        entry.model(), surgeon.Spec({"a": spec, "b": SHiRA(rank=1, seed=4, targets=("head",))})
    )
    add_noise(cm.store.parameters(), 2, 0.3)
    cm.set_active(["a", "b"])
    cm.eval()
    assert graph_code(cm) == GOLDEN_TWO
    x = entry.example()["x"]
    a, b = _layers(cm, "a")["head"], _layers(cm, "b")["head"]
    head = cm.model.head
    weight = head.weight.detach().clone()
    for layer in (a, b):
        rows, columns = layer.shira_indices.long()
        weight[rows, columns] += layer.shira_weight.detach()
    with torch.no_grad(), cm.disabled():
        expected = plain_output(head, torch.relu(cm.model.body(x)), weight)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
    cm.merge()
    torch.testing.assert_close(head.weight, weight, rtol=0, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


def test_after_an_adapter_of_another_method_the_update_adds_to_its_output():
    """IA³ scales the layer's output first; SHiRA's update comes after it, unscaled (``+ ΔW x``),
    which is also what merging them in that order folds."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 6)
    ia3 = surgeon.IA3(targets=("layer",), feedforward=())
    spec = surgeon.Spec({"ia3": ia3, "shira": SHiRA(rank=1, targets=("layer",))})
    cm = surgeon.compile(One(layer), spec)
    add_noise(cm.store.parameters(), 2, 0.3)
    cm.set_active(["ia3", "shira"])
    cm.eval()
    x = torch.randn(3, 5)
    scale, shira = _layers(cm, "ia3")["layer"].ia3_l, _layers(cm, "shira")["layer"]
    with torch.no_grad():
        plain = plain_output(layer, x)
        expected = scale * plain + formula(None, shira, layer, x) - plain
        torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
        cm.merge()
        torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
        cm.unmerge()
        torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)


GOLDEN_LEAF = """\
def forward(self, input):
    input_1 = input
    adapters_default_adapted_weight = self.adapters.default.adapted_weight()
    linear = torch._C._nn.linear(input_1, adapters_default_adapted_weight, None);  input_1 = adapters_default_adapted_weight = None
    return linear"""


def test_golden_graph_of_a_leaf_runs_the_layer_with_the_adapted_weight():
    cm = surgeon.compile(ZOO["llama"].model().to(torch.bfloat16), SHiRA(rank=1))
    assert graph_code(cm, "model.layers.0.self_attn.q_proj") == GOLDEN_LEAF


# -- PEFT parity -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly_unmerged_and_merged(dtype, tmp_path):
    """float32 values added to the half-precision weight and rounded once, as PEFT."""
    entry = ZOO["llama"]
    config = peft.ShiraConfig(r=2, target_modules=list(TARGETS), random_seed=1)
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path).eval()
    assert all(layer.shira_weight.dtype == torch.float32 for layer in _layers(cm).values())
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)
    cm.merge()
    pm.merge_adapter()
    for path, layer in _layers(cm).items():
        assert torch.equal(layer.base.weight, _peft_layer(pm, path).base_layer.weight), path
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=0, atol=0)


def test_the_config_is_written_as_peft_writes_it(tmp_path):
    """Every key PEFT writes, no other; the seed as random_seed, read back."""
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), SHiRA(rank=1, seed=3, targets=("head",))).save_adapters(
        tmp_path / "ours"
    )
    config = peft.ShiraConfig(r=1, random_seed=3, target_modules=["head"])
    peft_model(entry.model(), config, seed=None).save_pretrained(tmp_path / "peft")
    ours, theirs = (json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("ours", "peft"))
    bookkeeping = {"peft_version", "auto_mapping"}
    assert {k: v for k, v in ours.items() if k not in bookkeeping} == {
        k: v for k, v in theirs.items() if k not in bookkeeping
    }
    assert surgeon.load(entry.model(), tmp_path / "peft").spec("default").seed == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"target_modules": None}, "target_modules is missing"),
        ({"r": 0}, r"SHiRA.rank=0.*'r'"),
        ({"use_dora": True}, "use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), SHiRA(rank=1, targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_a_file_without_its_indices_is_refused(tmp_path):
    """PEFT always saves shira_indices; a file stripped of them would need the mask drawn again,
    which a load does not do (it refuses, naming the key)."""
    from safetensors.torch import save_file

    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), SHiRA(rank=1, targets=("head",))).save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    del tensors["base_model.model.head.shira_indices"]
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(surgeon.SpecError, match=r"missing key\(s\), e.g. .*head.shira_indices"):
        surgeon.load(entry.model(), tmp_path)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"SHiRA.rank=0: expected an integer >= 1"),
        ({"seed": 1.5}, r"SHiRA.seed=1.5: expected an integer \(a torch seed\) or None"),
        ({"seed": 2**64}, r"SHiRA.seed=18446744073709551616"),
        ({"mask_type": ""}, r"SHiRA.mask_type='': expected 'random' or the name"),
        ({"mask_type": "custom", "mask_fn": "top"}, r"SHiRA.mask_fn='top': expected a function"),
        ({"mask_fn": magnitude_mask}, r"mask_fn is set but mask_type='random'"),
        ({"alpha": 4}, r"SHiRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        SHiRA(**fields)


def test_a_rank_with_more_entries_than_the_weight_is_refused():
    with pytest.raises(surgeon.SpecError, match=r"SHiRA.rank=3 on layer: rank·\(in \+ out\) = 33"):
        surgeon.compile(One(nn.Linear(5, 6)), SHiRA(rank=3, targets=("layer",)))


@pytest.mark.parametrize(
    ("layer", "name"),
    [(gpt2_conv1d(), "Conv1D"), (nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which SHiRA cannot adapt"):
        surgeon.compile(One(layer), SHiRA(rank=1, targets=("layer",)))
