"""Cartridges beyond the conformance suite: the frozen tokens stay put while training, the
keys and values of a text as PEFT's initialiser makes them (chat template or plain), files
with another split, the spec's refusals."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, prefix_formula, randomize, train_a_few_steps
from zoo import padded_ids as _inputs

import surgeon

formula = prefix_formula  # the trained keys and values as the key/value cache

peft = pytest.importorskip("peft")

N = 4  # virtual tokens
TEXT = "the quick brown fox jumps over the lazy dog again and again"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"num_virtual_tokens": 2, "num_frozen_tokens": 3}, "num_frozen_tokens=3: more than"),
        ({"num_frozen_tokens": -1}, r"Cartridge\.num_frozen_tokens=-1"),
        ({"init_text": TEXT}, r"Cartridge\.tokenizer_path=None"),
        ({"chat_template": "yes"}, r"Cartridge\.chat_template='yes'"),
    ],
)
def test_bad_fields_raise_spec_errors_naming_them(fields, message):
    with pytest.raises(surgeon.SpecError, match=message):
        surgeon.Cartridge(**fields)


def test_training_moves_only_the_tokens_after_the_frozen_ones():
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.Cartridge(N, num_frozen_tokens=2))
    before = cm.store.calls["default"].flat().detach().clone()
    train_a_few_steps(cm, _inputs(), lr=1e-2, steps=2)
    after = cm.store.calls["default"].flat().detach()
    assert torch.equal(after[:2], before[:2])
    assert (after[2:] - before[2:]).abs().amax(dim=1).gt(0).all()


def _tokenizer_folder(tmp_path, chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.split()) | {"system", ":"})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.mark.parametrize(
    "template",
    [None, "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}{% endfor %}"],
    ids=["plain", "chat-template"],
)
def test_init_from_text_is_peft_initializer(tmp_path, template):
    folder, tokenizer = _tokenizer_folder(tmp_path, template)
    spec = surgeon.Cartridge(N, init_text=TEXT, tokenizer_path=str(folder))
    ours = surgeon.compile(ZOO["llama"].model(), spec).store.calls["default"].flat()
    config = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    pm = peft.get_peft_model(ZOO["llama"].model(), config)
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_text

    theirs = initialize_kv_prefix_from_text(pm, tokenizer, text=TEXT)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_text_shorter_than_the_prefix_is_refused(tmp_path):
    folder, _ = _tokenizer_folder(tmp_path, None)
    spec = surgeon.Cartridge(20, init_text="the fox", tokenizer_path=str(folder))
    with pytest.raises(surgeon.SpecError, match="2 tokens, fewer than num_virtual_tokens=20"):
        surgeon.compile(ZOO["llama"].model(), spec)


def test_a_peft_file_with_another_frozen_count_loads_with_its_split(tmp_path):
    cm = surgeon.compile(ZOO["llama"].model(), surgeon.Cartridge(N, num_frozen_tokens=3))
    randomize(cm, scale=0.5)
    cm.eval()
    x = _inputs()
    expected = cm(**x).logits
    cm.save_adapters(tmp_path)
    loaded = surgeon.load(ZOO["llama"].model(), tmp_path).eval()
    adapter = loaded.store.calls["default"]
    assert adapter.frozen_prefixes.shape[0] == 3 and not adapter.frozen_prefixes.requires_grad
    torch.testing.assert_close(loaded(**x).logits, expected, rtol=1e-5, atol=1e-5)
