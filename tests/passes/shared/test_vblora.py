"""VB-LoRA beyond the conformance suite (whose layers admit only sub-vectors of length one):
the formula and merge with longer sub-vectors, the fresh adapter drawn as PEFT draws it, PEFT
files both ways with longer sub-vectors, top-k files (PEFT's compact form, loadable for
inference and merging, refused for training as PEFT refuses), the bank shared by an adapter's
layers, trained biases, exact half-precision parity, errors and refused PEFT configs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
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
from surgeon.passes.shared.vblora import VBLoRA


def _sub_vectors(logits, bank, topk):
    """``Σ_{i ∈ top-k(z)} softmax(z)_i b_i`` per sub-vector: a softmax over all N logits with
    all but the k largest masked out, times the bank."""
    kth = logits.topk(topk, dim=-1).values[..., -1:]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1) @ bank


def formula(spec, adapter, base, x):
    """VB-LoRA (Li et al., 2024): ``W x + b + B A x``; each row of A is its in/L sub-vectors
    one after the other, each column of B its out/L sub-vectors, every sub-vector a top-k
    softmax mix of the adapter's bank vectors."""
    bank = adapter.bank.vblora_vector_bank
    logits_a, logits_b = adapter.vblora_logits_A, adapter.vblora_logits_B
    rank = logits_a.shape[0]
    a = _sub_vectors(logits_a, bank, spec.topk).reshape(rank, -1)
    # logits_B is (out/L, r, N): column j of B runs over the out/L pieces [:, j]
    b = _sub_vectors(logits_b, bank, spec.topk).permute(1, 0, 2).reshape(rank, -1).t()
    return plain_output(base, x) + x @ a.t() @ b.t()


peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # Llama's features 32 -> 32, 32 -> 16, 48 -> 32
MLP_TARGETS = ["body.0", "body.3"]  # the MLP's 12 -> 24, 24 -> 24


def _layers(cm, name="default"):
    return dict(cm.store.items(name))


def _peft_config(**fields):
    return peft.VBLoRAConfig(
        **{"r": 2, "num_vectors": 12, "vector_length": 4, "target_modules": MLP_TARGETS, **fields}
    )


# -- the formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_gpt2"])
def test_longer_sub_vectors_tile_a_and_b_as_the_paper_and_merge(conv1d):
    torch.manual_seed(0)
    layer = gpt2_conv1d(8, 12) if conv1d else nn.Linear(8, 12)
    model, x = One(layer), torch.randn(3, 8)
    spec = VBLoRA(rank=3, num_vectors=5, vector_length=4, topk=2, targets=("layer",))
    cm = surgeon.compile(model, spec).eval()
    randomize(cm, scale=0.5)
    adapter = _layers(cm)["layer"]
    assert adapter.vblora_logits_A.shape == (3, 2, 5) and adapter.vblora_logits_B.shape == (3, 3, 5)
    with torch.no_grad():
        expected = formula(spec, adapter, layer, x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
    weight = layer.weight.detach().clone()
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-6)
    cm.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-6)


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    spec = VBLoRA(num_vectors=4, vector_length=4, dropout=0.5, targets=("body.0",))
    cm = surgeon.compile(ZOO["mlp"].model(), spec)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    assert not torch.allclose(cm(x), cm(x))


# -- as PEFT -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)]
)
def test_the_fresh_adapter_is_peft_s_for_the_same_seed(dtype):
    """PEFT draws a bank before each layer's logits and keeps the last: so does surgeon, so a
    seeded run starts where PEFT's does, and the global generator goes on in step."""
    entry = ZOO["mlp"]
    base = entry.model().to(dtype)
    torch.manual_seed(3)
    pm = peft_model(base, _peft_config(init_logits_std=0.3), seed=None)
    after_peft = torch.rand(4)
    base = entry.model().to(dtype)
    torch.manual_seed(3)
    spec = VBLoRA(rank=2, num_vectors=12, vector_length=4, init_logits_std=0.3, targets=MLP_TARGETS)
    cm = surgeon.compile(base, spec)
    assert torch.equal(torch.rand(4), after_peft)
    layers = _layers(cm)
    bank = next(iter(layers.values())).bank.vblora_vector_bank
    assert bank.dtype == torch.float32
    assert torch.equal(bank, pm.base_model.vblora_vector_bank["default"])
    for path, layer in layers.items():
        theirs = pm.base_model.model.get_submodule(path)
        assert torch.equal(layer.vblora_logits_A, theirs.vblora_logits_A["default"])
        assert torch.equal(layer.vblora_logits_B, theirs.vblora_logits_B["default"])
    x = entry.example()["x"].to(dtype)
    torch.testing.assert_close(cm(x), pm(x), rtol=0, atol=0)


def _both_ways(entry, config, tmp_path) -> surgeon.CompiledModel:
    """PEFT's file loads in surgeon with PEFT's outputs, and surgeon's (with new values) in
    PEFT with surgeon's; returns the model surgeon loaded."""
    x = entry.example()
    pm = peft_model(entry.model(), config)
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(entry.model(), tmp_path / "peft")
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-6)
    randomize(cm, scale=0.5)
    cm.save_adapters(tmp_path / "ours")
    ours = logits(cm(**x))
    assert not torch.allclose(ours, expected)
    theirs = logits(peft_loaded(entry.model(), tmp_path / "ours")(**x))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    return cm


@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk"])
def test_files_with_longer_sub_vectors_go_both_ways(topk_only, tmp_path):
    config = _peft_config(topk=3, save_only_topk_weights=topk_only)
    cm = _both_ways(ZOO["mlp"], config, tmp_path)
    assert cm.spec("default").replace(targets=tuple(MLP_TARGETS)) == VBLoRA(
        rank=2,
        num_vectors=12,
        vector_length=4,
        topk=3,
        save_only_topk_weights=topk_only,
        targets=tuple(MLP_TARGETS),
    )


@pytest.mark.slow
@pytest.mark.parametrize("topk_only", [False, True], ids=["logits", "topk"])
def test_llama_files_with_longer_sub_vectors_go_both_ways(topk_only, tmp_path):
    config = _peft_config(
        vector_length=8, topk=3, save_only_topk_weights=topk_only, target_modules=TARGETS
    )
    cm = _both_ways(ZOO["llama"], config, tmp_path)
    assert sorted(cm.spec("default").targets) == sorted(TARGETS)  # PEFT writes them from a set


@pytest.mark.parametrize(("num_vectors", "index_dtype"), [(12, torch.uint8), (300, torch.int16)])
def test_topk_files_hold_what_peft_saves(num_vectors, index_dtype, tmp_path):
    """Indices in the smallest integer type that holds the bank, the first k - 1 weights: our
    file is the one PEFT writes for the same adapter, tensor for tensor."""
    entry = ZOO["mlp"]
    spec = VBLoRA(
        rank=2,
        num_vectors=num_vectors,
        vector_length=4,
        topk=3,
        save_only_topk_weights=True,
        targets=MLP_TARGETS,
    )
    cm = surgeon.compile(entry.model(), spec)
    randomize(cm, scale=0.5)
    cm.save_adapters(tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    key = "base_model.model.body.0.vblora_logits_B"
    assert key not in ours
    assert ours[key + "_topk_indices"].dtype == index_dtype
    assert ours[key + "_topk_indices"].shape == (6, 2, 3)
    assert ours[key + "_topk_weights"].shape == (6, 2, 2)
    # PEFT, given the same adapter with its full logits, saves the same compact tensors
    full = surgeon.compile(entry.model(), spec.replace(save_only_topk_weights=False))
    randomize(full, scale=0.5)
    assert torch.equal(
        _layers(full)["body.0"].vblora_logits_B, _layers(cm)["body.0"].vblora_logits_B
    )
    full.save_adapters(tmp_path / "full")
    pm = peft_loaded(entry.model(), tmp_path / "full")
    pm.peft_config["default"].save_only_topk_weights = True
    pm.save_pretrained(tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert theirs.keys() == ours.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name


def test_a_topk_file_serves_inference_and_merging_but_refuses_training(tmp_path):
    entry = ZOO["mlp"]
    x = entry.example()
    pm = peft_model(entry.model(), _peft_config(save_only_topk_weights=True))
    pm.save_pretrained(tmp_path)
    loaded = peft_loaded(entry.model(), tmp_path)
    expected = loaded(**x)
    cm = surgeon.load(entry.model(), tmp_path).eval()
    for layer in _layers(cm).values():
        for logit in (layer.vblora_logits_A, layer.vblora_logits_B):
            assert (logit.isfinite().sum(-1) == 2).all()  # the top k of every sub-vector
    torch.testing.assert_close(cm(**x), expected, rtol=1e-5, atol=1e-6)
    cm.merge()
    torch.testing.assert_close(cm(**x), expected, rtol=1e-5, atol=1e-6)
    cm.unmerge()
    cm.train()
    with pytest.raises(RuntimeError, match="save_only_topk_weights"):
        cm(**x)
    loaded.train()
    with pytest.raises(RuntimeError, match="infinity"):  # PEFT refuses alike
        loaded(**x)


def test_training_with_topk_files_on_is_fine_until_such_a_file_is_loaded():
    entry = ZOO["mlp"]
    spec = VBLoRA(num_vectors=8, vector_length=4, save_only_topk_weights=True, targets=MLP_TARGETS)
    cm = surgeon.compile(entry.model(), spec).train()
    cm(**entry.example()).pow(2).mean().backward()
    assert all(p.grad is not None for p in cm.store.parameters())


def test_the_bank_is_one_parameter_per_adapter_shared_by_its_layers():
    entry = ZOO["mlp"]
    spec = VBLoRA(rank=2, num_vectors=12, vector_length=4, targets=MLP_TARGETS)
    cm = surgeon.compile(entry.model(), surgeon.Spec({"a": spec, "b": spec}))
    banks = {
        name: {id(layer.bank.vblora_vector_bank) for layer in _layers(cm, name).values()}
        for name in ("a", "b")
    }
    assert all(len(ids) == 1 for ids in banks.values()) and banks["a"] != banks["b"]
    # per adapter the bank (12 x 4), per layer r x in/4 x 12 and out/4 x r x 12
    logits_per_layer = [2 * 3 * 12 + 6 * 2 * 12, 2 * 6 * 12 + 6 * 2 * 12]
    assert cm.num_trainable() == 2 * (12 * 4 + sum(logits_per_layer))
    cm.set_active("a")
    cm.train()
    cm(**entry.example()).pow(2).mean().backward()
    bank_a = next(iter(_layers(cm, "a").values())).bank.vblora_vector_bank
    assert bank_a.grad is not None and torch.count_nonzero(bank_a.grad) > 0


def test_trained_biases_are_saved_for_peft(tmp_path):
    entry = ZOO["mlp"]
    spec = VBLoRA(num_vectors=6, vector_length=4, bias="vblora_only", targets=MLP_TARGETS)
    cm = surgeon.compile(entry.model(), spec)
    assert {n for n, p in cm.named_parameters() if p.requires_grad and "bias" in n} == {
        "model.body.0.bias",
        "model.body.3.bias",
    }
    randomize(cm)
    with torch.no_grad():
        cm.model.body[0].bias.add_(1.0)
    cm.save_adapters(tmp_path)
    x = entry.example()
    torch.testing.assert_close(
        peft_loaded(entry.model(), tmp_path)(**x), cm(**x), rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_peft_exactly(dtype, tmp_path):
    entry = ZOO["llama"]
    pm = peft_model(entry.model().to(dtype), _peft_config(vector_length=8, target_modules=TARGETS))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model().to(dtype), tmp_path)
    x = entry.example()
    out = logits(cm(**x))
    assert out.dtype == dtype
    torch.testing.assert_close(out, logits(pm(**x)), rtol=0, atol=0)


# -- errors --------------------------------------------------------------------------------------


def test_vector_length_must_tile_every_targeted_layer():
    model = ZOO["mlp"].model()  # the head maps 24 features to 5
    with pytest.raises(
        surgeon.SpecError, match=r"vector_length=4 must divide .* head has 24 inputs"
    ):
        surgeon.compile(model, VBLoRA(num_vectors=6, vector_length=4, targets=("body.0", "head")))
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"rank": 0}, r"VBLoRA.rank=0: expected an integer >= 1"),
        ({"num_vectors": 2.5}, r"VBLoRA.num_vectors=2.5"),
        ({"vector_length": 0}, r"VBLoRA.vector_length=0"),
        ({"topk": 3, "num_vectors": 2}, r"VBLoRA.topk=3: expected at most num_vectors \(2\)"),
        ({"dropout": 1.0}, r"VBLoRA.dropout=1.0: expected a number >= 0 and < 1"),
        ({"save_only_topk_weights": 1}, r"VBLoRA.save_only_topk_weights=1"),
        ({"init_logits_std": -0.1}, r"VBLoRA.init_logits_std=-0.1"),
        ({"init_vector_bank_bound": "0.1"}, r"VBLoRA.init_vector_bank_bound='0.1'"),
        ({"bias": "lora_only"}, r"VBLoRA.bias='lora_only': expected one of"),
        ({"alpha": 4}, r"VBLoRA has no field 'alpha'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        VBLoRA(**fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bias": "lora_only"}, r"bias='lora_only'.*'bias'"),
        ({"topk": 40}, r"topk=40.*'topk'"),
        ({"vblora_dropout": 1.0}, r"dropout=1.0.*'vblora_dropout'"),
        ({"target_modules": None}, "target_modules is missing"),
    ],
)
def test_peft_configs_surgeon_cannot_honour_are_refused(change, match, tmp_path):
    entry = ZOO["mlp"]
    spec = VBLoRA(num_vectors=8, vector_length=4, targets=MLP_TARGETS)
    surgeon.compile(entry.model(), spec).save_adapters(tmp_path)
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(entry.model(), tmp_path, change)


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.Embedding(8, 8), "Embedding"), (nn.Conv2d(8, 8, 1), "Conv2d")],
)
def test_layers_peft_cannot_adapt_are_refused(layer, name):
    with pytest.raises(surgeon.SpecError, match=rf"layer \({name}\), which VBLoRA cannot adapt"):
        surgeon.compile(One(layer), VBLoRA(vector_length=4, targets=("layer",)))
