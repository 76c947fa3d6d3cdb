"""HRA beyond the conformance suite: its formula (the reflections multiplied out one by one, and
Gram-Schmidt by hand), the factored H against the plain product, PEFT's init draws, the
symmetric init's conditions (even rank, no Gram-Schmidt) and PEFT files that break them, PEFT
parity for options the examples lack (strided convolutions, Gram-Schmidt on a convolution, two
adapters on a convolution, trained biases), the orthogonality regulariser and its place in
`surgeon.train`, the eval-time cache, convolutions PEFT computes otherwise, spec errors and PEFT
keys refused, golden rewritten graphs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    count_calls,
    gpt2_conv1d,
    graph_code,
    load_with_changed_config,
    logits,
    mlp_without_dropout,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.orthogonal.hra import HRA, HRALayer


def _gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """The columns of ``u`` orthonormalised in order, by hand."""
    done: list[torch.Tensor] = []
    for column in u.t():
        for q in done:
            column = column - (q @ column) * q
        done.append(column / column.norm())
    return torch.stack(done, dim=1)


def _householder(u: torch.Tensor, gram_schmidt: bool) -> torch.Tensor:
    """``H = ∏ (I - 2 u_i u_iᵀ / ‖u_i‖²)`` over the columns in order, or ``I - 2 Q Qᵀ`` with Q
    the Gram-Schmidt basis of the columns."""
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    if gram_schmidt:
        q = _gram_schmidt(u)
        return eye - 2 * q @ q.t()
    h = eye
    for column in u.t():
        h = h @ (eye - 2 * torch.outer(column, column) / (column @ column))
    return h


def _rotated(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``W H`` with the weight's input dims (a kernel's channels x taps) flattened."""
    return (weight.reshape(weight.shape[0], -1) @ h).view(weight.shape)


def formula(spec, adapter, base, x):
    """HRA (Yuan et al., 2024): the layer run with ``W H``, H the chain of Householder
    reflections ``hra_u``'s columns define (or ``I - 2 Q Qᵀ`` after Gram-Schmidt); a Conv2d's
    weight is flattened over its input dims. Computed in float64."""
    h = _householder(adapter.hra_u.detach().double(), spec.gram_schmidt)
    weight = _rotated(base.weight.detach().double(), h)
    return plain_output(base, x, weight.to(base.weight.dtype))


peft = pytest.importorskip("peft")


def _layer(cm, name: str = "default") -> HRALayer:
    ((_, layer),) = cm.store.items(name)
    return layer


def _strided_conv() -> One:
    torch.manual_seed(0)
    return One(nn.Conv2d(3, 4, 3, stride=2, padding=1))


CONV_INPUT = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "gram_schmidt"),
    # a chain may be longer than the 5 input dims; Gram-Schmidt may not (refused below)
    [(1, False), (3, False), (7, False), (1, True), (3, True), (5, True)],
)
def test_factors_give_the_product_of_the_reflections(rank, gram_schmidt):
    torch.manual_seed(rank)
    cm = surgeon.compile(
        One(nn.Linear(5, 6)),
        HRA(rank=rank, init="random", gram_schmidt=gram_schmidt, targets=("layer",)),
    )
    layer = _layer(cm)
    v, s = layer.factors()
    h = (torch.eye(5) - v @ s @ v.t()).double()
    expected = _householder(layer.hra_u.detach().double(), gram_schmidt)
    close = {"atol": 1e-5, "rtol": 0}  # float32 factors against a float64 product
    torch.testing.assert_close(h, expected, **close)
    torch.testing.assert_close(h @ h.t(), torch.eye(5, dtype=torch.float64), **close)
    if gram_schmidt:  # one reflection, through the span of the u's: symmetric
        torch.testing.assert_close(h, h.t(), **close)


@pytest.mark.parametrize("gram_schmidt", [False, True], ids=["chain", "gram-schmidt"])
def test_gram_schmidt_sees_only_the_span_of_the_vectors(gram_schmidt):
    """After Gram-Schmidt, H = I - 2 Q Qᵀ depends on the u's span alone: reordering or
    rescaling them changes nothing. The plain chain multiplies the reflections in order."""
    torch.manual_seed(0)
    spec = HRA(rank=3, init="random", gram_schmidt=gram_schmidt, targets=("layer",))
    cm = surgeon.compile(One(nn.Linear(5, 6)), spec).eval()
    x = torch.randn(4, 5)
    u = _layer(cm).hra_u
    before = cm(x)
    with torch.no_grad():
        u.copy_(u[:, [2, 0, 1]] * torch.tensor([2.0, -0.5, 3.0]))
    assert torch.allclose(cm(x), before, atol=1e-5) is gram_schmidt


def test_merge_and_unmerge_fold_w_h_and_its_transpose_on_a_strided_conv():
    model = _strided_conv()
    weight = model.layer.weight.detach().clone()
    cm = surgeon.compile(model, HRA(rank=4, targets=("layer",))).eval()
    randomize(cm, scale=0.5)
    layer = _layer(cm)
    expected = formula(cm.spec("default"), layer, model.layer, CONV_INPUT)
    torch.testing.assert_close(cm(CONV_INPUT), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    h = _householder(layer.hra_u.detach().double(), False)
    torch.testing.assert_close(model.layer.weight, _rotated(weight.double(), h).float())
    torch.testing.assert_close(cm(CONV_INPUT), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-6)


# -- the init ------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["symmetric", "random"])
@pytest.mark.parametrize(
    "build", [lambda: nn.Linear(6, 5), lambda: nn.Conv2d(3, 4, 3)], ids=["linear", "conv2d"]
)
def test_init_draws_as_peft_does(build, init):
    layer, twin = build(), build()
    torch.manual_seed(7)
    ours = surgeon.compile(One(layer), HRA(rank=4, init=init, targets=("layer",)))
    torch.manual_seed(7)
    symmetric = init == "symmetric"
    config = peft.HRAConfig(r=4, target_modules=["layer"], init_weights=symmetric)
    theirs = peft_model(One(twin), config, seed=None)
    u = _layer(ours).hra_u
    assert torch.equal(u, theirs.base_model.model.layer.hra_u["default"])
    rows = 6 if isinstance(layer, nn.Linear) else 3 * 3 * 3
    assert u.shape == (rows, 4)
    assert torch.equal(u[:, 0::2], u[:, 1::2]) is symmetric


def test_the_symmetric_init_is_the_identity_in_half_precision():
    model = ZOO["llama"].model().to(torch.bfloat16)
    x = ZOO["llama"].example()
    before = logits(model(**x))
    cm = surgeon.compile(model, HRA(rank=4))
    assert all(layer.hra_u.dtype == torch.float32 for _, layer in cm.store.items("default"))
    torch.testing.assert_close(logits(cm(**x)), before, rtol=0, atol=0)


def test_an_odd_rank_with_the_symmetric_init_is_refused():
    with pytest.raises(surgeon.SpecError, match=r"HRA.rank=3: the symmetric init .* even rank"):
        HRA(rank=3)
    assert HRA(rank=3, init="random").rank == 3


def test_a_peft_file_with_an_odd_rank_loads_as_the_random_draw_peft_made(tmp_path):
    """PEFT warns on an odd rank with init_weights=true and draws every vector at random: the
    file loads, as that init."""
    entry = ZOO["llama"]
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="r is odd"):
        pm = peft.get_peft_model(
            entry.model(), peft.HRAConfig(r=3, target_modules=["q_proj", "v_proj"])
        )
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["init_weights"] is True
    x = entry.example()
    expected = logits(pm.eval()(**x))
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").init == "random" and cm.spec("default").rank == 3
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


# -- Gram-Schmidt ------------------------------------------------------------------------------


def test_gram_schmidt_with_the_symmetric_init_is_refused():
    with pytest.raises(surgeon.SpecError, match=r"HRA.gram_schmidt=True: .* use init='random'"):
        HRA(rank=4, gram_schmidt=True)


def test_gram_schmidt_needs_no_more_reflections_than_input_dims():
    with pytest.raises(surgeon.SpecError, match=r"HRA on layer: gram_schmidt needs rank <= 5"):
        surgeon.compile(
            One(nn.Linear(5, 6)),
            HRA(rank=6, gram_schmidt=True, init="random", targets=("layer",)),
        )


@pytest.mark.parametrize("gram_schmidt", [False, True], ids=["chain", "gram-schmidt"])
def test_a_strided_conv_matches_peft_both_ways(gram_schmidt, tmp_path):
    spec = HRA(rank=5, gram_schmidt=gram_schmidt, init="random", targets=("layer",))
    cm = surgeon.compile(_strided_conv(), spec).eval()
    randomize(cm, scale=0.5)
    expected = cm(CONV_INPUT)
    cm.save_adapters(tmp_path / "ours")
    loaded = peft_loaded(_strided_conv(), tmp_path / "ours")
    torch.testing.assert_close(loaded(CONV_INPUT), expected, rtol=1e-5, atol=1e-5)

    config = peft.HRAConfig(
        r=5, apply_GS=gram_schmidt, init_weights=False, target_modules=["layer"]
    )
    pm = peft_model(_strided_conv(), config)
    pm.save_pretrained(tmp_path / "peft")
    back = surgeon.load(_strided_conv(), tmp_path / "peft").eval()
    assert back.spec("default") == spec
    torch.testing.assert_close(back(CONV_INPUT), pm.eval()(CONV_INPUT), rtol=1e-5, atol=1e-5)


def test_a_gram_schmidt_train_step_gives_peft_gradients_on_a_conv(tmp_path):
    config = peft.HRAConfig(r=3, apply_GS=True, init_weights=False, target_modules=["layer"])
    pm = peft_model(_strided_conv(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_strided_conv(), tmp_path)
    for model in (cm, pm):
        model.train()
        model(CONV_INPUT).pow(2).mean().backward()
    theirs = pm.base_model.model.layer.hra_u["default"].grad
    torch.testing.assert_close(_layer(cm).hra_u.grad, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_conv_matches_peft_exactly_merged_too(dtype, tmp_path):
    """The rotated convolution runs in float32 as PEFT's does, then rounds once."""
    cm = surgeon.compile(_strided_conv().to(dtype), HRA(rank=4, targets=("layer",))).eval()
    randomize(cm, scale=0.5)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_strided_conv().to(dtype), tmp_path)
    x = CONV_INPUT.to(dtype)
    out = cm(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, pm(x), rtol=0, atol=0)
    cm.merge()
    pm.merge_adapter()
    theirs = pm.base_model.model.layer.base_layer.weight
    torch.testing.assert_close(cm.model.layer.weight, theirs, rtol=0, atol=0)


# -- several adapters, mixed batches, biases ----------------------------------------------------


def _two_on_a_conv() -> surgeon.CompiledModel:
    spec = HRA(rank=4, targets=("layer",))
    cm = surgeon.compile(_strided_conv(), surgeon.Spec({"a": spec, "b": spec}))
    randomize(cm, scale=0.5)
    cm.set_active(["a", "b"])
    return cm.eval()


def test_two_adapters_on_a_conv_compose_as_peft_and_merge(tmp_path):
    """W H_a H_b: b rotates the weight a rotated, as PEFT multiplies them."""
    cm = _two_on_a_conv()
    both = cm(CONV_INPUT)
    a, b = (_layer(cm, n).hra_u.detach().double() for n in "ab")
    h = _householder(a, False) @ _householder(b, False)
    base = cm.model.layer
    expected = plain_output(base, CONV_INPUT, _rotated(base.weight.detach().double(), h).float())
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_strided_conv(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(pm(CONV_INPUT), both, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(CONV_INPUT), both, rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_on_a_conv_gives_each_row_its_adapter():
    cm = _two_on_a_conv()
    names = ["a", "b"]
    mixed = cm(CONV_INPUT, adapter_names=names)
    for row, name in enumerate(names):
        cm.set_active(name)
        torch.testing.assert_close(mixed[row], cm(CONV_INPUT)[row], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", ["hra_only", "all"])
def test_trained_biases_are_saved_and_load_in_peft(bias, tmp_path):
    entry = ZOO["mlp"]
    spec = HRA(rank=2, targets=("head",), bias=bias)
    cm = surgeon.compile(entry.model(), spec)
    trained = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    biases = {"head.bias"} if bias == "hra_only" else {"body.0.bias", "body.3.bias", "head.bias"}
    assert trained == biases
    randomize(cm, scale=0.5)
    with torch.no_grad():  # as training would move them
        for name in biases:
            cm.model.get_parameter(name).add_(0.5)
    x = entry.example()
    expected = cm.eval()(**x)
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.head.base_layer.bias" in saved
    assert ("base_model.model.body.0.bias" in saved) is (bias == "all")
    torch.testing.assert_close(peft_loaded(entry.model(), tmp_path)(**x), expected)
    torch.testing.assert_close(surgeon.load(entry.model(), tmp_path).eval()(**x), expected)


# -- the orthogonality regulariser -----------------------------------------------------------


def test_the_regulariser_is_the_sum_of_frobenius_norms_by_hand():
    cm = surgeon.compile(ZOO["llama"].model(), HRA(rank=4, orth_reg_weight=0.3))
    randomize(cm, scale=0.4)
    layers = dict(cm.store.items("default"))
    expected = 0.0
    for layer in layers.values():
        u = layer.hra_u.detach()
        unit = torch.stack([c / c.norm() for c in u.t()], dim=1)
        expected += ((torch.eye(4) - unit.t() @ unit) ** 2).sum().sqrt()
    term = cm.regularization_loss()
    torch.testing.assert_close(term, 0.3 * expected)
    term.backward()
    assert all(layer.hra_u.grad is not None for layer in layers.values())
    assert HRA(rank=4).loss_term(layers) is None  # off by default, as PEFT trains


def _train_by_hand(cm, data, steps: int, regularised: bool) -> None:
    """What `surgeon.train` should do with the config below: AdamW, mean-squared error, the
    regulariser added to each step's loss."""
    trained = [p for p in cm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.0)
    cm.train()
    for step in range(steps):
        x, y = (torch.stack(t) for t in zip(*data[2 * step : 2 * step + 2]))
        loss = F.mse_loss(cm(x), y)
        if regularised:
            loss = loss + cm.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_surgeon_train_adds_the_regulariser_as_a_hand_written_loop_does():
    spec = HRA(rank=4, targets=("body.0", "head"), orth_reg_weight=0.5)
    generator = torch.Generator().manual_seed(4)
    data = [
        (torch.randn(12, generator=generator), torch.randn(5, generator=generator))
        for _ in range(6)
    ]
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=3,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=None,
        lr_scheduler="constant",
        shuffle=False,
        progress=False,
        distributed="none",
    )
    ours = surgeon.compile(mlp_without_dropout(), spec)
    randomize(ours, scale=0.5)  # seeded: the hand-trained copies start from the same values
    surgeon.train(ours, data, config, loss_fn=F.mse_loss)
    for regularised in (True, False):
        hand = surgeon.compile(mlp_without_dropout(), spec)
        randomize(hand, scale=0.5)
        _train_by_hand(hand, data, 3, regularised)
        for path, layer in ours.store.items("default"):
            mine = layer.hra_u.detach()
            theirs = dict(hand.store.items("default"))[path].hra_u.detach()
            assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6) is regularised, path


# -- the eval-time cache ----------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    return count_calls(monkeypatch, HRALayer, "factors")


def test_inference_builds_the_factors_once_until_hra_u_changes(counted):
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), HRA(rank=2, targets=("head",))).eval()
    randomize(cm, scale=0.5)
    x = entry.example()
    with torch.no_grad():
        first = cm(**x)
        torch.testing.assert_close(cm(**x), first)
        assert len(counted) == 1
        _layer(cm).hra_u.mul_(2.0)  # an in-place update: a new version
        cm(**x)
    assert len(counted) == 2


def test_training_or_autograd_rebuilds_the_factors_every_forward(counted):
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), HRA(rank=2, targets=("head",)))
    randomize(cm, scale=0.5)
    x = entry.example()
    cm.train()
    cm(**x), cm(**x)
    assert len(counted) == 2
    cm.eval()  # eval mode with autograd on: gradients still reach hra_u
    cm(**x).sum().backward()
    assert len(counted) == 3 and _layer(cm).hra_u.grad is not None


# -- layers, spec errors, PEFT keys -------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), r"groups=2 \(PEFT refuses"),
        (nn.Conv2d(2, 2, (1, 3)), r"a non-square kernel \(1, 3\)"),
        (nn.Conv2d(2, 2, 3, stride=(1, 2)), r"stride=\(1, 2\) \(PEFT uses"),
        (nn.Conv2d(2, 2, 3, padding="same"), r"padding='same' \(PEFT uses"),
        (nn.Conv2d(2, 2, 3, padding=(0, 1)), r"padding=\(0, 1\) \(PEFT uses"),
        (nn.Conv2d(2, 2, 3, dilation=2), r"dilation=\(2, 2\) \(PEFT drops it\)"),
        (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect'"),
    ],
    ids=["groups", "kernel", "stride", "padding-string", "padding", "dilation", "padding-mode"],
)
def test_convolutions_peft_computes_otherwise_are_refused(layer, match):
    with pytest.raises(surgeon.SpecError, match=rf"HRA on layer: Conv2d with {match}"):
        surgeon.compile(One(layer), HRA(rank=2, targets=("layer",)))


@pytest.mark.parametrize(
    ("layer", "name"),
    [
        (nn.Embedding(5, 4), "Embedding"),
        (nn.Conv1d(2, 2, 1), "Conv1d"),
        (gpt2_conv1d(), "Conv1D"),
    ],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which HRA cannot adapt"):
        surgeon.compile(One(layer), HRA(targets=("layer",)))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"HRA.rank=0: expected an integer >= 1"),
        ({"gram_schmidt": 1}, r"HRA.gram_schmidt=1: expected true or false"),
        ({"init": "orthogonal"}, r"HRA.init='orthogonal': expected one of 'symmetric', 'random'"),
        ({"bias": "lora_only"}, r"HRA.bias='lora_only': expected one of 'none', 'all', 'hra_only'"),
        ({"orth_reg_weight": -1}, r"HRA.orth_reg_weight=-1: expected a number >= 0"),
        ({"targets": []}, r"HRA.targets=\[\]: expected at least one target"),
        ({"apply_GS": True}, r"HRA has no field 'apply_GS'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        HRA(**fields)


def test_config_keys_map_to_fields_and_the_regulariser_stays_out():
    spec = HRA(rank=6, gram_schmidt=True, init="random", bias="hra_only", orth_reg_weight=0.2)
    config = spec.to_peft_config(["model.layers.0.self_attn.q_proj"])
    assert {k: config[k] for k in ("peft_type", "r", "apply_GS", "init_weights", "bias")} == {
        "peft_type": "HRA",
        "r": 6,
        "apply_GS": True,
        "init_weights": False,
        "bias": "hra_only",
    }
    assert not any("orth" in key for key in config)  # PEFT's HRAConfig has no such field
    peft.get_peft_config(config)  # PEFT takes every key we write
    assert HRA.from_peft_config(config, "here") == spec.replace(orth_reg_weight=0.0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"r": 0}, r"HRA.rank=0: .*\(adapter_config.json key 'r'\)"),
        ({"r": "8"}, r"r='8': expected an integer"),
        ({"apply_GS": "yes"}, r"apply_GS='yes': expected true or false"),
        ({"init_weights": "kaiming"}, r"init_weights='kaiming': expected true or false"),
        ({"bias": "lora_only"}, r"HRA.bias='lora_only'.*\(adapter_config.json key 'bias'\)"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
        ({"use_dora": True}, "use_dora=True selects a variant"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), HRA(rank=2)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- golden graphs -------------------------------------------------------------------------------

GOLDEN_TWO_ON_A_LINEAR = """\
def forward(self, x):
    adapters_b_layer_householder = self.adapters.b.layer.householder()
    getitem = adapters_b_layer_householder[0]
    getitem_1 = adapters_b_layer_householder[1];  adapters_b_layer_householder = None
    reflect_rows = surgeon_passes_orthogonal_hra_reflect_rows(x, getitem, getitem_1);  x = getitem = getitem_1 = None
    adapters_a_layer_householder = self.adapters.a.layer.householder()
    getitem_2 = adapters_a_layer_householder[0]
    getitem_3 = adapters_a_layer_householder[1];  adapters_a_layer_householder = None
    reflect_rows_1 = surgeon_passes_orthogonal_hra_reflect_rows(reflect_rows, getitem_2, getitem_3);  reflect_rows = getitem_2 = getitem_3 = None
    layer = self.layer(reflect_rows_1);  reflect_rows_1 = None
    return layer"""

GOLDEN_TWO_ON_A_BF16_CONV = """\
def forward(self, x):
    adapters_a_layer_base_weight = self.adapters.a.layer.base_weight
    adapters_a_layer_householder = self.adapters.a.layer.householder()
    getitem = adapters_a_layer_householder[0]
    getitem_1 = adapters_a_layer_householder[1];  adapters_a_layer_householder = None
    rotate_columns = surgeon_passes_orthogonal_hra_rotate_columns(adapters_a_layer_base_weight, getitem, getitem_1);  adapters_a_layer_base_weight = getitem = getitem_1 = None
    adapters_a_layer_base_bias = self.adapters.a.layer.base_bias
    to = x.to(torch.float32);  x = None
    to_1 = adapters_a_layer_base_bias.to(torch.float32);  adapters_a_layer_base_bias = None
    adapters_b_layer_householder = self.adapters.b.layer.householder()
    getitem_2 = adapters_b_layer_householder[0]
    getitem_3 = adapters_b_layer_householder[1];  adapters_b_layer_householder = None
    rotate_columns_1 = surgeon_passes_orthogonal_hra_rotate_columns(rotate_columns, getitem_2, getitem_3);  rotate_columns = getitem_2 = getitem_3 = None
    conv2d = torch.conv2d(to, rotate_columns_1, to_1, (2, 2), (1, 1));  to = rotate_columns_1 = to_1 = None
    to_2 = conv2d.to(torch.bfloat16);  conv2d = None
    return to_2"""


def _graph_of_two(layer: nn.Module) -> str:
    spec = HRA(rank=2, targets=("layer",))
    cm = surgeon.compile(One(layer), surgeon.Spec({"a": spec, "b": spec}))
    cm.set_active(["a", "b"])
    return graph_code(cm)


def test_golden_graph_where_the_last_adapter_reflects_the_input_first():
    assert _graph_of_two(nn.Linear(5, 6)) == GOLDEN_TWO_ON_A_LINEAR


def test_golden_graph_of_a_bf16_conv_whose_weight_two_adapters_rotate_in_float32():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(torch.bfloat16)
    assert _graph_of_two(conv) == GOLDEN_TWO_ON_A_BF16_CONV
