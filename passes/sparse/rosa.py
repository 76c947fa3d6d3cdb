"""RoSA: robust adaptation, a low-rank and a sparse update trained together (Nikdan, Tabesh,
Crnčević, Alistarh, ICML 2024, arXiv 2401.04679, §3).

``h = W x + b + s · B A dropout(x) + S x``: LoRA's ``A`` (r x in, kaiming-uniform) and ``B``
(out x r, zero) scaled by ``s = alpha / r`` (``alpha / √r`` with ``rslora``), and a sparse
``S`` (out x in) that holds ``int(density · out · in)`` trained values (zero at first) on a mask
chosen from the gradients of W (the paper's mask generation).

The schedule (the paper's ``wl<warmup>``): the first ``warmup`` training steps train LoRA alone;
the next ``mask_steps`` steps also collect W's gradient ``∇W = grad_outᵀ · x``, which the layer
computes itself in backward (the user's W never requires a gradient), accumulated per backward
call as a sum (``accumulation="mean"``) or a sum of squares (``"mean_squared"``, the diagonal
Fisher, the paper's default); the ranking of the sum is the mean's. After the last of those steps
(`RoSA.after_backward`, which `surgeon.train` calls after each optimizer step; a custom loop calls
``cm.update_ranks(step, optimizer)``) each layer keeps the positions of the largest accumulated
``|∇W|`` as its mask (under torch.distributed, of the sums of all processes) and trains the
values there from the next step, their optimizer moments restarted (the optimizer has to be
passed). Until then the values stand on placeholder positions (the first entries in row-major
order) and get a zero gradient: they stay zero while training, so the layer is LoRA alone. The layer's step count and gradient sums are buffers, so a training
checkpoint resumes across the mask step exactly; the step count and the positions are saved in
adapter files too, so a loaded adapter continues from its phase (gradient sums are not saved).

``S x`` runs as a sparse product (``torch.sparse.mm``; dense on the meta device) in a custom
autograd function whose backward forms ``∇W`` once (a transient out x in matrix) for the
collection and for the values' gradient (``∇W`` at the mask). Merging adds ``s · B A`` and the
dense ``S`` to W. With a half-precision base the adapter's tensors are float32 and its terms run
in float32, as LoRA's; the dropout (training only) acts on LoRA's input, not on S's.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_ROSA"`` (PEFT has no
RoSA; its loader refuses such a file), with the authors' peft-rosa config keys (``r``, ``d``,
``lora_alpha``, ``lora_dropout``, ``schedule``, ``spa_num_grads``, ``grad_acc_mode``, ...). Per
layer: ``rosa_A.weight``, ``rosa_B.weight``, ``rosa_spa.values`` (count), ``rosa_spa.indices``
(2 x count int32, rows then columns) and ``rosa_spa.steps`` (the schedule's step count).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (S indexes the out x in update either way).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_probability,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import (
    BOOL,
    INT,
    NUMBER,
    STRING,
    PeftFormat,
    PeftKey,
    choices,
    is_off,
    selection_keys,
)
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_ROSA"
"""This project's own PEFT type: PEFT has no RoSA, and must not read the file as anything else."""

ACCUMULATIONS = ("mean_squared", "mean")
BIAS_MODES = ("none", "all", "rosa_only")


def _warmup_from_schedule(value: Any, config: Mapping[str, Any], where: str) -> int:
    """peft-rosa's ``schedule``: ``wl<N>`` (N LoRA-only steps before the mask's), ``default``/
    ``df`` (``wl0``); the schedules that freeze a part are refused."""
    if value in (None, "default", "df"):
        return 0
    match = re.fullmatch(r"wl(\d+)", value)
    if match is None:
        raise SpecError(
            f"{where}: schedule={value!r} is not supported (supported: 'wl<warmup steps>', "
            f"'default'); 'spa_only' and 'lora_only' freeze a part surgeon's RoSA trains"
        )
    return int(match.group(1))


def _refuse_set(what: str) -> Any:
    """A loader refusing any value but an unset one (null, false, empty) for a peft-rosa key surgeon does not do."""

    def load(value: Any, config: Mapping[str, Any], where: str) -> None:
        if not is_off(value):
            raise SpecError(f"{where}: {what}={value!r} is not supported: {REFUSALS[what]}")

    return load


REFUSALS = {
    "mask_load_path": "masks come from the gradients, or from an adapter file's rosa_spa.indices",
    "mask_save_path": "the chosen masks are saved in the adapter file (rosa_spa.indices)",
    "terminate_after_mask_generation": "training goes on after the mask step",
    "rosa_dtype": "surgeon keeps the adapter in the base weight's dtype (float32 over half)",
    "rank_pattern": "every layer has the rank r",
    "alpha_pattern": "every layer has the scale of lora_alpha",
    "density_pattern": "every layer has the density d",
}

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("d", "density", 0.003, NUMBER),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("use_rslora", "rslora", False, BOOL),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey(
            "schedule",
            "warmup",
            None,
            STRING.optional(),
            save=lambda spec, paths: f"wl{spec.warmup}",
            load=_warmup_from_schedule,
        ),
        PeftKey("spa_num_grads", "mask_steps", 1, INT),
        PeftKey(
            "grad_acc_mode",
            "accumulation",
            "mean_squared",
            STRING,
            load=choices({a: a for a in ACCUMULATIONS}, "grad_acc_mode"),
        ),
        *(PeftKey(key, None, None, load=_refuse_set(key)) for key in REFUSALS),
    ),
    # fan_in_fan_out is implied by the layer type; init_lora_weights=False draws A, B that the
    # file's weights replace
    constants={"fan_in_fan_out": False, "init_lora_weights": True},
    # how peft-rosa's kernels lay S out in memory: the same numbers either way
    ignored=frozenset({"impl", "spa_store_transpose"}),
)


@dataclass(frozen=True)
class RoSA(MethodSpec):
    """Robust adaptation: LoRA plus a sparse update on a mask chosen from W's gradients.

    ``rank``, ``alpha``, ``dropout``, ``rslora``: LoRA's. ``density``: the share of each
    weight's entries the sparse part trains. ``warmup``: LoRA-only steps before the mask's
    gradients are collected; ``mask_steps``: the steps whose gradients choose the mask;
    ``accumulation``: ``mean_squared`` (the paper's default) or ``mean`` of those gradients.
    ``bias``: ``all`` or ``rosa_only`` also train the base biases.
    """

    name = "rosa"
    peft_format = PEFT_FORMAT

    rank: int = 8
    density: float = 0.003
    alpha: float = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    warmup: int = 0
    mask_steps: int = 1
    accumulation: str = "mean_squared"
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_number(owner, "density", self.density, 0, 1, high_inclusive=True)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)
        check_bool(owner, "rslora", self.rslora)
        check_int(owner, "warmup", self.warmup, minimum=0)
        check_int(owner, "mask_steps", self.mask_steps)
        check_choice(owner, "accumulation", self.accumulation, ACCUMULATIONS)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the paper's default schedule; then rsLoRA's scale with dropout (the schedule options
        # change no forward: the card trains through the mask step)
        return {
            "default": cls(rank=2, density=0.05, targets=targets),
            "rslora-dropout-mean": cls(
                rank=2,
                alpha=3,
                density=0.1,
                dropout=0.1,
                rslora=True,
                warmup=2,
                mask_steps=2,
                accumulation="mean",
                targets=targets,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def create_layer(self, layer: nn.Module, path: str) -> RoSALayer:
        fan_in, fan_out = in_out_features(layer)
        count = int(self.density * (fan_out * fan_in))  # peft-rosa's int(d · numel)
        if count < 1:
            raise SpecError(
                f"RoSA.density={self.density} on {path}: leaves none of its {fan_in * fan_out} "
                f"weight entries to train; raise the density"
            )
        return RoSALayer(layer, self, path, count)

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Count the step in every layer's schedule; after the last gradient-collecting step,
        choose the masks (`SparsePart.end_step`)."""
        for layer in layers.values():
            if isinstance(layer, RoSALayer):
                layer.spa.end_step(optimizer)


class SparsePart(nn.Module):
    """``S``: ``values`` (trained) at ``indices`` (2 x count, rows then columns) of the out x in
    update, the schedule's step count ``steps``, and while gradients are collected their sum
    ``collected`` (out x in; None otherwise)."""

    def __init__(
        self, spec: RoSA, path: str, weight: torch.Tensor, shape: tuple[int, int], count: int
    ) -> None:
        super().__init__()
        self.path = path
        self.shape = shape
        self.collect_from = spec.warmup
        self.mask_at = spec.warmup + spec.mask_steps
        self.squared = spec.accumulation == "mean_squared"
        self.values = nn.Parameter(torch.zeros(count, **adapter_tensor_kwargs(weight)))
        flat = torch.arange(count, device=weight.device)  # placeholders until the mask
        rows, columns = flat // shape[1], flat % shape[1]
        self.register_buffer("indices", torch.stack((rows, columns)).to(torch.int32))
        self.register_buffer("steps", torch.zeros(1, dtype=torch.int64, device=weight.device))
        self.register_buffer("collected", None)
        self._kept: tuple[tuple, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``S x`` over the last dimension of ``x``."""
        return SparseProduct.apply(x, self.values, self)

    def steps_done(self) -> int:
        """The schedule's step count, read once per value of the buffer (a device read)."""
        key = (self.steps.data_ptr(), self.steps._version, self.steps.device)
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, int(self.steps.item()))
        return self._kept[1]

    @property
    def has_mask(self) -> bool:
        return self.steps_done() >= self.mask_at

    @property
    def collecting(self) -> bool:
        return self.collect_from <= self.steps_done() < self.mask_at

    def dense(self) -> torch.Tensor:
        """``S`` as an out x in matrix in the values' dtype."""
        rows, columns = self.indices.long()
        zeros = self.values.new_zeros(self.shape)
        return zeros.index_put((rows, columns), self.values, accumulate=True)

    @torch.no_grad()
    def collect(self, gradient: torch.Tensor) -> None:
        """Add one backward call's ``∇W`` (squared for ``mean_squared``) to the sum."""
        term = gradient.square() if self.squared else gradient
        self.collected = term if self.collected is None else self.collected.add_(term)

    @torch.no_grad()
    def end_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """One training step done: after the last collecting step, choose the mask."""
        done = self.steps_done()
        if done >= self.mask_at:
            return
        if done == self.mask_at - 1:
            self.choose_mask(optimizer)
        self.steps.add_(1)

    @torch.no_grad()
    def choose_mask(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The positions of the largest accumulated ``|∇W|`` (row-major order) become the mask;
        the values restart at zero with fresh optimizer moments (the paper starts training S
        there)."""
        if optimizer is None:
            raise SpecError(
                f"RoSA on {self.path}: choosing the mask restarts the optimizer's moments of the "
                f"sparse values; pass the optimizer: cm.update_ranks(step, optimizer)"
            )
        if self.collected is None:
            raise SpecError(
                f"RoSA on {self.path}: no gradient reached the layer during the mask's "
                f"{self.mask_at - self.collect_from} step(s); the mask cannot be chosen"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each process summed its own batches' gradients: one mask for all of them
            torch.distributed.all_reduce(self.collected)
        scores = self.collected.abs().flatten()
        flat = torch.topk(scores, self.values.numel()).indices.sort().values
        rows, columns = flat // self.shape[1], flat % self.shape[1]
        self.indices.copy_(torch.stack((rows, columns)).to(torch.int32))
        self.values.zero_()
        optimizer.state.pop(self.values, None)
        self.collected = None


class SparseProduct(torch.autograd.Function):
    """``S x`` with the values' gradient taken from ``∇W = grad_outᵀ x``, formed once per
    backward: the sum for the mask takes it while the part collects, the values' gradient is
    its entries at the mask once the mask exists (zero before: the values wait for it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, part: SparsePart) -> torch.Tensor:
        indices = part.indices.long()
        ctx.save_for_backward(x, values, indices)
        ctx.part = part
        flat = x.reshape(-1, x.shape[-1])
        out = _sparse_times(indices, values, part.shape, flat)
        return out.reshape(*x.shape[:-1], part.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, values, indices = ctx.saved_tensors
        part: SparsePart = ctx.part
        grad_flat = grad.reshape(-1, grad.shape[-1]).to(values.dtype)
        x_flat = x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            shape = (part.shape[1], part.shape[0])
            grad_x = _sparse_times(indices.flip(0), values, shape, grad_flat)
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        collecting, has_mask = part.collecting, part.has_mask
        if not (collecting or has_mask):
            return grad_x, torch.zeros_like(values), None
        gradient = grad_flat.t() @ x_flat  # ∇W, out x in
        if collecting:
            part.collect(gradient)
        grad_values = gradient[indices[0], indices[1]] if has_mask else torch.zeros_like(values)
        return grad_x, grad_values, None


def _sparse_times(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], x: torch.Tensor
) -> torch.Tensor:
    """``x Mᵀ`` (rows of x times M, n x shape[0]) for ``M`` of ``shape`` holding ``values`` at
    ``indices``: a sparse product; dense on the meta device, which has no sparse kernels."""
    if x.is_meta:
        dense = values.new_zeros(shape).index_put((indices[0], indices[1]), values, accumulate=True)
        return x @ dense.t()
    matrix = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False)
    return torch.sparse.mm(matrix, x.t()).t()


class RoSALayer(AdapterLayer):
    """``lora_A`` (r x in), ``lora_B`` (out x r) and the sparse part ``spa`` of one layer;
    float32 over a half-precision base, as LoRA's."""

    method = "rosa"
    loraplus_b = ("lora_B",)

    def __init__(self, base: nn.Module, spec: RoSA, path: str, count: int) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        fan_in, fan_out = in_out_features(base)
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.scale = spec.scale
        self.lora_A = nn.Parameter(torch.empty(spec.rank, fan_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, spec.rank, **factory))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.spa = SparsePart(spec, path, weight, (fan_out, fan_in), count)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        cast = self.lora_A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.lora_A.dtype) if cast else x
        dropped = ctx.module("dropout", self.dropout, h) if self.dropout is not None else h
        low = ctx.call(F.linear, dropped, ctx.attr("lora_A", self.lora_A))
        low = ctx.call(
            F.linear, ctx.call(torch.mul, low, self.scale), ctx.attr("lora_B", self.lora_B)
        )
        sparse = ctx.module("spa", self.spa, h)
        out = ctx.call(torch.add, base_out, ctx.call(torch.add, low, sparse))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        delta = self.scale * (self.lora_B @ self.lora_A) + self.spa.dense()
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "rosa_A.weight": self.lora_A,
            "rosa_B.weight": self.lora_B,
            "rosa_spa.values": self.spa.values,
            "rosa_spa.indices": self.spa.indices,
            "rosa_spa.steps": self.spa.steps,
        }
