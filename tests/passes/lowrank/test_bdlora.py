"""BD-LoRA's card (its formula) and what is its own: PEFT's init draw for draw, the compact
factor shapes and keys, the merged weight, PEFT parity of options the examples leave out (rank
patterns, one side only), how ``use_bdlora`` files are told from LoRA's, and the errors (strict
matching, divisibility, overlap, inits, ``lora_bias``, malformed sub-configs). The conformance
suite runs the formula, merging, files, PEFT parity, gradients, devices and dtypes on every
example."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from zoo import ZOO, One, gpt2_conv1d, logits, peft_loaded, peft_model, randomize

import surgeon
from surgeon.io import method_from_peft_config
from surgeon.passes.lowrank.bdlora import BDLoRA, block_diagonal_linear
from surgeon.passes.lowrank.lora import LoRA


def _dense(factor: torch.Tensor, blocks: int) -> torch.Tensor:
    """A stacked-blocks factor as its dense block-diagonal matrix."""
    rows, cols = factor.shape[0] // blocks, factor.shape[1]
    dense = torch.zeros(factor.shape[0], cols * blocks, dtype=factor.dtype)
    for i in range(blocks):
        dense[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = factor[
            i * rows : (i + 1) * rows
        ]
    return dense


def formula(spec, adapter, base, x):
    """BD-LoRA (PEFT's use_bdlora): ``base(x) + (alpha / r) x Aᵀ Bᵀ`` with the factor a pattern
    names block-diagonal (its blocks stacked in the stored tensor)."""
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    if any(p in "layer" for p in spec.block_a):
        a = _dense(a, spec.blocks)
    if any(p in "layer" for p in spec.block_b):
        b = _dense(b, spec.blocks)
    r = a.shape[0]
    scale = spec.alpha / (math.sqrt(r) if spec.rslora else r)
    return base(x) + scale * x @ a.t() @ b.t()


peft = pytest.importorskip("peft")

LLAMA = ZOO["llama"]
QVD = ("q_proj", "v_proj", "down_proj")


def _peft_config(**options):
    return peft.LoraConfig(r=4, target_modules=list(QVD), use_bdlora=options)


def test_block_diagonal_linear_is_the_dense_block_diagonal_product():
    x, w = torch.randn(2, 3, 12), torch.randn(9, 4)
    expected = x @ torch.block_diag(*w.chunk(3)).t()
    torch.testing.assert_close(block_diagonal_linear(x, w, 3), expected)


def test_init_shapes_and_keys_are_peft_draw_for_draw():
    spec = BDLoRA(
        rank=4, targets=QVD, block_a=("down_proj",), block_b=("q_proj", "v_proj"), blocks=2
    )
    torch.manual_seed(3)
    cm = surgeon.compile(LLAMA.model(), spec)
    torch.manual_seed(3)
    pm = peft_model(
        LLAMA.model(),
        _peft_config(
            target_modules_bd_a=["down_proj"], target_modules_bd_b=["q_proj", "v_proj"], nblocks=2
        ),
        seed=None,
    )
    ours, theirs = cm.adapter_state_dict(), peft.get_peft_model_state_dict(pm)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    down = "base_model.model.model.layers.0.mlp.down_proj"
    assert ours[f"{q}.lora_B.weight"].shape == (32, 2)
    assert ours[f"{down}.lora_A.weight"].shape == (4, 24)
    assert not ours[f"{down}.lora_A.weight"].eq(0).all()  # B zero keeps the start a no-op


@pytest.mark.parametrize("side", ["A", "B"])
def test_merge_adds_the_dense_block_diagonal_update(side):
    torch.manual_seed(0)
    model = One(nn.Linear(8, 6))
    spec = BDLoRA(
        rank=4, alpha=3, targets=("layer",), blocks=2, **{f"block_{side.lower()}": ("layer",)}
    )
    cm = surgeon.compile(model, spec)
    randomize(cm, scale=0.3)
    ((_, layer),) = cm.store.items("default")
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    a, b = (_dense(a, 2), b) if side == "A" else (a, _dense(b, 2))
    before = model.layer.weight.detach().clone()
    cm.merge()
    torch.testing.assert_close(model.layer.weight, before + 0.75 * b @ a)
    cm.unmerge()
    torch.testing.assert_close(model.layer.weight, before, rtol=0, atol=1e-6)


def test_rank_pattern_and_one_sided_files_load_both_ways(tmp_path):
    """Options the examples leave out: a rank pattern and only B block-diagonal, strict."""
    config = peft.LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 6},
        use_bdlora={"target_modules_bd_b": ["proj"], "nblocks": 2},
    )
    pm = peft_model(LLAMA.model(), config)
    pm.save_pretrained(tmp_path / "peft")
    x = LLAMA.example()
    cm = surgeon.load(LLAMA.model(), tmp_path / "peft").eval()
    spec = cm.spec("default")
    assert (
        isinstance(spec, BDLoRA)
        and spec.block_b == ("proj",)
        and spec.rank_pattern == {"v_proj": 6}
    )
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), rtol=1e-5, atol=1e-6)
    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(LLAMA.model(), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), logits(cm(**x)), rtol=1e-5, atol=1e-6)


def test_written_config_and_what_claims_it():
    spec = BDLoRA(targets=QVD, block_b=("q_proj",), block_a=("v_proj", "down_proj"), blocks=2)
    config = json.loads(json.dumps(spec.to_peft_config()))
    assert config["peft_type"] == "LORA" and config["use_dora"] is False
    assert config["use_bdlora"] == {
        "target_modules_bd_a": ["v_proj", "down_proj"],
        "target_modules_bd_b": ["q_proj"],
        "nblocks": 2,
        "match_strict": True,
    }
    assert method_from_peft_config(config, "here") == spec
    plain = {**config, "use_bdlora": None}
    assert type(method_from_peft_config(plain, "here")) is LoRA
    # an empty sub-config is BD-LoRA with PEFT's defaults (strict, no patterns), not plain LoRA
    empty = method_from_peft_config({**config, "use_bdlora": {}}, "here")
    assert isinstance(empty, BDLoRA) and empty.strict and empty.blocks == 1
    with pytest.raises(surgeon.SpecError, match="matches neither block_a nor block_b"):
        surgeon.compile(LLAMA.model(), empty)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_bdlora": {"nblocks": 2, "extra": 1}}, r"use_bdlora\.extra is not a BD-LoRA option"),
        ({"use_bdlora": {"target_modules_bd_a": "q_proj"}}, r"use_bdlora\.target_modules_bd_a"),
        ({"use_bdlora": {"nblocks": 2.0}}, r"use_bdlora\.nblocks"),
        ({"use_bdlora": {"match_strict": 1}}, r"use_bdlora\.match_strict"),
        ({"use_bdlora": {"nblocks": 0}}, r"BDLoRA\.blocks=0.*'use_bdlora'"),
        ({"init_lora_weights": "pissa"}, r"BDLoRA\.init='pissa'.*'init_lora_weights'"),
        ({"use_dora": True}, r"use_bdlora=.*selects a variant"),
        ({"lora_bias": True}, r"use_bdlora=.*selects a variant"),
    ],
)
def test_config_values_it_cannot_honour_are_spec_errors_naming_the_key(change, match):
    config = BDLoRA(targets=QVD, block_b=("q_proj",), blocks=2, strict=False).to_peft_config()
    with pytest.raises(surgeon.SpecError, match=match):
        method_from_peft_config({**config, **change}, "adapter_config.json")


def test_errors_name_the_layer_and_the_rule():
    with pytest.raises(surgeon.SpecError, match="'q_proj' is in both block_a and block_b"):
        BDLoRA(block_a=("q_proj",), block_b=("q_proj",))
    with pytest.raises(surgeon.SpecError, match="lora_bias=True is not supported"):
        BDLoRA(lora_bias=True)
    with pytest.raises(surgeon.SpecError, match="matches both block_a and block_b"):
        surgeon.compile(
            One(nn.Linear(8, 8)), BDLoRA(targets=("layer",), block_a=("lay",), block_b=("er",))
        )
    with pytest.raises(
        surgeon.SpecError, match=r"block-diagonal A needs rank and in_features .*in_features=5"
    ):
        surgeon.compile(
            One(nn.Linear(5, 6)), BDLoRA(rank=4, targets=("layer",), block_a=("layer",), blocks=2)
        )
    with pytest.raises(surgeon.SpecError, match=r"rank=3"):
        surgeon.compile(
            One(nn.Linear(6, 6)), BDLoRA(rank=3, targets=("layer",), block_b=("layer",), blocks=2)
        )


def test_only_linear_layers_as_peft():
    spec = BDLoRA(block_b=("layer",), blocks=2)
    assert spec.supports(nn.Linear(4, 4))
    for layer in (gpt2_conv1d(), nn.Embedding(5, 4), nn.Conv2d(2, 2, 1)):
        assert not spec.supports(layer)
