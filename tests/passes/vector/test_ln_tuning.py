"""LN tuning beyond the conformance suite: its formula on torch's and a model's own norms, merge
and exact unmerge, PEFT parity both ways on GPT-2's LayerNorm and Llama's RMSNorm (PEFT's keys),
half precision kept as PEFT keeps it, norms inside a traced region next to LoRA, several adapters
refused when they run together and mixed batches, the layers it refuses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import ZOO, One, add_noise, logits, peft_loaded, peft_model, tiny_traced_decoder

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.vector.ln_tuning import LNTuning


class ScaledRMSNorm(nn.Module):
    """A model's own RMS norm that scales by ``1 + w`` (as Gemma's): the adapter must run the
    norm's own code, not a generic RMS norm."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def formula(spec, adapter, base, x):
    """LN tuning (Zhao et al., 2023): the norm with its trained weight and bias,
    ``(x - mean) / std · w' + b'`` for a LayerNorm, ``x / rms(x) · w'`` for an RMSNorm."""
    if isinstance(base, nn.LayerNorm):
        return F.layer_norm(x, base.normalized_shape, adapter.weight, adapter.bias, base.eps)
    if isinstance(base, nn.RMSNorm):
        return F.rms_norm(x, base.normalized_shape, adapter.weight, base.eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + adapter.weight)


peft = pytest.importorskip("peft")

NORMS = {
    "layernorm": lambda: nn.LayerNorm(6),
    "rmsnorm": lambda: nn.RMSNorm(6, eps=1e-5),
    "own_rmsnorm": lambda: ScaledRMSNorm(6),
}


@pytest.mark.parametrize("kind", sorted(NORMS))
def test_output_is_the_formula_and_merge_unmerge_are_exact(kind):
    torch.manual_seed(0)
    model, x = One(NORMS[kind]()), torch.randn(3, 4, 6)
    base_out = model(x)
    original = {n: p.detach().clone() for n, p in model.state_dict().items()}
    cm = surgeon.compile(model, LNTuning(targets=("layer",))).eval()
    torch.testing.assert_close(cm(x), base_out)  # the copy starts as the norm
    add_noise(cm.store.parameters(), 2, 0.3)
    ((_, adapter),) = cm.store.items("default")
    expected = formula(cm.spec("default"), adapter, model.layer, x)
    assert not torch.allclose(expected, base_out, atol=1e-4)
    torch.testing.assert_close(cm(x), expected)
    cm.merge()
    torch.testing.assert_close(model.layer.weight, adapter.weight)
    torch.testing.assert_close(cm(x), expected)
    cm.unmerge()
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name
    with cm.disabled():
        torch.testing.assert_close(cm(x), base_out)


def _gpt2_norms() -> LNTuning:
    return LNTuning(targets=("ln_1", "ln_2", "ln_f"))


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_peft_loads_our_file_under_its_keys_with_our_outputs(model, tmp_path):
    entry = ZOO[model]
    spec = _gpt2_norms() if model == "gpt2" else LNTuning()
    cm = surgeon.compile(entry.model(), spec).eval()
    add_noise(cm.store.parameters(), 2, 0.2)
    x = entry.example()
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LN_TUNING"
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    norm = "transformer.h.0.ln_1" if model == "gpt2" else "model.layers.0.input_layernorm"
    assert f"base_model.model.{norm}.ln_tuning_layers.weight" in keys
    assert (f"base_model.model.{norm}.ln_tuning_layers.bias" in keys) == (model == "gpt2")
    pm = peft_loaded(entry.model(), tmp_path)
    torch.testing.assert_close(logits(pm(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-5)


def test_we_load_peft_file_with_peft_outputs(tmp_path):
    entry = ZOO["gpt2"]
    config = peft.LNTuningConfig(target_modules=["ln_1", "ln_f"], exclude_modules=["h.1.ln_1"])
    pm = peft_model(entry.model(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(entry.model(), tmp_path).eval()
    assert sorted(path for path, _ in cm.store.items("default")) == [
        "transformer.h.0.ln_1",
        "transformer.ln_f",
    ]
    x = entry.example()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-5)


def test_half_precision_keeps_the_norm_dtype_as_peft():
    """PEFT trains a copy of the norm as it is (no float32 upcast): so do we."""
    cm = surgeon.compile(ZOO["llama"].model().to(torch.bfloat16), LNTuning())
    assert {p.dtype for p in cm.store.parameters()} == {torch.bfloat16}


def _traced_decoder_with_lora():
    torch.manual_seed(0)
    spec = surgeon.Spec(
        {
            "lora": surgeon.LoRA(rank=2, targets=("q_proj",)),
            "a": LNTuning(targets=("input_norm", "norm")),
            "b": LNTuning(targets=("input_norm",)),
        }
    )
    cm = surgeon.compile(tiny_traced_decoder(), spec).eval()
    add_noise(cm.store.parameters(), 2, 0.3)
    return cm


def test_a_norm_inside_a_traced_region_is_tuned_next_to_lora():
    """The traced region that LoRA rewrites calls the norm, rather than inlining its
    arithmetic, so the norm's adapter applies there too."""
    cm = _traced_decoder_with_lora()
    x = {"input_ids": torch.randint(3, 96, (2, 7))}
    cm.set_active("lora")
    lora = logits(cm(**x))
    cm.set_active(["lora", "a"])
    both = logits(cm(**x))
    assert not torch.allclose(both, lora, atol=1e-4)
    cm.merge()
    torch.testing.assert_close(logits(cm(**x)), both, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    torch.testing.assert_close(logits(cm(**x)), both, rtol=1e-5, atol=1e-5)


def test_two_adapters_on_one_norm_are_refused_when_run_and_mixed_batches_work():
    cm = _traced_decoder_with_lora()
    x = {"input_ids": torch.randint(3, 96, (3, 7))}
    cm.set_active(["a", "b"])
    with pytest.raises(
        surgeon.SpecError, match=r"'a' and 'b' are both active on layers\.0\.input_norm"
    ):
        cm(**x)
    names = ["a", "b", "__base__"]
    mixed = logits(cm(**x, adapter_names=names))
    for i, name in enumerate(names):
        if name == "__base__":
            with cm.disabled():
                expected = logits(cm(**x))
        else:
            cm.set_active(name)
            expected = logits(cm(**x))
        torch.testing.assert_close(mixed[i], expected[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4, elementwise_affine=False)],
    ids=["linear", "batchnorm", "layernorm-without-parameters"],
)
def test_layers_other_than_norms_with_parameters_are_refused(layer):
    with pytest.raises(surgeon.SpecError, match="cannot adapt"):
        surgeon.compile(One(layer), LNTuning(targets=("layer",)))
