"""aLoRA beyond the conformance suite (which passes ``alora_offsets`` itself): the offsets found
from ``input_ids`` as PEFT's causal-LM model finds them, files both ways, ``generate`` with a
cache, mixed batches, the invocation search, calls without ``input_ids``, and PEFT config keys."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from zoo import (
    ZOO,
    add_noise,
    assert_lora_a_grads_match_peft,
    assert_same_generation,
    bnb_llama,
    generate,
    llama64,
    logits,
    peft_loaded,
    peft_model,
)

import surgeon
from surgeon import quant
from surgeon.io import CONFIG_NAME, method_from_peft_config
from surgeon.passes.lowrank.alora import ALoRA, QALoRALayer, invocation_offsets
from surgeon.passes.lowrank.lora import LoRA


def call_inputs(spec, inputs):
    """Offsets (counted from the end) for every row: all tokens, the last two, none, the last."""
    rows = next(iter(inputs.values())).shape[0]
    return {"alora_offsets": torch.tensor(([100, 2, 0, 1] * rows)[:rows])}


def formula(spec, adapter, base, x):
    """``base(x) + m ⊙ scale · (B A x + b_B)``: ``m`` is 1 on each row's last ``offset`` tokens
    (a 2-D input is one token per row), from the call's ``alora_offsets``."""
    offsets = call_inputs(spec, {"x": x})["alora_offsets"]
    tokens = x.shape[1] if x.dim() == 3 else 1
    mask = torch.arange(tokens) >= tokens - offsets.clamp(max=tokens).unsqueeze(1)
    mask = mask.float().view(x.shape[0], tokens, 1) if x.dim() == 3 else mask.float()
    weight = base.weight.t() if type(base).__name__ == "Conv1D" else base.weight
    a, b = adapter.lora_A, adapter.lora_B
    bias = adapter.lora_bias if adapter.lora_bias is not None else torch.zeros(b.shape[0])
    delta = (F.linear(F.linear(x, a), b) + bias) * adapter.scale
    return F.linear(x, weight, base.bias) + mask * delta


peft = pytest.importorskip("peft")

SPEC = ALoRA(rank=4, targets=("q_proj", "v_proj"), invocation_tokens=(5, 6))
IDS = torch.tensor([[3, 5, 6, 9, 11, 5, 6, 12, 40], [7, 7, 20, 3, 1, 2, 9, 9, 9]])


def _llama():
    return ZOO["llama"].model()


def _ours(spec: ALoRA = SPEC, seed: int = 2) -> surgeon.CompiledModel:
    cm = surgeon.compile(_llama(), spec)
    add_noise(cm.store.parameters(), seed, 0.3)
    return cm.eval()


def _peft_causal(spec: ALoRA = SPEC):
    config = peft.get_peft_config({**spec.to_peft_config(["q_proj"]), "task_type": "CAUSAL_LM"})
    return peft_model(_llama(), config)


# -- the offsets from input_ids -----------------------------------------------------------------


def test_the_offsets_start_at_the_last_invocation_of_each_row():
    ids = torch.tensor([[5, 6, 1, 5, 6, 2, 3], [1, 2, 3, 4, 5, 1, 6], [5, 6, 5, 6, 5, 6, 5]])
    assert invocation_offsets(ids, (5, 6)).tolist() == [4, 0, 3]
    assert invocation_offsets(ids[0], (3,)).tolist() == [1]
    assert invocation_offsets(ids[:, :1], (5, 6)).tolist() == [0, 0, 0]  # shorter than tokens


@pytest.mark.slow
def test_we_save_peft_loads_and_finds_the_invocation_as_we_do(tmp_path):
    cm = _ours()
    got = logits(cm(input_ids=IDS))
    with cm.disabled():
        base = logits(cm(input_ids=IDS))
    # row 0 is adapted from its last (5, 6) on, row 1 (no invocation) nowhere
    changed = (got - base).abs().amax(-1) > 1e-6
    assert changed.tolist() == [[False] * 5 + [True] * 4, [False] * 9]
    cm.save_adapters(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["alora_invocation_tokens"] == [5, 6] and config["task_type"] == "CAUSAL_LM"
    pm = peft_loaded(_llama(), tmp_path)
    assert type(pm).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(logits(pm(input_ids=IDS)), got, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_we_load_peft_file_with_peft_outputs(tmp_path):
    pm = _peft_causal()
    pm.save_pretrained(tmp_path)
    cm = surgeon.load(_llama(), tmp_path).eval()
    assert cm.spec("default").invocation_tokens == (5, 6)
    torch.testing.assert_close(
        logits(cm(input_ids=IDS)), logits(pm(input_ids=IDS)), rtol=1e-5, atol=1e-5
    )


def _both(tmp_path):
    """PEFT's causal-LM model and ours loaded from its file."""
    pm = _peft_causal()
    pm.save_pretrained(tmp_path)
    return surgeon.load(_llama(), tmp_path).eval(), pm


@pytest.mark.slow
def test_generate_with_a_cache_gives_pefts_tokens_and_logits(tmp_path):
    """PEFT finds the offsets in the prompt once: every new token is adapted where the prompt
    holds the invocation (row 0), none where it does not (row 1)."""
    cm, pm = _both(tmp_path)
    mask = torch.ones_like(IDS)
    expected = generate(pm, IDS, mask, steps=4, sample=False)
    assert_same_generation(generate(cm, IDS, mask, steps=4, sample=False), expected)


@pytest.mark.slow
def test_a_mixed_batch_finds_each_rows_invocation_as_peft(tmp_path):
    other = SPEC.replace(invocation_tokens=(9, 9))
    cm = surgeon.compile(_llama(), surgeon.Spec({"a": SPEC, "b": other}))
    add_noise(cm.store.parameters(), 3, 0.3)
    cm.eval()
    names = ["a", "b"]
    got = logits(cm(input_ids=IDS, adapter_names=names))
    cm.save_adapters(tmp_path)
    pm = peft_loaded(_llama(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(
        logits(pm(input_ids=IDS, adapter_names=names)), got, rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_given_offsets_win_and_inputs_embeds_alone_run_the_base_with_a_warning(tmp_path):
    cm, pm = _both(tmp_path)
    offsets = torch.tensor([2, 9])
    torch.testing.assert_close(
        logits(cm(input_ids=IDS, alora_offsets=offsets)),
        logits(pm(input_ids=IDS, alora_offsets=offsets)),
        rtol=1e-5,
        atol=1e-5,
    )
    embeds = cm.model.get_input_embeddings()(IDS)
    with cm.disabled():
        base = logits(cm(inputs_embeds=embeds))
    with pytest.warns(UserWarning, match="no input_ids"):
        got = logits(cm(inputs_embeds=embeds))
    torch.testing.assert_close(got, base, rtol=0, atol=0)


def test_beam_search_is_refused():
    cm = _ours()
    with pytest.raises(surgeon.SpecError, match="beam search"):
        cm.generate(input_ids=IDS, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)


# -- spec, layers and PEFT configs ---------------------------------------------------------------


def test_invocation_tokens_are_required_and_checked():
    for bad in ((), [], (1, -2), "5", (1.5,)):
        with pytest.raises(surgeon.SpecError, match="invocation_tokens"):
            ALoRA(invocation_tokens=bad)
    assert ALoRA(invocation_tokens=[3, 4]).invocation_tokens == (3, 4)


def test_only_linear_layers_are_adapted_as_peft():
    spec = ALoRA(invocation_tokens=(1,))
    assert spec.supports(torch.nn.Linear(2, 3))
    assert not spec.supports(torch.nn.Embedding(4, 3))
    assert not spec.supports(torch.nn.Conv2d(2, 3, 1))


def test_peft_configs_with_the_key_load_as_alora_and_only_as_alora():
    config = {**SPEC.to_peft_config(["q_proj"])}
    assert type(method_from_peft_config(config, "cfg")) is ALoRA
    assert type(method_from_peft_config({**config, "alora_invocation_tokens": []}, "c")) is LoRA
    assert type(method_from_peft_config({**config, "alora_invocation_tokens": None}, "c")) is LoRA
    with pytest.raises(surgeon.SpecError, match="alora_invocation_tokens"):
        LoRA.from_peft_config(config, "cfg")
    with pytest.raises(surgeon.SpecError, match="alora_invocation_tokens"):
        method_from_peft_config({**config, "alora_invocation_tokens": "5"}, "cfg")
    with pytest.raises(surgeon.SpecError, match=r"use_dora=True .* ALoRA does not support"):
        method_from_peft_config({**config, "use_dora": True}, "cfg")  # PEFT has no DoRA aLoRA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})


# -- on layers stored in 4 bits -------------------------------------------------------------------


def test_on_4bit_layers_outputs_gradients_and_files_match_peft_with_bitsandbytes(tmp_path):
    """PEFT's aLoRA on bitsandbytes' Linear4bit: its file loads onto our 4-bit model with its
    outputs and gradients, and ours onto its model."""
    pytest.importorskip("bitsandbytes")
    state = {k: v.clone() for k, v in llama64().state_dict().items()}
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        alora_invocation_tokens=[5, 6],
        task_type="CAUSAL_LM",
    )
    theirs = peft_model(bnb_llama(state, torch.float32), config, seed=None)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__.endswith(
        "lora.bnb"
    )
    add_noise([p for n, p in theirs.named_parameters() if "lora_" in n], 4, 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    model = llama64()
    model.load_state_dict(state)
    quant.quantize_model(model, surgeon.NF4(compute_dtype="float32"))
    cm = surgeon.load(model, tmp_path / "peft").eval()
    assert all(isinstance(layer, QALoRALayer) for _, layer in cm.store.items("default"))
    theirs.eval()
    with torch.no_grad():
        expected = logits(theirs(input_ids=IDS))
        got = logits(cm(input_ids=IDS))
        with cm.disabled():
            base = logits(cm(input_ids=IDS))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    changed = (got - base).abs().amax(-1) > 1e-6  # row 0 from its last (5, 6) on, row 1 nowhere
    assert changed.tolist() == [[False] * 5 + [True] * 4, [False] * 9]
    assert_lora_a_grads_match_peft(cm, theirs, IDS)
    cm.save_adapters(tmp_path / "ours")
    loaded = peft_loaded(bnb_llama(state, torch.float32), tmp_path / "ours").eval()
    cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded(input_ids=IDS)), got, rtol=0, atol=1e-5)
