"""BOFT beyond the conformance suite: the butterfly product written out densely (and PEFT's
permutation matrices), block_size vs blocks per layer with PEFT's rules and errors, PEFT parity
where the examples cannot go (several butterfly factors, which PEFT builds only with its CUDA
extension: a torch stand-in for it here; a 3x3 Conv2d; BOFT adapters stacked on a Conv2d;
half precision on a Conv2d; dropout while training), init draws, the eval cache, bias modes,
SpecErrors naming fields and the PEFT keys refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    ZOO,
    One,
    add_noise,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
)

import surgeon
import surgeon.passes.orthogonal.boft as boft
from surgeon.passes.orthogonal.boft import BOFT


def permutation_matrix(n: int, block_size: int, factor: int) -> torch.Tensor:
    """The butterfly permutation ``P`` of factor ``factor`` (``P[i, order[i]] = 1``): within each
    run of ``2**factor`` blocks, the half-blocks taken even-numbered first, then odd-numbered.
    The first factor keeps the order."""
    if factor == 0:
        return torch.eye(n)
    half, run = block_size // 2, block_size * 2**factor
    order: list[int] = []
    for start in range(0, n, run):
        halves = [list(range(start + h * half, start + (h + 1) * half)) for h in range(run // half)]
        for chunk in halves[0::2] + halves[1::2]:
            order += chunk
    return torch.eye(n)[order]


def butterfly_matrix(params: torch.Tensor) -> torch.Tensor:
    """``R = F_{m-1} ⋯ F_0`` with ``F_i = P_i blockdiag(Q_i,1 … Q_i,D) P_iᵀ`` and each block
    ``Q = (I - S)(I + S)⁻¹`` (``S`` the skew-symmetric part of the learned block), dense."""
    factors, count, size, _ = params.shape
    n = count * size
    eye = torch.eye(size, dtype=params.dtype)
    rotation = torch.eye(n, dtype=params.dtype)
    for i in range(factors):
        skew = 0.5 * (params[i] - params[i].transpose(-1, -2))
        blocks = [(eye - s) @ torch.linalg.inv(eye + s) for s in skew]
        p = permutation_matrix(n, size, i).to(params.dtype) if factors > 1 else torch.eye(n)
        rotation = p @ torch.block_diag(*blocks) @ p.T @ rotation
    return rotation


def formula(spec, adapter, base, x):
    """BOFT (Liu et al., 2024): ``s ⊙ (W Rᵀ x) + b`` with ``R`` the butterfly product; a Conv2d
    convolves with ``diag(s) W Rᵀ``, ``W`` flattened to (out, in·k·k)."""
    rotation = butterfly_matrix(adapter.boft_R.detach())
    s = adapter.boft_s.detach().flatten()
    weight = base.weight
    if isinstance(base, nn.Conv2d):
        rotated = (weight.flatten(1) @ rotation.T * s[:, None]).view_as(weight)
        return F.conv2d(x, rotated, base.bias, base.stride, base.padding)
    out = s * (x @ rotation @ weight.T)
    return out + base.bias if base.bias is not None else out


peft = pytest.importorskip("peft")
boft_peft = pytest.importorskip("peft.tuners.boft.layer")


class BlockDiagExtension:
    """A stand-in for PEFT's ``fbd_cuda`` extension (``peft/tuners/boft/fbd``): its batched
    block-diagonal build and the gradient back to the blocks, in torch."""

    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]

    @staticmethod
    def backward(grad: torch.Tensor, blocks: torch.Tensor) -> list[torch.Tensor]:
        size = blocks.shape[-1]
        return [
            torch.stack(
                [
                    torch.stack([g[d : d + size, d : d + size] for d in range(0, g.shape[0], size)])
                    for g in grad
                ]
            )
        ]


@pytest.fixture
def with_extension(monkeypatch):
    """PEFT as on a machine where its CUDA extension builds: without it PEFT keeps one factor."""
    monkeypatch.setattr(boft_peft, "get_fbd_cuda", lambda: BlockDiagExtension)


def _compiled(model: nn.Module, spec: BOFT) -> surgeon.CompiledModel:
    cm = surgeon.compile(model, spec)
    add_noise(cm.store.parameters())
    return cm.eval()


# -- the formula ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "block_size", "factors"), [(8, 2, 2), (16, 2, 3), (24, 4, 2), (24, 6, 2), (32, 4, 4)]
)
def test_permutations_are_peft_s_and_the_product_is_orthogonal(n, block_size, factors):
    count = n // block_size
    for i in range(factors):
        peft_order = boft_peft.BOFTLayer.block_butterfly_perm(
            None, n, count // 2**i, block_size // 2, factors - 1
        )
        expected = boft_peft.BOFTLayer.perm2mat(None, peft_order)
        assert torch.equal(permutation_matrix(n, block_size, i), expected)
        assert torch.equal(torch.eye(n)[boft.butterfly_permutation(n, block_size, i)], expected)
    rotation = butterfly_matrix(torch.randn(factors, count, block_size, block_size))
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(n), rtol=0, atol=1e-5)


LAYERS = {
    "linear": (lambda: nn.Linear(16, 6), lambda: torch.randn(3, 16)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 2, padding=1), lambda: torch.randn(2, 2, 5, 5)),
    "conv2d-strided": (lambda: nn.Conv2d(4, 3, 2, stride=2), lambda: torch.randn(2, 4, 6, 6)),
}


@pytest.mark.parametrize("factors", [2, 3])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_several_butterfly_factors_are_the_formula_and_merge_to_it(kind, factors):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model, x = One(build()), make_x()
    weight, before = model.layer.weight.detach().clone(), model(x)
    spec = BOFT(targets=("layer",), block_size=2, butterfly_factors=factors)
    cm = _compiled(model, spec)
    ((_, adapter),) = cm.store.items("default")
    assert adapter.boft_R.shape[0] == factors
    expected = formula(spec, adapter, model.layer, x)
    assert not torch.allclose(expected, before, atol=1e-3)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, weight, rtol=1e-5, atol=1e-6)


# -- block_size vs blocks ---------------------------------------------------------------------------


def _peft_shape(layer: nn.Module, **config) -> tuple[int, ...]:
    pm = peft_model(One(layer), peft.BOFTConfig(target_modules=["layer"], **config), seed=None)
    return tuple(pm.base_model.model.layer.boft_R["default"].shape)


LAYOUTS = [
    (lambda: nn.Linear(24, 5), {"block_size": 4}, (1, 6, 4, 4)),
    (lambda: nn.Linear(24, 5), {"block_size": 0, "blocks": 3}, (1, 3, 8, 8)),
    (lambda: nn.Linear(24, 5), {"block_size": 2, "butterfly_factors": 3}, (3, 12, 2, 2)),
    (
        lambda: nn.Linear(24, 5),
        {"block_size": 0, "blocks": 4, "butterfly_factors": 2},
        (2, 4, 6, 6),
    ),
    (lambda: nn.Conv2d(3, 4, 3), {"block_size": 0, "blocks": 3}, (1, 3, 9, 9)),
    (lambda: nn.Conv2d(4, 4, 2), {"block_size": 4, "butterfly_factors": 3}, (3, 4, 4, 4)),
]

PEFT_KEYS = {
    "block_size": "boft_block_size",
    "blocks": "boft_block_num",
    "butterfly_factors": "boft_n_butterfly_factor",
}


def _peft_config(fields: dict) -> dict:
    return {PEFT_KEYS[k]: v for k, v in fields.items()}


@pytest.mark.parametrize(("build", "fields", "shape"), LAYOUTS)
def test_each_layer_derives_its_blocks_as_peft(build, fields, shape, with_extension):
    torch.manual_seed(0)
    cm = surgeon.compile(One(build()), BOFT(targets=("layer",), **fields))
    ((_, adapter),) = cm.store.items("default")
    assert tuple(adapter.boft_R.shape) == shape
    assert _peft_shape(build(), **_peft_config(fields)) == shape


UNFIT = [
    (
        lambda: nn.Linear(10, 3),
        {"block_size": 4},
        r"BOFT.block_size=4: layer's in_features \(10\) is not divisible by it",
    ),
    (
        lambda: nn.Linear(12, 3),
        {"block_size": 0, "blocks": 5},
        r"BOFT.blocks=5: layer's in_features \(12\) is not divisible by it",
    ),
    (
        lambda: nn.Linear(24, 3),
        {"block_size": 0, "blocks": 6, "butterfly_factors": 3},
        r"BOFT.blocks=6: with butterfly_factors=3 it must be a multiple of 4",
    ),
    (
        lambda: nn.Linear(12, 3),
        {"block_size": 4, "butterfly_factors": 2},
        r"BOFT.block_size=4: layer's in_features \(12\) is not divisible by block_size x 2",
    ),
    (
        lambda: nn.Linear(12, 3),
        {"block_size": 3, "butterfly_factors": 2},
        r"BOFT.butterfly_factors=2: .* even number of blocks of even size; .* 4 blocks of 3",
    ),
    (
        lambda: nn.Conv2d(3, 4, 3),
        {"block_size": 4},
        r"BOFT.block_size=4: layer's in·k·k \(27\) is not divisible by it",
    ),
]


@pytest.mark.parametrize(("build", "fields", "match"), UNFIT)
def test_layers_the_blocks_do_not_fit_are_refused_as_peft_refuses_them(
    build, fields, match, with_extension
):
    spec = BOFT(targets=("layer",), **fields)
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(One(build()), spec)
    assert not spec.supports(build())
    with pytest.raises(ValueError):
        _peft_shape(build(), **_peft_config(fields))


def test_a_preset_skips_layers_the_blocks_do_not_fit():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    cm = surgeon.compile(model, BOFT(targets="all-linear", block_size=4))
    assert cm.store.paths["default"] == ["0"]


# -- PEFT parity -------------------------------------------------------------------------------------

PARITY = [
    pytest.param(
        "mlp",
        {"targets": ("body.0", "body.3", "head"), "block_size": 2, "butterfly_factors": 2},
        id="mlp-two-factors",
    ),
    pytest.param(
        "cnn",
        {"targets": ("conv2", "fc"), "block_size": 0, "blocks": 4, "butterfly_factors": 3},
        id="cnn-three-factors",
    ),
    pytest.param(
        "cnn", {"targets": ("conv1", "conv2"), "block_size": 0, "blocks": 1}, id="cnn-3x3"
    ),
    pytest.param(
        "llama",
        {"targets": ("q_proj", "down_proj"), "butterfly_factors": 4, "block_size": 2},
        id="llama-four-factors",
        marks=pytest.mark.slow,
    ),
]
"""What the examples do not cover: several factors (PEFT without its extension keeps one), a
3x3 Conv2d with padding (the zoo CNN's conv1 fits one block only)."""


@pytest.mark.parametrize(("model_name", "fields"), PARITY)
def test_our_files_load_in_peft_and_theirs_in_ours_with_the_same_outputs(
    model_name, fields, with_extension, tmp_path
):
    entry = ZOO[model_name]
    spec = BOFT(**fields)
    x = entry.example()
    cm = _compiled(entry.model(), spec)
    expected = logits(cm(**x))
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    cm.save_adapters(tmp_path / "ours")
    pm = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(pm(**x)), expected, rtol=1e-5, atol=1e-5)

    config = peft.BOFTConfig(**spec.to_peft_config(cm.store.paths["default"]))
    pm = peft_model(entry.model(), config, scale=0.2)
    pm.save_pretrained(tmp_path / "theirs")
    loaded = surgeon.load(entry.model(), tmp_path / "theirs").eval()
    assert loaded.spec("default") == spec.replace(targets=loaded.spec("default").targets)
    expected = logits(pm(**x))
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-5)
    pm.merge_adapter()
    loaded.merge()
    for path in loaded.store.paths["default"]:
        ours = loaded.model.get_submodule(path).weight
        theirs = pm.get_base_model().get_submodule(path).base_layer.weight
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_train_step_with_three_factors_gives_peft_gradients(with_extension, tmp_path):
    entry = ZOO["mlp"]
    spec = BOFT(targets=("body.3", "head"), block_size=2, butterfly_factors=3, bias="boft_only")
    config = peft.BOFTConfig(**spec.to_peft_config(["body.3", "head"]))
    pm = peft_model(entry.model(), config, scale=0.2)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    x = entry.example()
    for model in (cm, pm):
        model.eval()  # the MLP's own dropout off; BOFT's is 0
        logits(model(**x)).pow(2).mean().backward()
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(theirs) == 2 * 3  # boft_R, boft_s and the bias of two layers
    adapters = dict(cm.store.items("default"))
    for path in ("body.3", "head"):
        adapter = adapters[path]
        peft_path = f"base_model.model.{path}"
        for name in ("boft_R", "boft_s"):
            torch.testing.assert_close(
                getattr(adapter, name).grad,
                theirs[f"{peft_path}.{name}.default"].grad,
                rtol=1e-4,
                atol=1e-6,
            )
        torch.testing.assert_close(
            cm.model.get_submodule(path).bias.grad,
            theirs[f"{peft_path}.base_layer.bias"].grad,
            rtol=1e-4,
            atol=1e-6,
        )


def test_two_adapters_on_a_conv2d_stack_as_peft_and_merge_in_order(tmp_path):
    entry = ZOO["cnn"]
    spec = BOFT(targets=("conv1", "conv2"), block_size=0, blocks=1)
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec}))
    add_noise(cm.store.parameters(), seed=3)
    cm.eval()
    x = entry.example()
    cm.set_active(["a"])
    only_a = logits(cm(**x))
    cm.set_active(["a", "b"])
    both = logits(cm(**x))
    assert not torch.allclose(both, only_a, atol=1e-4)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(both, logits(pm(**x)), rtol=1e-5, atol=1e-5)
    weights = {n: p.detach().clone() for n, p in cm.model.named_parameters()}
    cm.merge()
    torch.testing.assert_close(logits(cm(**x)), both, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    for name, value in cm.model.named_parameters():
        torch.testing.assert_close(value, weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_boft_conv2d_after_another_method_on_the_layer_is_refused():
    spec = surgeon.Spec(
        {
            "lora": surgeon.LoRA(targets=("conv2",), rank=2),
            "boft": BOFT(targets=("conv2",), block_size=0, blocks=1),
        }
    )
    with pytest.raises(surgeon.SpecError, match=r"can follow only other BOFT adapters, not lora"):
        surgeon.compile(ZOO["cnn"].model(), spec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_conv2d_runs_as_peft(dtype, tmp_path):
    entry = ZOO["cnn"]
    spec = BOFT(targets=("conv1", "conv2", "fc"), block_size=0, blocks=1)
    cm = _compiled(entry.model().to(dtype), spec)
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.boft_R.dtype == adapter.boft_s.dtype == torch.float32
    x = {"x": entry.example()["x"].to(dtype)}
    out = cm(**x)
    assert out.dtype == dtype
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model().to(dtype), tmp_path)
    torch.testing.assert_close(out, pm(**x), rtol=0, atol=2 * torch.finfo(dtype).eps)


# -- dropout ------------------------------------------------------------------------------------------


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


@pytest.mark.parametrize("factors", [1, 3])
def test_dropout_draws_as_peft_in_training_and_is_off_in_eval(factors, with_extension, tmp_path):
    spec = BOFT(targets=("0", "2"), block_size=2, butterfly_factors=factors, dropout=0.5)
    config = peft.BOFTConfig(**spec.to_peft_config(["0", "2"]))
    pm = peft_model(_two_layers(), config, scale=0.2)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_two_layers(), tmp_path)
    x = torch.randn(3, 16)
    expected_eval = pm(x)
    torch.testing.assert_close(cm.eval()(x), expected_eval, rtol=1e-5, atol=1e-6)
    cm.train()
    pm.train()
    for seed in (1, 2):
        torch.manual_seed(seed)
        ours = cm(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, pm(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, expected_eval, atol=1e-4)


def test_dropping_every_block_leaves_only_the_scale():
    torch.manual_seed(0)
    model = One(nn.Linear(8, 3))
    cm = _compiled(model, BOFT(targets=("layer",), block_size=2, dropout=1.0))
    ((_, adapter),) = cm.store.items("default")
    x = torch.randn(4, 8)
    s = adapter.boft_s.detach().flatten()
    layer = model.layer
    expected = s * (x @ layer.weight.T) + layer.bias
    torch.testing.assert_close(cm.train()(x), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cm.eval()(x), expected, atol=1e-4)


# -- the eval cache -------------------------------------------------------------------------------


def test_eval_without_gradients_caches_the_blocks_until_they_change(monkeypatch):
    calls = []
    cayley_blocks = boft.cayley_blocks
    monkeypatch.setattr(boft, "cayley_blocks", lambda p: calls.append(1) or cayley_blocks(p))
    torch.manual_seed(0)
    model = One(nn.Linear(8, 3))
    cm = _compiled(model, BOFT(targets=("layer",), block_size=2))
    ((_, adapter),) = cm.store.items("default")
    x = torch.randn(2, 8)
    with torch.no_grad():
        first = cm(x)
        torch.testing.assert_close(cm(x), first, rtol=0, atol=0)
        assert len(calls) == 1
        adapter.boft_R.mul_(2)
        assert not torch.allclose(cm(x), first)
        assert len(calls) == 2
    cm(x).sum().backward()  # gradients need boft_R: built anew, not cached
    cm(x)
    assert len(calls) == 4 and adapter.boft_R.grad is not None
    cm.train()
    with torch.no_grad():
        cm(x)
        cm(x)
    assert len(calls) == 6


# -- init, bias and layers ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "build", [lambda: nn.Linear(8, 3), lambda: nn.Conv2d(2, 3, 2)], ids=["linear", "conv2d"]
)
def test_random_init_draws_as_peft(build, dtype):
    ours, theirs = One(build().to(dtype)), One(build().to(dtype))
    torch.manual_seed(7)
    cm = surgeon.compile(ours, BOFT(targets=("layer",), block_size=2, init="random"))
    ((_, adapter),) = cm.store.items("default")
    torch.manual_seed(7)
    config = peft.BOFTConfig(target_modules=["layer"], boft_block_size=2, init_weights=False)
    pm = peft_model(theirs, config, seed=None)
    peft_layer = pm.base_model.model.layer
    for name in ("boft_R", "boft_s"):
        assert torch.equal(getattr(adapter, name), getattr(peft_layer, name)["default"]), name


@pytest.mark.parametrize("bias", ["none", "all", "boft_only"])
def test_bias_modes_choose_trainable_base_biases(bias):
    cm = surgeon.compile(ZOO["mlp"].model(), BOFT(targets=("head",), bias=bias))
    trainable = {n.removeprefix("model.") for n, p in cm.named_parameters() if p.requires_grad}
    expected = {
        "none": set(),
        "all": {"body.0.bias", "body.3.bias", "head.bias"},
        "boft_only": {"head.bias"},
    }
    assert {n for n in trainable if not n.startswith("store.")} == expected[bias]


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Conv1d(4, 4, 1), r"layer \(Conv1d\), which BOFT cannot adapt"),
        (nn.Embedding(5, 4), r"layer \(Embedding\), which BOFT cannot adapt"),
        (gpt2_conv1d(4, 4), r"layer \(Conv1D\), which BOFT cannot adapt"),
        (nn.Conv2d(4, 4, 1, groups=2), r"BOFT cannot adapt layer: groups=2"),
        (nn.Conv2d(4, 4, (2, 1)), r"BOFT cannot adapt layer: kernel_size=\(2, 1\)"),
        (nn.Conv2d(4, 4, 1, dilation=2), r"BOFT cannot adapt layer: dilation=\(2, 2\)"),
        (nn.Conv2d(4, 4, 1, stride=(1, 2)), r"BOFT cannot adapt layer: stride=\(1, 2\)"),
        (nn.Conv2d(4, 4, 3, padding="same"), r"BOFT cannot adapt layer: stride=.*padding='same'"),
        (nn.Conv2d(4, 4, 1, padding_mode="reflect"), r"padding_mode='reflect'"),
    ],
    ids=[
        "conv1d",
        "embedding",
        "gpt2-conv1d",
        "groups",
        "kernel",
        "dilation",
        "stride",
        "same",
        "reflect",
    ],
)
def test_layers_peft_does_not_adapt_alike_are_refused(layer, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(One(layer), BOFT(targets=("layer",), block_size=2))


# -- spec fields and PEFT keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match", "peft_refuses"),
    [
        ({"block_size": 0}, r"BOFT.block_size=0 and BOFT.blocks=0: set one of them", True),
        ({"blocks": 8}, r"BOFT.block_size=4 and BOFT.blocks=8: set only one of them", True),
        ({"block_size": -2}, r"BOFT.block_size=-2: expected an integer >= 0", False),
        ({"blocks": 2.0}, r"BOFT.blocks=2.0: expected an integer >= 0", False),
        ({"butterfly_factors": 0}, r"BOFT.butterfly_factors=0: expected an integer >= 1", False),
        ({"dropout": 1.5}, r"BOFT.dropout=1.5: expected a number >= 0 and <= 1", False),
        (
            {"bias": "lora_only"},
            r"BOFT.bias='lora_only': expected one of 'none', 'all', 'boft_only'",
            False,
        ),
        ({"init": "gaussian"}, r"BOFT.init='gaussian': expected one of 'default', 'random'", False),
        ({"rank": 4}, r"BOFT has no field 'rank'", False),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match, peft_refuses):
    with pytest.raises(surgeon.SpecError, match=match):
        BOFT(**fields)
    if peft_refuses:  # PEFT's config refuses the same pairs
        with pytest.raises(ValueError):
            peft.BOFTConfig(target_modules=["q"], **_peft_config(fields))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"boft_block_size": 0}, r"set one of them .*adapter_config.json key 'boft_block_size'"),
        (
            {"boft_block_num": 3},
            r"set only one of them.*adapter_config.json key 'boft_block_size'",
        ),
        ({"boft_n_butterfly_factor": 0}, r"key 'boft_n_butterfly_factor'"),
        ({"bias": "lora_only"}, r"BOFT.bias='lora_only'.*adapter_config.json key 'bias'"),
        ({"init_weights": "pissa"}, r"init_weights='pissa': expected true or false"),
        ({"boft_dropout": "0.1"}, r"boft_dropout='0.1': expected a number"),
        (
            {"layers_to_transform": [0], "layers_pattern": "stack"},
            r"layers_pattern='stack' is not supported",
        ),
        ({"use_dora": True}, r"use_dora=True selects a variant"),
        ({"target_modules": None}, r"target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), BOFT(targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_peft_options_that_do_not_change_the_numbers_load(tmp_path):
    entry = ZOO["mlp"]
    cm = _compiled(entry.model(), BOFT(targets=("head",), init="random"))
    cm.save_adapters(tmp_path)
    x = entry.example()
    loaded = load_with_changed_config(
        entry.model(), tmp_path, {"fan_in_fan_out": True, "init_weights": False}
    )
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=0, atol=0)


def test_trained_biases_travel_in_the_file_both_ways(tmp_path):
    entry = ZOO["mlp"]
    spec = BOFT(targets=("body.3", "head"), bias="boft_only")
    x = entry.example()
    cm = _compiled(entry.model(), spec)
    with torch.no_grad():
        cm.model.head.bias.add_(1.0)  # as training would move it
    cm.save_adapters(tmp_path / "ours")
    pm = peft_loaded(entry.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(pm(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)

    config = peft.BOFTConfig(**spec.to_peft_config(["body.3", "head"]))
    pm = peft_model(entry.model(), config, scale=0.2)
    with torch.no_grad():
        pm.base_model.model.body[3].base_layer.bias.sub_(1.0)
    pm.save_pretrained(tmp_path / "theirs")
    loaded = surgeon.load(entry.model(), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(loaded(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_a_mixed_batch_on_conv2d_layers_gives_each_row_its_adapter():
    entry = ZOO["cnn"]
    spec = BOFT(targets=("conv1", "conv2"), block_size=0, blocks=1)
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec}))
    add_noise(cm.store.parameters(), seed=3)
    cm.eval()
    x = entry.example()
    names = ["b", "__base__"]
    mixed = cm(**x, adapter_names=names)
    cm.set_active("b")
    torch.testing.assert_close(mixed[0], cm(**x)[0], rtol=1e-5, atol=1e-5)
    with cm.disabled():
        torch.testing.assert_close(mixed[1], cm(**x)[1], rtol=1e-5, atol=1e-5)


def test_conv2d_layers_compile_and_run_on_the_meta_device():
    with torch.device("meta"):
        model = ZOO["cnn"].build().eval()
    cm = surgeon.compile(model, BOFT(targets=("conv2", "fc"), block_size=2, butterfly_factors=2))
    out = cm(x=torch.randn(2, 3, 6, 6, device="meta"))
    assert out.is_meta and out.shape == (2, 4)
