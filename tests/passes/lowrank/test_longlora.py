"""LongLoRA's card (its layers' formula: LoRA's) and what is its own: S²-Attn in training equal to
a plain-torch implementation of the paper's pseudo-code on a tiny Llama and GPT-2 (with and
without padding, sdpa and eager masks), eval equal to LoRA, the model's attention put back
whenever the adapter stops running, training through `surgeon.train`, the trained embeddings
and norms in the file and loaded back, and the errors. PEFT has no LongLoRA: the conformance
suite runs the rest against the formula alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from zoo import add_noise, logits, padded_ids, tiny_gpt2, tiny_llama

import surgeon
from surgeon.io import CONFIG_NAME, WEIGHTS_NAME
from surgeon.passes.lowrank.longlora import LongLoRA, TrainedCopy


def formula(spec, adapter, base, x):
    """A LongLoRA layer is LoRA's (Hu et al.): ``base(x) + scale · B A x`` (S²-Attn changes
    attention, not the layers; the card checks it on whole models)."""
    if isinstance(adapter, TrainedCopy):
        return torch.func.functional_call(base, dict(adapter.named_parameters()), (x,))
    return base(x) + (x @ adapter.lora_A.T) @ adapter.lora_B.T * adapter.scale


# -- the paper's pseudo-code, in plain torch ---------------------------------------------------

REFERENCE = "test_longlora_reference"
RATIO = 0.25


def reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Algorithm 1 of the paper, head by head: the second half of the heads sees the sequence
    shifted by G/2 (token t at place t - G/2, cyclically); each group of G places attends to
    itself with standard causal attention under the model's mask (True: may attend); each
    result goes back to its token's own position (the roll back)."""
    batch, heads, length, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], 1)
    value = value.repeat_interleave(heads // value.shape[1], 1)
    group = int(length * RATIO)
    allowed = torch.ones(batch, length, length, dtype=torch.bool).tril()
    if attention_mask is not None:
        allowed = attention_mask[:, 0].bool()
    causal = torch.ones(group, group, dtype=torch.bool).tril()
    out = torch.zeros_like(query)
    for head in range(heads):
        places = torch.arange(length)
        if head >= heads // 2:
            places = (places + group // 2) % length
        for start in range(0, length, group):
            tokens = places[start : start + group]
            scores = query[:, head, tokens] @ key[:, head, tokens].transpose(-1, -2) * scaling
            ok = allowed[:, tokens][:, :, tokens] & causal
            scores = scores.masked_fill(~ok, torch.finfo(scores.dtype).min)
            out[:, head, tokens] = scores.softmax(-1) @ value[:, head, tokens]
    return out.transpose(1, 2), None


def _register_reference() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(REFERENCE, reference_attention)
    AttentionMaskInterface.register(REFERENCE, sdpa_mask)  # a boolean mask, True attends


def _without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


MODELS = {
    "llama": (tiny_llama, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt2": (tiny_gpt2, ("c_attn", "c_proj")),
}


def _compiled(
    model_name: str, implementation: str = "sdpa", specialise: bool = False, **fields
) -> surgeon.CompiledModel:
    """The model with LongLoRA compiled in and perturbed; by default without call-time
    specialisation (the attention function runs the same either way, and it is cheaper)."""
    build, targets = MODELS[model_name]
    torch.manual_seed(0)
    model = _without_dropout(build())
    model.config._attn_implementation = implementation
    fields = {"rank": 4, "targets": targets, "group_size_ratio": RATIO, **fields}
    cm = surgeon.compile(model, LongLoRA(**fields), specialise=specialise)
    add_noise(cm.store.parameters())
    return cm


def _attention_cases() -> list:
    """Llama with sdpa's masks, padded, in the default lane; the other models, implementations
    and paddings, and Llama traced at call time (a specialised region runs the same attention
    function inside its graph), in the slow one."""
    out = []
    for model_name in sorted(MODELS):
        for implementation in ("sdpa", "eager"):
            for padded in (False, True):
                first = (model_name, implementation, padded) == ("llama", "sdpa", True)
                marks = [] if first else [pytest.mark.slow]
                name = f"{model_name}-{implementation}-{'padded' if padded else 'unpadded'}"
                case = (model_name, implementation, padded, False)
                out.append(pytest.param(*case, id=name, marks=marks))
    traced = ("llama", "sdpa", True, True)
    return [*out, pytest.param(*traced, id="llama-sdpa-padded-traced", marks=[pytest.mark.slow])]


@pytest.mark.parametrize("model_name, implementation, padded, specialise", _attention_cases())
def test_training_attention_is_the_papers_shifted_sparse_attention(
    model_name, implementation, padded, specialise
):
    x = padded_ids(length=16, padded=padded)
    cm = _compiled(model_name, implementation, specialise).train()
    got = logits(cm(**x))
    plain = cm.merge_and_unload()  # the LoRA factors and trained copies folded in; no S²-Attn
    assert plain.config._attn_implementation == implementation
    _register_reference()
    plain.config._attn_implementation = REFERENCE
    expected = logits(plain.train()(**x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain.config._attn_implementation = implementation
    assert not torch.allclose(logits(plain(**x)), expected, atol=1e-3)  # S²-Attn changed it


@pytest.mark.slow
@pytest.mark.parametrize("model_name, implementation", [("llama", "sdpa"), ("gpt2", "eager")])
def test_eval_computes_what_lora_computes(model_name, implementation):
    """GPT-2 set to eager with ``reorder_and_upcast_attn`` takes its own attention path."""
    x = padded_ids(length=16)
    cm = _compiled(model_name, implementation, trainable=())
    build, targets = MODELS[model_name]
    torch.manual_seed(0)
    model = _without_dropout(build())
    model.config._attn_implementation = implementation
    lora = surgeon.compile(model, surgeon.LoRA(rank=4, targets=targets), specialise=False)
    lora.store.load_state_dict(cm.store.state_dict())
    for each in (cm, lora):
        for module in each.modules():
            if hasattr(module, "reorder_and_upcast_attn"):
                module.reorder_and_upcast_attn = True
    torch.testing.assert_close(logits(cm.eval()(**x)), logits(lora.eval()(**x)), rtol=0, atol=0)


def test_the_models_attention_is_put_back_whenever_the_adapter_stops_running():
    torch.manual_seed(0)
    model = tiny_llama()
    other = copy.deepcopy(model)
    cm = surgeon.compile(model, LongLoRA(rank=4, group_size_ratio=0.5), specialise=False)
    switched = model.config._attn_implementation
    assert switched != "sdpa" and other.config._attn_implementation == "sdpa"
    x = padded_ids(length=8, padded=False)
    cm.train()
    for stop, resume in (
        (lambda: cm.set_active(None), lambda: cm.set_active("default")),
        (cm.merge, cm.unmerge),
    ):
        stop()
        assert model.config._attn_implementation == "sdpa"
        resume()
        assert model.config._attn_implementation == switched
    with cm.disabled():
        assert model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(logits(cm(**x)), logits(other.train()(**x)))
    assert other.config._attn_implementation == "sdpa"  # another model is never switched
    cm.delete_adapter("default")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_surgeon_train_trains_with_shifted_sparse_attention():
    config = surgeon.TrainingConfig(
        learning_rate=1e-2,
        batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=2,
        warmup_steps=0,
        lr_scheduler="constant",
        shuffle=False,
        progress=False,
        distributed="none",
    )
    torch.manual_seed(0)
    cm = surgeon.compile(tiny_llama(), LongLoRA(rank=4))
    ids = torch.randint(3, 96, (4, 8))
    before = {n: p.detach().clone() for n, p in cm.store.named_parameters()}
    surgeon.train(cm, [{"input_ids": r, "labels": r} for r in ids], config)
    moved = {n for n, p in cm.store.named_parameters() if not torch.equal(p, before[n])}
    assert any("embed_tokens" in n for n in moved) and any("norm" in n for n in moved)
    assert any("lora_A" in n for n in moved)
    # 9 tokens do not split into groups of int(9 / 4) = 2: training runs S²-Attn, which refuses
    ragged = [{"input_ids": r[:-1], "labels": r[:-1]} for r in torch.randint(3, 96, (2, 10))]
    with pytest.raises(surgeon.SpecError, match="groups of int"):
        surgeon.train(cm, ragged, config)


@pytest.mark.slow
@pytest.mark.slow
def test_gradient_checkpointing_recomputes_with_shifted_sparse_attention():
    """The recomputation in backward runs after the call: the switch holds while the adapter
    runs, not only during the call, so the gradients are those of the plain backward."""
    x = padded_ids(length=16)
    grads = []
    for checkpointing in (False, True):
        cm = _compiled("llama").train()
        if checkpointing:
            cm.model.activation_checkpointing_enable()
        logits(cm(**x)).pow(2).mean().backward()
        grads.append([p.grad for p in cm.store.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trained_embeddings_and_norms_are_saved_and_loaded(tmp_path):
    cm = _compiled("llama")
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SURGEON_LONGLORA"
    assert config["group_size_ratio"] == RATIO and config["trainable_params"] == ["embed", "norm"]
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    trained = {k.removeprefix("base_model.model.") for k in keys if "longlora_trained" in k}
    assert trained == {
        "model.embed_tokens.longlora_trained.weight",
        "model.norm.longlora_trained.weight",
        *(
            f"model.layers.{i}.{norm}.longlora_trained.weight"
            for i in range(2)
            for norm in ("input_layernorm", "post_attention_layernorm")
        ),
    }
    torch.manual_seed(0)
    loaded = surgeon.load(_without_dropout(tiny_llama()), tmp_path)
    assert loaded.spec("default") == cm.spec("default")
    for (path, mine), (_, theirs) in zip(cm.store.items("default"), loaded.store.items("default")):
        for (name, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=f"{path}.{name}")
    x = padded_ids(length=16)
    for mode in ("eval", "train"):
        getattr(cm, mode)(), getattr(loaded, mode)()
        torch.testing.assert_close(logits(loaded(**x)), logits(cm(**x)), rtol=0, atol=0)


def test_training_refuses_what_shifted_sparse_attention_cannot_split():
    cm = _compiled("llama").train()
    with pytest.raises(surgeon.SpecError, match="not a divisor of 9"):
        cm(**padded_ids(length=9))
    cm.eval()(**padded_ids(length=9))  # inference runs full attention at any length
    cm.train()
    with pytest.raises(surgeon.SpecError, match="mixed batch"):
        cm(**padded_ids(length=16), adapter_names=["default", "__base__"])
    cm(**padded_ids(length=16))  # after the mixed batch, S²-Attn trains again
    cm.eval()(**padded_ids(length=16), adapter_names=["default", "__base__"])  # full attention
    cm.train()
    cm.add_adapter("other", LongLoRA(rank=2, group_size_ratio=0.5, trainable=()))
    cm.set_active(["default", "other"])
    with pytest.raises(surgeon.SpecError, match="different group_size_ratio"):
        cm(**padded_ids(length=16))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"group_size_ratio": 0}, "group_size_ratio=0"),
        ({"group_size_ratio": 1.5}, "group_size_ratio=1.5"),
        ({"trainable": "norm"}, "trainable='norm'"),
        ({"trainable": ["norm", ""]}, "trainable="),
    ],
)
def test_bad_fields_are_spec_errors(fields, match):
    with pytest.raises(surgeon.SpecError, match=match):
        LongLoRA(**fields)


def test_a_tied_embedding_is_refused():
    torch.manual_seed(0)
    with pytest.raises(surgeon.SpecError, match="shares its weight with lm_head"):
        surgeon.compile(tiny_gpt2(), LongLoRA(targets=("c_attn",), trainable=("wte",)))


def test_peft_config_keys_round_trip_and_are_checked():
    spec = LongLoRA(rank=4, group_size_ratio=0.5, trainable=("norm",))
    config = spec.to_peft_config(["model.layers.0.self_attn.q_proj", "model.norm"])
    assert LongLoRA.from_peft_config(config, "here") == spec
    with pytest.raises(surgeon.SpecError, match="trainable_params"):
        LongLoRA.from_peft_config({**config, "trainable_params": "norm"}, "here")
    with pytest.raises(surgeon.SpecError, match="group_size_ratio"):
        LongLoRA.from_peft_config({**config, "group_size_ratio": 2}, "here")
