"""Causal-LM fine-tuning data in TRL's formats (`surgeon.sft_samples`): loss masks token by token
against hand-built examples, packing checked on a compiled tiny Llama, the command line's
``--packing``, and the errors naming the line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from zoo import tiny_llama

import surgeon
from surgeon.cli import main
from surgeon.data import collate, count_items
from surgeon.textdata import pack, read_text_dataset

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "hi",
    "hello",
    "there",
    "be",
    "kind",
    "bye",
    "now",
    "what",
    "is",
    "one",
    "two",
    "three",
    "four",
]
VOCAB = {word: i for i, word in enumerate(WORDS)}

PLAIN_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
MARKED_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}<|{{ m.role }}|> {% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content }} <|end|>{% endgeneration %}{% else %}{{ m.content }} <|end|>"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Drops earlier assistant turns (as templates that strip past reasoning do): a conversation's
# start then renders differently from the whole, and no assistant span can be found.
UNSTABLE_TEMPLATE = PLAIN_TEMPLATE.replace(
    "<|{{ m.role }}|> {{ m.content }} <|end|> ",
    "{% if m.role != 'assistant' or loop.last %}<|{{ m.role }}|> {{ m.content }} <|end|> "
    "{% endif %}",
)

CONVERSATION = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello there"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "bye now"},
]
# The rendered conversation, the tokens with a loss in brackets: the assistant turns only.
CONVERSATION_TOKENS = (
    "<s> <|system|> be kind <|end|> <|user|> hi <|end|> <|assistant|> [hello there <|end|>] "
    "<|user|> bye <|end|> <|assistant|> [bye now <|end|>]"
)


def word_tokenizer(chat_template: str | None = PLAIN_TEMPLATE):
    """A word-level tokenizer that starts texts with <s>, as Llama's does, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=chat_template,
    )


def expected(marked: str) -> tuple[list[int], list[int]]:
    """Input ids and labels from words, the words with a loss in brackets."""
    ids, labels, inside = [], [], False
    for word in marked.split():
        inside = inside or word.startswith("[")
        token = VOCAB[word.strip("[]")]
        ids.append(token)
        labels.append(token if inside else -100)
        inside = inside and not word.endswith("]")
    return ids, labels


def tokens(sample: dict) -> tuple[list[int], list[int]]:
    return sample["input_ids"], sample["labels"]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


# -- loss masks, token by token -----------------------------------------------------------------


def test_plain_text_has_a_loss_on_every_token_and_ends_with_eos(tokenizer):
    (sample,) = surgeon.sft_samples([{"text": "hi there"}], tokenizer)
    assert tokens(sample) == expected("[<s> hi there </s>]")
    assert sample["attention_mask"] == [1, 1, 1, 1]


def test_prompt_completion_has_a_loss_on_the_completion_and_eos_only(tokenizer):
    (sample,) = surgeon.sft_samples([{"prompt": "what is", "completion": " one"}], tokenizer)
    assert tokens(sample) == expected("<s> what is [one </s>]")


@pytest.mark.parametrize("template", [PLAIN_TEMPLATE, MARKED_TEMPLATE], ids=["prefixes", "markers"])
def test_messages_have_a_loss_on_the_assistant_turns_only(template):
    (sample,) = surgeon.sft_samples([{"messages": CONVERSATION}], word_tokenizer(template))
    assert tokens(sample) == expected(CONVERSATION_TOKENS)


def test_conversational_prompt_completion_has_a_loss_on_the_completion(tokenizer):
    record = {"prompt": CONVERSATION[:2], "completion": CONVERSATION[2:3]}
    (sample,) = surgeon.sft_samples([record], tokenizer)
    assert tokens(sample) == expected(
        "<s> <|system|> be kind <|end|> <|user|> hi <|end|> <|assistant|> [hello there <|end|>]"
    )


def test_truncation_keeps_the_start_and_warns_about_samples_left_without_a_loss(tokenizer):
    records = [
        {"prompt": "what is one two three", "completion": " four"},
        {"prompt": "hi", "completion": " there"},
    ]
    with pytest.warns(UserWarning, match=r"1 of 2 samples .* \(the first: records\[0\]\)"):
        cut, kept = surgeon.sft_samples(records, tokenizer, max_length=4)
    assert tokens(kept) == expected("<s> hi [there </s>]")
    assert tokens(cut) == expected("<s> what is one")


# -- packing -------------------------------------------------------------------------------------


def test_packing_fills_rows_best_fit_decreasing():
    samples = [([7] * n, [7] * n) for n in (7, 5, 4, 3, 1)]
    rows = pack(samples, max_length=8)
    # 7 opens a row, 5 and 4 open one each; 3 fills 5's row and 1 fills 7's row exactly
    assert [r["position_ids"] for r in rows] == [
        [*range(7), 0],
        [*range(5), *range(3)],
        [*range(4)],
    ]
    assert rows[0]["labels"] == [-100, *[7] * 6, -100]  # each sample's first label: none


# Six tokens each once tokenised (<s>, prompt, completion, </s>): the samples alone run as one
# batch without padding, and packing in rows of 12 pairs them: (0, 1), (2, 3), then 4 padded.
RECORDS = [
    {"prompt": "what is", "completion": " one two"},
    {"prompt": "hi", "completion": " hello there be"},
    {"prompt": "be kind", "completion": " bye now"},
    {"prompt": "bye", "completion": " now be kind"},
    {"prompt": "hi there", "completion": " three four"},
]


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cm = surgeon.compile(tiny_llama(), surgeon.LoRA(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    for name, param in cm.named_parameters():
        if "lora_B" in name:  # a LoRA update that changes the outputs
            torch.nn.init.normal_(param, std=0.2)
    return cm.eval()


def test_a_packed_batch_computes_what_the_samples_compute_alone(tokenizer, llama):
    alone = surgeon.sft_samples(RECORDS, tokenizer)
    packed = surgeon.sft_samples(RECORDS, tokenizer, max_length=12, packing=True)
    rows = [[0, 1], [2, 3], [4]]
    for row, members in zip(packed, rows, strict=True):
        assert row["input_ids"] == [i for k in members for i in alone[k]["input_ids"]]
        assert row["position_ids"] == [*range(6)] * len(members)
    batch = collate(packed)  # rows of different lengths: padded, and still no attention mask
    assert "attention_mask" not in batch and batch["position_ids"][2].tolist() == [*range(6)] * 2
    unpacked = {**batch, "position_ids": torch.arange(12).expand(3, 12)}
    with torch.no_grad():
        llama(**unpacked, use_cache=False)  # same shapes, no packing: must not fix the mask
        out = llama(**batch, use_cache=False)
        single = llama(**collate(alone), use_cache=False).logits  # one row per sample
    for r, members in enumerate(rows):
        for slot, k in enumerate(members):
            got = out.logits[r, 6 * slot : 6 * slot + 6]
            torch.testing.assert_close(got, single[k], atol=1e-5, rtol=0)
    labels = torch.tensor([s["labels"] for s in alone])
    summed = torch.nn.functional.cross_entropy(
        single[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
    )
    counted = int((labels[:, 1:] != -100).sum())  # the losses of the samples, token-weighted
    assert int(count_items(batch["labels"], len(packed), shifts=True)) == counted
    torch.testing.assert_close(out.loss, summed / counted, atol=1e-5, rtol=0)


# -- the command line ---------------------------------------------------------------------------


def test_cli_trains_on_prompt_completion_records_packed(capsys, tmp_path, monkeypatch, tokenizer):
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    spec = tmp_path / "lora.yaml"
    spec.write_text("method: lora\nrank: 4\nalpha: 8\ntargets: [q_proj, v_proj]\n")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    seen = []
    real_train = surgeon.train

    def train(cm, train_data, *args, **kwargs):
        seen.append(train_data)
        return real_train(cm, train_data, *args, **kwargs)

    monkeypatch.setattr(surgeon, "train", train)
    code = main(
        [
            "train", str(model_dir), str(spec), str(data), "--out", str(tmp_path / "run"),
            "--packing", "--max-length", "12", "--max-steps", "1", "--batch-size", "2",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "trained 1 steps" in out
    (rows,) = seen
    assert rows == surgeon.sft_samples(str(data), tokenizer, max_length=12, packing=True)
    assert len(rows) < len(RECORDS)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "hi"}'], r":1: a prompt-completion record without 'completion'"),
        (['{"text": "hi"}', '{"prompt": "hi", "completion": 3}'], r":2: a prompt-completion"),
        (['{"prompt": "hi", "completion": 3}'], r":1: 'completion' must be a non-empty string"),
        (['{"messages": [{"content": "hi"}]}'], r":1: messages\[0\] must have a string 'role'"),
        (
            ['{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}'],
            r":1: messages\[1\] has role 'bot'; expected one of",
        ),
        (['{"messages": "hi"}'], r":1: 'messages' must be a non-empty list"),
        (['{"text": "hi"}', "", '{"messages": []}'], r":3: a messages record, but .*:1 is text"),
        (['{"question": "hi"}'], r":1: no 'text', 'prompt' \+ 'completion' or 'messages' field"),
        (['{"prompt": "what is", "completion": "one"}'], r":1: the prompt's tokens do not start"),
        (
            ['{"messages": [{"role": "assistant", "content": "hi"}]}'],
            r":1: messages\[0\] is an assistant turn",
        ),
    ],
)
def test_a_malformed_record_is_an_error_naming_its_line(tmp_path, tokenizer, lines, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(surgeon.SpecError, match=f"^{re.escape(str(data))}{message}"):
        surgeon.sft_samples(data, tokenizer)


def test_conversations_need_a_chat_template():
    with pytest.raises(surgeon.SpecError, match=r"need a chat template, and this .* has none"):
        surgeon.sft_samples([{"messages": CONVERSATION}], word_tokenizer(chat_template=None))


def test_a_template_that_renders_earlier_turns_differently_is_refused():
    with pytest.raises(surgeon.SpecError, match=r"records\[0\]: the chat template renders"):
        surgeon.sft_samples([{"messages": CONVERSATION}], word_tokenizer(UNSTABLE_TEMPLATE))


def test_packing_is_refused_for_classification_files(tmp_path, tokenizer):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi", "label": 1}\n')
    with pytest.raises(surgeon.SpecError, match="packing is for causal-LM text"):
        read_text_dataset(data, lambda: tokenizer, packing=True)
