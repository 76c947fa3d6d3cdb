"""Trained rows of an embedding: the chosen tokens' rows replaced by trained vectors.

PEFT builds this layer on its own (TRAINABLE_TOKENS, ``passes/vector/trainable_tokens.py``) and
beside LoRA (``trainable_token_indices``, ``passes/lowrank/lora_tokens.py``); both methods
share it here, as method families do not import one another.

``E'[t] = δ_t`` for each chosen token ``t``: `TokenRowsLayer` holds ``trainable_tokens_delta``
(one row per token, in the order given) and replaces those rows of the layer's output; the rest
of the matrix is never copied. An Embedding looks the tokens up (times its ``embed_scale`` where
it has one, as Gemma 3's scaled embedding); a Linear without bias (an LM head tied to the input
embedding) has the rows as output features. Merging writes the rows into the weight; unmerging
writes back the rows it replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.copies import refuse_several
from surgeon.errors import SpecError
from surgeon.layers import adapter_dtype, layer_kind

MERGED_TOKENS = "trainable_tokens"
"""The fx node meta key naming the tokens each adapter stacked so far replaces (adapter -> set)."""


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


def tied_to_input_embedding(model: nn.Module) -> list[str]:
    """Paths of the layers sharing the input embedding's weight, where the config ties them."""
    found = input_embedding(model)
    if not ties_word_embeddings(model) or found is None:
        return []
    weight = found[1].weight
    return [
        p
        for p, m in model.named_modules()
        if p and m is not found[1] and getattr(m, "weight", None) is weight
    ]


def has_token_rows(layer: nn.Module) -> bool:
    """Whether `TokenRowsLayer` can adapt ``layer``: an Embedding, or a Linear without bias
    (PEFT's trainable tokens computes a Linear without its bias)."""
    kind = layer_kind(layer)
    return kind == "embedding" or (kind == "linear" and layer.bias is None)


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


class TokenRowsLayer(AdapterLayer):
    """``trainable_tokens_delta`` (one row per token index; float32 over a half-precision base,
    as PEFT keeps it), shared with the input embedding's layer by a layer tied to it
    (``tied_to``). ``field``: the spec field that chose the tokens, for error messages."""

    def __init__(
        self,
        base: nn.Module,
        path: str,
        token_indices: Sequence[int],
        field: str,
        random_init: bool = False,
        tied_to: nn.Parameter | None = None,
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.tied = tied_to is not None
        weight = base.weight
        owner = field.partition(".")[0]
        if getattr(base, "max_norm", None) is not None:
            raise SpecError(
                f"{owner} cannot adapt {path}: its max_norm renormalises the rows it looks up "
                f"in place"
            )
        outside = [i for i in token_indices if i >= weight.shape[0]]
        if outside:
            raise SpecError(
                f"{field}: {outside} out of range for {path}, which has {weight.shape[0]} rows"
            )
        self.tokens = frozenset(token_indices)
        index = torch.tensor(list(token_indices), dtype=torch.long, device=weight.device)
        self.register_buffer("token_index", index, persistent=False)
        if self.kind == "embedding":
            positions = torch.full((weight.shape[0],), len(index), device=weight.device)
            positions[index] = torch.arange(len(index), device=weight.device)
            self.register_buffer("token_positions", positions, persistent=False)
            padding = base.padding_idx
            self.padding = list(token_indices).index(padding) if padding in self.tokens else None
        self.trainable_tokens_delta = tied_to if tied_to is not None else self._initial(random_init)
        self._replaced: torch.Tensor | None = None

    def _initial(self, random_init: bool) -> nn.Parameter:
        weight = self.base.weight
        if not random_init:
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
            raise RuntimeError(f"{type(self).__name__}.unmerge() without a merge() before it")
        self.base.weight.index_copy_(0, self.token_index, self._replaced)
        self._replaced = None

    def unload(self, requantize: bool = False) -> None:
        self._replaced = None
