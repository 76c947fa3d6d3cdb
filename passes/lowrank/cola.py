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
run in `COLA.after_backward` (ReLoRA's `RestartedLoRA`: inside `surgeon.train`; a custom loop
calls ``cm.update_ranks(step, optimizer)`` after ``optimizer.step()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from surgeon.checks import check_int
from surgeon.passes.lowrank.relora import AccumulatedLoRALayer, RestartedLoRA, lowrank_keys
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
class COLA(RestartedLoRA):
    """Chain of LoRA (Xia et al., 2024)."""

    name = "cola"
    peft_format = PEFT_FORMAT
    layer_class = COLALayer

    chain_length: int = 3
    link_steps: int = 1000

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_int(owner, "chain_length", self.chain_length)
        check_int(owner, "link_steps", self.link_steps)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {"default": cls(rank=4, targets=targets)}

    def restarts_after(self, step: int) -> bool:
        """At the end of every link but the last."""
        done = step + 1
        return done % self.link_steps == 0 and done // self.link_steps < self.chain_length

    def reset_state(self, optimizer: torch.optim.Optimizer, factors: list[nn.Parameter]) -> None:
        """All of it (moments and step count), as a new optimizer for the new LoRA."""
        for factor in factors:
            optimizer.state.pop(factor, None)
