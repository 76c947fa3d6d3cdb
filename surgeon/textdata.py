"""Text files and records turned into token samples that `surgeon.train` takes.

Files: ``.jsonl`` (one object per line), ``.csv`` and ``.tsv`` (a header row). `read_text_dataset`
tells the kind of data by the fields present: ``text`` + ``label`` is sequence classification,
token fields (``input_ids``, ...) are used as they are, and the rest is causal-LM fine-tuning
data in TRL's formats, which `sft_samples` turns into samples:

- language modelling: ``{"text": ...}``; the loss is on every token.
- prompt-completion: ``{"prompt": ..., "completion": ...}``, strings or lists of messages
  (conversational); the loss is on the completion only.
- conversational: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the
  tokenizer's chat template; the loss is on the assistant turns only.
"""

from __future__ import annotations

import bisect
import csv
import json
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from surgeon.data import IGNORE_INDEX
from surgeon.errors import SpecError

TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels")
ROLES = ("system", "developer", "user", "assistant", "tool")
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

Located = tuple[str, dict[str, Any]]
"""A record and where it came from (``file:line`` or ``records[i]``), for error messages."""
Tokens = tuple[list[int], list[int]]
"""A sample's input ids and its labels (-100 where there is no loss)."""


# -- reading files ------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The file's rows as dicts; a clear error naming the line for malformed input."""
    return [record for _, record in read_located_records(path)]


def read_located_records(path: str | Path) -> list[Located]:
    """The file's rows as dicts, each with ``file:line`` for the errors about it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = [(f"{path}:{reader.line_num}", row) for row in reader]
        if not rows:
            raise SpecError(f"{path}: no rows below the header")
        return rows
    raise SpecError(f"data file {str(path)!r}: expected .jsonl, .csv or .tsv")


def _read_jsonl(path: Path) -> list[Located]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise SpecError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((f"{path}:{number}", record))
    if not records:
        raise SpecError(f"{path}: no records")
    return records


def read_text_dataset(
    path: str | Path,
    load_tokenizer: Callable[[], Any],
    max_length: int = 128,
    packing: bool = False,
) -> list[dict]:
    """Token samples (lists of ints) for `surgeon.train`, the kind told by the fields present:
    token fields as they are, ``text`` + ``label`` for sequence classification (texts truncated
    to ``max_length``), anything else through `sft_samples`.

    ``load_tokenizer`` is called only when the file holds texts rather than token ids.
    """
    records = read_located_records(path)
    if all("input_ids" in r for _, r in records):
        _refuse_packing(packing, path, "token ids")
        return [_token_sample(where, r) for where, r in records]
    if any("label" in r for _, r in records):
        _refuse_packing(packing, path, "labelled texts (sequence classification)")
        return _classification_samples(records, load_tokenizer(), max_length)
    return _sft_samples(records, load_tokenizer(), max_length, packing)


def _refuse_packing(packing: bool, path: str | Path, kind: str) -> None:
    if packing:
        raise SpecError(
            f"{path}: packing is for causal-LM text (text, prompt/completion or messages "
            f"records); this file holds {kind}: leave packing off"
        )


def _classification_samples(
    records: list[Located], tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    samples = []
    for where, record in records:
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise SpecError(f"{where}: no 'text' (fields: {sorted(record)})")
        if "label" not in record:
            raise SpecError(f"{where}: no 'label', but other records have one")
        encoded = tokenizer(text, truncation=True, max_length=max_length)
        sample = {k: list(encoded[k]) for k in ("input_ids", "attention_mask") if k in encoded}
        sample["labels"] = _label(where, record["label"])
        samples.append(sample)
    return samples


def _label(where: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpecError(f"{where}: label {value!r} is not an integer") from None


def _token_sample(where: str, record: dict[str, Any]) -> dict[str, Any]:
    sample = {k: record[k] for k in TOKEN_FIELDS if k in record}
    ids = sample["input_ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise SpecError(f"{where}: input_ids must be a non-empty list of integers")
    sample.setdefault("labels", list(ids))
    return sample


# -- causal-LM fine-tuning data (TRL's formats) ------------------------------------------------


def sft_samples(
    data: str | Path | Iterable[dict[str, Any]],
    tokenizer: Any,
    max_length: int = 1024,
    packing: bool = False,
) -> list[dict[str, list[int]]]:
    """Causal-LM samples for `surgeon.train` from records in TRL's SFT formats (see the module
    docstring): a list (or any iterable) of dicts, or a ``.jsonl`` / ``.csv`` / ``.tsv`` path; one
    format for all.

    Labels are -100 where there is no loss: prompts, and every non-assistant token of a
    conversation. As TRL does, an EOS token ends plain texts and completions (not conversations:
    their chat template ends turns) and samples are cut to ``max_length`` from the right; a
    sample left without a label token is kept, with a warning. With ``packing`` the samples are
    packed best-fit-decreasing into rows of at most ``max_length`` tokens whose ``position_ids``
    restart at 0 for every sample: transformers then lets no token attend across samples, and
    each sample's first label is -100 so that no token learns to predict the next sample.
    """
    return _sft_samples(_located(data), tokenizer, max_length, packing)


def _sft_samples(
    records: list[Located], tokenizer: Any, max_length: int, packing: bool
) -> list[dict[str, list[int]]]:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise SpecError(f"max_length must be a positive integer, got {max_length!r}")
    kind = _common_format(records)
    if kind in ("messages", "conversational prompt-completion"):
        _check_chat_template(tokenizer)
    tokenised = [_tokenise(kind, where, record, tokenizer) for where, record in records]
    cut = [(ids[:max_length], labels[:max_length]) for ids, labels in tokenised]
    _warn_unlabelled(records, cut, max_length)
    if packing:
        return pack(cut, max_length)
    return [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
        for ids, labels in cut
    ]


def _located(data: str | Path | Iterable[dict[str, Any]]) -> list[Located]:
    """Records with where they came from; any iterable of dicts (a ``datasets.Dataset`` too)."""
    if isinstance(data, (str, Path)):
        return read_located_records(data)
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise SpecError(
            f"sft_samples: expected a list of dicts or a .jsonl path, got {type(data).__name__}"
        )
    data = list(data)
    if not data:
        raise SpecError("sft_samples: no records")
    for i, record in enumerate(data):
        if not isinstance(record, Mapping):
            raise SpecError(f"records[{i}]: expected a dict, got {type(record).__name__}")
    return [(f"records[{i}]", record) for i, record in enumerate(data)]


def _common_format(records: list[Located]) -> str:
    """The one format of all the records; a record of another format is an error."""
    first_where, first = records[0]
    kind = _record_format(first_where, first)
    for where, record in records[1:]:
        other = _record_format(where, record)
        if other != kind:
            raise SpecError(
                f"{where}: a {other} record, but {first_where} is {kind}; one format for all "
                f"records"
            )
    return kind


def _record_format(where: str, record: dict[str, Any]) -> str:
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if field not in record:
                raise SpecError(f"{where}: a prompt-completion record without '{field}'")
        conversational = isinstance(record["prompt"], list)
        return "conversational prompt-completion" if conversational else "prompt-completion"
    if "text" in record:
        return "text"
    raise SpecError(
        f"{where}: no 'text', 'prompt' + 'completion' or 'messages' field (fields: "
        f"{sorted(record)})"
    )


def _tokenise(kind: str, where: str, record: dict[str, Any], tokenizer: Any) -> Tokens:
    if kind == "text":
        ids = _with_eos(_text_ids(tokenizer, _string(where, record, "text")), tokenizer)
        return ids, list(ids)
    if kind == "prompt-completion":
        prompt = _string(where, record, "prompt")
        whole = prompt + _string(where, record, "completion")
        return _completion_only(
            where, _text_ids(tokenizer, prompt), _with_eos(_text_ids(tokenizer, whole), tokenizer)
        )
    if kind == "conversational prompt-completion":
        prompt = _messages(where, record, "prompt")
        completion = _messages(where, record, "completion")
        prompt_ids = _chat_ids(tokenizer, where, prompt, add_generation_prompt=True)
        return _completion_only(where, prompt_ids, _chat_ids(tokenizer, where, prompt + completion))
    return _assistant_only(where, _messages(where, record, "messages"), tokenizer)


def _string(where: str, record: dict[str, Any], field: str) -> str:
    value = record[field]
    if not isinstance(value, str) or not value:
        got = "an empty string" if value == "" else type(value).__name__
        raise SpecError(f"{where}: '{field}' must be a non-empty string, got {got}")
    return value


def _messages(where: str, record: dict[str, Any], field: str) -> list[dict[str, Any]]:
    value = record[field]
    if not isinstance(value, list) or not value:
        raise SpecError(
            f"{where}: '{field}' must be a non-empty list of {{role, content}} messages, got "
            f"{type(value).__name__ if value != [] else 'an empty list'}"
        )
    for k, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            shown = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise SpecError(
                f"{where}: {field}[{k}] must have a string 'role' and 'content' (got {shown})"
            )
        if message["role"] not in ROLES:
            raise SpecError(
                f"{where}: {field}[{k}] has role {message['role']!r}; expected one of {list(ROLES)}"
            )
    return value


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    """``ids`` ending with the EOS token (TRL appends it so the model learns to stop)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return [*ids, eos]


def _completion_only(where: str, prompt_ids: list[int], ids: list[int]) -> Tokens:
    """Labels on the tokens after the prompt's. The prompt is tokenised alone and with its
    completion (as TRL does); its tokens must start the whole's, else no token boundary is the
    prompt's end."""
    if ids[: len(prompt_ids)] != prompt_ids:
        raise SpecError(
            f"{where}: the prompt's tokens do not start the tokens of prompt + completion (the "
            f"tokenizer or chat template joins them differently at the boundary, token "
            f"{_first_difference(prompt_ids, ids)}); end the prompt where a token ends, e.g. move "
            f"the whitespace between them to the start of the completion"
        )
    return ids, [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- chat templates -----------------------------------------------------------------------------


def _check_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SpecError(
            f"conversational records need a chat template, and this {type(tokenizer).__name__} "
            f"has none: set tokenizer.chat_template, or use text or prompt/completion records"
        )


def _chat_ids(
    tokenizer: Any, where: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False
) -> list[int]:
    return list(_render(tokenizer, where, messages, add_generation_prompt)["input_ids"])


def _render(
    tokenizer: Any,
    where: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    assistant_mask: bool = False,
) -> Any:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=assistant_mask,
        )
    except (TemplateError, ValueError, TypeError) as err:
        raise SpecError(f"{where}: the chat template refused the conversation ({err})") from None


def _assistant_only(where: str, messages: list[dict[str, Any]], tokenizer: Any) -> Tokens:
    """Labels on the assistant turns' tokens only.

    A template with ``{% generation %}`` markers says which tokens those are (through a fast
    tokenizer's offsets). Otherwise each assistant turn spans from the end of the conversation
    before it rendered with the generation prompt, to the end of the conversation up to and
    including it: both renderings must be prefixes of the whole conversation's tokens, else
    (a template that renders earlier turns differently later on) no span can be trusted.
    """
    if _GENERATION_MARKER.search(tokenizer.get_chat_template()) and getattr(
        tokenizer, "is_fast", False
    ):
        rendered = _render(tokenizer, where, messages, assistant_mask=True)
        ids = list(rendered["input_ids"])
        mask = rendered["assistant_masks"]
        return ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]
    ids = _chat_ids(tokenizer, where, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if k == 0:
            raise SpecError(
                f"{where}: messages[0] is an assistant turn: without {{% generation %}} markers "
                f"in the chat template, a turn's start is found by rendering the messages before "
                f"it; start with a system or user message"
            )
        start = _prefix_length(tokenizer, where, messages, k, ids, add_generation_prompt=True)
        end = _prefix_length(tokenizer, where, messages, k + 1, ids)
        labels[start:end] = ids[start:end]
    return ids, labels


def _prefix_length(
    tokenizer: Any,
    where: str,
    messages: list[dict[str, Any]],
    count: int,
    ids: list[int],
    add_generation_prompt: bool = False,
) -> int:
    prefix = _chat_ids(tokenizer, where, messages[:count], add_generation_prompt)
    if ids[: len(prefix)] != prefix:
        turn = f"messages[{count if add_generation_prompt else count - 1}]"
        raise SpecError(
            f"{where}: the chat template renders the conversation before the end of {turn} "
            f"differently from how the whole conversation starts (token "
            f"{_first_difference(prefix, ids)}), so the assistant turns' tokens cannot be found; "
            f"use a template with {{% generation %}} markers, or prompt/completion records"
        )
    return len(prefix)


# -- after tokenising ---------------------------------------------------------------------------


def _warn_unlabelled(records: list[Located], samples: list[Tokens], max_length: int) -> None:
    empty = [where for (where, _), (_, labels) in zip(records, samples) if not _has_label(labels)]
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(samples)} samples have no label token within max_length="
            f"{max_length} (the first: {empty[0]}); they are kept, as TRL keeps them, and add "
            f"nothing to the loss",
            stacklevel=4,
        )


def _has_label(labels: list[int]) -> bool:
    """Whether a causal LM's shifted loss counts a token: one after the first position."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def pack(samples: Sequence[Tokens], max_length: int) -> list[dict[str, list[int]]]:
    """Rows of at most ``max_length`` tokens, filled best-fit-decreasing (TRL's "bfd": longest
    sample first, each into the fullest row it fits in). Each row carries ``position_ids`` that
    restart at 0 for every sample, and -100 as each sample's first label."""
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i][0]))
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (tokens left, row), sorted: the best fit comes first
    for i in order:
        length = len(samples[i][0])
        k = bisect.bisect_left(space, (length, -1))
        if k == len(space):
            rows.append([i])
            bisect.insort(space, (max_length - length, len(rows) - 1))
        else:
            left, row = space.pop(k)
            rows[row].append(i)
            bisect.insort(space, (left - length, row))
    return [_packed_row([samples[i] for i in sorted(row)]) for row in rows]


def _packed_row(samples: list[Tokens]) -> dict[str, list[int]]:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in samples:
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX, *labels[1:]]
        row["position_ids"] += list(range(len(ids)))
    return row
