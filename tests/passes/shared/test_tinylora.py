"""TinyLoRA beyond the conformance suite: the frozen factors, projections and fresh vectors as
PEFT builds them, vectors tied across layers as PEFT groups them, PEFT files without projections
both ways, saved factors used as saved, embeddings in half precision, errors and refused PEFT
configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import (
    EMBEDDING,
    ZOO,
    One,
    load_with_changed_config,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import WEIGHTS_NAME
from surgeon.passes.shared.tinylora import TinyLoRA, tying_groups


def formula(spec, adapter, base, x):
    """TinyLoRA (2026): ``W x + b + B R A x`` with ``R = Σ_i v_i P_i`` and ``B A`` the weight's
    best rank-r approximation ``U_r S_r V_rᵀ``, S split evenly (``A = √S V_rᵀ``); an
    embedding adds ``B[ids] R A``."""
    a, b = adapter.tinylora_A, adapter.tinylora_B
    plain = isinstance(base, (nn.Linear, nn.Embedding))  # GPT-2's Conv1D stores (in, out)
    weight = base.weight if plain else base.weight.t()
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rank = a.shape[0]
    torch.testing.assert_close(b @ a, u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank])
    torch.testing.assert_close(a @ a.t(), torch.diag(s[:rank]), rtol=1e-4, atol=1e-5)
    mixing = (adapter.vector.tinylora_v[:, None, None] * adapter.tinylora_P).sum(0)
    if isinstance(base, nn.Embedding):
        return plain_output(base, x) + b[x] @ mixing @ a
    return plain_output(base, x) + x @ a.t() @ mixing.t() @ b.t()


peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
MLP_TARGETS = ["body.0", "body.3", "head"]


def _layers(cm, name="default"):
    return dict(cm.store.items(name))


def _vectors(cm, name="default"):
    return {id(layer.vector.tinylora_v): layer.vector for layer in _layers(cm, name).values()}


# -- what the adapter is built from ----------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "tying"),
    [(n, t) for n in (1, 3, 4, 7, 12) for t in (0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0)],
)
def test_tying_groups_are_peft_s(count, tying):
    """PEFT's rule: round(n (1 - tying)) groups (at least one) of n // groups layers, the last
    group taking the rest."""
    groups = max(1, round(count * (1.0 - tying)))
    size = max(1, count // groups)
    got = tying_groups(count, tying)
    assert got == [min(i // size, groups - 1) for i in range(count)]
    assert got[0] == 0 and got == sorted(got)
    assert tying_groups(count, 0.0) == list(range(count)) and set(tying_groups(count, 1.0)) == {0}


@pytest.mark.parametrize(
    ("model_name", "targets", "dtype"),
    [
        ("mlp", MLP_TARGETS, torch.float32),
        pytest.param("llama", LLAMA_TARGETS, torch.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_buffers_and_fresh_vectors_are_peft_s(model_name, targets, dtype):
    """A, B from the weight, P from seed + the layer's position, v drawn from the global
    generator group by group: all PEFT's, to the bit, and tied as PEFT ties them (half the
    layers' worth of groups, the last taking the rest)."""
    entry = ZOO[model_name]
    config = peft.TinyLoraConfig(
        r=3,
        u=6,
        weight_tying=0.5,
        projection_seed=9,
        init_weights="uniform",
        target_modules=targets,
    )
    torch.manual_seed(4)
    pm = peft_model(entry.model().to(dtype), config, seed=None)
    spec = TinyLoRA(rank=3, u=6, weight_tying=0.5, seed=9, init="uniform", targets=tuple(targets))
    torch.manual_seed(4)
    cm = surgeon.compile(entry.model().to(dtype), spec)
    layers = _layers(cm)
    groups = round(len(layers) / 2)
    assert len(_vectors(cm)) == groups and cm.num_trainable() == groups * 6
    for path, layer in layers.items():
        theirs = pm.base_model.model.get_submodule(path)
        for name in ("tinylora_A", "tinylora_B", "tinylora_P"):
            mine, peft_buffer = getattr(layer, name), getattr(theirs, name)["default"]
            assert mine.dtype == peft_buffer.dtype == torch.float32, (path, name)
            assert torch.equal(mine, peft_buffer), (path, name)
        peft_v = theirs.tinylora_v["default"][theirs._tinylora_v_key["default"]]
        assert torch.equal(layer.vector.tinylora_v, peft_v), path
    assert all(v.tinylora_v.abs().max() <= 0.02 for v in _vectors(cm).values())
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in entry.example().items()}
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=0, atol=0)


def test_a_vector_is_shared_by_its_group_and_trains_from_all_of_it():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), TinyLoRA(u=3, weight_tying=1.0, targets=MLP_TARGETS))
    (vector,) = _vectors(cm).values()
    assert cm.num_trainable() == 3
    randomize(cm)
    cm.train()
    cm(**entry.example()).pow(2).mean().backward()
    assert vector.tinylora_v.grad is not None and vector.tinylora_v.grad.abs().sum() > 0
    assert [n for n, p in cm.named_parameters() if p.requires_grad] == [
        n for n, p in cm.named_parameters() if p.grad is not None
    ]


def test_the_rank_is_capped_by_the_weight_as_peft_caps_it():
    cm = surgeon.compile(One(nn.Linear(3, 7)), TinyLoRA(rank=5, u=2, targets=("layer",)))
    layer = _layers(cm)["layer"]
    assert layer.tinylora_A.shape == (3, 3) and layer.tinylora_P.shape == (2, 3, 3)


# -- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_name", "targets"),
    [
        ("mlp", MLP_TARGETS),
        pytest.param("llama", [*LLAMA_TARGETS, "embed_tokens"], marks=pytest.mark.slow),
    ],
)
def test_files_without_projections_go_both_ways_with_the_same_outputs(
    model_name, targets, tmp_path
):
    """The case the seeded draw exists for: P is not in the file; both sides draw it again
    from projection_seed and each layer's position (tied vectors, several groups)."""
    entry = ZOO[model_name]
    x = entry.example()
    config = peft.TinyLoraConfig(
        r=2,
        u=4,
        weight_tying=0.4,
        projection_seed=11,
        save_projection=False,
        target_modules=targets,
    )
    pm = peft_model(entry.model(), config)
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path / "peft")
    keys = {k for k in load_file(tmp_path / "peft" / WEIGHTS_NAME) if "tinylora" in k}
    assert keys and not any("tinylora_P" in k for k in keys)
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    assert cm.spec("default").seed == 11 and not cm.spec("default").save_projection
    assert not torch.allclose(expected, logits(entry.model()(**x)), atol=1e-5)
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    randomize(cm, scale=0.5)
    ours = logits(cm(**x))
    cm.save_adapters(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / WEIGHTS_NAME)) == keys
    theirs = logits(peft_loaded(entry.model(), tmp_path / "ours")(**x))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_saved_factors_and_projections_are_used_as_saved(tmp_path):
    entry = ZOO["mlp"]
    config = peft.TinyLoraConfig(r=2, u=3, target_modules=["body.0", "head"])
    peft_model(entry.model(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert tensors["base_model.model.head.tinylora_P"].shape == (3, 2, 2)
    assert tensors["base_model.tinylora_v.1"].shape == (3,)
    tensors["base_model.model.head.tinylora_A"] *= 2  # not what the weight gives
    tensors["base_model.model.body.0.tinylora_P"] = tensors[
        "base_model.model.body.0.tinylora_P"
    ].flip(0)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = peft_loaded(entry.model(), tmp_path)(**x)
    cm = surgeon.load(entry.model(), tmp_path)
    torch.testing.assert_close(cm(**x), expected, rtol=1e-5, atol=1e-6)


def test_projections_in_a_file_that_does_not_save_them_are_ignored_as_peft_ignores_them(
    tmp_path,
):
    entry = ZOO["mlp"]
    config = peft.TinyLoraConfig(r=2, u=3, target_modules=["head"])
    peft_model(entry.model(), config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.head.tinylora_P"] *= 3
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    x = entry.example()
    expected = peft_loaded(entry.model(), tmp_path)(**x)  # before the config changes
    cm = load_with_changed_config(entry.model(), tmp_path, {"save_projection": False})
    theirs = peft_loaded(entry.model(), tmp_path)(**x)
    torch.testing.assert_close(cm(**x), theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(theirs, expected)


def test_a_file_that_promises_projections_and_lacks_them_is_refused(tmp_path):
    """PEFT would draw P again with a warning; surgeon names the missing keys instead (the
    file says its P may differ from the seed's)."""
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), TinyLoRA(u=3, targets=("head",))).save_adapters(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    del tensors["base_model.model.head.tinylora_P"]
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(surgeon.SpecError, match=r"missing key.*head\.tinylora_P"):
        surgeon.load(entry.model(), tmp_path)


def test_modules_to_save_travel_with_the_tied_vectors(tmp_path):
    entry = ZOO["mlp"]
    spec = TinyLoRA(u=3, weight_tying=1.0, targets=("body.0", "body.3"), modules_to_save=("head",))
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm)
    cm.save_adapters(tmp_path)
    keys = set(load_file(tmp_path / WEIGHTS_NAME))
    assert {"base_model.tinylora_v.0", "base_model.model.head.weight"} <= keys
    x = entry.example()
    torch.testing.assert_close(surgeon.load(entry.model(), tmp_path)(**x), cm(**x))
    torch.testing.assert_close(peft_loaded(entry.model(), tmp_path)(**x), cm(**x))


# -- embeddings and half precision -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embeddings_in_half_precision_match_peft_exactly(dtype, tmp_path):
    """PEFT computes an embedding's update in the base dtype (a linear layer's in float32)."""
    config = peft.TinyLoraConfig(r=2, u=4, init_weights="uniform", target_modules=["emb", "proj"])
    pm = peft_model(EMBEDDING.model().to(dtype), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(EMBEDDING.model().to(dtype), tmp_path)
    x = EMBEDDING.example()
    out = cm(**x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, pm(**x), rtol=0, atol=0)


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), TinyLoRA(dropout=0.5, targets=("head",)))
    randomize(cm, scale=1.0)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"TinyLoRA.rank=0: expected an integer >= 1"),
        ({"u": 0}, r"TinyLoRA.u=0: expected an integer >= 1"),
        ({"weight_tying": 1.5}, r"TinyLoRA.weight_tying=1.5: expected a number >= 0 and <= 1"),
        ({"seed": "a"}, r"TinyLoRA.seed='a': expected an integer"),
        ({"save_projection": "yes"}, r"TinyLoRA.save_projection='yes': expected true or false"),
        ({"init": "gaussian"}, r"TinyLoRA.init='gaussian': expected one of 'zeros', 'uniform'"),
        ({"init_v_bound": -1}, r"TinyLoRA.init_v_bound=-1: expected a number >= 0"),
        ({"dropout": 1.0}, r"TinyLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"bias": "lora_only"}, r"TinyLoRA.bias='lora_only': expected one of"),
        ({"projection_seed": 1}, r"TinyLoRA has no field 'projection_seed'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        TinyLoRA(**fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"bias='lora_only'.*'bias'"),
        ({"tinylora_dropout": 1.0}, r"dropout=1.0.*'tinylora_dropout'"),
        ({"init_weights": "gaussian"}, r"init_weights='gaussian' is not supported"),
        ({"weight_tying": 2}, r"weight_tying=2.*'weight_tying'"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    surgeon.compile(entry.model(), TinyLoRA(targets=("head",))).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


def test_init_weights_false_loads_the_file_s_vector(tmp_path):
    """PEFT leaves v uninitialised with init_weights=False; the file's v replaces it."""
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), TinyLoRA(u=3, targets=("head",)))
    randomize(cm)
    cm.save_adapters(tmp_path)
    loaded = load_with_changed_config(entry.model(), tmp_path, {"init_weights": False})
    x = entry.example()
    torch.testing.assert_close(loaded(**x), cm(**x))


def test_layers_peft_cannot_adapt_are_refused():
    with pytest.raises(surgeon.SpecError, match=r"layer \(Conv2d\), which TinyLoRA cannot adapt"):
        surgeon.compile(One(nn.Conv2d(2, 2, 1)), TinyLoRA(targets=("layer",)))
