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
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, is_int
from surgeon.copies import refuse_several
from surgeon.errors import SpecError
from surgeon.layers import adapter_dtype, layer_kind
from surgeon.peft import NAMES, JsonType, PeftFormat, PeftKey, as_json, choices
from surgeon.spec import MethodSpec
from surgeon.targets import PRESETS

INPUT_EMBEDDINGS = "input-embeddings"
"""The default target: the model's input embedding (PEFT's ``target_modules=None``)."""

INITS = ("copy", "random")
"""``copy``: δ starts as the tokens' rows (PEFT's ``init_weights=True``); ``random``: standard
normal (``init_weights=False``)."""

TOKEN_INDICES = JsonType(
    "a list of token indices", lambda v: isinstance(v, (list, tuple)) and all(map(is_int, v))
)

MERGED_TOKENS = "trainable_tokens"
"""The fx node meta key naming the tokens each adapter stacked so far replaces (adapter -> set)."""


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


def input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The path and module ``get_input_embeddings()`` names, if the model has one."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        embedding = getter()
    except (NotImplementedError, AttributeError):
        return None
    return next(((p, m) for p, m in model.named_modules() if p and m is embedding), None)


def ties_word_embeddings(model: nn.Module) -> bool:
    """Whether the model's config ties its output head to the input embedding (PEFT adapts the
    tied layers along only then)."""
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


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
        kind = layer_kind(layer)
        return kind == "embedding" or (kind == "linear" and layer.bias is None)

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
        if not ties_word_embeddings(model) or found is None or found[0] not in paths:
            return []
        weight = found[1].weight
        tied = [
            p
            for p, m in model.named_modules()
            if p and m is not found[1] and getattr(m, "weight", None) is weight
        ]
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


def swap_embedded_tokens(
    base_out: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    padding: int | None,
    layer: nn.Embedding,
) -> torch.Tensor:
    """The embedding's output with the trained tokens' vectors in place of their rows, looked
    up as the layer looks up (no gradient for its padding token's row, ``padding`` among
    ``rows``; gradients scaled by frequency where it asks), times its ``embed_scale`` if any."""
    where = positions[ids]
    table = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # the last row: other tokens
    looked_up = F.embedding(
        where, table, padding_idx=padding, scale_grad_by_freq=layer.scale_grad_by_freq
    )
    scale = getattr(layer, "embed_scale", None)
    if scale is not None:
        looked_up = looked_up * torch.as_tensor(scale).to(looked_up)
    return torch.where((where < len(rows)).unsqueeze(-1), looked_up, base_out)


def swap_output_features(
    base_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """A bias-free Linear's output with the trained rows' features in place of the weight's."""
    return base_out.index_copy(-1, index, F.linear(x, rows))


class TrainableTokensLayer(AdapterLayer):
    """``trainable_tokens_delta`` (one row per token index; float32 over a half-precision base,
    as PEFT keeps it), shared with the input embedding's layer by a tied layer."""

    method = "trainable_tokens"

    def __init__(
        self,
        base: nn.Module,
        path: str,
        spec: TrainableTokens,
        tied_to: nn.Parameter | None = None,
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.tied = tied_to is not None
        weight = base.weight
        if getattr(base, "max_norm", None) is not None:
            raise SpecError(
                f"TrainableTokens cannot adapt {path}: its max_norm renormalises the rows it "
                f"looks up in place"
            )
        outside = [i for i in spec.token_indices if i >= weight.shape[0]]
        if outside:
            raise SpecError(
                f"TrainableTokens.token_indices: {outside} out of range for {path}, which has "
                f"{weight.shape[0]} rows"
            )
        self.tokens = frozenset(spec.token_indices)
        index = torch.tensor(spec.token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("token_index", index, persistent=False)
        if self.kind == "embedding":
            positions = torch.full((weight.shape[0],), len(index), device=weight.device)
            positions[index] = torch.arange(len(index), device=weight.device)
            self.register_buffer("token_positions", positions, persistent=False)
            padding = base.padding_idx
            self.padding = spec.token_indices.index(padding) if padding in self.tokens else None
        self.trainable_tokens_delta = tied_to if tied_to is not None else self._initial(spec)
        self._replaced: torch.Tensor | None = None

    def _initial(self, spec: TrainableTokens) -> nn.Parameter:
        weight = self.base.weight
        if spec.init == "copy":
            rows = weight.detach()[self.token_index]
        else:  # PEFT's draw: in the weight's dtype, from the global generator
            shape = (len(self.token_index), weight.shape[1])
            rows = torch.randn(shape, dtype=weight.dtype, device=weight.device)
        return nn.Parameter(rows.to(adapter_dtype(weight)))

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        rows = ctx.attr("trainable_tokens_delta", self.trainable_tokens_delta)
        dtype = self.base.weight.dtype
        if self.trainable_tokens_delta.dtype != dtype:  # rounded to the weight's dtype, as PEFT
            rows = ctx.method("to", rows, dtype)
        if self.kind == "embedding":
            positions = ctx.attr("token_positions", self.token_positions)
            base = ctx.attr("base_layer", self.base)
            out = ctx.call(swap_embedded_tokens, base_out, x, positions, rows, self.padding, base)
        else:
            index = ctx.attr("token_index", self.token_index)
            out = ctx.call(swap_output_features, base_out, x, index, rows)
        return self._claim_tokens(ctx, base_out, out)

    def _claim_tokens(self, ctx: EmitContext, base_out: fx.Node, out: fx.Node) -> fx.Node:
        """Record which tokens the adapters stacked so far replace; an adapter replacing a token
        an earlier one replaced makes the graph refuse to run, naming both."""
        claimed = base_out.meta.get(MERGED_TOKENS, {})
        name = ctx.tag["adapter"]
        clash = next((a for a, tokens in claimed.items() if tokens & self.tokens), None)
        if clash is not None:
            common = sorted(claimed[clash] & self.tokens)
            message = (
                f"trainable tokens adapters {clash!r} and {name!r} both replace tokens {common} "
                f"of {ctx.prefix.rpartition('.')[0]}; only disjoint tokens can run together "
                f"(PEFT refuses this too): activate one of them, or give each its rows of a "
                f"mixed batch"
            )
            out = ctx.call(refuse_several, out, message)
        out.meta[MERGED_TOKENS] = {**claimed, name: self.tokens}
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Write δ into the weight's rows, keeping the rows it replaces for `unmerge` (a tied
        layer writes the same rows into the shared weight again)."""
        weight = self.base.weight
        self._replaced = weight[self.token_index].clone()
        weight.index_copy_(0, self.token_index, self.trainable_tokens_delta.to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._replaced is None:
            raise RuntimeError("TrainableTokensLayer.unmerge() without a merge() before it")
        self.base.weight.index_copy_(0, self.token_index, self._replaced)
        self._replaced = None

    def unload(self, requantize: bool = False) -> None:
        self._replaced = None

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """A tied layer's δ is the embedding's: saved as a copy (a file holds no aliases)."""
        tensors = self.peft_tensors()
        return {k: v.detach().clone() for k, v in tensors.items()} if self.tied else tensors
