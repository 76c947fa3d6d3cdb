"""P-tuning (v1) beyond the conformance suite: the encoder is PEFT's (same weights, same outputs
and gradients while training, MLP and LSTM), files hold its output both ways, the spec's
refusals, generate with the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo import (
    ZOO,
    assert_same_generation,
    count_calls,
    decode_without_cache,
    generate,
    logits,
    peft_loaded,
    randomize,
)
from zoo import padded_ids as _inputs

import surgeon
from surgeon.passes.prompt.ptuning import MlpHead


def _mlp(head, e: torch.Tensor) -> torch.Tensor:
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    for i, linear in enumerate(linears):
        e = F.linear(e, linear.weight, linear.bias)
        if i < len(linears) - 1:
            e = F.relu(e)
    return e


def prompts_of(adapter) -> torch.Tensor:
    """P = head(E): the MLP's three Linear layers with ReLU between, or the bidirectional LSTM
    over the virtual tokens in order, then its two-layer ReLU MLP."""
    e = adapter.embeddings
    if adapter.head is None:
        return e
    if hasattr(adapter.head, "lstm_head"):
        states, _ = adapter.head.lstm_head(e.unsqueeze(0))
        return _mlp(adapter.head.mlp_head, states[0])
    return _mlp(adapter.head, e)


def formula(spec, adapter, model, inputs):
    """P-tuning (Liu et al., 2021): the model on ``[head(E); embed(ids)]``."""
    ids = inputs["input_ids"]
    embedded = model.get_input_embeddings()(ids)
    prompts = prompts_of(adapter).to(embedded.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
    mask = torch.ones(ids.shape[0], prompts.shape[1] + ids.shape[1], dtype=torch.long)
    return model(inputs_embeds=torch.cat([prompts, embedded], 1), attention_mask=mask)


peft = pytest.importorskip("peft")

N = 3  # virtual tokens


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"encoder_type": "gru"}, "PTuning.encoder_type='gru'"),
        ({"encoder_num_layers": 3}, "PTuning.encoder_num_layers=3: the MLP encoder always has 2"),
        ({"encoder_dropout": 0.1}, "PTuning.encoder_dropout=0.1: the MLP encoder has no dropout"),
        ({"encoder_type": "lstm", "encoder_dropout": 1.5}, "PTuning.encoder_dropout=1.5"),
        ({"encoder_hidden_size": 0}, "PTuning.encoder_hidden_size=0"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.PTuning(**fields)


def _peft_config(**fields) -> peft.PromptEncoderConfig:
    return peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=8, **fields
    )


def _peft_name(ours: str, spec: surgeon.PTuning) -> str:
    """PEFT's name of one of our encoder's parameters (only the embedding's differs in form)."""
    if ours == "embeddings":
        return "embedding.weight"
    head = ours.removeprefix("head.")
    return f"mlp_head.{head}" if spec.encoder_type == "mlp" else head


def _ours_like(pm, spec: surgeon.PTuning) -> surgeon.CompiledModel:
    """Ours with PEFT's encoder weights."""
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    adapter = cm.store.calls["default"]
    theirs = pm.prompt_encoder["default"].state_dict()
    adapter.load_state_dict({n: theirs[_peft_name(n, spec)] for n in adapter.state_dict()})
    return cm


@pytest.mark.parametrize(
    "peft_fields, spec",
    [
        ({}, surgeon.PTuning(N, encoder_hidden_size=8)),
        (
            {"encoder_reparameterization_type": "LSTM", "encoder_num_layers": 2},
            surgeon.PTuning(N, encoder_type="lstm", encoder_hidden_size=8),
        ),
    ],
    ids=["mlp", "lstm"],
)
def test_training_runs_peft_encoder_same_outputs_and_gradients(peft_fields, spec):
    torch.manual_seed(0)
    pm = peft.get_peft_model(ZOO["llama"].model(), _peft_config(**peft_fields))
    cm = _ours_like(pm, spec)
    x = {**_inputs(), "labels": _inputs()["input_ids"]}
    pm.train(), cm.train()
    ours, theirs = cm(**x), pm(**x)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    ours.loss.backward(), theirs.loss.backward()
    adapter = cm.store.calls["default"]
    mine = {_peft_name(n, spec): p.grad for n, p in adapter.named_parameters()}
    peft_grads = {n: p.grad for n, p in pm.prompt_encoder["default"].named_parameters()}
    assert mine.keys() == peft_grads.keys()
    for name, grad in mine.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_saved_file_holds_the_encoders_prompts_and_loads_as_them_both_ways(tmp_path):
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PTuning(N, "lstm", 8, 1))
    randomize(cm, scale=0.5)
    cm.eval()
    x = _inputs()
    expected = logits(cm(**x))
    cm.save_adapters(tmp_path)
    loaded = surgeon.load(ZOO["llama"].model(), tmp_path).eval()
    assert loaded.store.calls["default"].head is None
    torch.testing.assert_close(logits(loaded(**x)), expected, rtol=1e-5, atol=1e-5)
    theirs = peft_loaded(ZOO["llama"].model(), tmp_path)
    torch.testing.assert_close(logits(theirs(**x)), expected, rtol=1e-5, atol=1e-5)


def test_peft_mlp_files_with_lstm_only_settings_load_as_their_prompts(tmp_path):
    """PEFT ignores encoder_num_layers and encoder_dropout for its MLP: such files load."""
    config = _peft_config(encoder_num_layers=5, encoder_dropout=0.3)
    pm = peft.get_peft_model(ZOO["llama"].model(), config).eval()
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = _inputs()
    expected = logits(pm(**x))
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(ZOO["llama"].model(), tmp_path).eval()
    torch.testing.assert_close(logits(cm(**x)), expected, rtol=1e-5, atol=1e-5)


def test_generate_with_the_cache_equals_decoding_without_it():
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PTuning(N, encoder_hidden_size=8))
    randomize(cm, scale=0.5)
    cm.eval()
    x = _inputs()
    got = generate(cm, x["input_ids"], x["attention_mask"], 4, False)
    assert_same_generation(got, decode_without_cache(cm, **x, steps=4, sample=False))


def test_without_gradients_the_encoder_runs_once_until_its_weights_change(monkeypatch):

    cm = surgeon.compile(ZOO["llama"].model(), surgeon.PTuning(N, encoder_hidden_size=8)).eval()
    calls = count_calls(monkeypatch, MlpHead, "forward")
    x = _inputs()
    with torch.no_grad():
        cm(**x), cm(**x)
    assert len(calls) == 1
    with torch.no_grad():
        cm.store.calls["default"].head[0].weight.add_(0.1)
        cm(**x)
    assert len(calls) == 2
