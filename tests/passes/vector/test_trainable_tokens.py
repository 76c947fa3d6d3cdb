"""Trainable tokens beyond the conformance suite: the tied LM head (one δ, PEFT's keys both ways,
merge into the shared weight and back), the default target, PEFT's random init drawn alike, the
padding row and frequency-scaled gradients as PEFT's, a scaled embedding (Gemma 3), half
precision as PEFT keeps it, stacked adapters (disjoint tokens run, common ones are refused),
errors and PEFT config values."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from zoo import ZOO, One, add_noise, load_with_changed_config, logits, peft_loaded, peft_model

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.vector.trainable_tokens import TrainableTokens


def formula(spec, adapter, base, x):
    """PEFT's trainable tokens: the layer with the chosen rows of its weight replaced,
    ``W' = W`` with ``W'[t] = δ_t`` (``δ`` rounded to the weight's dtype); an embedding looks
    ``x`` up in ``W'`` (then scales by its ``embed_scale``), a bias-free Linear computes ``x W'ᵀ``."""
    weight = base.weight
    index = torch.tensor(spec.token_indices)
    replaced = weight.index_copy(0, index, adapter.trainable_tokens_delta.to(weight.dtype))
    if isinstance(base, nn.Embedding):
        out = F.embedding(x, replaced, padding_idx=base.padding_idx)
        scale = getattr(base, "embed_scale", None)
        return out * scale.to(out.dtype) if scale is not None else out
    return F.linear(x, replaced)


peft = pytest.importorskip("peft")

IDS = {"input_ids": torch.tensor([[3, 5, 7, 9, 11, 0], [7, 7, 20, 3, 1, 2]])}


def _gpt2(dtype: torch.dtype = torch.float32) -> nn.Module:
    return ZOO["gpt2"].model().to(dtype)


def _perturbed(model: nn.Module, spec: TrainableTokens, **kwargs) -> surgeon.CompiledModel:
    cm = surgeon.compile(model, spec, **kwargs)
    add_noise(cm.store.parameters(), 2, 0.3)
    return cm.eval()


# -- tied embeddings ---------------------------------------------------------------------------


def test_a_tied_lm_head_shares_the_embeddings_rows_and_peft_reads_both_keys(tmp_path):
    spec = TrainableTokens(token_indices=(3, 7, 20))
    model = _gpt2()
    assert spec.select(model) == ["transformer.wte", "lm_head"]
    cm = _perturbed(model, spec)
    (delta,) = list(cm.store.parameters())  # one δ for both layers
    got = logits(cm(**IDS))
    hidden = cm.model.transformer(**IDS).last_hidden_state
    index = torch.tensor(spec.token_indices)
    head = cm.model.lm_head.weight.index_copy(0, index, delta)
    torch.testing.assert_close(got, F.linear(hidden, head))  # the head sees the new rows
    cm.save_adapters(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        "base_model.model.transformer.wte.trainable_tokens_delta": (3, 32),
        "base_model.model.lm_head.trainable_tokens_delta": (3, 32),
    }
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["target_modules"] is None and config["token_indices"] == [3, 7, 20]
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["init_weights"] is True
    pm = peft_loaded(_gpt2(), tmp_path)
    torch.testing.assert_close(logits(pm(**IDS)), got, rtol=1e-5, atol=1e-5)


def test_we_load_peft_tied_file_with_peft_outputs(tmp_path):
    config = peft.TrainableTokensConfig(token_indices=[3, 7, 20])
    pm = peft_model(_gpt2(), config)
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_gpt2(), tmp_path).eval()
    assert cm.spec("default").targets == "transformer.wte"  # PEFT wrote the path it found
    torch.testing.assert_close(logits(cm(**IDS)), logits(pm(**IDS)), rtol=1e-5, atol=1e-5)


def test_merge_writes_the_shared_weight_once_and_unmerge_restores_it():
    model = _gpt2()
    weight = model.transformer.wte.weight.detach().clone()
    cm = _perturbed(model, TrainableTokens(token_indices=(3, 7, 20)))
    expected = logits(cm(**IDS))
    cm.merge()
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(logits(cm(**IDS)), expected, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    assert torch.equal(model.transformer.wte.weight, weight)
    plain = cm.merge_and_unload()
    torch.testing.assert_close(logits(plain(**IDS)), expected, rtol=1e-5, atol=1e-5)


def test_the_lm_head_alone_on_a_tied_model_refuses_to_merge():
    """PEFT adapts the head on its own then (the embedding is not targeted), and merging would
    change the embedding too: surgeon refuses, as for any method."""
    cm = _perturbed(_gpt2(), TrainableTokens(token_indices=(3,), targets=("lm_head",)))
    assert list(dict(cm.store.items("default"))) == ["lm_head"]
    with pytest.raises(surgeon.SpecError, match=r"lm_head\.weight is tied to transformer\.wte"):
        cm.merge()


def test_half_precision_keeps_delta_in_float32_and_matches_peft(tmp_path):
    cm = _perturbed(_gpt2(torch.bfloat16), TrainableTokens(token_indices=(3, 7, 20)))
    assert cm.store.parameters().__next__().dtype == torch.float32
    got = logits(cm(**IDS))
    assert got.dtype == torch.bfloat16
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_gpt2(torch.bfloat16), tmp_path)
    torch.testing.assert_close(got, logits(pm(**IDS)), rtol=0, atol=0)


# -- targets and inits ----------------------------------------------------------------------------


def test_the_default_target_is_the_input_embedding_else_embed_tokens():
    assert TrainableTokens(token_indices=(1,)).select(ZOO["llama"].model()) == [
        "model.embed_tokens"
    ]
    named = nn.Module()
    named.embed_tokens = nn.Embedding(5, 3)
    assert TrainableTokens(token_indices=(1,)).select(named) == ["embed_tokens"]
    with pytest.raises(surgeon.SpecError, match="no module named 'embed_tokens'; name the"):
        TrainableTokens(token_indices=(1,)).select(One(nn.Embedding(5, 3)))


def test_random_init_draws_as_peft():
    config = peft.TrainableTokensConfig(token_indices=[3, 9], init_weights=False)
    theirs, ours = ZOO["llama"].model(), ZOO["llama"].model()
    torch.manual_seed(7)
    pm = peft_model(theirs, config, seed=None)
    torch.manual_seed(7)
    cm = surgeon.compile(ours, TrainableTokens(token_indices=(3, 9), init="random"))
    ((_, theirs),) = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    (mine,) = list(cm.store.parameters())
    assert torch.equal(mine, theirs)


EMBEDDINGS = {
    "padding": lambda: nn.Embedding(12, 4, padding_idx=0),
    "by_frequency": lambda: nn.Embedding(12, 4, scale_grad_by_freq=True),
}


@pytest.mark.parametrize("kind", sorted(EMBEDDINGS))
def test_gradients_as_peft_for_the_padding_row_and_by_frequency(kind, tmp_path):
    torch.manual_seed(0)
    x = torch.tensor([[0, 3, 3, 5, 0], [3, 7, 0, 11, 3]])
    config = peft.TrainableTokensConfig(token_indices=[3, 0, 11], target_modules=["layer"])
    pm = peft_model(One(EMBEDDINGS[kind]()), config)
    pm.save_pretrained(tmp_path)
    torch.manual_seed(0)
    cm = surgeon.load(One(EMBEDDINGS[kind]()), tmp_path)
    for model in (cm, pm):
        model(x).pow(2).sum().backward()
    (mine,) = list(cm.store.parameters())
    ((_, theirs),) = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    torch.testing.assert_close(mine.grad, theirs.grad)
    if kind == "padding":
        assert not mine.grad[1].any()  # token 0, the padding row


def test_a_scaled_embedding_scales_the_new_rows_as_peft(tmp_path):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    torch.manual_seed(0)
    x = torch.tensor([[1, 3, 5, 3]])
    cm = _perturbed(
        One(Gemma3TextScaledWordEmbedding(8, 4, 0, 2.5)), TrainableTokens((3, 5), ("layer",))
    )
    ((_, adapter),) = cm.store.items("default")
    torch.testing.assert_close(cm(x), formula(cm.spec("default"), adapter, cm.model.layer, x))
    cm.save_adapters(tmp_path)
    torch.manual_seed(0)
    pm = peft_loaded(One(Gemma3TextScaledWordEmbedding(8, 4, 0, 2.5)), tmp_path)
    torch.testing.assert_close(pm(x), cm(x))


# -- several adapters -----------------------------------------------------------------------------


def test_disjoint_tokens_stack_and_common_ones_are_refused(tmp_path):
    x = ZOO["llama"].example()["input_ids"]  # holds tokens 5, 8, 13
    spec = surgeon.Spec(
        {
            "a": TrainableTokens(token_indices=(5, 8)),
            "b": TrainableTokens(token_indices=(13,)),
            "c": TrainableTokens(token_indices=(8, 40)),
        }
    )
    cm = _perturbed(ZOO["llama"].model(), spec)
    cm.set_active(["a", "b"])
    both = logits(cm(input_ids=x))
    cm.save_adapters(tmp_path)
    pm = peft_loaded(ZOO["llama"].model(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    torch.testing.assert_close(both, logits(pm(input_ids=x)), rtol=1e-5, atol=1e-5)
    cm.merge()
    torch.testing.assert_close(logits(cm(input_ids=x)), both, rtol=1e-5, atol=1e-5)
    cm.unmerge()
    cm.set_active(["a", "c"])
    with pytest.raises(surgeon.SpecError, match=r"'a' and 'c' both replace tokens \[8\]"):
        cm(input_ids=x)


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, r"token_indices=\[\]: expected at least one token index"),
        ({"token_indices": (1, 2, 1)}, r"\[1\] appear more than once"),
        ({"token_indices": (-1,)}, "expected a list of integers >= 0"),
        ({"token_indices": (1,), "init": "zeros"}, "init='zeros'"),
    ],
)
def test_bad_fields_are_spec_errors(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        TrainableTokens(**fields)


def test_layers_it_cannot_adapt_are_refused_by_name():
    spec = TrainableTokens(token_indices=(12,), targets=("layer",))
    with pytest.raises(
        surgeon.SpecError, match=r"\[12\] out of range for layer, which has 12 rows"
    ):
        surgeon.compile(One(nn.Embedding(12, 4)), spec)
    with pytest.raises(surgeon.SpecError, match="max_norm"):
        surgeon.compile(One(nn.Embedding(20, 4, max_norm=1.0)), spec)
    with pytest.raises(surgeon.SpecError, match="cannot adapt"):
        surgeon.compile(One(nn.Linear(4, 20)), spec)  # a bias PEFT's forward would drop
    assert TrainableTokens(token_indices=(1,)).supports(nn.Linear(4, 20, bias=False))


def test_peft_config_values_load_or_are_refused_by_key(tmp_path):
    cm = _perturbed(ZOO["llama"].model(), TrainableTokens(token_indices=(5, 8)))
    cm.save_adapters(tmp_path)
    loaded = load_with_changed_config(ZOO["llama"].model(), tmp_path, {"init_weights": False})
    assert loaded.spec("default").init == "random"
    x = ZOO["llama"].example()
    torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)))  # the file's rows
    for change, key in [
        ({"init_weights": "yes"}, "init_weights"),
        ({"token_indices": 5}, "token_indices"),
    ]:
        with pytest.raises(surgeon.SpecError, match=key):
            load_with_changed_config(ZOO["llama"].model(), tmp_path, change)
