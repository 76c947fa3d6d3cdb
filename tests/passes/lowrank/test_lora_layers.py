"""LoRA on convolutions with groups, dilation or a padding_mode, and on nn.MultiheadAttention
(passes/lowrank/lora_layers.py): PEFT parity both ways (outputs, files, gradients), merging
where it is exact, and the refusals, each naming the layer and the option."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import One, add_noise, peft_loaded, peft_model

import surgeon

peft = pytest.importorskip("peft")

CONVS = {
    "grouped2d": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 6, 6)),
    "depthwise1d": (lambda: nn.Conv1d(4, 4, 3, padding=1, groups=4), (2, 4, 7)),
    "dilated_same1d": (lambda: nn.Conv1d(3, 4, 3, padding="same", dilation=2), (2, 3, 9)),
    "dilated_1x1": (lambda: nn.Conv2d(3, 4, 1, dilation=2), (2, 3, 5, 5)),
    "reflect2d": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "circular3d": (
        lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="circular"),
        (1, 2, 4, 4, 4),
    ),
}
MERGEABLE = {"dilated_1x1"}
REFUSED_MERGE = {
    "grouped2d": "groups=2",
    "depthwise1d": "groups=4",
    "dilated_same1d": r"dilation=\(2,\)",
    "reflect2d": "padding_mode='reflect'",
    "circular3d": "padding_mode='circular'",
}


def _conv(kind: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape = CONVS[kind]
    torch.manual_seed(0)
    model = One(make())
    torch.manual_seed(1)
    return model, torch.randn(shape)


def _grads(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    model(x).pow(2).mean().backward()


def _peft_grads(pm) -> dict[str, torch.Tensor]:
    """PEFT's factor gradients by their key in PEFT's file (no adapter name, no base_layer)."""
    out = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "").replace("base_model.model.", "")
            out[key.replace("base_layer.", "")] = p.grad
    return out


def _our_grads(cm) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in cm.store.items("default"):
        for name, p in layer.named_parameters(recurse=False):
            out[f"{path}.{layer.peft_names.get(name, name)}"] = p.grad
    return out


def _slow_but(fast: str, names) -> list:
    """``names`` as parameters, all but ``fast`` in the slow lane (each costs about a second)."""
    return [pytest.param(n, marks=() if n == fast else pytest.mark.slow) for n in sorted(names)]


@pytest.mark.parametrize("kind", _slow_but("grouped2d", CONVS))
def test_conv_options_match_peft_both_ways_with_its_gradients(kind, tmp_path):
    """PEFT's adapter (A over all channels, undilated, zero-padded; B a grouped 1x1) loads here
    with PEFT's outputs and train-step gradients, and ours loads in PEFT with ours."""
    model, x = _conv(kind)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["layer"])
    pm = peft_model(model, config)
    pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(_conv(kind)[0], tmp_path / "peft").eval()
    expected = pm(x)
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path / "ours")
    theirs = peft_loaded(_conv(kind)[0], tmp_path / "ours")
    torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)
    _grads(pm, x)
    _grads(cm, x)
    mine, their = _our_grads(cm), _peft_grads(pm)
    assert set(mine) == set(their)
    for key, grad in mine.items():
        torch.testing.assert_close(grad, their[key], rtol=1e-4, atol=1e-6)


def test_grouped_conv_runs_a_over_all_channels_and_a_grouped_b():
    """The formula, written out: A convolves like the base (no groups), B is grouped."""
    model, x = _conv("grouped2d")
    cm = surgeon.compile(model, surgeon.LoRA(rank=4, alpha=2, targets=("layer",))).eval()
    add_noise(cm.store.parameters())
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_A.shape == (4, 4, 3, 3) and adapter.lora_B.shape == (6, 2, 1, 1)
    base = cm.model.layer
    with cm.disabled():
        plain = cm(x)
    low = F.conv2d(F.conv2d(x, adapter.lora_A, None, 1, 1), adapter.lora_B, groups=2)
    torch.testing.assert_close(cm(x), plain + 0.5 * low, rtol=1e-5, atol=1e-6)
    assert base.groups == 2


@pytest.mark.parametrize("kind", sorted(MERGEABLE))
def test_mergeable_conv_options_merge_and_unmerge_exactly(kind):
    model, x = _conv(kind)
    cm = surgeon.compile(model, surgeon.LoRA(rank=4, targets=("layer",))).eval()
    add_noise(cm.store.parameters())
    expected = cm(x)
    weight = cm.model.layer.weight.clone()
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(cm.model.layer.weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(REFUSED_MERGE))
def test_merges_that_would_change_outputs_are_refused_naming_layer_and_option(kind):
    model, x = _conv(kind)
    cm = surgeon.compile(model, surgeon.LoRA(rank=4, targets=("layer",))).eval()
    add_noise(cm.store.parameters())
    expected = cm(x)
    weight = cm.model.layer.weight.clone()
    for act in (cm.merge, cm.merge_and_unload):
        with pytest.raises(
            surgeon.SpecError, match=rf"merge LoRA into layer: {REFUSED_MERGE[kind]}"
        ):
            act()
    assert cm.merged == [] and torch.equal(cm.model.layer.weight, weight)
    torch.testing.assert_close(cm(x), expected)


@pytest.mark.parametrize(
    ("layer", "rank", "match"),
    [
        (nn.Conv2d(4, 6, 3, groups=2), 3, r"on layer: rank 3 does not divide by .*groups=2"),
        (nn.Conv1d(3, 4, 3, padding=2, dilation=2), 4, r"on layer: dilation=\(2,\) with"),
        (nn.Conv2d(3, 4, 3, dilation=(1, 2)), 4, r"on layer: dilation=\(1, 2\) with"),
    ],
)
def test_conv_options_peft_cannot_run_are_refused(layer, rank, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(One(layer), surgeon.LoRA(rank=rank, targets=("layer",)))


def test_rank_pattern_can_fit_a_grouped_layer():
    model, _ = _conv("grouped2d")
    spec = surgeon.LoRA(rank=3, targets=("layer",), rank_pattern={"layer": 2})
    cm = surgeon.compile(model, spec)
    ((_, adapter),) = cm.store.items("default")
    assert adapter.lora_B.shape == (6, 1, 1, 1)


def test_dora_keeps_refusing_conv_options_naming_them():
    layer = nn.Conv2d(4, 6, 3, groups=2, padding_mode="reflect", padding=1)
    with pytest.raises(surgeon.SpecError, match=r"on layer: .*groups=2, padding_mode='reflect'"):
        surgeon.compile(One(layer), surgeon.DoRA(rank=2, targets=("layer",)))


def test_combining_grouped_conv_adapters_is_refused():
    model, _ = _conv("grouped2d")
    cm = surgeon.compile(model, surgeon.LoRA(rank=2, targets=("layer",)))
    cm.add_adapter("other", surgeon.LoRA(rank=2, targets=("layer",)))
    with pytest.raises(surgeon.SpecError, match="adapts layer, a convolution with groups=2"):
        cm.merge_adapters({"default": 1.0, "other": 1.0}, "both", how="cat")


# -- nn.MultiheadAttention --------------------------------------------------------------------


class SelfAttention(nn.Module):
    """A MultiheadAttention called on one input, with a key padding mask."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, **options)

    def forward(self, x, mask=None):
        return self.mha(x, x, x, key_padding_mask=mask, need_weights=False)[0]


def _attention(**options) -> SelfAttention:
    torch.manual_seed(0)
    model = SelfAttention(**options)
    if model.mha.in_proj_bias is not None:
        with torch.no_grad():
            model.mha.in_proj_bias.normal_()
    return model


MHA_OPTIONS = {
    "batch_first": {"batch_first": True},
    "seq_first_bias_kv": {"add_bias_kv": True},
}


@pytest.mark.parametrize("name", _slow_but("batch_first", MHA_OPTIONS))
def test_multihead_attention_matches_peft_both_ways_with_its_gradients(name, tmp_path):
    """PEFT adapts the packed q/k/v projection and out_proj; its file loads here with its
    outputs and gradients, ours in PEFT with ours (PEFT 0.21 counts out_proj's update twice in
    outputs, once in gradients: so do we)."""
    options = MHA_OPTIONS[name]
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["mha"])
    pm = peft_model(_attention(**options), config)
    pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(_attention(**options), tmp_path / "peft").eval()
    x = torch.randn(3, 4, 8)
    batch, length = (3, 4) if options.get("batch_first") else (4, 3)
    mask = torch.zeros(batch, length, dtype=torch.bool)  # (batch, source), either layout
    mask[1, -1] = True
    expected = pm(x, mask)
    torch.testing.assert_close(cm(x, mask), expected, rtol=1e-5, atol=1e-5)
    cm.save_adapters(tmp_path / "ours")
    theirs = peft_loaded(_attention(**options), tmp_path / "ours")
    torch.testing.assert_close(theirs(x, mask), expected, rtol=1e-5, atol=1e-5)
    _grads(pm, x)
    _grads(cm, x)
    mine, their = _our_grads(cm), _peft_grads(pm)
    assert set(mine) == set(their) and len(mine) == 4
    for key, grad in mine.items():
        torch.testing.assert_close(grad, their[key], rtol=1e-4, atol=1e-6)


def test_multihead_attention_merges_as_peft_and_unmerges():
    pm = peft_model(_attention(batch_first=True), peft.LoraConfig(r=2, target_modules=["mha"]))
    x = torch.randn(2, 5, 8)
    cm = surgeon.compile(_attention(batch_first=True), surgeon.LoRA(rank=2, targets=("mha",)))
    cm.eval()
    add_noise(cm.store.parameters())
    expected = cm(x)
    weights = {k: v.clone() for k, v in cm.model.state_dict().items()}
    cm.merge()
    torch.testing.assert_close(cm(x), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    for k, v in cm.model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=1e-6)
    merged = cm.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pm.merge_and_unload()
    assert set(theirs.state_dict()) == set(merged.state_dict())


def test_multihead_attention_ignores_the_lora_dropout_as_peft():
    spec = surgeon.LoRA(rank=2, dropout=0.9, targets=("mha",))
    cm = surgeon.compile(_attention(batch_first=True), spec).train()
    add_noise(cm.store.parameters())
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(cm(x), cm(x))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (surgeon.DoRA(rank=2, targets=("mha",)), "which DoRA cannot adapt"),
        (surgeon.LoRA(rank=2, targets=("mha",), lora_bias=True), "lora_bias=True on mha"),
        (surgeon.LoRA(rank=2, targets=("mha",), init="pissa"), "which LoRA cannot adapt"),
        (surgeon.LoRA(rank=2, targets=("mha",), bias="all"), "bias='all' on mha"),
        (surgeon.LoRA(rank=2, targets=("mha",), init="orthogonal"), "init='orthogonal' on mha"),
    ],
)
def test_multihead_attention_refuses_what_peft_refuses(spec, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(_attention(batch_first=True), spec)


def test_multihead_attention_with_separate_kv_sizes_is_refused():
    model = SelfAttention(kdim=4, vdim=4)
    with pytest.raises(surgeon.SpecError, match="on mha: MultiheadAttention with kdim"):
        surgeon.compile(model, surgeon.LoRA(rank=2, targets=("mha",)))


def test_multihead_attention_refuses_mixed_batches_and_combining():
    cm = surgeon.compile(_attention(batch_first=True), surgeon.LoRA(rank=2, targets=("mha",)))
    cm.add_adapter("other", surgeon.LoRA(rank=2, targets=("mha",)))
    x = torch.randn(2, 3, 8)
    with pytest.raises(surgeon.SpecError, match="mixed-adapter batches"):
        cm(x, adapter_names=["default", "other"])
    with pytest.raises(surgeon.SpecError, match="adapts mha, a MultiheadAttention"):
        cm.merge_adapters({"default": 1.0, "other": 1.0}, "both", how="cat")


def test_two_adapters_on_one_multihead_attention_add_their_updates():
    cm = surgeon.compile(_attention(batch_first=True), surgeon.LoRA(rank=2, targets=("mha",)))
    cm.add_adapter("other", surgeon.LoRA(rank=3, targets=("mha",)))
    cm.eval()
    add_noise(cm.store.parameters())
    x = torch.randn(2, 3, 8)
    cm.set_active(["default", "other"])
    both = cm(x)
    cm.merge()
    torch.testing.assert_close(cm(x), both, rtol=1e-5, atol=1e-5)
