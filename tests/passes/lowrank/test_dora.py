"""DoRA's card (its formula) and what is DoRA's own: the merged weight, the norm as a constant in
backward, the initial magnitude (as PEFT's), PEFT's file layout, training with dropout as PEFT
(outputs and gradients), merging in half precision, the eval-mode norm cache, spec checks, golden
graphs, DoRA beside LoRA on one layer. The conformance suite (tests/conformance) runs the formula,
merging, files, PEFT parity, gradients, devices and dtypes on every example."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import (
    ZOO,
    One,
    count_calls,
    gpt2_conv1d,
    graph_code,
    logits,
    peft_loaded,
    peft_model,
    plain_output,
    randomize,
)

import surgeon
from surgeon.io import WEIGHTS_NAME, method_from_peft_config
from surgeon.passes.lowrank.dora import DoRA, DoRALayer
from surgeon.passes.lowrank.lora import LoRA
from surgeon.spec import METHODS, MethodSpec


def formula(spec, adapter, base, x):
    """DoRA (Liu et al., 2024): the layer with its weight replaced by ``m ⊙ V / ‖V‖``,
    ``V = W + (alpha / r) B A`` and the norm per output feature (over everything else); GPT-2's
    Conv1D and embeddings hold their output features last."""
    a, b, m = adapter.lora_A, adapter.lora_B, adapter.magnitude.flatten()
    r = a.shape[0]
    scale = spec.alpha_pattern.get("layer", spec.alpha) / (math.sqrt(r) if spec.rslora else r)
    transposed = not isinstance(base, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    rows = base.weight.t() if transposed else base.weight
    v = rows + scale * torch.einsum("or,r...->o...", b.flatten(1), a)
    adapted = v * (m / v.flatten(1).norm(dim=1)).view(-1, *(1,) * (v.dim() - 1))
    return plain_output(base, x, adapted.t() if transposed else adapted)


peft = pytest.importorskip("peft")


LAYERS = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (gpt2_conv1d, lambda: torch.randn(2, 3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 4, 1), lambda: torch.randn(2, 3, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    "embedding": (lambda: nn.Embedding(11, 6, padding_idx=0), lambda: torch.randint(0, 11, (2, 4))),
}


def _dora_weight(layer: nn.Module, adapter, detach_norm: bool = True) -> torch.Tensor:
    """The DoRA weight written out: m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per output feature."""
    a, b, s, m = adapter.lora_A, adapter.lora_B, adapter.scale, adapter.magnitude
    out_first = not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d))  # Embedding, GPT-2 Conv1D
    weight = layer.weight.t() if out_first else layer.weight
    adapted = weight + s * (b.flatten(1) @ a.flatten(1)).view(weight.shape)
    norm = adapted.flatten(1).norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    scaled = adapted * (m.flatten() / norm).view(-1, *(1,) * (adapted.dim() - 1))
    return scaled.t() if out_first else scaled


def _expected(layer: nn.Module, adapter, x: torch.Tensor, detach_norm: bool = True):
    """The layer run with its weight replaced by the DoRA weight (bias unchanged)."""
    weight = _dora_weight(layer, adapter, detach_norm)
    return torch.func.functional_call(layer, {"weight": weight}, (x,))


def _single(kind: str, **fields):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    cm = surgeon.compile(model, DoRA(targets=("layer",), **{"rank": 3, "alpha": 5, **fields}))
    randomize(cm, scale=0.3)
    ((_, adapter),) = cm.store.items("default")
    return model, cm, adapter, make_x()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_merge_writes_the_dora_weight_and_unmerge_restores_the_base(kind):
    model, cm, adapter, _ = _single(kind)
    original = model.layer.weight.detach().clone()
    merged_weight = _dora_weight(model.layer, adapter).detach()
    assert not torch.allclose(merged_weight, original, atol=1e-3)  # the adapter matters
    cm.merge()
    torch.testing.assert_close(model.layer.weight, merged_weight)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, original, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_delta_weight_is_what_merging_adds(kind):
    model, _, adapter, _ = _single(kind)
    torch.testing.assert_close(
        model.layer.weight + adapter.delta_weight(), _dora_weight(model.layer, adapter)
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2", "conv2d"])
def test_the_norm_gets_no_gradient(kind):
    """DoRA §4.3: the norm is a constant in backward; gradients differ if it were not."""
    model, cm, adapter, x = _single(kind)
    cm.train()
    target = torch.randn_like(cm(x))
    params = (adapter.lora_A, adapter.lora_B, adapter.magnitude)

    def grads(out):
        return torch.autograd.grad((out * target).sum(), params)

    ours = grads(cm(x))
    detached = grads(_expected(model.layer, adapter, x, detach_norm=True))
    attached = grads(_expected(model.layer, adapter, x, detach_norm=False))
    for g, d in zip(ours, detached):
        torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[1], attached[1], atol=1e-4)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_init_is_the_weight_norm_and_leaves_outputs_unchanged(kind):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    x = make_x()
    before = model(x)
    cm = surgeon.compile(model, DoRA(rank=4, targets=("layer",)))
    ((_, adapter),) = cm.store.items("default")
    out_first = kind in ("conv1d_gpt2", "embedding")
    weight = model.layer.weight.t() if out_first else model.layer.weight
    torch.testing.assert_close(adapter.magnitude.flatten(), weight.flatten(1).norm(dim=1))
    assert torch.equal(cm(x), before)


def test_init_matches_peft():
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), DoRA(rank=4, targets=entry.targets))
    config = peft.LoraConfig(r=4, target_modules=list(entry.targets), use_dora=True)
    pm = peft_model(entry.model(), config, seed=None)
    for path, layer in cm.store.items("default"):
        theirs = pm.get_submodule(f"base_model.model.{path}").lora_magnitude_vector["default"]
        torch.testing.assert_close(layer.magnitude, theirs.weight)


def test_half_precision_init_is_the_identity():
    """PEFT computes the initial magnitude in the base dtype, so its bf16 output moves at init
    (by ~1e-3 on this model); surgeon's float32 magnitude keeps the output exactly."""
    entry = ZOO["llama"]
    model = entry.model().to(torch.bfloat16)
    x = entry.example()
    before = logits(model(**x))
    cm = surgeon.compile(model, DoRA(rank=4, targets=entry.targets))
    (_, adapter), *_ = cm.store.items("default")
    assert adapter.magnitude.dtype == torch.float32
    assert torch.equal(logits(cm(**x)), before)


# -- PEFT: files, training with dropout, dtypes ---------------------------------------------------


def test_files_hold_peft_keys_and_shapes(tmp_path):
    entry = ZOO["cnn"]
    cm = surgeon.compile(entry.model(), DoRA(rank=2, targets=entry.targets))
    cm.save_adapters(tmp_path)
    config = peft.LoraConfig(target_modules=list(entry.targets), use_dora=True, r=2)
    peft_model(entry.model(), config, scale=0.1).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / WEIGHTS_NAME)
    theirs = load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours["base_model.model.conv1.lora_magnitude_vector"].shape == (1, 8, 1, 1)
    assert ours["base_model.model.seq.lora_magnitude_vector"].shape == (1, 8, 1)
    assert ours["base_model.model.fc.lora_magnitude_vector"].shape == (4,)


@pytest.mark.parametrize("name", ["mlp", "llama", "cnn", "gpt2"])
def test_training_with_dropout_matches_peft_outputs_and_gradients(name, tmp_path):
    """PEFT feeds the dropped input to the base weight while training; same masks, same numbers."""
    entry = ZOO[name]
    targets = tuple(t for t in entry.targets if t not in ("embed_tokens", "wte"))
    cm = surgeon.compile(entry.model(), DoRA(rank=2, alpha=4, targets=targets, dropout=0.3))
    randomize(cm)
    cm.save_adapters(tmp_path)
    pm = peft_loaded(entry.model(), tmp_path, is_trainable=True)
    cm.train()
    pm.train()
    x = entry.example()
    torch.manual_seed(3)
    ours = logits(cm(**x))
    torch.manual_seed(3)
    theirs = logits(pm(**x))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, logits(cm(**x)))  # dropout is live
    ours.pow(2).mean().backward()
    theirs.pow(2).mean().backward()
    names = {
        "lora_A": "lora_A.default.weight",
        "lora_B": "lora_B.default.weight",
        "magnitude": "lora_magnitude_vector.default.weight",
    }
    for path, layer in cm.store.items("default"):
        peft_layer = pm.get_submodule(f"base_model.model.{path}")
        for ours_name, peft_name in names.items():
            expected = peft_layer.get_parameter(peft_name).grad
            torch.testing.assert_close(
                getattr(layer, ours_name).grad, expected, rtol=1e-4, atol=1e-7
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama", "cnn"])
def test_half_precision_bases_get_float32_adapters_like_peft(name, dtype):
    """As PEFT's autocast_adapter_dtype: A, B and the magnitude are float32 on a half base."""
    entry = ZOO[name]
    cm = surgeon.compile(entry.model().to(dtype), DoRA(rank=4, targets=entry.targets))
    for _, adapter in cm.store.items("default"):
        assert adapter.magnitude.dtype == adapter.lora_A.dtype == torch.float32


# -- merging --------------------------------------------------------------------------------------


def test_merge_and_unload_leaves_plain_layers_with_the_same_outputs():
    entry = ZOO["llama"]
    cm = surgeon.compile(entry.model(), DoRA(rank=4, targets=("q_proj", "v_proj", "down_proj")))
    randomize(cm, scale=0.3)
    x = entry.example()
    expected = logits(cm(**x))
    plain = cm.merge_and_unload()
    assert not any(isinstance(m, DoRALayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain(**x)), expected, rtol=1e-5, atol=1e-5)


def test_merge_in_half_precision_is_undone_up_to_rounding():
    model = One(nn.Linear(64, 32)).to(torch.bfloat16)
    original = model.layer.weight.detach().clone()
    cm = surgeon.compile(model, DoRA(rank=4, targets=("layer",)))
    randomize(cm)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = cm(x)
    cm.merge()
    assert not torch.equal(model.layer.weight, original)
    torch.testing.assert_close(cm(x), expected, rtol=2e-2, atol=2e-2)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, original, rtol=1e-2, atol=1e-3)


# -- the eval-mode norm cache ---------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """Counts how often a DoRA norm is computed."""
    return count_calls(monkeypatch, DoRALayer, "weight_norm_now")


def test_eval_mode_computes_the_norm_once_until_a_weight_changes(counted):
    model, cm, adapter, x = _single("linear")
    cm.eval()
    counted.clear()
    for _ in range(3):
        cm(x)
    assert len(counted) == 1
    with torch.no_grad():
        adapter.lora_B.mul_(2)  # an in-place change to B
    torch.testing.assert_close(cm(x), _expected(model.layer, adapter, x), rtol=1e-5, atol=1e-5)
    assert len(counted) == 2
    optimizer = torch.optim.SGD([adapter.lora_A], lr=0.1)
    cm(x).sum().backward()
    optimizer.step()
    torch.testing.assert_close(cm(x), _expected(model.layer, adapter, x), rtol=1e-5, atol=1e-5)
    assert len(counted) == 3
    cm.merge()
    cm.unmerge()  # the base weight was written twice
    torch.testing.assert_close(cm(x), _expected(model.layer, adapter, x), rtol=1e-5, atol=1e-5)
    assert len(counted) == 4
    with torch.no_grad():
        adapter.magnitude.mul_(3)  # the magnitude is not part of the norm
    torch.testing.assert_close(cm(x), _expected(model.layer, adapter, x), rtol=1e-5, atol=1e-5)
    assert len(counted) == 4


def test_training_mode_computes_the_norm_every_forward(counted):
    _, cm, _, x = _single("linear")
    cm.train()
    counted.clear()
    for _ in range(3):
        cm(x)
    assert len(counted) == 3


def test_a_norm_cached_in_inference_mode_still_allows_gradients():
    _, cm, adapter, x = _single("linear")
    cm.eval()
    with torch.inference_mode():
        cm(x)
    cm(x).sum().backward()  # would fail on an inference tensor saved for backward
    assert adapter.magnitude.grad is not None


# -- dropout --------------------------------------------------------------------------------------


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    _, cm, adapter, x = _single("linear", dropout=0.5)
    _, plain, _, _ = _single("linear")
    cm.eval()
    torch.testing.assert_close(cm(x), plain(x))  # eval: dropout and its correction do nothing
    cm.train()
    torch.manual_seed(0)
    first = cm(x)
    assert not torch.allclose(first, cm(x))
    cm.eval()
    assert not adapter.training and not adapter.dropout_correction.training


# -- the spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"rank": 0}, r"DoRA\.rank=0: expected an integer >= 1"),
        ({"dropout": 1.5}, r"DoRA\.dropout=1\.5: expected a number >= 0 and < 1"),
        ({"bias": "some"}, r"DoRA\.bias='some': expected one of 'none', 'all', 'lora_only'"),
        ({"init": "eva"}, r"DoRA\.init='eva': expected one of 'default', 'gaussian'"),
        ({"magnitude": 1}, r"DoRA has no field 'magnitude'"),
    ],
)
def test_bad_fields_raise_spec_errors(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        DoRA(**fields)


def test_registered_under_its_name_with_lora_fields():
    assert METHODS["dora"] is DoRA and issubclass(DoRA, LoRA) and DoRA.peft_type == "LORA"
    spec = MethodSpec.from_dict({"method": "dora", "rank": 4, "targets": ["q_proj"]})
    assert spec == DoRA(rank=4, targets=("q_proj",))


def test_peft_configs_go_to_lora_or_dora_by_use_dora():
    config = DoRA(rank=4, rslora=True).to_peft_config(["q_proj"])
    assert config == {**LoRA(rank=4, rslora=True).to_peft_config(["q_proj"]), "use_dora": True}
    assert type(method_from_peft_config(config, "cfg")) is DoRA
    assert type(method_from_peft_config({**config, "use_dora": False}, "cfg")) is LoRA
    assert method_from_peft_config(config, "cfg") == DoRA(rank=4, rslora=True)


# -- golden graphs --------------------------------------------------------------------------------

GOLDEN_MLP = """\
def forward(self, x : _torch_Tensor_) -> _torch_Tensor_:
    body_0 = getattr(self.body, "0")(x);  x = None
    body_1 = getattr(self.body, "1")(body_0);  body_0 = None
    body_2 = getattr(self.body, "2")(body_1);  body_1 = None
    body_3 = getattr(self.body, "3")(body_2);  body_2 = None
    relu = torch.relu(body_3);  body_3 = None
    head = self.head(relu)
    adapters_default_head_lora_a = self.adapters.default.head.lora_A
    adapters_default_head_lora_b = self.adapters.default.head.lora_B
    adapters_default_head_magnitude = self.adapters.default.head.magnitude
    adapters_default_head_weight_norm = self.adapters.default.head.weight_norm()
    div = torch.div(adapters_default_head_magnitude, adapters_default_head_weight_norm);  adapters_default_head_magnitude = adapters_default_head_weight_norm = None
    mul = torch.mul(div, 2.0)
    view = mul.view(-1, 1);  mul = None
    mul_1 = torch.mul(adapters_default_head_lora_b, view);  adapters_default_head_lora_b = view = None
    adapters_default_head_dropout = self.adapters.default.head.dropout(relu)
    adapters_default_head_base_bias = self.adapters.default.head.base_bias
    addcmul = torch.addcmul(adapters_default_head_base_bias, adapters_default_head_base_bias, div, value = -1);  adapters_default_head_base_bias = None
    linear = torch._C._nn.linear(adapters_default_head_dropout, adapters_default_head_lora_a);  adapters_default_head_lora_a = None
    linear_1 = torch._C._nn.linear(linear, mul_1, addcmul);  linear = mul_1 = addcmul = None
    addcmul_1 = torch.addcmul(linear_1, head, div);  linear_1 = head = None
    adapters_default_head_dropout_correction = self.adapters.default.head.dropout_correction(addcmul_1, relu, adapters_default_head_dropout, div);  addcmul_1 = relu = adapters_default_head_dropout = div = None
    return adapters_default_head_dropout_correction"""

GOLDEN_CONV = """\
    conv1 = self.conv1(x)
    adapters_default_conv1_lora_a = self.adapters.default.conv1.lora_A
    adapters_default_conv1_lora_b = self.adapters.default.conv1.lora_B
    adapters_default_conv1_magnitude = self.adapters.default.conv1.magnitude
    adapters_default_conv1_weight_norm = self.adapters.default.conv1.weight_norm()
    div = torch.div(adapters_default_conv1_magnitude, adapters_default_conv1_weight_norm);  adapters_default_conv1_magnitude = adapters_default_conv1_weight_norm = None
    view = div.view(-1)
    mul = torch.mul(view, 4.0)
    view_1 = mul.view(-1, 1, 1, 1);  mul = None
    mul_1 = torch.mul(adapters_default_conv1_lora_b, view_1);  adapters_default_conv1_lora_b = view_1 = None
    adapters_default_conv1_base_bias = self.adapters.default.conv1.base_bias
    addcmul = torch.addcmul(adapters_default_conv1_base_bias, adapters_default_conv1_base_bias, view, value = -1);  adapters_default_conv1_base_bias = view = None
    conv2d = torch.conv2d(x, adapters_default_conv1_lora_a, None, (1, 1), (1, 1));  x = adapters_default_conv1_lora_a = None
    conv2d_1 = torch.conv2d(conv2d, mul_1, addcmul);  conv2d = mul_1 = addcmul = None
    addcmul_1 = torch.addcmul(conv2d_1, conv1, div);  conv2d_1 = conv1 = div = None
    relu = torch.nn.functional.relu(addcmul_1, inplace = False);  addcmul_1 = None"""

GOLDEN_EMBEDDING_BF16 = """\
def forward(self, input):
    input_1 = input
    base = self.base(input_1)
    adapters_default_lora_a = self.adapters.default.lora_A
    adapters_default_lora_b = self.adapters.default.lora_B
    adapters_default_magnitude = self.adapters.default.magnitude
    adapters_default_weight_norm = self.adapters.default.weight_norm()
    div = torch.div(adapters_default_magnitude, adapters_default_weight_norm);  adapters_default_magnitude = adapters_default_weight_norm = None
    mul = torch.mul(div, 4.0)
    view = mul.view(-1, 1);  mul = None
    mul_1 = torch.mul(adapters_default_lora_b, view);  adapters_default_lora_b = view = None
    t = adapters_default_lora_a.t();  adapters_default_lora_a = None
    embedding = torch.nn.functional.embedding(input_1, t, 0, None, 2.0, False, False);  input_1 = t = None
    t_1 = mul_1.t();  mul_1 = None
    matmul = torch.matmul(embedding, t_1);  embedding = t_1 = None
    addcmul = torch.addcmul(matmul, base, div);  matmul = base = div = None
    to = addcmul.to(torch.bfloat16);  addcmul = None
    return to"""


def test_golden_graph_of_a_linear_with_bias_and_dropout():
    cm = surgeon.compile(ZOO["mlp"].model(), DoRA(rank=4, alpha=8, targets=("head",), dropout=0.1))
    assert graph_code(cm, "") == GOLDEN_MLP


def test_golden_graph_of_a_convolution():
    cm = surgeon.compile(ZOO["cnn"].model(), DoRA(rank=2, alpha=8, targets=("conv1",)))
    assert GOLDEN_CONV in graph_code(cm, "")


def test_golden_graph_of_a_half_precision_embedding():
    cm = surgeon.compile(
        ZOO["llama"].model().to(torch.bfloat16), DoRA(rank=2, alpha=8, targets=("embed_tokens",))
    )
    assert graph_code(cm, "model.embed_tokens") == GOLDEN_EMBEDDING_BF16


@pytest.mark.parametrize("order", [("dora", "lora"), ("lora", "dora")])
def test_merge_matches_unmerged_when_dora_shares_a_layer_with_another_adapter(order):
    entry = ZOO["llama"]
    spec = surgeon.Spec(
        adapters={
            "dora": DoRA(rank=2, targets=("q_proj",)),
            "lora": LoRA(rank=2, targets=("q_proj",)),
        }
    )
    cm = surgeon.compile(entry.model(), spec).eval()
    randomize(cm, scale=0.3)
    cm.set_active(list(order))
    inputs = entry.example()
    with torch.no_grad():
        unmerged = logits(cm(**inputs))
        cm.merge()
        merged = logits(cm(**inputs))
        cm.unmerge()
        again = logits(cm(**inputs))
    # the DoRA norm is the base weight's plus DoRA's own delta, whatever merged before it
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-4)
