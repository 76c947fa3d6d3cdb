"""The fusion pass: which subgraphs become fused ops, and that fused graphs compute what the
unfused ones do (outputs and gradients) on the zoo, in every dtype, in train mode with dropout,
in mixed batches, under torch.compile, and through the Triton kernels (interpreted)."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from zoo import ZOO, logits, randomize

import surgeon

FUSABLE = {"mlp": 3, "cnn": 1, "llama": 6, "gpt2": 4, "bert": 11}
"""Linear / GPT-2 Conv1D layers among each zoo model's targets (convolutions and embeddings
stay unfused)."""


class CountOps(TorchDispatchMode):
    """Counts the ``surgeon::`` ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "surgeon":
            self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def fused_and_unfused(entry, method, dtype=torch.float32, train=False):
    cm = surgeon.compile(entry.model().to(dtype), method)
    randomize(cm, scale=0.3)
    cm.train(train)
    return cm


def run(cm, inputs, seed=0, autocast=False, **kwargs):
    """Output, and the adapters' gradients of a fixed random projection of it; ``autocast``: the
    forward in CPU bfloat16 autocast (the backward outside it, as autocast recommends)."""
    torch.manual_seed(seed)
    device = next(cm.store.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = logits(cm(**inputs, **kwargs))
    params = [p for p in cm.store.parameters() if p.requires_grad]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad((out * weight).sum(), params)
    return out.detach(), grads


def on(device, inputs):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def errors(a, b) -> list[float]:
    """Per tensor (output, then each gradient): largest difference over the largest entry."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    pairs = zip([out_a, *grads_a], [out_b, *grads_b], strict=True)
    return [
        ((x.double() - y.double()).abs().max() / y.double().abs().max()).item() for x, y in pairs
    ]


def assert_same(a, b, tol):
    worst = max(errors(a, b))
    assert worst <= tol, f"fused and unfused differ by {worst:.2e} (relative to the largest entry)"


@pytest.mark.parametrize("method", ["LoRA", "DoRA"])
def test_fused_zoo_models_match_unfused(zoo_entry, method):
    cm = fused_and_unfused(zoo_entry, getattr(surgeon, method)(rank=3, targets=zoo_entry.targets))
    inputs = zoo_entry.example()
    unfused = run(cm, inputs)
    assert cm.fuse() == FUSABLE[zoo_entry.name]
    cm.graph.check()
    code = cm.graph.code()
    assert f"torch.ops.surgeon.{method.lower()}_linear.default" in code
    with CountOps() as ops:
        fused = run(cm, inputs)
    assert ops.counts[f"{method.lower()}_linear"] == FUSABLE[zoo_entry.name]
    assert ops.counts["lora_backward"] == FUSABLE[zoo_entry.name]
    assert_same(fused, unfused, 1e-4)


@pytest.mark.parametrize(
    ("method", "dtype"),
    [
        ("LoRA", torch.bfloat16),
        ("DoRA", torch.float16),
        pytest.param("LoRA", torch.float16, marks=pytest.mark.slow),
        pytest.param("DoRA", torch.bfloat16, marks=pytest.mark.slow),
    ],
    ids=str,
)
def test_fused_half_precision_is_as_accurate_as_unfused(method, dtype):
    """Outputs agree within the dtype's tolerance; gradients, which half precision makes noisy
    through a whole model, are about as far from a float64 run of the same weights as the
    unfused graph's are (per tensor the two noises differ by chance, so the worst is compared)."""
    entry = ZOO["llama"]
    cm = fused_and_unfused(entry, getattr(surgeon, method)(rank=4, targets="all-linear"), dtype)
    inputs = entry.example()
    unfused = run(cm, inputs)
    assert cm.fuse() == 14  # 7 projections x 2 layers
    fused = run(cm, inputs)
    floor = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert errors(fused, unfused)[0] <= 2 * floor
    cm.fuse(False)
    truth = run(cm.double(), inputs)
    assert max(errors(fused, truth)) <= 1.5 * max(errors(unfused, truth)) + floor


@pytest.mark.parametrize("method", ["LoRA", "DoRA"])
def test_dropout_in_train_mode_is_fused_with_the_models_own_mask(method):
    entry = ZOO["gpt2"]
    spec = getattr(surgeon, method)(rank=2, targets=("c_attn", "c_fc"), dropout=0.3)
    cm = fused_and_unfused(entry, spec, train=True)
    inputs = entry.example()
    unfused = run(cm, inputs, seed=5)
    assert cm.fuse() == 4
    assert "dropout(" in cm.graph.code("transformer.h.0.attn.c_attn")
    fused = run(cm, inputs, seed=5)
    assert_same(fused, unfused, 1e-4)
    assert not torch.allclose(fused[0], run(cm, inputs, seed=6)[0])  # dropout is on


def mixed_batch_case() -> tuple:
    """Two LoRA adapters sharing q_proj on the zoo Llama, and a batch whose rows pick them."""
    spec = surgeon.Spec(
        {
            "a": surgeon.LoRA(rank=2, targets=("q_proj", "v_proj")),
            "b": surgeon.LoRA(rank=5, alpha=3, targets=("q_proj", "o_proj")),
        }
    )
    cm = fused_and_unfused(ZOO["llama"], spec)
    inputs = {"input_ids": torch.randint(3, 96, (4, 7), generator=torch.Generator().manual_seed(0))}
    return cm, inputs, ["b", "__base__", "a", "b"]


def test_mixed_batches_use_the_multi_adapter_op():
    cm, inputs, names = mixed_batch_case()
    expected = logits(cm(**inputs, adapter_names=names))
    cm.fuse()
    with CountOps() as ops:
        out = logits(cm(**inputs, adapter_names=names))
    # q_proj (a and b), v_proj (a), o_proj (b), per layer
    assert ops.counts["multi_lora_linear"] == 3 * 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for i, name in enumerate(names):  # each row as if it ran alone
        cm.set_active(None if name == "__base__" else name)
        alone = logits(cm(input_ids=inputs["input_ids"][i : i + 1]))
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_fuse_is_reversible_and_follows_adapter_changes():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=("head",)), fuse=True)
    assert cm.fused and sum("surgeon.lora_linear" in r.gm.code for r in cm.graph.rewritten()) == 1
    cm.add_adapter("more", surgeon.LoRA(rank=2, targets=("body.0", "body.3")))
    cm.set_active(["default", "more"])
    assert cm.fuse() == 3
    cm.merge()
    assert cm.fuse() == 0  # merged adapters leave nothing to fuse
    cm.unmerge()
    assert cm.fuse(False) == 0 and not cm.fused
    assert "surgeon.lora_linear" not in cm.graph.code() and "lora_A" in cm.graph.code()
    with pytest.raises(surgeon.SpecError, match="fuse must be True or False"):
        surgeon.compile(entry.model(), surgeon.LoRA(targets=("head",)), fuse="yes")


def test_fused_graph_code_golden():
    cm = surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("head",)), fuse=True)
    expected = """\
    relu = torch.relu(body_3);  body_3 = None
    adapters_default_head_lora_a = self.adapters.default.head.lora_A
    adapters_default_head_lora_b = self.adapters.default.head.lora_B
    head_weight = self.head.weight
    head_bias = self.head.bias
    lora_linear_default = torch.ops.surgeon.lora_linear.default(relu, head_weight, head_bias, \
adapters_default_head_lora_a, adapters_default_head_lora_b, 8.0);  relu = head_weight = \
head_bias = adapters_default_head_lora_a = adapters_default_head_lora_b = None
    return lora_linear_default"""
    assert expected in cm.graph.code()


def test_what_is_not_fused_is_left_as_it_was():
    # convolutions and embeddings; LoRA after IA3's input scaling on the same layer; VeRA
    entry = ZOO["llama"]
    spec = surgeon.Spec(
        {
            "ia3": surgeon.IA3(targets=("down_proj",), feedforward=("down_proj",)),
            "lora": surgeon.LoRA(rank=2, targets=("down_proj", "embed_tokens")),
            "vera": surgeon.VeRA(rank=4, targets=("q_proj",)),
        }
    )
    cm = fused_and_unfused(entry, spec)
    inputs = entry.example()
    expected = run(cm, inputs)
    assert cm.fuse() == 0
    assert_same(run(cm, inputs), expected, 1e-6)
    cnn = surgeon.compile(ZOO["cnn"].model(), surgeon.LoRA(rank=2, targets=("conv1", "fc")))
    assert cnn.fuse() == 1  # fc only


def test_fused_graphs_run_on_the_meta_device():
    entry = ZOO["gpt2"]
    with torch.device("meta"):
        model = entry.build()
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=("c_attn",)), fuse=True)
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert logits(cm(input_ids=ids)).shape == (2, 5, 96)


COMPILED_SPECS = {
    "lora": surgeon.LoRA(rank=2, targets=ZOO["mlp"].targets),
    "qlora_double_quant": surgeon.QLoRA(
        rank=2,
        targets=ZOO["mlp"].targets,
        quant=surgeon.NF4(compute_dtype="float32", double_quant=True),
    ),
}


@pytest.mark.parametrize("spec", sorted(COMPILED_SPECS))
@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_torch_compile_runs_fused_and_unfused_graphs(fuse, spec):
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), COMPILED_SPECS[spec], fuse=fuse)
    randomize(cm)
    inputs = entry.example()
    expected = run(cm, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(cm, backend="aot_eager", fullgraph=True)
    assert_same(run(compiled, inputs), expected, 1e-5)


def test_torch_compile_with_inductor_on_the_fused_graph():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=("head",)), fuse=True)
    randomize(cm)
    inputs = entry.example()
    expected = run(cm, inputs)
    torch._dynamo.reset()
    assert_same(run(torch.compile(cm), inputs), expected, 1e-4)


@pytest.mark.parametrize("method", ["LoRA", "DoRA"])
def test_fused_graph_through_the_triton_kernels(monkeypatch, method):
    pytest.importorskip("triton")
    entry = ZOO["gpt2"]  # Conv1D: the kernels read the transposed weight by strides
    cm = fused_and_unfused(entry, getattr(surgeon, method)(rank=3, targets=("c_attn",)))
    inputs = entry.example()
    expected = run(cm, inputs)
    assert cm.fuse() == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert_same(run(cm, inputs), expected, 1e-4)


def test_trainable_base_bias_and_weight_get_the_unfused_gradients():
    entry = ZOO["gpt2"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=("c_fc",), bias="lora_only"))
    randomize(cm)
    layer = cm.model.transformer.h[0].mlp.c_fc
    layer.weight.requires_grad_(True)  # a user unfreezing a base weight
    inputs = entry.example()

    def base_grads():
        out = logits(cm(**inputs))
        return torch.autograd.grad(out.square().mean(), [layer.bias, layer.weight])

    expected = base_grads()
    assert cm.fuse() == 2
    for got, want in zip(base_grads(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- QLoRA's 4-bit layers ----------------------------------------------------------------------

QLORA_TARGETS = {"llama": ("q_proj", "down_proj"), "gpt2": ("c_attn", "c_fc")}


def qlora(entry_name, compute_dtype="float32", double_quant=True, quant_type="nf4", **fields):
    quant = surgeon.NF4(
        compute_dtype=compute_dtype, double_quant=double_quant, quant_type=quant_type
    )
    return surgeon.QLoRA(rank=3, targets=QLORA_TARGETS[entry_name], quant=quant, **fields)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double_quant", "plain_absmax"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fused_qlora_equals_unfused_in_train_mode(name, compute_dtype, double_quant):
    entry = ZOO[name]
    spec = qlora(name, compute_dtype, double_quant, dropout=0.2)
    cm = fused_and_unfused(entry, spec, train=True)
    inputs = entry.example()
    unfused = run(cm, inputs, seed=3)
    assert cm.fuse() == 4  # two targets x two layers
    cm.graph.check()
    code = cm.graph.code()
    assert "torch.ops.surgeon.nf4_lora_linear.default" in code
    assert "dequantize_4bit" not in code and "linear_4bit" not in code
    with CountOps() as ops:
        fused = run(cm, inputs, seed=3)
    assert ops.counts["nf4_lora_linear"] == 4 and ops.counts["lora_backward"] == 4
    assert torch.equal(fused[0], unfused[0])  # the same operations in the same dtypes
    assert_same(fused, unfused, 1e-5 if compute_dtype == "float32" else 1e-2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fused_qlora_base_gets_no_gradient(quant_type):
    entry = ZOO["gpt2"]
    cm = fused_and_unfused(entry, qlora("gpt2", quant_type=quant_type), train=True)
    assert cm.fuse() == 4
    layer = cm.model.transformer.h[0].attn.c_attn
    logits(cm(**entry.example())).square().mean().backward()
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.weight.grad is None and layer.bias.grad is None
    trained = [p for p in cm.store.parameters() if p.grad is not None]
    assert len(trained) == 8 and all(p.grad.abs().sum() > 0 for p in trained)


def test_fused_qlora_merges_unmerges_and_unfuses():
    entry = ZOO["llama"]
    cm = fused_and_unfused(entry, qlora("llama", "bfloat16"))
    inputs = entry.example()
    expected = logits(cm(**inputs)).detach()
    assert cm.fuse() == 4
    cm.merge()  # dequantized plain layers with LoRA folded in: nothing left to fuse
    assert cm.fuse() == 0
    merged = logits(cm(**inputs)).detach()
    torch.testing.assert_close(merged, expected, rtol=2e-2, atol=2e-2)
    cm.unmerge()
    assert cm.fuse() == 4
    assert torch.equal(logits(cm(**inputs)), expected)
    assert cm.fuse(False) == 0
    assert "linear_4bit" in cm.graph.code() and "nf4_lora_linear" not in cm.graph.code()
    assert torch.equal(logits(cm(**inputs)), expected)


def test_qlora_sites_left_unfused_are_counted():
    # a second adapter on the same 4-bit layer adds to the fused op's output (as LoRA's rule
    # does), and mixed batches call the 4-bit layer itself: both stay as they are
    entry = ZOO["llama"]
    spec = surgeon.Spec(
        {
            "a": surgeon.QLoRA(rank=2, targets=("q_proj",), quantize="targets"),
            "b": surgeon.LoRA(rank=3, targets=("q_proj", "v_proj")),
        }
    )
    cm = fused_and_unfused(entry, spec)
    cm.set_active(["a", "b"])
    inputs = {"input_ids": torch.randint(3, 96, (3, 5), generator=torch.Generator().manual_seed(0))}
    stacked = logits(cm(**inputs)).detach()
    names = ["a", "b", "__base__"]
    mixed = logits(cm(**inputs, adapter_names=names)).detach()
    assert cm.fuse() == 4  # q_proj: QLoRA "a" (b stays on top of it); v_proj: LoRA "b"
    rules = collections.Counter(
        n.meta["surgeon"]["rule"]
        for r in cm.graph.rewritten()
        for n in r.graph.nodes
        if "rule" in n.meta.get("surgeon", {})
    )
    assert rules == {"qlora": 2, "lora": 2}
    torch.testing.assert_close(logits(cm(**inputs)), stacked, rtol=1e-6, atol=1e-6)
    with CountOps() as ops:
        out = logits(cm(**inputs, adapter_names=names))
    assert ops.counts["nf4_lora_linear"] == 0
    torch.testing.assert_close(out, mixed, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_fused_qlora_through_the_triton_kernels(monkeypatch, compute_dtype):
    pytest.importorskip("triton")
    entry = ZOO["gpt2"]
    spec = surgeon.QLoRA(
        rank=3, targets=("c_attn",), quant=surgeon.NF4(compute_dtype=compute_dtype, block_size=32)
    )
    cm = fused_and_unfused(entry, spec)
    inputs = entry.example()
    expected = run(cm, inputs)
    assert cm.fuse() == 2
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fused = run(cm, inputs)
    if compute_dtype == "float32":
        assert_same(fused, expected, 1e-4)
        return
    # bfloat16 products summed in another order: as far from a float64 run as unfused is
    monkeypatch.delenv("TRITON_INTERPRET")
    cm.fuse(False)
    truth = run(cm.double(), inputs)
    assert max(errors(fused, truth)) <= 1.5 * max(errors(expected, truth)) + 1e-2


# -- under autocast ----------------------------------------------------------------------------


class ProductDtypes(TorchDispatchMode):
    """Per ``surgeon::`` forward op that runs, the dtype of its adapter factor ``lora_A`` (the
    dtype its products run in: autocast's kernels cast the operands before the op runs)."""

    LORA_A = {"lora_linear": 3, "dora_linear": 3, "multi_lora_linear": 3, "nf4_lora_linear": 7}

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, torch.dtype]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "surgeon" and name in self.LORA_A:
            self.seen.add((name, args[self.LORA_A[name]].dtype))
        return func(*args, **(kwargs or {}))


AUTOCAST_CASES = {  # model, spec, the fused op
    "lora": ("llama", surgeon.LoRA(rank=3, targets=("q_proj", "v_proj"), dropout=0.1), "lora"),
    "dora": ("gpt2", surgeon.DoRA(rank=3, targets=("c_attn", "c_fc")), "dora"),
    "qlora_fp32": ("llama", qlora("llama", "float32", dropout=0.1), "nf4_lora"),
    "qlora_bf16": ("gpt2", qlora("gpt2", "bfloat16"), "nf4_lora"),
}


@pytest.mark.parametrize("case", sorted(AUTOCAST_CASES))
def test_fused_graph_under_autocast_computes_like_the_unfused_one(case):
    name, spec, op = AUTOCAST_CASES[case]
    entry = ZOO[name]
    cm = fused_and_unfused(entry, spec, train=True)
    inputs = entry.example()
    truth = run(cm, inputs, seed=3)  # float32 without autocast
    unfused = run(cm, inputs, seed=3, autocast=True)
    assert cm.fuse() == 4
    with ProductDtypes() as dtypes:
        fused = run(cm, inputs, seed=3, autocast=True)
    # (DoRA's backward recomputes its unscaled output with lora_linear)
    assert (f"{op}_linear", torch.bfloat16) in dtypes.seen
    assert {d for _, d in dtypes.seen} == {torch.bfloat16}
    assert fused[0].dtype == unfused[0].dtype == torch.bfloat16
    assert [g.dtype for g in fused[1]] == [g.dtype for g in unfused[1]]
    if case != "dora":  # the same operations in the same dtypes
        assert torch.equal(fused[0], unfused[0])
    assert errors(fused, unfused)[0] <= 1e-2
    # gradients: as far from float32 as the unfused graph's (per tensor the bfloat16 noise
    # differs by summation order)
    assert max(errors(fused, truth)) <= 1.5 * max(errors(unfused, truth)) + 1e-2
    with ProductDtypes() as dtypes:
        assert_same(run(cm, inputs, seed=3), truth, 1e-5)  # outside autocast nothing changes
    assert {d for _, d in dtypes.seen} == {torch.float32 if "bf16" not in case else torch.bfloat16}


def test_mixed_batch_under_autocast():
    cm, inputs, names = mixed_batch_case()
    truth = run(cm, inputs, adapter_names=names)
    unfused = run(cm, inputs, autocast=True, adapter_names=names)
    assert cm.fuse() == 6
    with ProductDtypes() as dtypes:
        fused = run(cm, inputs, autocast=True, adapter_names=names)
    assert dtypes.seen == {("multi_lora_linear", torch.bfloat16)}
    assert torch.equal(fused[0], unfused[0])
    assert max(errors(fused, truth)) <= 1.5 * max(errors(unfused, truth)) + 1e-2


def test_torch_compile_keeps_the_fused_ops_autocast():
    entry = ZOO["mlp"]
    cm = surgeon.compile(entry.model(), surgeon.LoRA(rank=2, targets=entry.targets), fuse=True)
    randomize(cm)
    inputs = entry.example()
    expected = run(cm, inputs, autocast=True)
    torch._dynamo.reset()
    compiled = torch.compile(cm, backend="aot_eager", fullgraph=True)
    got = run(compiled, inputs, autocast=True)
    assert got[0].dtype == torch.bfloat16
    assert_same(got, expected, 1e-6)


# -- on a GPU: the same checks through the compiled Triton kernels -----------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def dropout(dtype):
    """Dropout where fused and unfused graphs alone are compared (a float64 run of the same
    model, the oracle in half precision, would not draw the same masks on CUDA)."""
    return 0.1 if dtype == torch.float32 else 0.0


GPU_CASES = {  # model, spec for a compute dtype, surgeon ops per train step
    "lora": (
        "llama",
        lambda dtype: surgeon.LoRA(rank=3, targets=("q_proj", "v_proj"), dropout=dropout(dtype)),
        8,
    ),
    "dora": ("gpt2", lambda dtype: surgeon.DoRA(rank=3, targets=("c_attn", "c_fc")), 12),
    "qlora": (
        "llama",
        lambda dtype: qlora("llama", str(dtype).split(".")[1], dropout=dropout(dtype)),
        8,
    ),
}


def fused_model_matches_unfused(device, case, dtype):
    """Train-mode outputs and gradients; in half precision, as far from float64 as unfused."""
    name, spec, ops_per_step = GPU_CASES[case]
    entry = ZOO[name]
    cm = surgeon.compile(entry.model().to(device, dtype), spec(dtype))
    randomize(cm, scale=0.3)
    cm.train()
    inputs = on(device, entry.example())
    unfused = run(cm, inputs, seed=3)
    assert cm.fuse() == 4
    with CountOps() as ops:
        fused = run(cm, inputs, seed=3)
    assert sum(ops.counts.values()) == ops_per_step  # forwards and backwards, all fused
    assert fused[0].device.type == device
    if dtype == torch.float32:
        assert_same(fused, unfused, 1e-4)
        return
    cm.fuse(False)
    truth = run(cm.double(), inputs, seed=3)
    assert max(errors(fused, truth)) <= 1.5 * max(errors(unfused, truth)) + 1e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_fused_models_on_cuda_match_unfused(case, dtype):
    fused_model_matches_unfused("cuda", case, dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", sorted(AUTOCAST_CASES))
def test_fused_models_under_cuda_autocast(case):
    name, spec, op = AUTOCAST_CASES[case]
    entry = ZOO[name]
    cm = surgeon.compile(entry.model().cuda(), spec)
    randomize(cm, scale=0.3)
    inputs = on("cuda", entry.example())
    truth = run(cm, inputs)
    unfused = run(cm, inputs, autocast=True)
    assert cm.fuse() == 4
    with ProductDtypes() as dtypes:
        fused = run(cm, inputs, autocast=True)
    assert (f"{op}_linear", torch.bfloat16) in dtypes.seen
    assert fused[0].dtype == unfused[0].dtype == torch.bfloat16
    assert max(errors(fused, truth)) <= 1.5 * max(errors(unfused, truth)) + 1e-2


@pytest.mark.gpu
@cuda
def test_mixed_batch_on_cuda():
    cm, inputs, names = mixed_batch_case()
    cm.cuda()
    inputs = on("cuda", inputs)
    unfused = run(cm, inputs, adapter_names=names)
    assert cm.fuse() == 6
    assert_same(run(cm, inputs, adapter_names=names), unfused, 1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", ["lora", "qlora"])
def test_inductor_compiles_fused_models_on_cuda(case):
    name, spec, _ = GPU_CASES[case]
    entry = ZOO[name]
    cm = surgeon.compile(entry.model().cuda(), spec(torch.float32))
    randomize(cm, scale=0.3)
    inputs = on("cuda", entry.example())
    assert cm.fuse() == 4
    expected = run(cm, inputs)
    torch._dynamo.reset()
    assert_same(run(torch.compile(cm), inputs), expected, 1e-4)
