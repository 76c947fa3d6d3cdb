"""LLaMA-Adapter (adaption prompt) beyond the conformance suite: the formula on Llama and GPT-2,
PEFT's files both ways with generation (Mistral too, slow), the seeded init, gradients (with
gradient checkpointing), the hooks' lifetime, a LoRA on q_proj alongside, refusals."""

from __future__ import annotations

import math

import pytest
import torch
from zoo import (
    ZOO,
    assert_same_generation,
    generate,
    load_with_changed_config,
    logits,
    padded_ids,
    peft_loaded,
    peft_model,
    randomize,
    tiny_family,
    tiny_traced_decoder,
)

import surgeon


def _rotated(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = query.shape[-1] // 2
    turned = torch.cat([-query[..., half:], query[..., :half]], dim=-1)
    return query * cos[:, None] + turned * sin[:, None]


def formula(spec, adapter, base, x):
    """The paper's eq. 7-8 as PEFT computes them: in each adapted attention layer the queries
    also attend, on their own softmax, to the prompt's keys and values (the layer's projections
    of the prompt), and the gated result is added to the attention output (through o_proj on
    Llama, not on GPT-2). Plain torch in forward hooks on the base model, calling the layer's
    projections (so a layer adapter installed on one counts, as in PEFT)."""
    tensors = adapter.peft_tensors()
    hooks = []

    def add(path, module, args, kwargs, output):
        prompt = tensors[f"base_model.model.{path}.adaption_prompt"][0]
        gate = tensors[f"base_model.model.{path}.adaption_gate"]
        hidden = args[0] if args else kwargs["hidden_states"]
        b, n = hidden.shape[:2]
        if hasattr(module, "q_proj"):
            d = module.head_dim
            q = module.q_proj(hidden).view(b, n, -1, d).transpose(1, 2)
            q = _rotated(q, *kwargs["position_embeddings"])
            k = module.k_proj(prompt).view(len(prompt), -1, d).transpose(0, 1)
            v = module.v_proj(prompt).view(len(prompt), -1, d).transpose(0, 1)
            k = k.repeat_interleave(q.shape[1] // k.shape[0], 0)
            v = v.repeat_interleave(q.shape[1] // v.shape[0], 0)
        else:
            d, w = module.head_dim, module.embed_dim
            q = module.c_attn(hidden)[..., :w].view(b, n, -1, d).transpose(1, 2)
            k = module.c_attn(prompt)[:, w : 2 * w].view(len(prompt), -1, d).transpose(0, 1)
            v = module.c_attn(prompt)[:, 2 * w :].view(len(prompt), -1, d).transpose(0, 1)
        attention = torch.softmax(torch.einsum("bhnd,hpd->bhnp", q, k) / math.sqrt(d), dim=-1)
        term = (gate * torch.einsum("bhnp,hpd->bnhd", attention, v)).reshape(b, n, -1)
        if hasattr(module, "o_proj"):
            term = module.o_proj(term)
        return (output[0] + term, *output[1:])

    for path in adapter.paths:
        hook = lambda m, a, k, o, path=path: add(path, m, a, k, o)  # noqa: E731
        hooks.append(base.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    try:
        return base(**x)
    finally:
        for hook in hooks:
            hook.remove()


# -- the tests --------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
EXACT = {"rtol": 1e-5, "atol": 1e-5}


def _model(kind: str):
    torch.manual_seed(0)
    return tiny_family(kind).eval() if kind == "mistral" else ZOO[kind].model()


def _compiled(kind: str, **fields) -> surgeon.CompiledModel:
    cm = surgeon.compile(_model(kind), surgeon.AdaptionPrompt(prompt_length=3, **fields))
    randomize(cm, scale=0.5)
    return cm.eval()


def _peft(kind: str, layers: int = 2):
    config = peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=layers, task_type="CAUSAL_LM")
    return peft_model(_model(kind), config)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_output_is_the_formula(kind):
    cm = _compiled(kind)
    x = padded_ids()
    expected = formula(cm.spec("default"), cm.store.calls["default"], _model(kind), x)
    torch.testing.assert_close(logits(cm(**x)), logits(expected), **EXACT)


@pytest.mark.parametrize(
    "kind", ["llama", *(pytest.param(k, marks=pytest.mark.slow) for k in ("gpt2", "mistral"))]
)
def test_peft_files_load_both_ways_and_generate_alike(kind, tmp_path):
    """Every layer adapted, a padded batch: PEFT's file in surgeon and back, the same logits and
    the same greedy generation (the cache holds no prompt: both recompute it per step)."""
    pm = _peft(kind)
    pm.save_pretrained(tmp_path / "peft")
    cm = surgeon.load(_model(kind), tmp_path / "peft").eval()
    assert cm.spec("default") == surgeon.AdaptionPrompt(
        prompt_length=3, top_layers=2, attention="self_attn" if kind != "gpt2" else "attn"
    )
    x = padded_ids()
    torch.testing.assert_close(logits(cm(**x)), logits(pm(**x)), **EXACT)
    ids, mask = x["input_ids"], x["attention_mask"]
    assert_same_generation(generate(cm, ids, mask, 3, False), generate(pm, ids, mask, 3, False))
    cm.save_adapters(tmp_path / "ours")
    back = peft_loaded(_model(kind), tmp_path / "ours")
    torch.testing.assert_close(logits(back(**x)), logits(pm(**x)), **EXACT)


def test_a_fresh_adapter_draws_peft_prompts_from_the_same_seed():
    """PEFT saves both tensors; still, the same seed gives the same initial prompts (same
    order, shapes and dtype) and zero gates."""
    spec = surgeon.AdaptionPrompt(prompt_length=3)
    model = _model("llama")
    graph = surgeon.compile(_model("llama"), spec).graph  # tracing draws: seed after it
    torch.manual_seed(3)
    ours = spec.create_call_adapter(model, graph, from_file=False).peft_tensors()
    torch.manual_seed(3)
    pm = peft.get_peft_model(model, peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2))
    theirs = {k: v for k, v in pm.state_dict().items() if ".adaption_" in k}
    assert [k.removeprefix("base_model.model.") for k in ours] == [
        k.removeprefix("base_model.model.") for k in theirs
    ]
    for mine, their in zip(ours.values(), theirs.values()):
        torch.testing.assert_close(mine, their, rtol=0, atol=0)


def test_training_gives_peft_gradients_on_every_layer_and_under_checkpointing(tmp_path):
    pm = _peft("llama")
    pm.save_pretrained(tmp_path)
    x = {**padded_ids(), "labels": padded_ids()["input_ids"]}
    grads = []
    for checkpointing in (False, True):
        cm = surgeon.load(_model("llama"), tmp_path).train()
        if checkpointing:
            cm.model.gradient_checkpointing_enable()
        cm(**x).loss.backward()
        grads.append([p.grad for p in cm.store.parameters()])
    pm.train()
    pm(**x).loss.backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    for name, mine in zip(cm.store.calls["default"].peft_tensors(), grads[0]):
        torch.testing.assert_close(mine, theirs[name], rtol=1e-4, atol=1e-6)
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed, rtol=1e-5, atol=1e-7)


def test_the_hooks_live_only_for_calls_the_adapter_runs_in():
    cm = _compiled("llama", top_layers=1)
    x = padded_ids()
    base = logits(_model("llama")(**x))
    adapted = logits(cm(**x))
    with cm.disabled():
        torch.testing.assert_close(logits(cm(**x)), base, rtol=0, atol=0)
    with pytest.raises((IndexError, RuntimeError)):
        cm(input_ids=x["input_ids"] + 1000)  # fails after the call rewrite added the hooks
    cm.set_active(None)
    torch.testing.assert_close(logits(cm(**x)), base, rtol=0, atol=0)
    cm.set_active("default")
    torch.testing.assert_close(logits(cm(**x)), adapted, rtol=0, atol=0)
    cm.delete_adapter("default")
    torch.testing.assert_close(logits(cm(**x)), base, rtol=0, atol=0)


@pytest.mark.slow
def test_lora_on_the_query_projection_runs_with_it():
    """The query is recomputed through q_proj: a LoRA there reaches the prompt's term too."""
    prompt = surgeon.AdaptionPrompt(prompt_length=3, top_layers=1)
    spec = surgeon.Spec({"lora": surgeon.LoRA(targets=("q_proj",), rank=2), "prompt": prompt})
    cm = surgeon.compile(_model("llama"), spec)
    randomize(cm, scale=0.5)
    cm.set_active(["lora", "prompt"])
    x = padded_ids()
    both = logits(cm(**x))
    cm.set_active("lora")
    lora_only = logits(cm(**x))
    model = cm.model  # the LoRA still installed on q_proj: the formula runs it
    expected = logits(formula(prompt, cm.store.calls["prompt"], model, x))
    torch.testing.assert_close(both, expected, **EXACT)
    assert not torch.allclose(both, lora_only)


def test_merging_is_refused_and_the_adapter_keeps_running():
    cm = _compiled("llama")
    with pytest.raises(surgeon.SpecError, match="acts on the model call"):
        cm.merge(["default"])
    with pytest.raises(surgeon.SpecError, match="cannot be folded"):
        cm.merge_and_unload()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt_length": 0}, "AdaptionPrompt.prompt_length=0"),
        ({"top_layers": 0}, "AdaptionPrompt.top_layers=0"),
        ({"attention": ""}, "AdaptionPrompt.attention=''"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.AdaptionPrompt(**fields)


@pytest.mark.parametrize(
    "build, spec, message",
    [
        (lambda: ZOO["bert"].model(), {}, "model type 'bert' is not supported"),
        (lambda: tiny_traced_decoder(), {}, "model type '' is not supported"),
        (lambda: _model("llama"), {"top_layers": 3}, "top_layers=3: the model has 2"),
        (lambda: _model("llama"), {"attention": "mlp"}, "attention='mlp'"),
    ],
)
def test_models_and_selections_it_cannot_adapt_are_refused(build, spec, message):
    model = build()
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.compile(model, surgeon.AdaptionPrompt(**spec))


def test_a_head_dim_peft_cannot_group_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    with pytest.raises(surgeon.SpecError, match="infers the key/value heads"):
        surgeon.compile(LlamaForCausalLM(config), surgeon.AdaptionPrompt())


def test_a_file_without_adapter_len_is_refused(tmp_path):
    _peft("llama").save_pretrained(tmp_path)
    with pytest.raises(surgeon.SpecError, match="adapter_len is missing"):
        load_with_changed_config(_model("llama"), tmp_path, {"adapter_len": None})


@pytest.mark.slow
def test_export_carries_the_gated_prompt_term(tmp_path):
    """The hooks run while the exporter traces the model: the ONNX graph computes the term."""
    ort = pytest.importorskip("onnxruntime")
    cm = _compiled("llama", top_layers=1)
    x = padded_ids()
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", x)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got, *_) = session.run(None, {k: v.numpy() for k, v in x.items()})
    expected = logits(cm(**x))
    real = x["attention_mask"].bool()  # fully masked (padding) rows are arbitrary in both
    torch.testing.assert_close(torch.from_numpy(got)[real], expected[real], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, logits(_model("llama")(**x)), atol=1e-3)
