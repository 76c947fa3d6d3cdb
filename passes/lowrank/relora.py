"""ReLoRA (Lialin et al., 2023, arXiv 2307.05695): LoRA restarted every ``T`` steps.

``base(x) + D x + scale * B(A(dropout(x)))``. Every ``restart_every`` optimizer steps (§3) the
LoRA product is merged, ``D += scale * B A``, A is drawn again as LoRA draws it (B zero), the
optimizer moments of A and B are pruned by magnitude (``prune_ratio`` of each, 0.99 as the
paper's partial reset; 1 resets them fully, 0 keeps them) and the learning rate re-warms: the
paper's jagged schedule (Fig. 2) is `ReLoRA.lr_factor`, 0 at each restart and back to 1 over
``rewarm_steps`` linearly, multiplying `surgeon.train`'s schedule (a cosine one gives the jagged
cosine). The paper's full-rank warm start before the first LoRA is not part of the method here.

The shared part of the accumulating methods lives here too (COLA and Delta-LoRA import it):
`RestartedLoRA`, the restarts with their optimizer resets (COLA's too), and
`AccumulatedLoRALayer`, LoRA plus a frozen dense delta ``D`` per layer, in the base weight's
layout and the adapter's dtype, zero at first, so a fresh adapter is the base. ``D`` is not
written into the user's weight: the adapter stays removable, and the file holds it (key
``lora_delta.weight`` besides ``lora_A.weight``/``lora_B.weight``), so `surgeon.load` on a fresh
base gives the trained model. Merging folds ``D + scale * B A``.

Layers: LoRA's full-precision ones (Linear, Conv1d/2d/3d, Embedding, GPT-2's ``Conv1D``).
Files: PEFT's layout under this project's own type ``SURGEON_RELORA`` (PEFT has no ReLoRA).
The restarts run in `ReLoRA.after_backward` (inside `surgeon.train`; a custom loop calls
``cm.update_ranks(step, optimizer)`` after ``optimizer.step()`` and applies ``cm.lr_factor``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_int, check_number, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_dtype, layer_kind
from surgeon.passes.lowrank.lora import LoRALayer
from surgeon.peft import BOOL, INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec


def lowrank_keys(dropout: bool = True) -> tuple[PeftKey, ...]:
    """The LoRA keys the accumulating methods share (``lora_dropout`` where they have one)."""
    keys = [
        PeftKey("r", "rank", 8, INT),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        *selection_keys(),
        PeftKey("use_rslora", "rslora", False, BOOL),
    ]
    if dropout:
        keys.append(PeftKey("lora_dropout", "dropout", 0.0, NUMBER))
    return tuple(keys)


PEFT_FORMAT = PeftFormat(
    "SURGEON_RELORA",
    keys=(
        *lowrank_keys(),
        PeftKey("restart_every", "restart_every", 5000, INT),
        PeftKey("rewarm_steps", "rewarm_steps", 50, INT),
        PeftKey("prune_ratio", "prune_ratio", 0.99, NUMBER),
    ),
    switches={"bias": "none"},
)


@dataclass(frozen=True)
class AccumulatedLoRA(MethodSpec):
    """The fields and layers the accumulating LoRA methods share (not a method itself)."""

    layer_class: ClassVar[type[AccumulatedLoRALayer]]

    rank: int = 8
    alpha: float = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    rslora: bool = False
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        check_bool(owner, "rslora", self.rslora)

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) is not None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def create_layer(self, layer: nn.Module, path: str) -> AccumulatedLoRALayer:
        dropout = getattr(self, "dropout", 0.0)
        return self.layer_class(layer, path, self.rank, self.scale, dropout)


class AccumulatedDelta(nn.Module):
    """The frozen dense delta ``D`` (buffer ``weight``), called from the graph as a module so
    the graph reads whatever tensor the buffer holds (a checkpoint restores buffers by
    replacing them)."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        dtype = adapter_dtype(like)
        self.register_buffer("weight", torch.zeros(like.shape, dtype=dtype, device=like.device))

    def forward(self) -> torch.Tensor:
        return self.weight


class AccumulatedLoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` (default init) and ``lora_delta`` (`AccumulatedDelta`)."""

    method = "relora"
    fuses_as = None  # the fused LoRA kernel knows nothing of D

    def __init__(self, base: nn.Module, path: str, rank: int, scale: float, dropout: float) -> None:
        super().__init__(base, path, rank, scale, dropout, "default")
        self.lora_delta = AccumulatedDelta(base.weight)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        # D reads the undropped input, as the merged weight would; LoRA adds on top
        delta = ctx.module("lora_delta", self.lora_delta)
        if self.kind == "embedding":
            dense = ctx.call(F.embedding, x, delta)
        else:
            cast = self.lora_A.dtype != self.base.weight.dtype
            h = ctx.method("to", x, self.lora_A.dtype) if cast else x
            if self.kind == "linear":
                dense = ctx.call(F.linear, h, delta)
            elif self.kind == "conv1d_gpt2":
                dense = ctx.call(torch.matmul, h, delta)
            else:
                conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
                dense = ctx.call(conv, h, delta, None, self.base.stride, self.base.padding)
        return super().emit(ctx, x, ctx.call(torch.add, base_out, dense))

    def product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``scale * B A`` for factors ``a``, ``b`` (shaped as the layer's) in the base weight's
        layout: LoRA's fold of other factors than the layer's own (Delta-LoRA's previous ones)."""
        if self.kind == "conv" and any(k != 1 for k in self.base.kernel_size):
            conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
            return conv(a.transpose(0, 1), b).transpose(0, 1) * self.scale
        low = b.flatten(1) @ a.flatten(1)
        if self.kind == "conv":
            low = low.view(b.shape[0], a.shape[1], *a.shape[2:])
        elif self.kind != "linear":  # embeddings and GPT-2's Conv1D store (in, out)
            low = low.t()
        return low * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.lora_delta.weight + self.product(self.lora_A, self.lora_B)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_delta.weight": self.lora_delta.weight}

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_A, self.lora_B

    @torch.no_grad()
    def merge_and_restart(self) -> None:
        """``D += scale * B A``; A drawn again as LoRA draws it, B zero (embeddings: A zero,
        B normal): the output stays what it was."""
        self.lora_delta.weight.add_(self.product(self.lora_A, self.lora_B))
        self._initialise("default", self.path)


def require_optimizer(owner: str, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    """``optimizer``, or a `SpecError` for a custom loop that did not pass it."""
    if optimizer is None:
        raise SpecError(
            f"{owner} resets the optimizer's moments when it restarts its factors: call "
            f"cm.update_ranks(step, optimizer) with the optimizer that just stepped"
        )
    return optimizer


def restart_factors(layers: Mapping[str, AdapterLayer]) -> list[nn.Parameter]:
    """Merge and restart every layer; the factors whose optimizer state now belongs to a
    LoRA that no longer exists."""
    factors = []
    for layer in layers.values():
        layer.merge_and_restart()
        factors += layer.factors()
    return factors


@torch.no_grad()
def prune_moments(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], ratio: float
) -> None:
    """Zero the ``ratio`` smallest-magnitude entries of every moment the optimizer keeps for
    ``params`` (its state tensors shaped as the parameter: Adam's two moments, SGD's momentum);
    step counters stay."""
    for param in params:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.is_floating_point() and value.shape == param.shape:
                zero_smallest(value, ratio)


def zero_smallest(tensor: torch.Tensor, ratio: float) -> None:
    """Zero (in place) the ``floor(ratio * n)`` entries of smallest magnitude (ties at the
    threshold go too, as ReLoRA's ``|m| > quantile`` mask)."""
    count = int(ratio * tensor.numel())
    if count >= tensor.numel():
        tensor.zero_()
    elif count > 0:
        magnitude = tensor.abs()
        threshold = magnitude.flatten().kthvalue(count).values
        tensor.mul_(magnitude > threshold)


@dataclass(frozen=True)
class RestartedLoRA(AccumulatedLoRA):
    """The accumulating methods that merge their LoRA into ``D`` at some steps and start a
    fresh one (ReLoRA, COLA): LoRA's dropout, and the restarts in `after_backward`, where the
    optimizer that just stepped drops what it kept for the old factors (not a method itself)."""

    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_probability(type(self).__name__, "dropout", self.dropout)

    def restarts_after(self, step: int) -> bool:
        """Whether step ``step`` (from 0) ends a LoRA that a fresh one follows."""
        raise NotImplementedError

    def reset_state(self, optimizer: torch.optim.Optimizer, factors: list[nn.Parameter]) -> None:
        """What the optimizer keeps of its state for the restarted ``factors``."""
        raise NotImplementedError

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """After a step that ends a LoRA: merge it, start the next, reset the optimizer's state
        of the factors."""
        optimizer = require_optimizer(type(self).__name__, optimizer)
        if self.restarts_after(step):
            self.reset_state(optimizer, restart_factors(layers))


@dataclass(frozen=True)
class ReLoRA(RestartedLoRA):
    """LoRA with periodic merge-and-restart (Lialin et al., 2023)."""

    name = "relora"
    peft_format = PEFT_FORMAT
    layer_class = AccumulatedLoRALayer

    restart_every: int = 5000
    rewarm_steps: int = 50
    prune_ratio: float = 0.99

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_int(owner, "restart_every", self.restart_every)
        check_int(owner, "rewarm_steps", self.rewarm_steps, minimum=0)
        check_number(owner, "prune_ratio", self.prune_ratio, 0, 1, True, True)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, targets=targets),
            "rslora-dropout": cls(rank=2, alpha=3, rslora=True, dropout=0.1, targets=targets),
        }

    def restarts_after(self, step: int) -> bool:
        """Every ``restart_every``-th step."""
        return (step + 1) % self.restart_every == 0

    def reset_state(self, optimizer: torch.optim.Optimizer, factors: list[nn.Parameter]) -> None:
        """The paper's partial reset: the moments pruned by magnitude (``prune_ratio``)."""
        prune_moments(optimizer, factors, self.prune_ratio)

    def lr_factor(self, step: int) -> float:
        """1 until the first restart; then at each restart 0, rising linearly to 1 over
        ``rewarm_steps`` steps."""
        since = step % self.restart_every
        if step < self.restart_every or since >= self.rewarm_steps:
            return 1.0
        return since / self.rewarm_steps
