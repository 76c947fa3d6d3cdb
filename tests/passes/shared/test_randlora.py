"""RandLoRA beyond the conformance suite: bases drawn as PEFT draws them (dense, sparse, very
sparse; in every dtype), PEFT files without bases both ways, saved bases used as saved, the
trained biases, exact half-precision parity, errors and refused PEFT configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    ZOO,
    One,
    gpt2_conv1d,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import WEIGHTS_NAME
from surgeon.passes.shared.randlora import RandLoRA


def formula(spec, adapter, base, x):
    """RandLoRA (Albert et al., 2025): ``W x + b + (alpha/r) ΔW x``. With ``m``/``M`` the smaller/
    larger of the layer's sizes, ``n = ⌈m/r⌉`` and ``p`` running over the ``r·n`` basis
    columns, ``U[I, j] = Σ_p B[I, p // r, p % r] · Λ[p // n, p % n] A[p // n, 0, j]
    Γ[p % n, j]`` (M x m); ``ΔW = U`` when in <= out, else ``Uᵀ``."""
    lam, gamma = adapter.randlora_lambda, adapter.randlora_gamma
    a, b = adapter.bases.randlora_A, adapter.bases.randlora_B
    rank, count = lam.shape
    fan_in, fan_out = x.shape[-1], plain_output(base, x).shape[-1]
    small, large = min(fan_in, fan_out), max(fan_in, fan_out)
    p = torch.arange(rank * count)
    left = b[:large, p // rank, p % rank]  # (M, r·n)
    right = lam[p // count, p % count, None] * a[p // count, 0, :small] * gamma[p % count]
    update = left @ right
    delta = update if fan_in <= fan_out else update.t()
    return plain_output(base, x) + spec.alpha / spec.rank * (x @ delta.t())


peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")  # in = out, in > out, in < out
KINDS = {
    "dense": {},
    "sparse": {"sparse": True},
    "very_sparse": {"very_sparse": True},
    "both": {"sparse": True, "very_sparse": True},  # very_sparse wins, as in PEFT
}


def _layers(cm, name="default"):
    return dict(cm.store.items(name))


def _bases(cm):
    shared = next(iter(_layers(cm).values())).bases
    return shared.randlora_A, shared.randlora_B


def _peft_config(rank=5, **fields):
    return peft.RandLoraConfig(r=rank, target_modules=list(TARGETS), **fields)


# -- the formula, the bases ------------------------------------------------------------------------


class Two(nn.Module):
    """Two layers, one widening and one narrowing: the bases are sized for the larger of each
    dimension and each layer uses its own slice and orientation of them."""

    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        make = gpt2_conv1d if conv1d else nn.Linear
        self.a = make(5, 9)
        self.b = make(9, 4)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_layers_of_different_shapes_share_the_bases_and_merge(conv1d):
    torch.manual_seed(0)
    model = Two(conv1d)
    spec = RandLoRA(rank=2, alpha=3, targets=("a", "b"))
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.5)
    a, b = _bases(cm)
    assert a.shape == (2, 1, 9) and b.shape == (9, 5, 2)  # min 9 (max in), max 9; ⌈9/2⌉ bases
    layers = _layers(cm)
    assert layers["a"].randlora_lambda.shape == (2, 3) and layers["a"].randlora_gamma.shape == (
        3,
        5,
    )
    assert layers["b"].randlora_lambda.shape == (2, 2) and layers["b"].randlora_gamma.shape == (
        2,
        4,
    )
    x = torch.randn(3, 5)
    with torch.no_grad(), cm.disabled():
        h = formula(spec, layers["a"], model.a, x)
        expected = formula(spec, layers["b"], model.b, h)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    weights = [model.a.weight.detach().clone(), model.b.weight.detach().clone()]
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close([model.a.weight, model.b.weight], weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [
        ("dense", torch.bfloat16),
        ("sparse", torch.float32),
        ("very_sparse", torch.float16),
        pytest.param("both", torch.float32, marks=pytest.mark.slow),
    ],
)
def test_a_fresh_adapter_is_peft_init_bases_included(kind, dtype):
    """The bases drawn from the seed as PEFT draws them (dense ones in bfloat16, rounded through
    the base dtype and held in float32), Λ zero and Γ ``1/max(n, m)``."""
    entry = ZOO["llama"]
    config = _peft_config(projection_prng_key=9, **KINDS[kind])
    pm = peft_model(entry.model().to(dtype), config, seed=None)
    spec = RandLoRA(rank=5, seed=9, targets=TARGETS, **KINDS[kind])
    cm = surgeon.compile(entry.model().to(dtype), spec)
    a, b = _bases(cm)
    assert a.shape == (5, 1, 48) and b.shape == (48, 10, 5) and a.dtype == torch.float32
    assert torch.equal(a, pm.base_model.randlora_A["default"])
    assert torch.equal(b, pm.base_model.randlora_B["default"])
    if kind != "dense":
        assert (b == 0).any() and len(b.unique()) == 3  # ternary: -c, 0, c
    for path, layer in _layers(cm).items():
        theirs = pm.base_model.model.get_submodule(path)
        assert torch.equal(layer.randlora_lambda, theirs.randlora_lambda["default"])
        assert torch.equal(layer.randlora_gamma, theirs.randlora_gamma["default"])
    assert torch.count_nonzero(layer.randlora_lambda) == 0
    other = surgeon.compile(entry.model(), spec.replace(seed=10))
    assert not torch.equal(_bases(other)[1], b)


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), RandLoRA(rank=4, targets=("head",), dropout=0.5))
    randomize(cm)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- PEFT parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", pytest.param("very_sparse", marks=pytest.mark.slow)])
def test_peft_file_without_bases_loads_with_peft_outputs(kind, tmp_path):
    """PEFT draws the bases again from projection_prng_key; so must surgeon."""
    entry = ZOO["llama"]
    config = _peft_config(randlora_alpha=9, projection_prng_key=4, save_projection=False)
    config.sparse, config.very_sparse = kind == "sparse", kind == "very_sparse"
    pm = peft_model(entry.model(), config)
    x = entry.example()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    assert not any("randlora_A" in k for k in load_file(tmp_path / WEIGHTS_NAME))
    cm = surgeon.load(entry.model(), tmp_path)
    spec = cm.spec("default")
    assert (spec.seed, spec.alpha, spec.save_projection) == (4, 9, False)
    assert spec.very_sparse is (kind == "very_sparse")
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", pytest.param("sparse", marks=pytest.mark.slow)])
def test_surgeon_file_without_bases_loads_in_peft_with_same_outputs(kind, tmp_path):
    entry = ZOO["llama"]
    spec = RandLoRA(rank=6, alpha=4, seed=2, save_projection=False, targets=TARGETS, **KINDS[kind])
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    x = entry.example()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == {
        f"base_model.model.{p}.randlora_{t}" for p in _layers(cm) for t in ("lambda", "gamma")
    }
    loaded = peft_loaded(entry.model(), tmp_path)
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-4)
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_saved_bases_are_used_as_saved_the_adapter_wide_key_first(tmp_path):
    """PEFT's file holds the bases once for the adapter and once per layer; PEFT loads the
    adapter-wide copy last, so that one counts. Without it, the layers' (identical) copies do."""
    entry = ZOO["llama"]
    pm = peft_model(entry.model(), _peft_config())
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.model.layers.0.self_attn.q_proj.randlora_B" in tensors
    tensors = {k: v.clone() for k, v in tensors.items()}  # safetensors saves no shared memory
    tensors["base_model.randlora_B"] = tensors["base_model.randlora_B"].flip(0)  # not the draw
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = logits(peft_loaded(entry.model(), tmp_path)(**x))
    cm = surgeon.load(entry.model(), tmp_path)
    assert torch.equal(_bases(cm)[1], tensors["base_model.randlora_B"])
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    # without the adapter-wide key: the layers' copies (all one tensor in PEFT's file)
    copy = tensors.pop("base_model.randlora_B")
    for key in [k for k in tensors if k.endswith(".randlora_B")]:
        tensors[key] = copy.clone()
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    torch.testing.assert_close(
        logits(surgeon.load(entry.model(), tmp_path)(**x)), expected, rtol=1e-5, atol=1e-6
    )
    tensors["base_model.model.model.layers.1.self_attn.q_proj.randlora_B"] = copy.flip(1)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(surgeon.SpecError, match="layers' copies of it differ"):
        surgeon.load(entry.model(), tmp_path)


@pytest.mark.slow
def test_a_file_with_bases_but_save_projection_off_is_drawn_again(tmp_path):
    """PEFT does not load bases it does not save: they are drawn from the seed whatever the
    file holds."""
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), RandLoRA(rank=4, targets=TARGETS))
    randomize(cm)
    cm.save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.randlora_A"] = tensors["base_model.randlora_A"].flip(2)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    loaded = load_with_changed_config(entry.model(), tmp_path, {"save_projection": False})
    expected = logits(peft_loaded(entry.model(), tmp_path)(**x))
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trained_biases_of_the_adapted_layers_go_both_ways(tmp_path):
    entry = ZOO["bert"]
    config = peft.RandLoraConfig(
        r=4, target_modules=["query", "value"], bias="randlora_only", save_projection=False
    )
    pm = peft_model(entry.model(), config)
    x = entry.example()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    assert cm.spec("default").bias == "randlora_only"
    trained = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("query.bias", "value.bias")) for n in trained)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "back")
    back = peft_loaded(entry.model(), tmp_path / "back")
    torch.testing.assert_close(logits(back(**x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly(dtype, tmp_path):
    entry = ZOO["llama"]
    config = _peft_config(randlora_alpha=10, save_projection=False)  # 640 overflows float16
    pm = peft_model(entry.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"bias='lora_only'.*'randlora_only'"),
        ({"target_modules": None}, "target_modules is missing"),
        ({"layers_to_transform": [0], "layers_pattern": "blocks.x"}, "layers_pattern="),
        ({"randlora_alpha": "big"}, r"randlora_alpha='big': expected a number"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["llama"]
    surgeon.compile(entry.model(), RandLoRA(rank=4)).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


# -- spec validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"RandLoRA.rank=0: expected an integer >= 1"),
        ({"alpha": float("inf")}, r"RandLoRA.alpha=inf: expected a finite number"),
        ({"seed": 1.5}, r"RandLoRA.seed=1.5"),
        ({"dropout": 1.0}, r"RandLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"sparse": 1}, r"RandLoRA.sparse=1: expected true or false"),
        ({"very_sparse": "yes"}, r"RandLoRA.very_sparse='yes': expected true or false"),
        ({"save_projection": None}, r"RandLoRA.save_projection=None: expected true or false"),
        ({"bias": "lora_only"}, r"RandLoRA.bias='lora_only': expected one of"),
        ({"targets": ()}, r"RandLoRA.targets=\[\]: expected at least one target"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        RandLoRA(**fields)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(5, 4), "Embedding"), (nn.Conv2d(2, 2, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which RandLoRA cannot adapt"):
        surgeon.compile(One(layer), RandLoRA(targets=("layer",)))


def test_the_bases_follow_the_model_onto_the_meta_device():
    """The suite checks the trained Λ and Γ on the meta device; the bases are buffers."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 96), nn.Linear(80, 40))
    cm = surgeon.compile(model, RandLoRA(rank=8, targets=("0", "1")))
    a, b = _bases(cm)
    assert a.is_meta and b.is_meta and a.shape == (8, 1, 80) and b.shape == (96, 10, 8)
