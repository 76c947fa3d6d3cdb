"""Prompt tuning (Lester et al., 2021): learned virtual-token embeddings in front of the input.

The model sees ``num_virtual_tokens`` learned embeddings, then the embedded input; the attention
mask, position ids, token type ids and labels are extended to match (labels with -100, so the
loss covers real tokens only). Outputs keep the virtual positions, as in PEFT (logits have
``num_virtual_tokens`` more rows than the input). During ``generate`` the virtual tokens go in
once, at the first step, and stay in the key/value cache after.

Initialisation: uniform in ``[-init_range, init_range]``, or, with ``init_text``, the model's own
embeddings of that text tokenized by the tokenizer in the local folder ``tokenizer_path``
(repeated or cut to ``num_virtual_tokens``, as PEFT's ``TEXT`` init).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.adapter import CallAdapter, ModelCall
from surgeon.checks import check_int, check_positive
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.passes.prompt.common import (
    IGNORE_INDEX,
    SIZE_KEYS,
    PromptMethod,
    adapter_factory,
    batch_and_length,
    check_file_sizes,
    extend_mask,
    input_embeddings,
    peft_sizes,
    prepend,
    prepend_positions,
    shift_positions,
)
from surgeon.peft import INT, REQUIRED, STRING, PeftFormat, PeftKey, one_of, task_type
from surgeon.spec import MethodSpec

PEFT_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


def _if_text(value: Any, config: Mapping[str, Any], where: str) -> Any:
    """The file holds the trained embeddings; a TEXT init is kept as a record."""
    return value if config.get("prompt_tuning_init") == "TEXT" else None


PEFT_FORMAT = PeftFormat(
    "PROMPT_TUNING",
    keys=(
        PeftKey("num_virtual_tokens", "num_virtual_tokens", REQUIRED, INT),
        PeftKey(
            "prompt_tuning_init",
            None,
            "RANDOM",
            one_of(*PEFT_INITS),
            save=lambda spec, paths: "RANDOM" if spec.init_text is None else "TEXT",
        ),
        PeftKey("prompt_tuning_init_text", "init_text", None, STRING.optional(), load=_if_text),
        PeftKey("tokenizer_name_or_path", "tokenizer_path", None, STRING.optional(), load=_if_text),
        *SIZE_KEYS,
    ),
    constants={"tokenizer_kwargs": None},
)


@dataclass(frozen=True)
class PromptTuning(PromptMethod):
    """Learned virtual-token embeddings prepended to the input embeddings."""

    name = "prompt_tuning"
    peft_format = PEFT_FORMAT

    num_virtual_tokens: int = 10
    init_range: float = 0.5
    init_text: str | None = None
    tokenizer_path: str | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        check_positive(owner, "init_range", self.init_range)
        check_text_init(self)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(num_virtual_tokens=3),
            "wide-init": cls(num_virtual_tokens=2, init_range=2.0),
        }

    def create_call_adapter(self, model: nn.Module, graph: Graph, from_file: bool) -> PromptAdapter:
        owner = type(self).__name__
        embeddings = input_embeddings(model, owner)
        sizes = peft_sizes(model, owner, embeddings.embedding_dim)
        check_file_sizes(
            getattr(self, "_file_sizes", None), {"token_dim": sizes["token_dim"]}, owner
        )
        adapter = PromptAdapter(
            embeddings,
            self.num_virtual_tokens,
            {**sizes, "task_type": task_type(model)},
            **adapter_factory(model),
        )
        if not from_file:
            with torch.no_grad():
                adapter.embeddings.copy_(self._initial(embeddings, adapter.embeddings))
        return adapter

    def _initial(self, embeddings: nn.Embedding, like: torch.Tensor) -> torch.Tensor:
        if self.init_text is None:
            return torch.empty_like(like).uniform_(-self.init_range, self.init_range)
        return text_embeddings(self, embeddings)


def check_text_init(spec: Any) -> None:
    """``init_text`` and ``tokenizer_path``: both or neither, a text and a local folder."""
    owner = type(spec).__name__
    if spec.init_text is not None and (not isinstance(spec.init_text, str) or not spec.init_text):
        raise SpecError(
            f"{owner}.init_text={spec.init_text!r}: expected a non-empty string or None"
        )
    if spec.tokenizer_path is not None and not isinstance(spec.tokenizer_path, str):
        raise SpecError(
            f"{owner}.tokenizer_path={spec.tokenizer_path!r}: expected the path of a local "
            f"tokenizer folder"
        )
    if (spec.init_text is None) != (spec.tokenizer_path is None):
        given, missing = (
            ("init_text", "tokenizer_path")
            if spec.tokenizer_path is None
            else ("tokenizer_path", "init_text")
        )
        raise SpecError(
            f"{owner}.{missing}=None: {given} is set, and initialising from text needs both "
            f"init_text and tokenizer_path (a local tokenizer folder)"
        )


def text_embeddings(spec: Any, embeddings: nn.Embedding) -> torch.Tensor:
    """The model's embeddings of ``spec.init_text`` tokenized by ``spec.tokenizer_path``,
    repeated or cut to ``spec.num_virtual_tokens`` (PEFT's ``TEXT`` init)."""
    ids = _text_ids(spec, embeddings.num_embeddings)
    index = torch.tensor(ids, dtype=torch.long, device=embeddings.weight.device)
    return embeddings.weight[index].detach()


def load_init_tokenizer(spec: Any) -> Any:
    """The tokenizer in the local folder ``spec.tokenizer_path`` (a text init's), or a
    `SpecError` naming the field."""
    owner = type(spec).__name__
    path = Path(spec.tokenizer_path)
    if not path.is_dir():
        raise SpecError(
            f"{owner}.tokenizer_path={spec.tokenizer_path!r}: not a folder; pass the local "
            f"folder of a tokenizer saved with save_pretrained (nothing is downloaded)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise SpecError(
            f"{owner}.tokenizer_path={spec.tokenizer_path!r}: no tokenizer could be read from "
            f"it ({str(err).splitlines()[0]})"
        ) from None


def _text_ids(spec: Any, vocab_size: int) -> list[int]:
    owner = type(spec).__name__
    tokenizer = load_init_tokenizer(spec)
    ids = list(tokenizer(spec.init_text)["input_ids"])
    if not ids:
        raise SpecError(f"{owner}.init_text={spec.init_text!r}: tokenizes to no tokens")
    too_big = [i for i in ids if i >= vocab_size]
    if too_big:
        raise SpecError(
            f"{owner}.tokenizer_path={spec.tokenizer_path!r}: its token ids (up to "
            f"{max(too_big)}) do not fit the model's {vocab_size} embeddings; use the "
            f"model's own tokenizer"
        )
    n = spec.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


class PromptAdapter(CallAdapter):
    """The virtual-token embeddings (PEFT's ``prompt_embeddings``) and the call rewrite."""

    method = "prompt_tuning"

    def __init__(
        self, embeddings: nn.Embedding, n: int, peft_config: dict[str, Any], **factory
    ) -> None:
        super().__init__()
        self.n = n
        self.embeddings = nn.Parameter(torch.empty(n, embeddings.embedding_dim, **factory))
        self.config_fields = peft_config
        self.target = f"input embeddings (+{n} virtual tokens)"
        self.where = "model call"
        self._constants: torch.Tensor | None = None

    def prompts(self) -> torch.Tensor:
        return self._constants if self._constants is not None else self.embeddings

    def transform(self, call: ModelCall) -> None:
        kwargs = call.kwargs
        if not call.prefill:  # the cache already holds the virtual tokens
            extend_mask(kwargs, self.n)
            shift_positions(kwargs, self.n)
            return
        embedded = kwargs.get("inputs_embeds")
        if embedded is None:
            embedded = call.model.get_input_embeddings()(kwargs["input_ids"])
        kwargs["input_ids"] = None
        batch, length = batch_and_length({"inputs_embeds": embedded})
        prompts = self.batch_prompts(call, batch).to(embedded.dtype)
        kwargs["inputs_embeds"] = torch.cat([prompts, embedded], dim=1)
        extend_mask(kwargs, self.n)
        prepend_positions(kwargs, self.n)
        prepend(kwargs, "labels", self.n, length, IGNORE_INDEX)
        prepend(kwargs, "token_type_ids", self.n, length, 0)

    def batch_prompts(self, call: ModelCall, batch: int) -> torch.Tensor:
        """(batch, virtual tokens, hidden): every row's prompts."""
        return self.prompts().unsqueeze(0).expand(batch, -1, -1)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings}

    def peft_config(self) -> dict[str, Any]:
        return dict(self.config_fields)

    @contextlib.contextmanager
    def as_constants(self) -> Iterator[None]:
        with torch.no_grad():  # the prompts as they run (an encoder's or a delta's folded)
            self._constants = self.prompts().detach().clone()
        try:
            yield
        finally:
            self._constants = None
