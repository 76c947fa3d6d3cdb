"""LoRA with trainable token rows (PEFT's ``trainable_token_indices``): LoRA's layers, and
beside them chosen rows of embeddings trained as PEFT's trainable tokens, ``E'[t] = δ_t``.

``LoRA.trainable_tokens``: token indices for the model's input embedding (``get_input_embeddings()``,
else modules whose path ends with ``embed_tokens``), or a mapping of module names (matched as
PEFT matches them: the end of the module path) to indices. Each such module gets a
`LoRATokensLayer` (`surgeon.tokens.TokenRowsLayer`, keys ``<path>.token_adapter.
trainable_tokens_delta``, the rows copied from the weight at first: PEFT's LoRA always copies).
Where the model's config ties its word embeddings and the input embedding is chosen, the layers
sharing its weight (the LM head) get the same δ, one parameter, and no key in the file (PEFT
writes none: the tie restores it); a mapping that names a tied layer with other indices than the
embedding's is refused (PEFT would give the shared weight two different sets of rows). A module
both targeted by LoRA and chosen here is refused, as PEFT refuses it. Merging writes
the rows into the weight (a tied head's weight once more), which is why such a LoRA may merge
into weights shared by tied layers.

Methods built on LoRA that choose or build their layers their own way (QLoRA, aLoRA, DyLoRA...),
or whose PEFT format has no ``trainable_token_indices``, refuse the field; those that only build
other factor layers (DoRA) take it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.adapter import AdapterLayer
from surgeon.checks import is_int
from surgeon.errors import SpecError
from surgeon.peft import JsonType, PeftKey, as_json
from surgeon.spec import Combination
from surgeon.targets import peft_selection
from surgeon.tokens import TokenRowsLayer, has_token_rows, input_embedding, tied_to_input_embedding

if TYPE_CHECKING:
    from surgeon.passes.lowrank.lora import LoRA

FIELD = "trainable_tokens"
DEFAULT_NAME = "embed_tokens"
"""PEFT's input embedding for a model without ``get_input_embeddings()``."""


def _is_indices(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(map(is_int, value))


TOKEN_INDICES = JsonType(
    "a list of token indices or a mapping of module names to lists of token indices",
    lambda v: (
        _is_indices(v)
        or (
            isinstance(v, Mapping)
            and all(isinstance(k, str) and _is_indices(i) for k, i in v.items())
        )
    ),
).optional()


def _load(value: Any, config: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, Mapping):
        return {name: tuple(indices) for name, indices in value.items()}
    return tuple(value)


PEFT_KEY = PeftKey(
    "trainable_token_indices",
    FIELD,
    (),
    TOKEN_INDICES,
    save=lambda spec, paths: as_json(spec.trainable_tokens) or None,
    load=_load,
)
"""LoRA's config key: null (PEFT's default) for none."""


def _checked_indices(owner: str, where: str, indices: Any) -> tuple[int, ...]:
    if not isinstance(indices, (list, tuple)) or not all(is_int(i) and i >= 0 for i in indices):
        raise SpecError(f"{owner}.{where}={indices!r}: expected a list of integers >= 0")
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise SpecError(
            f"{owner}.{where}: {repeated} appear more than once; each token has one row"
        )
    return tuple(indices)


def check_spec(spec: LoRA, lora: type[LoRA]) -> None:
    """Normalise ``trainable_tokens`` (a tuple, or a dict of tuples; an empty mapping is none,
    as PEFT's) and refuse it where this LoRA (``lora``'s class or a subclass) cannot build the
    token layers."""
    owner = type(spec).__name__
    tokens = spec.trainable_tokens
    if isinstance(tokens, Mapping):
        for name, indices in tokens.items():
            if not isinstance(name, str) or not name:
                raise SpecError(f"{owner}.{FIELD}: module name {name!r} is not a non-empty string")
            if not indices:
                raise SpecError(f"{owner}.{FIELD}[{name!r}]: expected at least one token index")
        tokens = {n: _checked_indices(owner, f"{FIELD}[{n!r}]", i) for n, i in tokens.items()}
    else:
        tokens = _checked_indices(owner, FIELD, tokens)
    spec._set(FIELD, tokens or ())
    if tokens:
        _refuse_unsupported(spec, lora, owner)


def _refuse_unsupported(spec: LoRA, lora: type[LoRA], owner: str) -> None:
    cls = type(spec)
    own_building = any(
        getattr(cls, hook) is not getattr(lora, hook)
        for hook in ("select", "create_layers", "create_layers_from_data")
    )
    if own_building or cls.peft_format is None or cls.peft_format.field_key(FIELD) is None:
        raise SpecError(
            f"{owner}.{FIELD} is not supported: {owner} chooses or builds its layers its own way "
            f"(LoRA and the variants that only change LoRA's factors take it)"
        )
    if spec.target_parameters:
        raise SpecError(
            f"{owner}.{FIELD} together with target_parameters is not supported yet (not checked "
            f"against PEFT)"
        )
    marker = "\0"  # peft_selection writes the chosen paths, not the selector, for presets
    if peft_selection(spec, [marker])[0] == [marker]:
        raise SpecError(
            f"{owner}.{FIELD} needs targets PEFT reads as written (module names or a regex, not "
            f"the 'attention'/'mlp' presets, a regex with layers or an exclude preset): the "
            f"saved target_modules would name the token layers"
        )


# -- which layers -------------------------------------------------------------------------------


def _named_layers(spec: LoRA, model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every module a name of ``trainable_tokens`` chooses (PEFT's rule: the path ends with the
    name), with its indices."""
    owner = type(spec).__name__
    tokens = spec.trainable_tokens
    if not isinstance(tokens, Mapping):
        found = input_embedding(model)
        tokens = {found[0] if found is not None else DEFAULT_NAME: tokens}
    chosen: dict[str, tuple[int, ...]] = {}
    for name, indices in tokens.items():
        matched = [p for p, _ in model.named_modules() if p and p.endswith(name)]
        if not matched:
            raise SpecError(f"{owner}.{FIELD}: {name!r} matches no module")
        for path in matched:
            if path in chosen:
                raise SpecError(f"{owner}.{FIELD}: {path} is chosen by more than one name")
            if not has_token_rows(model.get_submodule(path)):
                raise SpecError(
                    f"{owner}.{FIELD}: {path} is a {type(model.get_submodule(path)).__name__}; "
                    f"trainable tokens adapt an Embedding or a Linear without bias"
                )
            chosen[path] = indices
    return chosen


def token_layers(spec: LoRA, model: nn.Module) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The layers with their own δ (path -> token indices), and those tied to the input
    embedding that share its δ (where it is chosen and the config ties them)."""
    own = _named_layers(spec, model)
    found = input_embedding(model)
    if found is None or found[0] not in own:
        return own, []
    tied = tied_to_input_embedding(model)
    for path in tied:
        if path in own and own[path] != own[found[0]]:
            raise SpecError(
                f"{type(spec).__name__}.{FIELD}: {path} is tied to {found[0]} but has other token "
                f"indices ({list(own[path])} and {list(own[found[0]])}); tied layers share one "
                f"weight, so they take the same tokens"
            )
        if not has_token_rows(model.get_submodule(path)):
            raise SpecError(
                f"{type(spec).__name__}.{FIELD}: {path} is tied to the input embedding "
                f"{found[0]} but is neither an Embedding nor a Linear without bias"
            )
    return {p: i for p, i in own.items() if p not in tied}, tied


def select(spec: LoRA, model: nn.Module, paths: list[str]) -> list[str]:
    """LoRA's ``paths``, then the token layers (none may be LoRA's targets too: PEFT refuses)."""
    if not spec.trainable_tokens:
        return paths
    own, tied = token_layers(spec, model)
    both = [p for p in [*own, *tied] if p in paths]
    if both:
        raise SpecError(
            f"{type(spec).__name__}: {both[0]} is both a LoRA target and a {FIELD} layer, which "
            f"PEFT refuses: leave it out of targets (or of {FIELD})"
        )
    return [*paths, *own, *tied]


def with_token_layers(
    spec: LoRA,
    model: nn.Module,
    paths: Sequence[str],
    build: Callable[[list[str]], dict[str, AdapterLayer]],
) -> dict[str, AdapterLayer]:
    """The layers of ``paths``: ``build`` makes LoRA's (first, as PEFT draws its inits before
    it adds the token layers), then the token layers, tied ones sharing the embedding's δ."""
    if not spec.trainable_tokens:
        return build(list(paths))
    own, tied = token_layers(spec, model)
    layers = build([p for p in paths if p not in own and p not in tied])
    for path, indices in own.items():
        layers[path] = LoRATokensLayer(model.get_submodule(path), path, indices, f"LoRA.{FIELD}")
    if tied:
        embedding = layers[input_embedding(model)[0]]
        for path in tied:
            layers[path] = LoRATokensLayer(
                model.get_submodule(path),
                path,
                embedding.token_index.tolist(),
                f"LoRA.{FIELD}",
                tied_to=embedding.trainable_tokens_delta,
            )
    return {p: layers[p] for p in paths}


def refuse_combining(sources: Sequence[Combination]) -> None:
    """Weighted combinations fold LoRA's factors; the token rows have none."""
    with_tokens = [c.name for c in sources if getattr(c.spec, FIELD, ())]
    if with_tokens:
        raise SpecError(
            f"merge_adapters: adapter {with_tokens[0]!r} has {FIELD}; combinations fold LoRA's "
            f"factors and would drop its token rows"
        )


class LoRATokensLayer(TokenRowsLayer):
    """A LoRA adapter's trained rows of one layer, under PEFT's ``token_adapter`` key; a layer
    tied to the input embedding has no key of its own (its δ is the embedding's)."""

    method = "trainable_tokens"
    peft_names = {"trainable_tokens_delta": "token_adapter.trainable_tokens_delta"}

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.tied else super().peft_tensors()
