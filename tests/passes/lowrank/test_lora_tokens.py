"""LoRA with trainable token rows (PEFT's ``trainable_token_indices``, passes/lowrank/lora_tokens.py):
PEFT parity both ways on a tied GPT-2 and a tied tiny Llama (list and mapping forms), the file's
keys (the tied head has none), one train step's gradients as PEFT's, merge into the shared weight
and back, our own save/load, and the refusals, each naming what it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import ZOO, add_noise, load_with_changed_config, logits, peft_loaded, peft_model

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME

peft = pytest.importorskip("peft")

TOKENS = (3, 7, 20)
KEY = "token_adapter.trainable_tokens_delta"


def _gpt2() -> nn.Module:
    return ZOO["gpt2"].model()  # its config ties wte and lm_head


def _tied_llama() -> nn.Module:
    from transformers import LlamaForCausalLM

    config = ZOO["llama"].model().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _ids(name: str = "gpt2") -> dict[str, torch.Tensor]:
    ids = ZOO[name].example()["input_ids"]
    ids[0, :3] = torch.tensor(TOKENS)  # the chosen tokens appear in the inputs
    return {"input_ids": ids}


def _perturbed(model: nn.Module, spec: surgeon.LoRA) -> surgeon.CompiledModel:
    cm = surgeon.compile(model, spec)
    add_noise(cm.store.parameters(), 2, 0.3)
    return cm.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- PEFT parity both ways, tied embeddings ------------------------------------------------------


def test_peft_file_loads_with_peft_outputs_and_the_tied_head_shares_the_rows(tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=list(TOKENS))
    pm = peft_model(_gpt2(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_gpt2(), tmp_path).eval()
    assert cm.spec("default").trainable_tokens == TOKENS
    layers = dict(cm.store.items("default"))
    assert list(layers)[-2:] == ["transformer.wte", "lm_head"]
    assert (
        layers["lm_head"].trainable_tokens_delta is layers["transformer.wte"].trainable_tokens_delta
    )
    _close(logits(cm(**_ids())), logits(pm(**_ids())))


def test_our_file_has_peft_keys_and_config_and_peft_reads_it(tmp_path):
    cm = _perturbed(_gpt2(), surgeon.LoRA(rank=2, targets=("c_attn",), trainable_tokens=TOKENS))
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    tokens = {k: tuple(v.shape) for k, v in saved.items() if "token" in k}
    assert tokens == {f"base_model.model.transformer.wte.{KEY}": (3, 32)}  # none for lm_head
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["trainable_token_indices"] == list(TOKENS)
    assert config["target_modules"] == ["c_attn"] and config["peft_type"] == "LORA"
    pm = peft_loaded(_gpt2(), tmp_path)
    _close(logits(pm(**_ids())), logits(cm(**_ids())))
    again = surgeon.load(_gpt2(), tmp_path).eval()  # and our own load
    _close(logits(again(**_ids())), logits(cm(**_ids())))


def test_a_tied_llama_mapping_naming_both_tied_layers_as_peft_both_ways(tmp_path):
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    indices = {"embed_tokens": list(TOKENS), "lm_head": list(TOKENS)}
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=indices)
    pm = peft_model(_tied_llama(), config)
    pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(_tied_llama(), tmp_path / "peft").eval()
    assert cm.spec("default").trainable_tokens == {"embed_tokens": TOKENS, "lm_head": TOKENS}
    _close(logits(cm(**_ids("llama"))), logits(pm(**_ids("llama"))))
    add_noise(cm.store.parameters(), 4, 0.3)
    cm.save_adapters(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert [k for k in saved if "token" in k] == [f"base_model.model.model.embed_tokens.{KEY}"]
    theirs = peft_loaded(_tied_llama(), tmp_path / "ours")
    _close(logits(theirs(**_ids("llama"))), logits(cm(**_ids("llama"))))


@pytest.mark.slow
def test_an_untied_head_named_alone_gets_its_own_rows_and_key(tmp_path):
    """On an untied model (the zoo's Llama) the LM head, a Linear without bias, takes rows of its
    own (output features), saved under its path."""
    spec = surgeon.LoRA(rank=2, targets=("q_proj",), trainable_tokens={"lm_head": (4, 9)})
    cm = _perturbed(ZOO["llama"].model(), spec)
    cm.save_adapters(tmp_path)
    assert f"base_model.model.lm_head.{KEY}" in load_file(tmp_path / WEIGHTS_NAME)
    pm = peft_loaded(ZOO["llama"].model(), tmp_path)
    _close(logits(pm(**_ids("llama"))), logits(cm(**_ids("llama"))))


# -- training, merging ---------------------------------------------------------------------------


def test_one_train_step_gives_peft_gradients(tmp_path):
    config = peft.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=list(TOKENS))
    pm = peft_model(_gpt2(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_gpt2(), tmp_path).eval()
    for model in (cm, pm):
        logits(model(**_ids())).pow(2).mean().backward()
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    delta = theirs["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta.default"]
    layers = dict(cm.store.items("default"))
    mine = layers["transformer.wte"].trainable_tokens_delta
    assert delta.grad.abs().sum() > 0
    _close(mine.grad, delta.grad)  # the head's gradient and the embedding's, in one δ
    lora_a = theirs["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"]
    _close(layers["transformer.h.0.attn.c_attn"].lora_A.grad, lora_a.grad)
    assert len(list(cm.store.parameters())) == len(theirs)


def test_merge_writes_the_shared_weight_and_unmerge_restores_it():
    model = _gpt2()
    weight = model.transformer.wte.weight.detach().clone()
    cm = _perturbed(model, surgeon.LoRA(rank=2, targets=("c_attn",), trainable_tokens=TOKENS))
    expected = logits(cm(**_ids()))
    cm.merge()
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(logits(cm(**_ids())), expected, rtol=1e-4, atol=1e-4)
    cm.unmerge()
    assert torch.equal(model.transformer.wte.weight, weight)
    plain = cm.merge_and_unload()
    torch.testing.assert_close(logits(plain(**_ids())), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_dora_takes_the_tokens_from_a_peft_file(tmp_path):
    config = peft.LoraConfig(
        r=2, target_modules=["c_attn"], use_dora=True, trainable_token_indices=list(TOKENS)
    )
    pm = peft_model(_gpt2(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_gpt2(), tmp_path).eval()
    assert isinstance(cm.spec("default"), surgeon.DoRA)
    _close(logits(cm(**_ids())), logits(pm(**_ids())))


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, match",
    [
        ((1, 2, 1), r"\[1\] appear more than once"),
        ((-1,), "expected a list of integers >= 0"),
        ({"embed_tokens": ()}, r"\['embed_tokens'\]: expected at least one token index"),
        ({"": (1,)}, "is not a non-empty string"),
    ],
)
def test_bad_values_are_spec_errors(tokens, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.LoRA(trainable_tokens=tokens)


def test_an_empty_mapping_is_none_as_peft():
    assert surgeon.LoRA(trainable_tokens={}).trainable_tokens == ()


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            surgeon.LoRA(targets=("c_attn", "wte"), trainable_tokens=TOKENS),
            "transformer.wte is both a LoRA target and a trainable_tokens layer",
        ),
        (
            surgeon.LoRA(targets=("c_attn",), trainable_tokens={"wte": TOKENS, "lm_head": (1,)}),
            r"lm_head is tied to transformer.wte but has other token indices",
        ),
        (surgeon.LoRA(targets=("c_attn",), trainable_tokens={"nothing": (1,)}), "matches no"),
        (
            surgeon.LoRA(targets=("c_attn",), trainable_tokens={"ln_f": (1,)}),
            "ln_f is a LayerNorm",
        ),
        (
            surgeon.LoRA(targets=("c_attn",), trainable_tokens={"wte": (96,)}),
            r"\[96\] out of range for transformer.wte",
        ),
    ],
)
def test_layers_it_cannot_take_are_refused_by_name(spec, match):
    with pytest.raises(surgeon.SpecError, match=match):
        surgeon.compile(_gpt2(), spec)


@pytest.mark.slow
def test_peft_refuses_a_lora_target_that_is_also_a_token_layer():
    config = peft.LoraConfig(target_modules=["c_attn", "wte"], trainable_token_indices=[3])
    with pytest.raises(TypeError, match="trainable_token_indices cannot be applied"):
        peft_model(_gpt2(), config)


def test_methods_building_their_own_layers_and_presets_refuse_it():
    with pytest.raises(surgeon.SpecError, match="ALoRA chooses or builds its layers"):
        surgeon.ALoRA(invocation_tokens=(5,), trainable_tokens=TOKENS)
    with pytest.raises(surgeon.SpecError, match="needs targets PEFT reads as written"):
        surgeon.LoRA(targets="attention", trainable_tokens=TOKENS)


def test_combining_adapters_with_tokens_is_refused():
    spec = surgeon.LoRA(rank=2, targets=("c_attn",), trainable_tokens=TOKENS)
    cm = surgeon.compile(_gpt2(), surgeon.Spec({"a": spec, "b": spec}))
    with pytest.raises(surgeon.SpecError, match="'a' has trainable_tokens"):
        cm.merge_adapters({"a": 0.5, "b": 0.5}, "ab")


def test_peft_config_values_of_the_wrong_type_are_refused_by_key(tmp_path):
    cm = _perturbed(_gpt2(), surgeon.LoRA(rank=2, targets=("c_attn",), trainable_tokens=TOKENS))
    cm.save_adapters(tmp_path)
    for value in (5, {"wte": 3}, ["a"]):
        with pytest.raises(surgeon.SpecError, match="trainable_token_indices"):
            load_with_changed_config(_gpt2(), tmp_path, {"trainable_token_indices": value})
