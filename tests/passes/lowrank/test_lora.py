"""LoRA's card (its formula) and what is LoRA's own: initialisations (default, gaussian, the
residual PiSSA and OLoRA), bias modes, dropout, the adapter's dtype, golden rewritten graphs. The
conformance suite (tests/conformance) runs the formula, merging, files, PEFT parity, gradients,
devices and dtypes on every example."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, One, gpt2_conv1d, graph_code, plain_output, randomize

import surgeon


def formula(spec, adapter, base, x):
    """LoRA (Hu et al., 2021): ``W x + b + (alpha / r) · B A x`` (rsLoRA: ``alpha / sqrt(r)``);
    on a convolution A convolves like the base and B mixes channels (1x1); on an embedding A is
    looked up."""
    a, b = adapter.lora_A, adapter.lora_B
    r = a.shape[0]
    alpha = spec.alpha_pattern.get("layer", spec.alpha)
    scale = alpha / (math.sqrt(r) if spec.rslora else r)
    if isinstance(base, nn.Embedding):
        low = F.embedding(x, a.t()) @ b.t()
    elif isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
        low = conv(conv(x, a, None, base.stride, base.padding), b)
    else:
        low = x @ a.t() @ b.t()
    return plain_output(base, x) + scale * low


LAYERS = {
    "linear": (lambda: nn.Linear(5, 6), lambda: torch.randn(3, 5)),
    "conv1d_gpt2": (gpt2_conv1d, lambda: torch.randn(2, 3, 5)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 7, 7)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 4, 1), lambda: torch.randn(2, 3, 5, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 9)),
    "embedding": (lambda: nn.Embedding(11, 6, padding_idx=0), lambda: torch.randint(0, 11, (2, 4))),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_default_init_is_peft_init(kind):
    build, _ = LAYERS[kind]
    torch.manual_seed(0)
    cm = surgeon.compile(One(build()), surgeon.LoRA(rank=4, targets=("layer",)))
    ((_, adapter),) = cm.store.items("default")
    if kind == "embedding":  # A zeros, B normal
        assert torch.count_nonzero(adapter.lora_A) == 0 and adapter.lora_B.std() > 0.5
    else:  # A kaiming-uniform(a=sqrt(5)) bound = 1/sqrt(fan_in), B zeros
        fan_in = adapter.lora_A[0].numel()
        assert adapter.lora_A.abs().max() <= 1 / math.sqrt(fan_in) + 1e-6
        assert torch.count_nonzero(adapter.lora_B) == 0


def test_gaussian_init_has_std_one_over_rank():
    torch.manual_seed(0)
    cm = surgeon.compile(
        One(nn.Linear(400, 8)), surgeon.LoRA(rank=4, targets=("layer",), init="gaussian")
    )
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_A.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(adapter.lora_B) == 0


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d_gpt2"])
def test_residual_inits_keep_outputs_and_factor_the_weight(init, kind):
    build, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    x = make_x()
    original = model.layer.weight.detach().clone()
    before = model(x)
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, alpha=4, targets=("layer",), init=init))
    ((_, adapter),) = cm.store.items("default")
    torch.testing.assert_close(cm(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        model.layer.weight + adapter.delta_weight(), original, rtol=1e-5, atol=1e-5
    )
    w = original.t() if kind == "conv1d_gpt2" else original
    if init == "pissa":  # B A / scale is the best rank-2 approximation of W
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        torch.testing.assert_close(
            adapter.lora_B @ adapter.lora_A * adapter.scale, best, rtol=1e-4, atol=1e-5
        )
    else:  # B has orthonormal columns (Q of a QR)
        torch.testing.assert_close(
            adapter.lora_B.t() @ adapter.lora_B, torch.eye(2), rtol=1e-5, atol=1e-5
        )


def test_residual_init_on_an_embedding_is_refused_and_leaves_the_model():
    torch.manual_seed(0)
    model = One(nn.Embedding(10, 4))
    saved = model.layer.weight.detach().clone()
    with pytest.raises(surgeon.SpecError, match="init='pissa' supports Linear and Conv1D"):
        surgeon.compile(model, surgeon.LoRA(targets=("layer",), init="pissa"))
    assert torch.equal(model.layer.weight, saved) and model.layer.weight.requires_grad


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_choose_trainable_base_biases(bias):
    cm = surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("head",), bias=bias))
    trainable = {n for n, p in cm.model.named_parameters() if p.requires_grad}
    expected = {
        "none": set(),
        "all": {"body.0.bias", "body.3.bias", "head.bias"},
        "lora_only": {"head.bias"},
    }
    assert trainable == expected[bias]
    adapter_params = 2 * 24 + 5 * 2
    assert cm.num_trainable() == adapter_params + sum(
        cm.model.get_parameter(n).numel() for n in trainable
    )


def test_dropout_is_live_in_train_mode_and_off_in_eval():
    cm = surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=4, targets=("head",), dropout=0.5))
    randomize(cm)
    x = torch.randn(8, 12)
    cm.eval()
    torch.testing.assert_close(cm(x), cm(x))
    cm.train()
    torch.manual_seed(0)
    first = cm(x)
    assert not torch.allclose(first, cm(x))
    cm.eval()
    ((_, adapter),) = cm.store.items("default")
    assert not adapter.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_bases_get_float32_adapters_like_peft(dtype):
    """As PEFT's autocast_adapter_dtype: the adapter is float32 whatever the base's dtype."""
    cm = surgeon.compile(
        ZOO["llama"].model().to(dtype), surgeon.LoRA(rank=4, targets=("q_proj", "v_proj"))
    )
    assert all(p.dtype == torch.float32 for p in cm.store.parameters())


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
    adapters_default_head_dropout = self.adapters.default.head.dropout(relu);  relu = None
    linear = torch._C._nn.linear(adapters_default_head_dropout, adapters_default_head_lora_a);  adapters_default_head_dropout = adapters_default_head_lora_a = None
    mul = torch.mul(linear, 2.0);  linear = None
    linear_1 = torch._C._nn.linear(mul, adapters_default_head_lora_b);  mul = adapters_default_head_lora_b = None
    add = torch.add(head, linear_1);  head = linear_1 = None
    return add"""

GOLDEN_LEAF = """\
def forward(self, input):
    input_1 = input
    base = self.base(input_1)
    adapters_default_lora_a = self.adapters.default.lora_A
    adapters_default_lora_b = self.adapters.default.lora_B
    t = adapters_default_lora_a.t();  adapters_default_lora_a = None
    embedding = torch.nn.functional.embedding(input_1, t, 0, None, 2.0, False, False);  input_1 = t = None
    mul = torch.mul(embedding, 4.0);  embedding = None
    t_1 = adapters_default_lora_b.t();  adapters_default_lora_b = None
    matmul = torch.matmul(mul, t_1);  mul = t_1 = None
    add = torch.add(base, matmul);  base = matmul = None
    return add"""


def test_golden_graph_of_a_whole_model_region_with_dropout():
    cm = surgeon.compile(
        ZOO["mlp"].model(), surgeon.LoRA(rank=4, alpha=8, targets=("head",), dropout=0.1)
    )
    assert graph_code(cm, "") == GOLDEN_MLP


def test_golden_graph_of_a_leaf_region():
    cm = surgeon.compile(
        ZOO["llama"].model(), surgeon.LoRA(rank=2, alpha=8, targets=("embed_tokens",))
    )
    assert graph_code(cm, "model.embed_tokens") == GOLDEN_LEAF


def test_graph_shows_no_adapter_nodes_when_merged_or_disabled():
    cm = surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=4, targets=("head",)))
    assert "lora_A" in cm.graph.code()
    cm.merge()
    assert "lora_A" not in cm.graph.code("")
    cm.unmerge()
    with cm.disabled():
        assert "lora_A" not in cm.graph.code("")
    assert "lora_A" in cm.graph.code("")
