"""BD-LoRA: LoRA with block-diagonal factors, for multi-LoRA serving without inter-GPU traffic
(Wang et al., 2025; PEFT's ``use_bdlora``).

``base(x) + scale * B(A(dropout(x)))`` as LoRA, where on the layers ``block_a`` names A is
block-diagonal with ``blocks`` blocks, and on those ``block_b`` names B is: a block-diagonal
factor stores only its diagonal blocks, stacked (A: ``r x in/blocks``, B: ``out x r/blocks``), and
block ``i`` of the input features meets only block ``i`` of the rows. Patterns match as PEFT's,
by substring of the module path; with ``strict`` every target must match one list (a target
matching neither is then a `SpecError`; without it, such a target is plain LoRA).

Layers: Linear only, as PEFT (its block-diagonal factor reads ``in_features``/``out_features``,
which GPT-2's ``Conv1D`` lacks; embeddings and convolutions have no BD-LoRA there). Saved as
PEFT's type ``LORA`` with ``use_bdlora`` = ``{target_modules_bd_a, target_modules_bd_b, nblocks,
match_strict}``; the factors keep LoRA's keys (``lora_A.weight``, ``lora_B.weight``) in their
compact shapes. Initialisation as PEFT: LoRA's init on full-size factors, then a block-diagonal A
is drawn again (kaiming-uniform with ``a = 0``, through the base dtype) and a block-diagonal B is
zero. Merging adds ``scale * B_full A_full``.
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
from surgeon.checks import check_bool, check_int, check_names
from surgeon.errors import SpecError
from surgeon.layers import layer_kind, through_base_dtype
from surgeon.passes.lowrank.lora import LoRA, LoRALayer
from surgeon.peft import MAPPING, REQUIRED, PeftKey

KEY = "use_bdlora"
OPTIONS = {
    "target_modules_bd_a": "block_a",
    "target_modules_bd_b": "block_b",
    "nblocks": "blocks",
    "match_strict": "strict",
}
"""PEFT's ``BdLoraConfig`` fields and the spec fields carrying them."""
INITS = ("default", "gaussian")
"""LoRA's inits PEFT's BD-LoRA keeps: the others set both factors before it replaces one."""


def _read_options(value: Any, where: str) -> dict[str, Any]:
    """The spec fields a ``use_bdlora`` mapping holds, with PEFT's defaults; `SpecError` naming
    the key for an unknown or ill-typed entry."""
    unknown = sorted(set(value) - set(OPTIONS))
    if unknown:
        raise SpecError(
            f"{where}: {KEY}.{unknown[0]} is not a BD-LoRA option (known: {', '.join(OPTIONS)})"
        )
    fields = {"block_a": (), "block_b": (), "blocks": 1, "strict": True}
    for key, name in OPTIONS.items():
        found = value.get(key)
        if found is None:
            continue
        if name.startswith("block_") and not (
            isinstance(found, (list, tuple)) and all(isinstance(p, str) for p in found)
        ):
            # PEFT iterates a plain string character by character: refuse it rather than guess
            raise SpecError(f"{where}: {KEY}.{key}={found!r}: expected a list of module names")
        if name == "blocks" and (isinstance(found, bool) or not isinstance(found, int)):
            raise SpecError(f"{where}: {KEY}.{key}={found!r}: expected an integer")
        if name == "strict" and not isinstance(found, bool):
            raise SpecError(f"{where}: {KEY}.{key}={found!r}: expected true or false")
        fields[name] = tuple(found) if name.startswith("block_") else found
    return fields


def _option_key(field: str) -> PeftKey:
    """``use_bdlora``, read for one of the spec fields it carries; each writes the whole
    mapping."""
    return PeftKey(
        KEY,
        field,
        REQUIRED,
        MAPPING,
        save=lambda spec, paths: {
            "target_modules_bd_a": list(spec.block_a),
            "target_modules_bd_b": list(spec.block_b),
            "nblocks": spec.blocks,
            "match_strict": spec.strict,
        },
        load=lambda value, config, where: _read_options(value, where)[field],
        why_required="BD-LoRA's block-diagonal factors are configured there",
    )


@dataclass(frozen=True)
class BDLoRA(LoRA):
    """Block-diagonal LoRA: LoRA's fields, and which layers get a block-diagonal A or B."""

    name = "bdlora"
    peft_format = LoRA.peft_format.but(
        keys=(*LoRA.peft_format.keys, *(_option_key(f) for f in OPTIONS.values())),
        switches={"use_dora": False, "lora_bias": False},
    )
    adapts_quantized = False
    combinations = ()

    block_a: str | tuple[str, ...] = ()
    block_b: str | tuple[str, ...] = ()
    blocks: int = 1
    strict: bool = True

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        if self.init not in INITS:
            raise SpecError(
                f"{owner}.init={self.init!r}: BD-LoRA takes {' or '.join(map(repr, INITS))} "
                f"(PEFT replaces one factor after the init, which breaks the others)"
            )
        self._set("block_a", check_names(owner, "block_a", self.block_a))
        self._set("block_b", check_names(owner, "block_b", self.block_b))
        overlap = sorted(set(self.block_a) & set(self.block_b))
        if overlap:
            raise SpecError(
                f"{owner}: {overlap[0]!r} is in both block_a and block_b (as PEFT: a factor "
                f"pair has one block-diagonal side)"
            )
        check_int(owner, "blocks", self.blocks)
        check_bool(owner, "strict", self.strict)

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return super().accepts_peft_config(config) and isinstance(config.get(KEY), Mapping)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, LoRA]:
        # the first target gets a block-diagonal B, the others A: every zoo layer divides so
        return {
            "a-and-b": cls(
                rank=4, targets=targets, block_b=targets[:1], block_a=targets[1:], blocks=2
            ),
            "loose-dropout": cls(
                rank=2,
                alpha=3,
                dropout=0.1,
                init="gaussian",
                targets=targets,
                block_b=targets[:1],
                blocks=2,
                strict=False,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> BDLoRALayer:
        rank, scale = self.rank_and_scale(path)
        side = self.block_side(path)
        return BDLoRALayer(layer, path, rank, scale, self.dropout, self.init, side, self.blocks)

    def block_side(self, path: str) -> str | None:
        """``"A"`` or ``"B"``: which factor of ``path`` is block-diagonal (None: neither)."""
        in_a = any(p in path for p in self.block_a)
        in_b = any(p in path for p in self.block_b)
        if in_a and in_b:
            raise SpecError(f"BDLoRA on {path}: it matches both block_a and block_b (as PEFT)")
        if self.strict and not (in_a or in_b):
            raise SpecError(
                f"BDLoRA on {path}: it matches neither block_a nor block_b; name it in one, or "
                f"set strict=False (PEFT's match_strict) to give it a plain LoRA"
            )
        return "A" if in_a else "B" if in_b else None


def block_diagonal_linear(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """``x @ block_diag(*weight.chunk(blocks)).T`` without the zeros: block ``i`` of ``x``'s
    features meets only the ``i``-th block of ``weight``'s rows."""
    h = x.unflatten(-1, (blocks, -1))
    w = weight.view(blocks, weight.shape[0] // blocks, -1)
    return torch.einsum("...bi,boi->...bo", h, w).flatten(-2)


class BDLoRALayer(LoRALayer):
    """LoRA's factors, one of them (``side`` ``"A"`` or ``"B"``) holding only its ``blocks``
    diagonal blocks, stacked along its rows."""

    method = "bdlora"
    fuses_as = None  # the fused LoRA kernel assumes full factors

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        side: str | None,
        blocks: int,
    ) -> None:
        self.side = side
        self.blocks = blocks if side is not None else 1
        _check_divisible(path, side, blocks, rank, base.in_features, base.out_features)
        super().__init__(base, path, rank, scale, dropout, init)

    def _shapes(self, base: nn.Module, path: str, rank: int) -> tuple[tuple[int, ...], ...]:
        a_shape, b_shape = super()._shapes(base, path, rank)
        if self.side == "A":
            return (rank, base.in_features // self.blocks), b_shape
        if self.side == "B":
            return a_shape, (base.out_features, rank // self.blocks)
        return a_shape, b_shape

    @torch.no_grad()
    def _initialise(self, init: str, path: str) -> None:
        """PEFT's draws: its ``nn.Linear`` factors, LoRA's init of full-size factors, then the
        block-diagonal factor's own init (A kaiming-uniform in the base dtype, B zero)."""
        full_a = (self.rank, self.base.in_features)
        full_b = (self.base.out_features, self.rank)
        for shape in (full_a, full_b):
            nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
        a = torch.empty(full_a)
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.rank)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        weight = self.base.weight
        if self.side == "A":
            a = nn.init.kaiming_uniform_(torch.empty(self.lora_A.shape, dtype=weight.dtype))
        self.lora_A.copy_(through_base_dtype(a, weight))
        nn.init.zeros_(self.lora_B)

    def emit_update(self, ctx: EmitContext, h: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        h = self._emit_factor(ctx, "A", h, a)
        return self._emit_factor(ctx, "B", ctx.call(torch.mul, h, self.scale), b)

    def _emit_factor(self, ctx: EmitContext, side: str, h: fx.Node, weight: fx.Node) -> fx.Node:
        if side == self.side:
            return ctx.call(block_diagonal_linear, h, weight, self.blocks)
        return ctx.call(F.linear, h, weight)

    def full_factor(self, side: str) -> torch.Tensor:
        """Factor ``side`` as the dense matrix it stands for (zeros off the diagonal blocks)."""
        factor = self.lora_A if side == "A" else self.lora_B
        if side != self.side:
            return factor
        return torch.block_diag(*factor.chunk(self.blocks, dim=0))

    def delta_weight(self) -> torch.Tensor:
        return self.full_factor("B") @ self.full_factor("A") * self.scale


def _check_divisible(
    path: str, side: str | None, blocks: int, rank: int, fan_in: int, fan_out: int
) -> None:
    """A block-diagonal factor splits its rank and its layer side into ``blocks`` equal parts."""
    if side is None:
        return
    sizes = {
        "rank": rank,
        "in_features" if side == "A" else "out_features": fan_in if side == "A" else fan_out,
    }
    uneven = [f"{name}={size}" for name, size in sizes.items() if size % blocks]
    if uneven:
        raise SpecError(
            f"BDLoRA on {path}: a block-diagonal {side} needs {' and '.join(sizes)} divisible "
            f"by blocks={blocks}; {', '.join(uneven)} is not"
        )
