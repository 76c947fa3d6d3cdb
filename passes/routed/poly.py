"""Poly (Ponti et al., 2022, "Combining Modular Skills in Multitask Learning",
https://arxiv.org/abs/2202.13914) and MHR (Caccia et al., 2022, "Multi-Head Adapter Routing for
Cross-Task Generalization", https://arxiv.org/abs/2211.03831): per layer an inventory of LoRA
skills, mixed per task by a learned router.

``W x + x·A_t·B_t / r`` with ``A_t = Σ_s w_ts A_s`` and ``B_t = Σ_s w_ts B_s``: ``t`` is the
row's task (``task_ids``, one per batch row, passed in the model call), ``w_t`` the router's
weights over the ``skills`` skills. With ``splits > 1`` (MHR) the input and output features are
cut into ``splits`` blocks and each block has weights of its own (``A``: splits x skills x
in/splits x r, PEFT's ``poly_lora_A``; ``B``: splits x skills x r x out/splits,
``poly_lora_B``). The router holds one logit per (task, split, skill) (PEFT's
``poly_router.module_logits``): in eval ``w = sigmoid(logits)``, in training a relaxed-Bernoulli
sample at temperature 1 (drawn from torch's global generator, as PEFT draws it), then
normalised to sum to one over the skills.

Initialisation is PEFT's, in its order from torch's global generator: per layer, A's blocks
Kaiming-uniform (skill by skill, split by split), B zero (``init_weights=False``: Kaiming-uniform
too), the router's logits uniform in ±1e-3. A fresh adapter leaves the model unchanged.

The update depends on each row's task, so Poly does not merge (nor export, which merges).

Layers: Linear (the only type PEFT's Poly supports), whose input and output features divide
into ``splits`` blocks; inputs of any rank (PEFT's takes batch x tokens x features only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.distributions import RelaxedBernoulli

import surgeon.rewrite
from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_int
from surgeon.errors import SpecError
from surgeon.layers import layer_kind, through_base_dtype
from surgeon.peft import BOOL, INT, STRING, PeftFormat, PeftKey, choices, selection_keys
from surgeon.spec import MethodSpec

EPS = 1e-12
"""Added to the sum of the mixing weights before dividing by it (PEFT's)."""

ROUTER_INIT = 1e-3
"""The router's logits start uniform in ±ROUTER_INIT (PEFT's)."""

PEFT_FORMAT = PeftFormat(
    "POLY",
    # PEFT's Poly has exclude_modules but no layers_to_transform: a selection by layer index
    # is written out as the chosen module paths
    keys=(
        *selection_keys(layers=False),
        PeftKey("r", "rank", 8, INT),
        PeftKey("n_tasks", "tasks", 1, INT),
        PeftKey("n_skills", "skills", 4, INT),
        PeftKey("n_splits", "splits", 1, INT),
        PeftKey("init_weights", "init_weights", True, BOOL),
        # the only router PEFT has; another value would be a router surgeon does not know
        PeftKey("poly_type", None, "poly", STRING, load=choices({"poly": None}, "poly_type")),
    ),
)


@dataclass(frozen=True)
class Poly(MethodSpec):
    """Poly / MHR: per-task mixtures of an inventory of LoRA skills (``splits > 1``: MHR's
    per-block mixtures). Every call takes ``task_ids``, one task index per batch row."""

    name = "poly"
    peft_format = PEFT_FORMAT
    merge_refusal = (
        "Poly mixes its skills by each row's task_ids, so it has no single weight update to fold"
    )

    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank: int = 8
    tasks: int = 1
    skills: int = 4
    splits: int = 1
    init_weights: bool = True
    """PEFT's init (B zero: a fresh adapter is a no-op); False draws B Kaiming-uniform too."""

    def validate(self) -> None:
        owner = type(self).__name__
        for field in ("rank", "tasks", "skills", "splits"):
            self._set(field, check_int(owner, field, getattr(self, field)))
        self._set("init_weights", check_bool(owner, "init_weights", self.init_weights))

    def supports(self, layer: nn.Module) -> bool:
        # MHR cuts the input and output features into `splits` equal blocks
        return (
            layer_kind(layer) == "linear"
            and layer.in_features % self.splits == 0
            and layer.out_features % self.splits == 0
        )

    def create_layer(self, layer: nn.Module, path: str) -> PolyLayer:
        return PolyLayer(layer, self)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # MHR (blocks of the features, each mixed apart; first, so the suite picks layers
        # whose features split) and plain Poly; both with several tasks, so rows of different
        # tasks get different updates
        return {
            "mhr": cls(targets=targets, rank=2, tasks=3, skills=2, splits=2),
            "poly": cls(targets=targets, rank=4, tasks=2, skills=3),
        }


def kaiming_blocks(
    splits: int, skills: int, rows: int, cols: int, weight: torch.Tensor
) -> torch.Tensor:
    """(splits, skills, rows, cols) blocks, each the transpose of a (cols, rows) matrix drawn
    Kaiming-uniform as nn.Linear inits its weight (fan-in ``rows``), skill by skill and split
    by split from torch's global generator on the CPU: PEFT's draws, in its order. On the meta
    device nothing is drawn."""
    if weight.is_meta:
        return torch.empty(splits, skills, rows, cols, device="meta", dtype=weight.dtype)
    blocks = torch.empty(splits, skills, rows, cols)
    for skill in range(skills):
        for split in range(splits):
            drawn = torch.empty(cols, rows)
            nn.init.kaiming_uniform_(drawn, a=math.sqrt(5))
            blocks[split, skill] = drawn.T
    return blocks


class PolyRouter(nn.Module):
    """Mixing weights (batch x splits x skills) of each row's task, from the router's logits;
    a module of its own so that the rewritten graph shows the routing."""

    def __init__(self, splits: int, skills: int) -> None:
        super().__init__()
        self.splits = splits
        self.skills = skills

    def forward(
        self, logits: torch.Tensor, task_ids: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        task_ids = checked_task_ids(task_ids, x.shape[0], logits.shape[0]).to(logits.device)
        chosen = logits[task_ids].view(-1, self.splits, self.skills)
        if self.training:
            weights = RelaxedBernoulli(1.0, logits=chosen, validate_args=False).rsample()
        else:
            weights = torch.sigmoid(chosen)
        return weights / (weights.sum(dim=-1, keepdim=True) + EPS)


def checked_task_ids(task_ids: torch.Tensor, rows: int, tasks: int) -> torch.Tensor:
    """``task_ids`` as indices, after checking there is one per row and each names a task."""
    if task_ids.is_floating_point() or task_ids.is_complex() or task_ids.dtype == torch.bool:
        raise SpecError(f"poly: task_ids must hold integer task indices, got {task_ids.dtype}")
    if task_ids.shape != (rows,):
        raise SpecError(
            f"poly: task_ids has shape {tuple(task_ids.shape)}, expected ({rows},): one task "
            f"index per batch row"
        )
    checkable = not (task_ids.is_meta or torch.compiler.is_compiling())
    if checkable and bool(((task_ids < 0) | (task_ids >= tasks)).any()):
        raise SpecError(f"poly: task_ids {task_ids.tolist()} outside 0..{tasks - 1}")
    return task_ids.long()


def poly_update(
    x: torch.Tensor, weights: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """``x·A_t·B_t / r`` per row, where row b's factors are its mixture ``weights[b]`` of the
    skills, split by split. ``x`` is (batch, ..., in), in the factors' dtype."""
    batch, rank = x.shape[0], lora_a.shape[-1]
    mixed_a = torch.einsum("bqs,qsdr->bqdr", weights, lora_a).reshape(batch, -1, rank)
    mixed_b = torch.einsum("bqs,qsrd->bqrd", weights, lora_b)
    mixed_b = mixed_b.transpose(1, 2).reshape(batch, rank, -1)
    rows = x.reshape(batch, -1, x.shape[-1])
    update = rows.bmm(mixed_a).bmm(mixed_b) / rank
    return update.reshape(*x.shape[:-1], mixed_b.shape[-1])


class PolyLayer(AdapterLayer):
    """One layer's skills (``lora_A``, ``lora_B``) and router logits (``router_logits``);
    float32 over a half-precision base, as PEFT keeps them."""

    method = "poly"
    call_arguments = ("task_ids",)
    peft_names = {
        "lora_A": "poly_lora_A",
        "lora_B": "poly_lora_B",
        "router_logits": "poly_router.module_logits",
    }
    loraplus_b = ("lora_B",)

    def __init__(self, base: nn.Module, spec: Poly) -> None:
        super().__init__(base)
        splits, skills, rank = spec.splits, spec.skills, spec.rank
        weight = base.weight
        a = kaiming_blocks(splits, skills, base.in_features // splits, rank, weight)
        out_block = base.out_features // splits
        if spec.init_weights:
            b = torch.zeros(splits, skills, rank, out_block)
        else:
            b = kaiming_blocks(splits, skills, rank, out_block, weight)
        logits = torch.empty(spec.tasks, splits * skills, device="meta" if weight.is_meta else None)
        if not weight.is_meta:
            nn.init.uniform_(logits, -ROUTER_INIT, ROUTER_INIT)
        self.lora_A = nn.Parameter(through_base_dtype(a, weight))
        self.lora_B = nn.Parameter(through_base_dtype(b, weight))
        self.router_logits = nn.Parameter(through_base_dtype(logits, weight))
        self.router = PolyRouter(splits, skills)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        task_ids = ctx.call(surgeon.rewrite.call_argument, "task_ids", ctx.adapter, x)
        logits = ctx.attr("router_logits", self.router_logits)
        weights = ctx.module("router", self.router, logits, task_ids, x)
        lora_a, lora_b = ctx.attr("lora_A", self.lora_A), ctx.attr("lora_B", self.lora_B)
        x = ctx.method("to", x, self.lora_A.dtype) if self.lora_A.dtype != self._dtype() else x
        out = ctx.call(torch.add, base_out, ctx.call(poly_update, x, weights, lora_a, lora_b))
        # float32 skills promote a half-precision output; rounded back as PEFT's in-place sum
        return ctx.method("to", out, self._dtype()) if self.lora_A.dtype != self._dtype() else out

    def _dtype(self) -> torch.dtype:
        return self.base.weight.dtype
