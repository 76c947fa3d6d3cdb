"""Delta-LoRA (Zi et al., 2023, arXiv 2309.02411): the weight follows the LoRA product's change.

``base(x) + D x + scale * B(A(x))``, ``scale = alpha / r``, with ReLoRA's accumulated delta
``D`` (`surgeon.passes.lowrank.relora.AccumulatedLoRALayer`) standing for the paper's update of
the pre-trained weight: after each optimizer step ``t > K`` (``start_step``, Algorithm 1),
``D += λ · scale · (B_{t+1} A_{t+1} - B_t A_t)`` (``update_ratio`` λ), with no gradient of its
own and no optimizer state. As the paper (§4.2), the LoRA branch has no dropout: the gradient of
``B A`` then equals the weight's. A and B start as LoRA's (A Kaiming-uniform, B zero), so a
fresh adapter is the base.

Each layer keeps the factors of the step before (small copies of A and B, and the step that
took them, in non-persistent buffers a checkpoint saves): an update applies only when they
come from the step right before, so a loop that starts again (a new run, a loaded file) takes
fresh copies first rather than folding a stale difference.

Layers: LoRA's full-precision ones (Linear, Conv1d/2d/3d, Embedding, GPT-2's ``Conv1D``).
Files: PEFT's layout under this project's own type ``SURGEON_DELTALORA``: ``lora_A.weight``,
``lora_B.weight`` and ``lora_delta.weight`` (``D``) per layer; a config with ``lora_dropout``
other than 0 is refused. The update runs in `DeltaLoRA.after_backward` (inside `surgeon.train`;
a custom loop calls ``cm.update_ranks(step)`` after ``optimizer.step()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.adapter import AdapterLayer
from surgeon.checks import check_int, check_number
from surgeon.errors import SpecError
from surgeon.passes.lowrank.relora import AccumulatedLoRA, AccumulatedLoRALayer, lowrank_keys
from surgeon.peft import INT, NUMBER, PeftFormat, PeftKey
from surgeon.spec import MethodSpec


def _no_dropout(value: Any, config: Mapping[str, Any], where: str) -> None:
    if value:
        raise SpecError(
            f"{where}: lora_dropout={value!r} is not supported: Delta-LoRA removes the dropout "
            f"of the low-rank branch (its update of W assumes B A's gradient is W's)"
        )


PEFT_FORMAT = PeftFormat(
    "SURGEON_DELTALORA",
    keys=(
        *lowrank_keys(dropout=False),
        PeftKey("lora_dropout", None, 0.0, NUMBER, load=_no_dropout),
        PeftKey("update_ratio", "update_ratio", 2.0, NUMBER),
        PeftKey("start_step", "start_step", 500, INT),
    ),
    switches={"bias": "none"},
)


class DeltaLoRALayer(AccumulatedLoRALayer):
    """The accumulating LoRA layer, plus ``previous_A``, ``previous_B`` and ``previous_step``:
    the factors after step ``previous_step`` (-1: none yet)."""

    method = "deltalora"

    def __init__(self, base: nn.Module, path: str, rank: int, scale: float, dropout: float) -> None:
        super().__init__(base, path, rank, scale, dropout)
        self.register_buffer("previous_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("previous_B", self.lora_B.detach().clone(), persistent=False)
        step = torch.tensor(-1, device=self.lora_A.device)
        self.register_buffer("previous_step", step, persistent=False)

    @torch.no_grad()
    def follow(self, step: int, ratio: float, start_step: int) -> None:
        """After step ``step``: ``D += ratio * (scale B A - scale B' A')`` for the factors
        ``B', A'`` before it, when ``step > start_step`` and they are known; then remember the
        factors."""
        if step > start_step and int(self.previous_step) == step - 1:
            # B A - B' A' as one product of rank 2r: [B, -B'] [A; A']
            a = torch.cat([self.lora_A, self.previous_A])
            b = torch.cat([self.lora_B, -self.previous_B], dim=1)
            self.lora_delta.weight.add_(self.product(a, b), alpha=ratio)
        self.previous_A.copy_(self.lora_A)
        self.previous_B.copy_(self.lora_B)
        self.previous_step.fill_(step)


@dataclass(frozen=True)
class DeltaLoRA(AccumulatedLoRA):
    """Delta-LoRA (Zi et al., 2023)."""

    name = "deltalora"
    peft_format = PEFT_FORMAT
    layer_class = DeltaLoRALayer

    update_ratio: float = 2.0
    start_step: int = 500

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_number(owner, "update_ratio", self.update_ratio, 0, low_inclusive=True)
        check_int(owner, "start_step", self.start_step, minimum=0)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {"default": cls(rank=4, targets=targets)}

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Every step: fold the factors' change into ``D`` (after ``start_step``)."""
        for layer in layers.values():
            layer.follow(step, self.update_ratio, self.start_step)
