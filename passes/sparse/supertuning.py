"""Super-Tuning: a trained sparse support of each weight's entries, chosen by magnitude, with an
optional low-rank part (arXiv:2607.09287, as PEFT cites it; "Super", and "Supra" with LoRA).

``(W + S) x + b + (alpha / r) · B A dropout(x)``: ``S`` is nonzero only on the
``int(numel · (1 - sparsity))`` entries of largest ``|W|`` (smallest with ``largest=False``),
chosen from the base weight when the adapter is built (``torch.topk``, as PEFT chooses them).
The values there train (PEFT's ``supertuning_values``, zero at first); with ``rank`` set, LoRA's
``A`` (kaiming-uniform) and ``B`` (zero) train too, scaled by ``alpha / rank`` (``alpha``
defaults to ``2 · rank``). A fresh adapter is the base layer.

The chosen positions (flat, int32) are saved as ``supertuning_indices`` unless
``save_indices=False``: a load then chooses them again from the base weight, exactly as PEFT
does, so either side's files load with the other's outputs on the same base model.

The layer runs as PEFT's: ``F.linear(x, W + S, b)``, the values cast to the weight's dtype and
scattered into it (kept in eval until W or the adapter change), then the low-rank output in
float32 over a half-precision base, scaled, cast back and added. Merging scatters the values into
W and adds the low-rank product, as PEFT.

Layers: Linear (the only type PEFT's Super-Tuning supports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import EmitContext
from surgeon.checks import check_bool, check_int, check_number, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind
from surgeon.passes.sparse.shira import SparseUpdateLayer
from surgeon.peft import BOOL, INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec


def _low_rank_only(value: Any, config: Mapping[str, Any], where: str) -> Any:
    """PEFT ignores ``lora_dropout`` without ``r``: so does a load."""
    return value if config.get("r") is not None else 0.0


PEFT_FORMAT = PeftFormat(
    "SUPERTUNING",
    keys=(
        # PEFT's Super-Tuning has neither exclude_modules nor layers_to_transform: a selection
        # that uses them is written out as the chosen module paths
        *selection_keys(exclude=False, layers=False),
        PeftKey("sparsity", "sparsity", 0.99, NUMBER),
        PeftKey("select_top", "largest", True, BOOL),
        PeftKey("r", "rank", None, INT.optional()),
        # written resolved, as PEFT writes it (2 · r when not given)
        PeftKey(
            "lora_alpha",
            "alpha",
            None,
            NUMBER.optional(),
            save=lambda spec, paths: spec.resolved_alpha,
        ),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER, load=_low_rank_only),
        PeftKey("save_precomputed_indices", "save_indices", True, BOOL),
    ),
    # init_weights=False draws values that the file's weights replace
    constants={"init_weights": True},
)


@dataclass(frozen=True)
class SuperTuning(MethodSpec):
    """Sparse fine-tuning of each weight's largest (or smallest) entries, optionally with LoRA."""

    name = "supertuning"
    peft_format = PEFT_FORMAT

    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    sparsity: float = 0.99
    """The share of each weight's entries left frozen: 0.99 trains 1% of them."""
    largest: bool = True
    """Train the entries of largest magnitude (PEFT's ``select_top``); False: the smallest."""
    rank: int | None = None
    """The low-rank part's rank ("Supra"); None: the sparse part alone ("Super")."""
    alpha: float | None = None
    """The low-rank part's scale is ``alpha / rank``; None: ``alpha = 2 · rank``."""
    dropout: float = 0.0
    """Dropout on the low-rank part's input."""
    save_indices: bool = True
    """Whether adapter files hold the chosen positions; False: a load chooses them again."""
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_number(owner, "sparsity", self.sparsity, 0, 1, low_inclusive=True)
        check_bool(owner, "largest", self.largest)
        check_bool(owner, "save_indices", self.save_indices)
        check_probability(owner, "dropout", self.dropout)
        if self.rank is not None:
            check_int(owner, "rank", self.rank)
            if self.alpha is not None:
                check_positive(owner, "alpha", self.alpha)
            return
        for field, value, off in (("alpha", self.alpha, None), ("dropout", self.dropout, 0.0)):
            if value != off:
                raise SpecError(
                    f"{owner}.{field}={value!r} applies to the low-rank part, which rank=None "
                    f"leaves out: set rank too"
                )

    @property
    def resolved_alpha(self) -> float | None:
        """``alpha``, or PEFT's default ``2 · rank``; None without a low-rank part."""
        if self.rank is None:
            return None
        return 2 * self.rank if self.alpha is None else self.alpha

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the low-rank part's dropout and default alpha are the card's (PEFT parity there)
        return {
            "supra": cls(sparsity=0.8, rank=2, alpha=3, targets=targets),
            "super-bottom-unsaved": cls(
                sparsity=0.9, largest=False, save_indices=False, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> SuperTuningLayer:
        count = int(layer.weight.numel() * (1 - self.sparsity))  # PEFT's count, to the bit
        if count < 1:
            raise SpecError(
                f"SuperTuning.sparsity={self.sparsity} on {path}: leaves none of its "
                f"{layer.weight.numel()} weight entries to train; lower the sparsity"
            )
        return SuperTuningLayer(layer, self, count)


def chosen_positions(weight: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Flat positions of the ``count`` entries of largest (or smallest) ``|W|``, int32, in
    ``torch.topk``'s order, as PEFT chooses them (ties broken alike on the same device)."""
    scores = weight.detach().abs().flatten()
    return torch.topk(scores, k=count, largest=largest).indices.to(torch.int32)


def scatter_added(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``weight`` with ``values``, cast to its dtype, added at flat ``indices``: PEFT's
    ``scatter_add``, rounding included."""
    flat = weight.reshape(-1).scatter_add(0, indices.long(), values.to(weight.dtype))
    return flat.view_as(weight)


class SuperTuningLayer(SparseUpdateLayer):
    """``supertuning_values`` at ``supertuning_indices`` (a buffer), and the low-rank ``lora_A``
    (r x in), ``lora_B`` (out x r) when the spec has a rank; float32 over a half-precision base,
    as PEFT keeps them."""

    method = "supertuning"
    indices_name = "supertuning_indices"
    values_name = "supertuning_values"
    add_entries = staticmethod(scatter_added)
    loraplus_b = ("lora_B",)

    def __init__(self, base: nn.Module, spec: SuperTuning, count: int) -> None:
        super().__init__(base)
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.save_indices = spec.save_indices
        self.register_buffer("supertuning_indices", chosen_positions(weight, count, spec.largest))
        self.supertuning_values = nn.Parameter(torch.zeros(count, **factory))
        self.rank = spec.rank
        if spec.rank is None:
            return
        self.scale = spec.resolved_alpha / spec.rank
        self.lora_A = nn.Parameter(torch.empty(spec.rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, spec.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        out = super().emit(ctx, x, base_out)
        if self.rank is None:
            return out
        # PEFT's order: dropout in the input's dtype, then float32, the scale on B's output
        h = ctx.module("dropout", self.dropout, x) if self.dropout is not None else x
        dtype = self.lora_A.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", h, dtype) if cast else h
        h = ctx.call(F.linear, h, ctx.attr("lora_A", self.lora_A))
        low = ctx.call(
            torch.mul, ctx.call(F.linear, h, ctx.attr("lora_B", self.lora_B)), self.scale
        )
        low = ctx.method("to", low, self.base.weight.dtype) if cast else low
        return ctx.call(torch.add, out, low)

    def _low_rank_delta(self) -> torch.Tensor:
        """``scale · B A`` in the weight's dtype, as PEFT folds it."""
        return (self.scale * (self.lora_B @ self.lora_A)).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        super().merge()
        if self.rank is not None:
            self.base.weight.add_(self._low_rank_delta())

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.rank is not None:
            self.base.weight.sub_(self._low_rank_delta())
        super().unmerge()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().peft_tensors()
        if not self.save_indices:
            del tensors["supertuning_indices"]
        if self.rank is not None:
            tensors["supertuning_lora_A.weight"] = self.lora_A
            tensors["supertuning_lora_B.weight"] = self.lora_B
        return tensors
