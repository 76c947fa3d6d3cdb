"""The best evaluation of a run, its weights, and early stopping.

All of it follows from the evaluation history (``Progress.eval_losses``), so a resumed run
derives it from its checkpoint: the best is the lowest eval loss (the earliest on ties), and
early stopping counts the evaluations in a row that did not lower the best loss before them by
more than a threshold (transformers' ``EarlyStoppingCallback``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from surgeon.checkpoint import set_store_buffers, store_buffers

History = Sequence[tuple[int, float]]


def best_evaluation(eval_losses: History) -> tuple[int, float] | None:
    """``(step, loss)`` of the lowest eval loss, the earliest on ties; a NaN loss is never it."""
    best = None
    for step, loss in eval_losses:
        if not math.isnan(loss) and (best is None or loss < best[1]):
            best = (step, loss)
    return best


def evaluations_without_improvement(eval_losses: History, threshold: float) -> int:
    """How many of the latest evaluations in a row did not lower the best loss before each of
    them by more than ``threshold`` (the best still follows every lower loss, as in
    transformers, where the callback compares with the best before the evaluation)."""
    best, count = None, 0
    for _, loss in eval_losses:
        count = 0 if best is None or best - loss > threshold else count + 1
        if not math.isnan(loss) and (best is None or loss < best):
            best = loss
    return count


@dataclass
class Snapshot:
    """A copy of the trained tensors (on their device; FSDP keeps its local shards) and of the
    adapter store's buffers at one step."""

    step: int
    params: list[torch.Tensor]
    buffers: Mapping[str, torch.Tensor | None]

    @classmethod
    @torch.no_grad()
    def take(cls, step: int, params: Sequence[torch.Tensor], cm: object) -> Snapshot:
        buffers = {
            name: None if value is None else value.clone()
            for name, value in store_buffers(cm).items()
        }
        return cls(step, [p.detach().clone() for p in params], buffers)

    @torch.no_grad()
    def restore(self, params: Sequence[torch.Tensor], cm: object) -> None:
        for param, value in zip(params, self.params, strict=True):
            param.copy_(value)
        set_store_buffers(cm, self.buffers)
