"""LoRA's card (its formula) and what is LoRA's own: initialisations (default, gaussian, the
residual PiSSA, PiSSA by randomized SVD and OLoRA, orthogonal), bias modes, B's bias (``lora_bias``) where the examples do not reach
(layers without bias, refusals, gradients), dropout, the adapter's dtype, golden rewritten graphs. The
conformance suite (tests/conformance) runs the formula, merging, files, PEFT parity, gradients,
devices and dtypes on every example."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
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
    randomize,
)

import surgeon
from surgeon import quant

peft = pytest.importorskip("peft")


def formula(spec, adapter, base, x):
    """LoRA (Hu et al., 2021): ``W x + b + (alpha / r) · B A x`` (rsLoRA: ``alpha / sqrt(r)``);
    on a convolution A convolves like the base and B mixes channels (1x1); on an embedding A is
    looked up. PEFT's ``lora_bias``: ``(alpha / r) · (B A x + b_B)``, b_B per output feature."""
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
    if spec.lora_bias:
        channels_first = isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        low = low + (
            adapter.lora_bias.view(-1, *(1,) * (x.dim() - 2))
            if channels_first
            else adapter.lora_bias
        )
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


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
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
    elif init == "olora":  # B has orthonormal columns (Q of a QR)
        torch.testing.assert_close(
            adapter.lora_B.t() @ adapter.lora_B, torch.eye(2), rtol=1e-5, atol=1e-5
        )
    # pissa_niter's randomized SVD is approximate: its factors are PEFT's, tested below


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "orthogonal"])
@pytest.mark.parametrize("kind", ["embedding", "conv2d"])
def test_inits_beyond_default_and_gaussian_refuse_embeddings_and_convolutions(init, kind):
    """PEFT raises on convolutions and quietly gives embeddings its default init instead:
    both are refused here, the model left as it was."""
    build, _ = LAYERS[kind]
    torch.manual_seed(0)
    model = One(build())
    saved = model.layer.weight.detach().clone()
    with pytest.raises(surgeon.SpecError, match=f"init='{init}' supports Linear and Conv1D"):
        surgeon.compile(model, surgeon.LoRA(rank=2, targets=("layer",), init=init))
    assert torch.equal(model.layer.weight, saved) and model.layer.weight.requires_grad


RANDOM_INITS = ["pissa_niter_2", "orthogonal"]
"""Inits that draw from torch's generator, as PEFT's do."""


def _seeded(build):
    torch.manual_seed(0)
    return build()


def _peft_and_ours(build, targets, init, dora=False):
    """PEFT's LoRA (or DoRA) model and ours, built on two equal copies of ``build()`` from the
    same seed."""
    theirs, ours = (_seeded(build) for _ in range(2))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=init, use_dora=dora
    )
    torch.manual_seed(3)
    pm = peft_model(theirs, config, seed=None)
    torch.manual_seed(3)
    method = surgeon.DoRA if dora else surgeon.LoRA
    return pm, surgeon.compile(ours, method(rank=4, alpha=8, targets=tuple(targets), init=init))


@pytest.mark.parametrize("init", RANDOM_INITS)
@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("mlp", torch.float32), ("mlp", torch.bfloat16), ("conv1d_gpt2", torch.float32)],
)
def test_random_inits_draw_peft_tensors_from_the_same_seed(init, kind, dtype):
    """PEFT builds its factor layers (default-initialised ``nn.Linear``s: draws), then draws
    the init: from one seed ours has PEFT's A, B and residual base weight, layer after layer
    (the MLP has three), rounded through a half-precision base dtype as PEFT's are."""
    if kind == "mlp":
        build, targets = (lambda: ZOO["mlp"].model().to(dtype)), ZOO["mlp"].targets
    else:
        build, targets = (lambda: One(gpt2_conv1d(8, 6))), ("layer",)
    pm, cm = _peft_and_ours(build, targets, init)
    theirs = dict(pm.named_parameters())
    for path, adapter in cm.store.items("default"):
        name = f"base_model.model.{path}."
        torch.testing.assert_close(adapter.lora_A, theirs[name + "lora_A.default.weight"])
        torch.testing.assert_close(adapter.lora_B, theirs[name + "lora_B.default.weight"])
        torch.testing.assert_close(
            cm.model.get_submodule(path).weight, theirs[name + "base_layer.weight"]
        )
    assert len(cm.store.items("default")) == len(targets)


def test_orthogonal_init_starts_as_the_base_with_both_factors_random():
    """PEFT's orthogonal init: A and B from the odd and even rows of one orthogonal matrix, so
    B A = 0 although neither is zero; the base weight stays."""
    torch.manual_seed(0)
    model = One(nn.Linear(16, 12))
    weight = model.layer.weight.detach().clone()
    x = torch.randn(3, 16)
    before = model(x)
    cm = surgeon.compile(model, surgeon.LoRA(rank=4, targets=("layer",), init="orthogonal"))
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_A.abs().min() > 0 and adapter.lora_B.abs().min() > 0
    assert (adapter.lora_B @ adapter.lora_A).abs().max() < 1e-6
    assert torch.equal(model.layer.weight, weight)
    torch.testing.assert_close(cm(x), before)


@pytest.mark.parametrize("init", RANDOM_INITS)
def test_random_init_files_load_both_ways_with_peft_outputs(init, tmp_path):
    """PEFT's file names the init; loading reruns it (PEFT redraws the PiSSA residual from the
    generator), so from the load's seed both libraries give the same outputs, both ways."""
    entry = ZOO["mlp"]
    pm, cm = _peft_and_ours(entry.model, entry.targets, init)
    add_noise(p for p in pm.parameters() if p.requires_grad)
    add_noise(cm.store.parameters())
    x = entry.example()
    pm.save_pretrained(tmp_path / "peft")
    cm.save_adapters(tmp_path / "ours")
    for folder in ("peft", "ours"):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert config["init_lora_weights"] == init
    ours, theirs = entry.model(), entry.model()
    torch.manual_seed(3)  # the seed both adapters were made from
    loaded = surgeon.load(ours, tmp_path / "peft")
    torch.manual_seed(3)
    peft_outputs = peft_loaded(theirs, tmp_path / "ours")(**x)
    assert loaded.store.specs["default"].init == init
    for out in (loaded(**x), peft_outputs, cm(**x)):
        torch.testing.assert_close(out, pm(**x), rtol=1e-5, atol=1e-6)


def test_orthogonal_init_needs_an_even_rank_on_every_layer():
    with pytest.raises(surgeon.SpecError, match=r"on layer: needs an even rank .*got 3"):
        surgeon.compile(
            One(nn.Linear(5, 6)), surgeon.LoRA(rank=3, init="orthogonal", targets=("layer",))
        )
    spec = surgeon.LoRA(rank=2, init="orthogonal", targets=("head",), rank_pattern={"head": 5})
    with pytest.raises(surgeon.SpecError, match=r"on head: needs an even rank .*got 5"):
        surgeon.compile(ZOO["mlp"].model(), spec)


@pytest.mark.parametrize("init", ["pissa_niter_x", "pissa_niter_", "pissa_4", "Orthogonal"])
def test_unknown_init_names_are_refused(init):
    match = rf"LoRA.init='{init}': expected one of 'default', .* 'orthogonal' or 'pissa_niter_<K>'"
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(init=init)


@pytest.mark.parametrize("value", ["pissa_niter_-1", "pissa_niter_two", "default"])
def test_peft_init_names_we_do_not_have_are_refused(value, tmp_path):
    cm = surgeon.compile(ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("head",)))
    cm.save_adapters(tmp_path)
    match = rf"init_lora_weights='{value}' is not supported \(supported: true, false, 'gaussian'"
    with pytest.raises(surgeon.SpecError, match=match):
        load_with_changed_config(ZOO["mlp"].model(), tmp_path, {"init_lora_weights": value})


@pytest.mark.parametrize(
    ("init", "match"),
    [
        ("pissa_niter_2", "residual inits need its full-precision weight"),
        ("orthogonal", "PEFT casts the orthogonal A and B to the weight's storage dtype"),
    ],
)
def test_random_inits_refuse_layers_stored_in_4_bits(init, match):
    """PEFT refuses PiSSA on 4-bit weights and fails building orthogonal factors there."""
    model = One(nn.Linear(64, 32))
    quant.quantize_linear(model.layer, surgeon.NF4(compute_dtype="float32"))
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(model, surgeon.LoRA(rank=2, targets=("layer",), init=init))


@pytest.mark.parametrize("init", RANDOM_INITS)
def test_dora_with_random_inits_matches_peft(init):
    """DoRA takes LoRA's inits; its magnitude is measured after them, as PEFT's."""
    entry = ZOO["mlp"]
    pm, cm = _peft_and_ours(entry.model, entry.targets, init, dora=True)
    x = entry.example()
    torch.testing.assert_close(cm(**x), pm(**x))
    theirs_params = dict(pm.named_parameters())
    for path, adapter in cm.store.items("default"):
        name = f"base_model.model.{path}.lora_magnitude_vector.default.weight"
        torch.testing.assert_close(adapter.magnitude, theirs_params[name])


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


# -- lora_bias: B's bias (PEFT's lora_B.bias) -------------------------------------------------------


def test_lora_bias_starts_at_zero_and_saves_under_peft_key(tmp_path):
    cm = surgeon.compile(
        ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("head",), lora_bias=True)
    )
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_bias.shape == (5,) and torch.count_nonzero(adapter.lora_bias) == 0
    assert "base_model.model.head.lora_B.bias" in cm.adapter_state_dict()
    cm.save_adapters(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_bias"] is True


def test_peft_file_with_lora_bias_on_layers_without_bias_loads_but_refuses_to_merge(tmp_path):
    """Llama's projections have no bias: PEFT runs B's bias there (and warns) but cannot merge
    it; ours loads the file with PEFT's outputs, warns, and refuses merging before any change."""
    entry = ZOO["llama"]
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_bias=True)
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    x = entry.example()
    expected = logits(pm(**x))
    with pytest.warns(
        UserWarning, match="layer without bias: the adapter runs, but cannot be merged"
    ):
        cm = surgeon.load(entry.model(), tmp_path).eval()
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)
    weights = {k: v.clone() for k, v in cm.model.state_dict().items()}
    for act in (cm.merge, cm.merge_and_unload):
        with pytest.raises(surgeon.SpecError, match="no bias to take B's bias"):
            act()
    assert cm.merged == []
    assert all(torch.equal(v, weights[k]) for k, v in cm.model.state_dict().items())
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


def test_lora_bias_train_step_gives_peft_gradients(tmp_path):
    """The suite compares gradients on first examples only: B's bias here."""
    entry = ZOO["gpt2"]
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True, fan_in_fan_out=True)
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path)
    x = entry.example()
    for model in (cm, pm):
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        model.train()
        logits(model(**x)).pow(2).mean().backward()
    theirs = {n: p for n, p in pm.named_parameters() if n.endswith("lora_B.default.bias")}
    assert len(theirs) == 2
    for path, adapter in cm.store.items("default"):
        mine = adapter.lora_bias.grad
        their = theirs[f"base_model.model.{path}.lora_B.default.bias"].grad
        torch.testing.assert_close(mine, their, rtol=1e-4, atol=1e-6)


def test_our_lora_bias_file_loads_in_peft_with_our_outputs(tmp_path):
    entry = ZOO["gpt2"]
    spec = surgeon.LoRA(rank=2, targets=("c_attn", "c_fc"), lora_bias=True)
    cm = surgeon.compile(entry.model(), spec).eval()
    add_noise(cm.store.parameters())
    x = entry.example()
    cm.save_adapters(tmp_path)
    theirs = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(theirs(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)
    cm.merge()  # GPT-2's layers have biases: B's bias folds in
    torch.testing.assert_close(logits(cm(**x)), logits(theirs(**x)), rtol=1e-5, atol=1e-5)


def test_merge_folds_the_scaled_bias_and_unmerge_restores_it():
    torch.manual_seed(0)
    model = One(nn.Linear(5, 6))
    original = model.layer.bias.detach().clone()
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, alpha=6, targets=("layer",), lora_bias=True))
    ((_, adapter),) = cm.store.items("default")
    add_noise(cm.store.parameters())
    cm.merge()
    torch.testing.assert_close(model.layer.bias, original + 3 * adapter.lora_bias)
    cm.unmerge()
    torch.testing.assert_close(model.layer.bias, original)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"init": "gaussian"}, r"lora_bias=True needs init='default'.*not init='gaussian'"),
        ({"init": "pissa"}, r"lora_bias=True needs init='default'"),
        ({"init": "pissa_niter_4"}, r"lora_bias=True needs init='default'"),
        ({"init": "orthogonal"}, r"lora_bias=True needs init='default'"),
        ({"lora_bias": 1}, "lora_bias"),
    ],
)
def test_lora_bias_refuses_what_peft_refuses(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(**{"lora_bias": True, **fields})


def test_lora_bias_is_refused_with_dora_and_on_embeddings():
    with pytest.raises(surgeon.SpecError, match=r"DoRA.lora_bias=True is not supported"):
        surgeon.DoRA(lora_bias=True)
    assert "lora_bias" not in surgeon.DoRA.examples(("layer",))
    with pytest.raises(surgeon.SpecError, match=r"embed_tokens \(Embedding\), which LoRA cannot"):
        surgeon.compile(
            ZOO["llama"].model(), surgeon.LoRA(targets=("embed_tokens",), lora_bias=True)
        )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_dora": True}, "use_dora=True selects a variant"),  # neither LoRA's nor DoRA's
        ({"init_lora_weights": "gaussian"}, "lora_bias=True needs init='default'"),
    ],
)
def test_peft_configs_with_lora_bias_we_cannot_honour_are_refused(change, match, tmp_path):
    cm = surgeon.compile(
        ZOO["mlp"].model(), surgeon.LoRA(rank=2, targets=("head",), lora_bias=True)
    )
    cm.save_adapters(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.load(ZOO["mlp"].model(), tmp_path)


def test_combining_adapters_with_lora_bias_is_refused():
    spec = surgeon.LoRA(rank=2, targets=("head",), lora_bias=True)
    cm = surgeon.compile(ZOO["mlp"].model(), spec, name="a")
    cm.add_adapter("b", spec)
    with pytest.raises(surgeon.SpecError, match="adapter 'a' has lora_bias=True"):
        cm.merge_adapters({"a": 1.0, "b": 1.0}, "ab", how="cat")
