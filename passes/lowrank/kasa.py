"""KaSA: knowledge-aware singular-value adaptation (Wang et al., 2024, arXiv:2412.06071; PEFT's
``kasa_config``).

``W' x + scale * B(diag(d) A(dropout(x)))`` (Eq. 7-8), where ``W'`` is the base weight without
its ``r`` smallest singular components (Eq. 5), truncated once, in place, when the adapter is
created; ``d`` (PEFT's ``lora_diag``, ``r`` values drawn normal) is a learned diagonal of singular
values between LoRA's A and B (B starts at zero, so the adapter starts as the truncated base).
Training adds the paper's regulariser (Eq. 9-11) to the loss through `KaSA.loss_term`:
``beta * Σ d² + gamma * (‖BᵀB - I‖_F + ‖AAᵀ - I‖_F)`` per layer (PEFT exposes the same sum as
``_get_kasa_loss`` for its users to add by hand).

Layers: Linear only, as PEFT (it refuses GPT-2's ``Conv1D``; embeddings and convolutions have no
KaSA there); ``r`` must stay below ``min(in, out)``. Saved as PEFT's type ``LORA`` with
``kasa_config = {beta, gamma}``; the diagonal is ``lora_diag`` beside LoRA's keys. As in PEFT, the
truncation is part of the base from then on: disabling, unmerging or deleting the adapter does
not restore the original weight, and each KaSA adapter on a layer truncates it again; for the
same reason an adapter of any other method is refused on a model with a KaSA adapter, both ways
(PEFT's ``_check_new_adapter_config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_number
from surgeon.errors import SpecError
from surgeon.layers import layer_kind
from surgeon.passes.lowrank.lora import LoRA, LoRALayer
from surgeon.peft import MAPPING, REQUIRED, PeftKey
from surgeon.spec import MethodSpec

KEY = "kasa_config"
DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}
"""PEFT's ``KasaConfig`` fields (the spec fields have the same names) and their defaults."""
INITS = ("default", "gaussian")
"""LoRA's inits PEFT's KaSA keeps: the residual ones would rewrite the base a second time."""


def _read_options(value: Mapping[str, Any], where: str) -> dict[str, float]:
    """``beta`` and ``gamma`` from a ``kasa_config`` mapping, PEFT's defaults where absent;
    `SpecError` naming the key for an unknown or ill-typed entry."""
    unknown = sorted(set(value) - set(DEFAULTS))
    if unknown:
        raise SpecError(f"{where}: {KEY}.{unknown[0]} is not a KaSA option (known: beta, gamma)")
    options = dict(DEFAULTS)
    for key in DEFAULTS:
        found = value.get(key)
        if found is None:
            continue
        if isinstance(found, bool) or not isinstance(found, (int, float)):
            raise SpecError(f"{where}: {KEY}.{key}={found!r}: expected a number")
        options[key] = found
    return options


def _option_key(field: str) -> PeftKey:
    """``kasa_config``, read for one of its fields; each writes the whole mapping."""
    return PeftKey(
        KEY,
        field,
        REQUIRED,
        MAPPING,
        save=lambda spec, paths: {"beta": spec.beta, "gamma": spec.gamma},
        load=lambda value, config, where: _read_options(value, where)[field],
        why_required="KaSA's regulariser weights are configured there",
    )


@dataclass(frozen=True)
class KaSA(LoRA):
    """Knowledge-aware singular-value adaptation: LoRA's fields and the regulariser's weights
    ``beta`` (on the learned singular values) and ``gamma`` (orthogonality of A and B)."""

    name = "kasa"
    peft_format = LoRA.peft_format.but(
        keys=(*LoRA.peft_format.keys, *(_option_key(f) for f in DEFAULTS)),
    )
    adapts_quantized = False
    combinations = ()

    beta: float = DEFAULTS["beta"]
    gamma: float = DEFAULTS["gamma"]

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        if self.init not in INITS:
            raise SpecError(
                f"{owner}.init={self.init!r}: KaSA takes {' or '.join(map(repr, INITS))} (its "
                f"truncation already rewrites the base)"
            )
        for field in DEFAULTS:
            check_number(owner, field, getattr(self, field), 0, low_inclusive=True)

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return super().accepts_peft_config(config) and isinstance(config.get(KEY), Mapping)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, LoRA]:
        return {
            "default": cls(rank=2, targets=targets),
            "rslora-dropout-gaussian-patterns": cls(
                rank=2,
                alpha=3,
                rslora=True,
                dropout=0.1,
                init="gaussian",
                rank_pattern={targets[0]: 3},
                beta=0.01,
                gamma=0.0,
                targets=targets,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    @property
    def rewrites_base(self) -> bool:
        return True

    def conflict_with(self, other: MethodSpec) -> str | None:
        if isinstance(other, KaSA):
            return None
        return (
            "KaSA truncates the base weights when it is created, so what an adapter of another "
            "method sees would depend on the order the adapters were added (PEFT refuses this mix "
            "too); put KaSA adapters on a model of their own"
        )

    def create_layer(self, layer: nn.Module, path: str) -> KaSALayer:
        rank, scale = self.rank_and_scale(path)
        return KaSALayer(layer, path, rank, scale, self.dropout, self.init, self.lora_bias)

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """Eq. 9-11 summed over the layers, in float32 (as PEFT's ``_get_kasa_loss``)."""
        if self.beta == 0 and self.gamma == 0:
            return None
        return torch.stack([self._layer_term(layer) for layer in layers.values()]).sum()

    def _layer_term(self, layer: KaSALayer) -> torch.Tensor:
        d, a, b = layer.lora_diag.float(), layer.lora_A.float(), layer.lora_B.float()
        eye = torch.eye(d.shape[0], device=d.device)
        orthogonality = torch.linalg.matrix_norm(b.t() @ b - eye) + torch.linalg.matrix_norm(
            a @ a.t() - eye
        )
        return self.beta * d.pow(2).sum() + self.gamma * orthogonality


class KaSALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` (and ``lora_bias``) with ``lora_diag`` between them; creating
    it truncates the base weight."""

    method = "kasa"
    fuses_as = None  # the fused LoRA kernel has no diagonal

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        lora_bias: bool,
    ) -> None:
        smallest = min(base.weight.shape)
        if rank >= smallest:
            raise SpecError(
                f"KaSA on {path}: rank {rank} must be below min(in, out) = {smallest}, so that "
                f"the truncation keeps some of the weight (PEFT's rule)"
            )
        super().__init__(base, path, rank, scale, dropout, init, lora_bias=lora_bias)
        factory = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        # drawn after LoRA's init, as PEFT draws it
        self.lora_diag = nn.Parameter(torch.randn(rank, **factory))
        truncate_smallest(base.weight, rank)

    def emit_update(self, ctx: EmitContext, h: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        diag = ctx.attr("lora_diag", self.lora_diag)
        h = ctx.call(torch.mul, ctx.call(F.linear, h, a), diag)
        return ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b, *self._emit_bias(ctx))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B * self.lora_diag) @ self.lora_A * self.scale

    @property
    def peft_names(self) -> dict[str, str]:
        return {**super().peft_names, "lora_diag": "lora_diag"}


@torch.no_grad()
def truncate_smallest(weight: torch.Tensor, rank: int) -> None:
    """Drop ``weight``'s ``rank`` smallest singular components in place (an SVD in float32, the
    result stored in the weight's dtype). A weight on the meta device has no values to change."""
    if weight.is_meta:
        return
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    keep = s.shape[0] - rank
    weight.copy_(((u[:, :keep] * s[:keep]) @ vh[:keep]).to(weight.dtype))
