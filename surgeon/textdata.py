"""Labelled or plain text files turned into token samples that `surgeon.train` takes.

Formats: ``.jsonl`` (one object per line with ``text`` and optionally ``label``, or with token
fields such as ``input_ids`` already), ``.csv`` and ``.tsv`` (a header row with ``text`` and
optionally ``label``). With labels the samples are for sequence classification; without, for
causal language modelling (the labels are the input ids).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgeon.errors import SpecError

TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The file's rows as dicts; a clear error naming the line for malformed input."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        if not rows:
            raise SpecError(f"{path}: no rows below the header")
        return rows
    raise SpecError(f"data file {str(path)!r}: expected .jsonl, .csv or .tsv")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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
        records.append(record)
    if not records:
        raise SpecError(f"{path}: no records")
    return records


def read_text_dataset(
    path: str | Path, load_tokenizer: Callable[[], Any], max_length: int = 128
) -> list[dict]:
    """Token samples (lists of ints) for `surgeon.train`; texts are truncated to ``max_length``.

    ``load_tokenizer`` is called only when the file holds texts rather than token ids.
    """
    records = read_records(path)
    if all("input_ids" in r for r in records):
        return [_token_sample(path, n, r) for n, r in enumerate(records, 1)]
    tokenizer = load_tokenizer()
    samples = []
    for number, record in enumerate(records, 1):
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise SpecError(f"{path}: record {number} has no 'text' (fields: {sorted(record)})")
        encoded = tokenizer(text, truncation=True, max_length=max_length)
        sample = {k: list(encoded[k]) for k in ("input_ids", "attention_mask") if k in encoded}
        if "label" in record:
            sample["labels"] = _label(path, number, record["label"])
        else:
            sample["labels"] = list(sample["input_ids"])
        samples.append(sample)
    return samples


def _label(path: Path, number: int, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SpecError(f"{path}: record {number}: label {value!r} is not an integer") from None


def _token_sample(path: Path, number: int, record: dict[str, Any]) -> dict[str, Any]:
    sample = {k: record[k] for k in TOKEN_FIELDS if k in record}
    ids = sample["input_ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise SpecError(f"{path}: record {number}: input_ids must be a non-empty list of integers")
    sample.setdefault("labels", list(ids))
    return sample
