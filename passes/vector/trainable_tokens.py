"""Trainable tokens: train only chosen rows of an embedding matrix (PEFT's TRAINABLE_TOKENS,
for new tokens added to a vocabulary or old ones re-learned, without training the whole matrix).

``E'[t] = δ_t`` for ``t`` in ``token_indices``, ``E'[t] = E[t]`` otherwise: each chosen token's
row is replaced by a trained vector ``δ_t`` (PEFT's ``trainable_tokens_delta``, one row per index
in the order given). It starts as the token's own row (``init="copy"``, a no-op; ``"random"``:
standard normal draws, as PEFT's ``init_weights=False`` draws them from the global generator).
The graph replaces the chosen tokens' rows of the embedding's output (times the layer's
``embed_scale`` where it has one, as Gemma 3's scaled embedding); the rest of the matrix is never
copied. Merging writes the rows into the weight; unmerging writes back the rows it replaced.

Tied embeddings: where the model's config ties its word embeddings
(``tie_word_embeddings``) and the targets take the input embedding, every other layer that
shares its weight (the LM head) is adapted too, with the same ``δ`` (one parameter): it sees the
new rows as the embedding does, and merging both writes the same rows once more. PEFT does the
same, and its file holds ``δ`` under each of those layers; so does ours.

Several adapters may replace disjoint tokens of one layer together; running two that replace a
common token is refused, naming both (PEFT refuses too). A mixed batch gives each row its own.

Layers: Embedding (not one with ``max_norm``, which renormalises the rows it looks up in place)
and Linear without a bias, whose rows are output features (PEFT's trainable tokens computes a
Linear without its bias). The default target is the model's input embedding
(``get_input_embeddings()``), else a module named ``embed_tokens``, as PEFT's.

The layer is `surgeon.tokens.TokenRowsLayer`, shared with LoRA's ``trainable_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.adapter import AdapterLayer
from surgeon.checks import check_choice, is_int
from surgeon.errors import SpecError
from surgeon.peft import NAMES, JsonType, PeftFormat, PeftKey, as_json, choices
from surgeon.spec import MethodSpec
from surgeon.targets import PRESETS
from surgeon.tokens import (
    TokenRowsLayer,
    has_token_rows,
    input_embedding,
    tied_to_input_embedding,
)

INPUT_EMBEDDINGS = "input-embeddings"
"""The default target: the model's input embedding (PEFT's ``target_modules=None``)."""

INITS = ("copy", "random")
"""``copy``: δ starts as the tokens' rows (PEFT's ``init_weights=True``); ``random``: standard
normal (``init_weights=False``)."""

TOKEN_INDICES = JsonType(
    "a list of token indices", lambda v: isinstance(v, (list, tuple)) and all(map(is_int, v))
)


def _written_targets(spec: TrainableTokens, paths: Sequence[str]) -> Any:
    """``target_modules``: null for the input embedding (PEFT finds it alike), the chosen paths
    for a preset PEFT lacks, else the selector as given."""
    if spec.targets == INPUT_EMBEDDINGS:
        return None
    if spec.targets in PRESETS:
        return sorted(paths)
    return as_json(spec.targets)


def _read_targets(value: Any, config: Any, where: str) -> Any:
    if value is None:
        return INPUT_EMBEDDINGS
    return tuple(value) if isinstance(value, list) else value


PEFT_FORMAT = PeftFormat(
    "TRAINABLE_TOKENS",
    keys=(
        PeftKey("token_indices", "token_indices", [], TOKEN_INDICES, load=lambda v, c, w: tuple(v)),
        PeftKey(
            "target_modules", "targets", None, NAMES.optional(), _written_targets, _read_targets
        ),
        PeftKey(
            "init_weights",
            "init",
            True,
            JsonType("true or false", lambda v: isinstance(v, bool)),
            save=lambda spec, paths: spec.init == "copy",
            load=choices({True: "copy", False: "random"}, "init_weights"),
        ),
    ),
)


@dataclass(frozen=True)
class TrainableTokens(MethodSpec):
    """Trainable rows of an embedding: ``token_indices`` are the tokens whose rows train."""

    name = "trainable_tokens"
    peft_format = PEFT_FORMAT
    stacks = False  # two adapters replacing the same token on one layer are refused
    merges_into_shared_weights = True  # a tied LM head writes the embedding's rows again

    token_indices: tuple[int, ...] = ()
    targets: str | tuple[str, ...] = INPUT_EMBEDDINGS
    init: str = "copy"

    def validate(self) -> None:
        owner = type(self).__name__
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)) or not all(is_int(i) and i >= 0 for i in indices):
            raise SpecError(f"{owner}.token_indices={indices!r}: expected a list of integers >= 0")
        if not indices:
            raise SpecError(f"{owner}.token_indices=[]: expected at least one token index")
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise SpecError(
                f"{owner}.token_indices: {repeated} appear more than once; each token has one row"
            )
        self._set("token_indices", tuple(indices))
        check_choice(owner, "init", self.init, INITS)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # tokens that the zoo's inputs hold and every targeted layer has rows for; the init
        # only sets starting values (its draws are checked against PEFT's in the card)
        return {"default": cls(token_indices=(2, 5, 8), targets=targets)}

    @property
    def starts_as_base(self) -> bool:
        return self.init == "copy"

    def supports(self, layer: nn.Module) -> bool:
        return has_token_rows(layer)

    def select(self, model: nn.Module) -> list[str]:
        """The targets (the input embedding by default), then the layers tied to the input
        embedding where it is targeted and the config ties them."""
        chosen = self
        if self.targets == INPUT_EMBEDDINGS:
            chosen = self.replace(targets=self._input_embedding_selector(model))
        paths = MethodSpec.select(chosen, model)
        return paths + [p for p in self._tied(model, paths) if p not in paths]

    def _input_embedding_selector(self, model: nn.Module) -> str:
        found = input_embedding(model)
        if found is not None:
            return re.escape(found[0])
        if not any(p == "embed_tokens" for p, _ in model.named_modules()):
            raise SpecError(
                f"{type(self).__name__}.targets={INPUT_EMBEDDINGS!r}: {type(model).__name__} has "
                f"no get_input_embeddings() and no module named 'embed_tokens'; name the "
                f"embedding in targets"
            )
        return "embed_tokens"

    def _tied(self, model: nn.Module, paths: Sequence[str]) -> list[str]:
        """Layers sharing the targeted input embedding's weight, where the config ties them."""
        found = input_embedding(model)
        if found is None or found[0] not in paths:
            return []
        tied = tied_to_input_embedding(model)
        refused = [p for p in tied if not self.supports(model.get_submodule(p))]
        if refused:
            raise SpecError(
                f"{type(self).__name__}: {refused[0]} is tied to the input embedding "
                f"{found[0]} but is neither an Embedding nor a Linear without bias; the new "
                f"rows cannot reach it"
            )
        return tied

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        """One layer per target; the layers tied to the input embedding share its δ."""
        tied = set(self._tied(model, paths))
        layers: dict[str, AdapterLayer] = {}
        for path in paths:
            if path not in tied:
                layers[path] = TrainableTokensLayer(model.get_submodule(path), path, self)
        found = input_embedding(model)
        for path in paths:
            if path in tied:
                source = layers[found[0]].trainable_tokens_delta
                layers[path] = TrainableTokensLayer(model.get_submodule(path), path, self, source)
        return {p: layers[p] for p in paths}


class TrainableTokensLayer(TokenRowsLayer):
    """`TokenRowsLayer` of a `TrainableTokens` spec; a tied layer's file entry is a copy of the
    embedding's δ."""

    method = "trainable_tokens"

    def __init__(
        self,
        base: nn.Module,
        path: str,
        spec: TrainableTokens,
        tied_to: nn.Parameter | None = None,
    ) -> None:
        field = f"{type(spec).__name__}.token_indices"
        super().__init__(base, path, spec.token_indices, field, spec.init == "random", tied_to)

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """A tied layer's δ is the embedding's: saved as a copy (a file holds no aliases)."""
        tensors = self.peft_tensors()
        return {k: v.detach().clone() for k, v in tensors.items()} if self.tied else tensors
