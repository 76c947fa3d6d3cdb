"""Chain of LoRA, COLA (Xia et al., 2024, arXiv 2401.04151): a chain of ``M`` LoRAs trained in
turn.

``base(x) + D x + scale * B(A(dropout(x)))`` with ReLoRA's accumulated delta ``D``
(`surgeon.passes.lowrank.relora.AccumulatedLoRALayer`). Training runs ``chain_length`` links of
``link_steps`` optimizer steps each (the paper's Algorithm 1, tune - merge - re-initialise): at
each boundary between links the current LoRA is merged, ``D += scale * B A``, the next one
starts fresh (A drawn again as LoRA draws it, B zero) and the optimizer forgets A's and B's
state (moments and step count, as a new optimizer for the new LoRA). After the last link's
steps the last LoRA keeps training. The learning-rate schedule is `surgeon.train`'s, unchanged.

Layers: LoRA's full-precision ones (Linear, Conv1d/2d/3d, Embedding, GPT-2's ``Conv1D``).
Files: PEFT's layout under this project's own type ``SURGEON_COLA`` (PEFT has no COLA):
``lora_A.weight``, ``lora_B.weight`` and ``lora_delta.weight`` (``D``) per layer. The boundaries
run in `COLA.after_backward` (inside `surgeon.train`; a custom loop calls
``cm.update_ranks(step, optimizer)`` after ``optimizer.step()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from surgeon.adapter import AdapterLayer
from surgeon.checks import check_int, check_probability
from surgeon.passes.lowrank.relora import (
    AccumulatedLoRA,
    AccumulatedLoRALayer,
    lowrank_keys,
    require_optimizer,
    restart_factors,
)
from surgeon.peft import INT, PeftFormat, PeftKey
from surgeon.spec import MethodSpec

PEFT_FORMAT = PeftFormat(
    "SURGEON_COLA",
    keys=(
        *lowrank_keys(),
        PeftKey("chain_length", "chain_length", 3, INT),
        PeftKey("link_steps", "link_steps", 1000, INT),
    ),
    switches={"bias": "none"},
)


class COLALayer(AccumulatedLoRALayer):
    method = "cola"


@dataclass(frozen=True)
class COLA(AccumulatedLoRA):
    """Chain of LoRA (Xia et al., 2024)."""

    name = "cola"
    peft_format = PEFT_FORMAT
    layer_class = COLALayer

    dropout: float = 0.0
    chain_length: int = 3
    link_steps: int = 1000

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_probability(owner, "dropout", self.dropout)
        check_int(owner, "chain_length", self.chain_length)
        check_int(owner, "link_steps", self.link_steps)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {"default": cls(rank=4, targets=targets)}

    def boundary(self, step: int) -> bool:
        """Whether step ``step`` (from 0) ends a link that another follows."""
        done = step + 1
        return done % self.link_steps == 0 and done // self.link_steps < self.chain_length

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """At a boundary: merge the link's LoRA, start the next, drop A's and B's optimizer
        state."""
        optimizer = require_optimizer(type(self).__name__, optimizer)
        if self.boundary(step):
            for factor in restart_factors(layers):
                optimizer.state.pop(factor, None)
