"""Cartridges (Eyuboglu et al., 2025, "Cartridges: Lightweight and general-purpose long context
representations via self-study"): a trained key/value cache. Every attention layer attends to
``num_virtual_tokens`` learned keys and values before the real tokens, stored as they are (no
encoder), the first ``num_frozen_tokens`` of them frozen (an attention sink, as the paper
recommends).

Prefixes reach attention as prefix tuning's do (the cache or the graph route); the file is
PEFT's ``CARTRIDGE``, whose ``prompt_embeddings`` has prefix tuning's layout. Initialisation:
standard normal (PEFT's), or the model's own keys and values of the first tokens of
``init_text`` (tokenized by the tokenizer in ``tokenizer_path``, as a system message through
its chat template when it has one, as PEFT's ``initialize_kv_prefix_from_text``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.checks import check_bool, check_int
from surgeon.errors import SpecError
from surgeon.passes.prompt.common import (
    SIZE_KEYS,
    PrefixAdapter,
    PrefixMethod,
    cache_argument,
    new_cache,
)
from surgeon.passes.prompt.prompt_tuning import check_text_init, load_init_tokenizer
from surgeon.peft import INT, REQUIRED, PeftFormat, PeftKey
from surgeon.spec import MethodSpec

FILE_KEY = "prompt_embeddings"
PARTS = (f"{FILE_KEY}.frozen", f"{FILE_KEY}.trainable")
"""The file's one tensor, split as the adapter holds it (the frozen rows first)."""

PEFT_FORMAT = PeftFormat(
    "CARTRIDGE",
    keys=(
        PeftKey("num_virtual_tokens", "num_virtual_tokens", REQUIRED, INT),
        PeftKey("num_frozen_tokens", "num_frozen_tokens", 1, INT),
        *SIZE_KEYS,
    ),
)


@dataclass(frozen=True)
class Cartridge(PrefixMethod):
    """A trained key/value prefix in every attention layer, its first tokens frozen."""

    name = "cartridge"
    peft_format = PEFT_FORMAT

    num_virtual_tokens: int = 20
    num_frozen_tokens: int = 1
    init_text: str | None = None
    tokenizer_path: str | None = None
    chat_template: bool = True
    """Tokenize ``init_text`` as a system message through the tokenizer's chat template (when it
    has one), as PEFT; False: the plain text."""
    route: str = "auto"

    def validate(self) -> None:
        self.check_common_fields()
        owner = type(self).__name__
        check_int(owner, "num_frozen_tokens", self.num_frozen_tokens, minimum=0)
        if self.num_frozen_tokens > self.num_virtual_tokens:
            raise SpecError(
                f"{owner}.num_frozen_tokens={self.num_frozen_tokens}: more than its "
                f"num_virtual_tokens={self.num_virtual_tokens}"
            )
        check_text_init(self)
        check_bool(owner, "chat_template", self.chat_template)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "one-frozen": cls(num_virtual_tokens=3),
            "all-trained": cls(num_virtual_tokens=2, num_frozen_tokens=0),
        }

    def encoder_size(self) -> None:
        return None

    def make_adapter(self, *arguments: Any, **factory: Any) -> CartridgeAdapter:
        adapter = CartridgeAdapter(*arguments, frozen=self.num_frozen_tokens, **factory)
        model = arguments[1]  # PrefixAdapter's arguments: method name, model, ...
        if self.init_text is not None:
            with torch.no_grad():
                adapter.set_prefixes(self._text_prefixes(model, adapter))
        return adapter

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        if FILE_KEY not in tensors:
            return tensors
        rest = {k: v for k, v in tensors.items() if k != FILE_KEY}
        whole = tensors[FILE_KEY]
        k = self.num_frozen_tokens
        return {**rest, PARTS[0]: whole[:k], PARTS[1]: whole[k:]}

    def _text_prefixes(self, model: nn.Module, adapter: CartridgeAdapter) -> torch.Tensor:
        """The model's keys and values of the first tokens of ``init_text``, in the file's
        layout."""
        ids = self._text_ids(model)
        n = self.num_virtual_tokens
        if ids.shape[1] < n:
            raise SpecError(
                f"{type(self).__name__}.init_text: {ids.shape[1]} tokens, fewer than "
                f"num_virtual_tokens={n}; give a longer text"
            )
        cache = new_cache(model)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **_cache_argument(model, cache))
        rows = []
        for layer in range(adapter.shape.num_layers):
            key, value = cache.layers[layer].keys, cache.layers[layer].values
            # (1, heads, tokens, head_dim) -> (tokens, heads * head_dim), key then value
            rows += [t[0, :, :n].transpose(0, 1).reshape(n, -1) for t in (key, value)]
        return torch.cat(rows, dim=1)

    def _text_ids(self, model: nn.Module) -> torch.Tensor:
        tokenizer = load_init_tokenizer(self)
        device = next(model.parameters()).device
        if self.chat_template and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": self.init_text}],
                tokenize=True,
                add_generation_prompt=False,
                return_dict=False,
                return_tensors="pt",
            )
        else:
            ids = tokenizer(self.init_text, return_tensors="pt")["input_ids"]
        return torch.as_tensor(ids, device=device).reshape(1, -1)


def _cache_argument(model: nn.Module, cache: Any) -> dict[str, Any]:
    name = cache_argument(model)
    if name is None:
        raise SpecError(
            f"Cartridge.init_text: {type(model).__name__} takes no key/value cache argument to "
            f"read the text's keys and values from"
        )
    return {name: cache, "use_cache": True}


class CartridgeAdapter(PrefixAdapter):
    """Prefix tuning's plain prefixes, held as two parameters: the first ``frozen`` tokens (not
    trained) and the rest."""

    def __init__(self, *arguments: Any, frozen: int, **factory: Any) -> None:
        super().__init__(*arguments, **factory)
        start = self.prefixes.detach()
        del self.prefixes
        self.frozen_prefixes = nn.Parameter(start[:frozen].clone(), requires_grad=False)
        self.trained_prefixes = nn.Parameter(start[frozen:].clone())
        self.target = f"{self.target}, {frozen} of {self.n} tokens frozen"

    def flat(self) -> torch.Tensor:
        if self._constants is not None:
            return self._constants
        if not len(self.frozen_prefixes):
            return self.trained_prefixes
        return torch.cat([self.frozen_prefixes, self.trained_prefixes])

    def set_prefixes(self, prefixes: torch.Tensor) -> None:
        k = len(self.frozen_prefixes)
        self.frozen_prefixes.copy_(prefixes[:k])
        self.trained_prefixes.copy_(prefixes[k:])

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(PARTS, (self.frozen_prefixes, self.trained_prefixes)))
