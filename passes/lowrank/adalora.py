"""AdaLoRA: an SVD-shaped update whose rank budget is reallocated while training (Zhang et al., 2023).

``ΔW = P diag(Λ) Q · alpha / (initial_rank + 1e-5)``, stored under PEFT's names: ``lora_A`` is
``Q`` (r x in), ``lora_E`` is ``Λ`` (r x 1), ``lora_B`` is ``P`` (out x r). PEFT divides by its
``ranknum``, which always holds the initial rank (also after a rank pattern shrinks a layer), so
here the scale is a constant of the spec. ``Λ`` starts at zero: a fresh adapter changes nothing.

Rank allocation runs in `AdaLoRA.after_backward` (``cm.update_ranks(step)``): each step it keeps
exponential averages of every entry's sensitivity ``|θ·∇θ|`` and their uncertainty; every
``delta_t`` steps of the budgeting phase it zeroes the singular values of the least important
(P column, Λ entry, Q row) triplets across all layers, down to a budget that falls cubically from
the initial to ``target_rank`` per layer. At step ``total_steps - tfinal`` the allocation is fixed
and re-applied on every later step, as PEFT's ``update_and_allocate`` does. A save after an
allocation writes only the kept triplets and the final ``rank_pattern``, as PEFT does; a
``rank_pattern`` read from a file builds those smaller layers.

Layers: Linear, transformers' GPT-2 ``Conv1D`` and Conv2d (those PEFT's AdaLoRA supports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_int, check_number, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind, through_base_dtype
from surgeon.peft import INT, MAPPING, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

FACTORS = ("lora_A", "lora_E", "lora_B")
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5


def _paths_of_peft_rank_pattern(pattern: Any, config: Mapping[str, Any], where: str) -> dict:
    """PEFT keys a rank pattern by the ``lora_E`` parameter (``<path>.lora_E``, in memory with
    the adapter name after it); surgeon by the module path."""
    out = {}
    for key, flags in pattern.items():
        path, found, _ = str(key).rpartition(".lora_E")
        if not found:
            raise SpecError(
                f"{where}: rank_pattern key {key!r} does not name a lora_E parameter "
                f"(expected '<module path>.lora_E')"
            )
        out[path] = flags
    return out


PEFT_FORMAT = PeftFormat(
    "ADALORA",
    keys=(
        PeftKey("init_r", "initial_rank", 12, INT),
        PeftKey("target_r", "target_rank", 8, INT),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        PeftKey("beta1", "beta1", 0.85, NUMBER),
        PeftKey("beta2", "beta2", 0.85, NUMBER),
        PeftKey("tinit", "tinit", 0, INT),
        PeftKey("tfinal", "tfinal", 0, INT),
        PeftKey("deltaT", "delta_t", 1, INT),
        # PEFT refuses configs without total_step even for inference; the smallest valid one
        # stands in (it only matters for training)
        PeftKey(
            "total_step",
            "total_steps",
            None,
            INT.optional(),
            save=lambda spec, paths: spec.total_steps or spec.tinit + spec.tfinal + 1,
        ),
        PeftKey("orth_reg_weight", "orth_reg_weight", 0.5, NUMBER),
        PeftKey(
            "rank_pattern",
            "rank_pattern",
            {},
            MAPPING.optional(),
            save=lambda spec, paths: (
                {f"{p}.lora_E": list(flags) for p, flags in spec.rank_pattern.items()} or None
            ),
            load=_paths_of_peft_rank_pattern,
        ),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
    ),
    switches={"use_dora": False, "bias": "none"},
    # init_lora_weights only decides values the file replaces; fan_in_fan_out is implied by the
    # layer type
    constants={"fan_in_fan_out": False, "init_lora_weights": True},
    ignored=frozenset({"r", "alpha_pattern", "use_rslora"}),  # PEFT ignores them for AdaLoRA
)


@dataclass(frozen=True)
class AdaLoRA(MethodSpec):
    """Adaptive budget allocation for low-rank adaptation.

    ``rank_pattern`` (module path -> one flag per initial rank) is what PEFT saves after
    allocation: a layer keeps only the flagged triplets, still scaled by the initial rank.
    """

    name = "adalora"
    peft_format = PEFT_FORMAT

    initial_rank: int = 12
    target_rank: int = 8
    alpha: float = 16
    beta1: float = 0.85
    beta2: float = 0.85
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    total_steps: int | None = None
    orth_reg_weight: float = 0.5
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "initial_rank", self.initial_rank)
        check_int(owner, "target_rank", self.target_rank)
        if self.target_rank > self.initial_rank:
            raise SpecError(
                f"{owner}.target_rank={self.target_rank}: expected an integer <= initial_rank "
                f"({self.initial_rank}); allocation only removes ranks"
            )
        check_positive(owner, "alpha", self.alpha)
        check_number(owner, "beta1", self.beta1, 0, 1)
        check_number(owner, "beta2", self.beta2, 0, 1)
        check_int(owner, "tinit", self.tinit, minimum=0)
        check_int(owner, "tfinal", self.tfinal, minimum=0)
        check_int(owner, "delta_t", self.delta_t)
        if self.total_steps is not None:
            check_int(owner, "total_steps", self.total_steps)
            if self.tinit >= self.total_steps - self.tfinal:
                raise SpecError(
                    f"{owner}.tinit={self.tinit}: expected tinit < total_steps - tfinal "
                    f"({self.total_steps} - {self.tfinal}), or no step is left to reallocate "
                    f"ranks in; lower tinit or tfinal, or raise total_steps"
                )
        check_number(owner, "orth_reg_weight", self.orth_reg_weight, 0, low_inclusive=True)
        check_probability(owner, "dropout", self.dropout)
        self._set("rank_pattern", self._checked_rank_pattern(owner))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(initial_rank=4, target_rank=2, total_steps=10, targets=targets),
            "dropout": cls(initial_rank=3, target_rank=1, alpha=5, dropout=0.1, targets=targets),
        }

    def _checked_rank_pattern(self, owner: str) -> dict[str, tuple[bool, ...]]:
        if not isinstance(self.rank_pattern, Mapping):
            raise SpecError(
                f"{owner}.rank_pattern={self.rank_pattern!r}: expected a mapping of module path "
                f"-> list of {self.initial_rank} true/false flags"
            )
        out = {}
        for path, flags in self.rank_pattern.items():
            if not isinstance(path, str) or not path:
                raise SpecError(f"{owner}.rank_pattern: key {path!r} must be a module path")
            if (
                isinstance(flags, (str, bytes))
                or not isinstance(flags, Sequence)
                or len(flags) != self.initial_rank
                or not all(isinstance(f, bool) for f in flags)
            ):
                raise SpecError(
                    f"{owner}.rank_pattern[{path!r}]={flags!r}: expected a list of "
                    f"{self.initial_rank} true/false flags (one per initial rank)"
                )
            out[path] = tuple(flags)
        return out

    @property
    def scale(self) -> float:
        return self.alpha / (self.initial_rank + RANKNUM_EPS)

    def supports(self, layer: nn.Module) -> bool:
        kind = layer_kind(layer)
        return kind in ("linear", "conv1d_gpt2") or isinstance(layer, nn.Conv2d)

    def select(self, model: nn.Module) -> list[str]:
        paths = super().select(model)
        stray = sorted(set(self.rank_pattern) - set(paths))
        if stray:
            raise SpecError(
                f"{type(self).__name__}.rank_pattern: {stray[0]!r} is not a targeted module "
                f"(targeted: {', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''})"
            )
        return paths

    def peft_config_from_training(self, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """The final rank pattern: for each layer, which of the initial triplets are kept."""
        pattern = {p: list(f) for p, f in self.rank_pattern.items()}
        for path, layer in layers.items():
            if layer.kept is None:
                continue
            kept = iter(layer.kept.tolist())
            built = pattern.get(path, [True] * self.initial_rank)
            pattern[path] = [flag and next(kept) for flag in built]
        return {"rank_pattern": {f"{p}.lora_E": f for p, f in pattern.items()} or None}

    def create_layer(self, layer: nn.Module, path: str) -> AdaLoRALayer:
        flags = self.rank_pattern.get(path)
        rank = self.initial_rank if flags is None else sum(flags)
        return AdaLoRALayer(layer, path, rank, self.scale, self.dropout)

    # -- rank allocation -----------------------------------------------------------------------

    def budget_schedule(
        self, step: int, initial_budget: int, target_budget: int
    ) -> tuple[int, bool]:
        """The total rank budget at ``step`` and whether to mask down to it now, by PEFT's rule:
        the initial budget up to ``tinit``; then a cubic fall to the target, masking every
        ``delta_t`` steps, up to ``total_steps - tfinal``; the target, masked, after that."""
        total = self._total_steps()
        if step <= self.tinit:
            return initial_budget, False
        if step > total - self.tfinal:
            return target_budget, True
        left = 1 - (step - self.tinit) / (total - self.tfinal - self.tinit)
        budget = int((initial_budget - target_budget) * (left**3) + target_budget)
        return budget, step % self.delta_t == 0

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """PEFT's ``update_and_allocate``. Before step ``total_steps - tfinal``: update the
        importances and, when the schedule says so, mask down to the step's budget; at that
        step: fix the allocation; after it: zero the pruned singular values again (optimizer
        steps move them). Reads the gradients: call between ``loss.backward()`` and
        ``optimizer.zero_grad()``."""
        final = self._total_steps() - self.tfinal
        adapters: list[AdaLoRALayer] = list(layers.values())
        if step > final:  # the allocation is fixed: keep pruned singular values at zero
            for layer in adapters:
                layer.prune()
            return
        if step < final:
            for layer in adapters:
                layer.update_importance(self.beta1, self.beta2)
        initial = sum(layer.rows for layer in adapters)
        budget, due = self.budget_schedule(step, initial, self.target_rank * len(adapters))
        if due or step == final:
            allocate(adapters, budget)
        if step == final:
            for layer in adapters:
                layer.forget_importance()

    def _total_steps(self) -> int:
        if self.total_steps is None:
            raise SpecError(
                f"{type(self).__name__}.total_steps=None: rank allocation needs the number of "
                f"training steps; set total_steps"
            )
        return self.total_steps

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """``orth_reg_weight`` x the mean, over every P and Q, of ``‖QQᵀ - I‖_F`` and
        ``‖PᵀP - I‖_F`` (Frobenius norms, not squared: PEFT's term)."""
        if self.orth_reg_weight == 0:
            return None
        norms = []
        for layer in layers.values():
            a, b = layer.lora_A, layer.lora_B
            for gram in (a @ a.t(), b.t() @ b):
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                norms.append(torch.linalg.matrix_norm(gram - eye))
        return self.orth_reg_weight * torch.stack(norms).mean()


@torch.no_grad()
def allocate(layers: Sequence[AdaLoRALayer], budget: int) -> None:
    """Zero the singular values of all but the ``budget`` most important triplets across
    ``layers`` (scores tied with the threshold go too, as in PEFT)."""
    scores = [layer.triplet_scores() for layer in layers]
    pruned = sum(s.numel() for s in scores) - budget
    if pruned <= 0:
        keeps = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    else:
        threshold = torch.kthvalue(torch.cat(scores), pruned).values
        keeps = [~(s <= threshold) for s in scores]
    for layer, keep in zip(layers, keeps):
        layer.keep(keep)


class AdaLoRALayer(AdapterLayer):
    """``lora_A`` (Q, r x in), ``lora_E`` (Λ, r x 1) and ``lora_B`` (P, out x r) for one layer,
    plus its rank-allocation state (importance averages, the latest allocation)."""

    method = "adalora"
    loraplus_b = ("lora_B",)

    def __init__(self, base: nn.Module, path: str, rank: int, scale: float, dropout: float) -> None:
        super().__init__(base)
        self.kind = "conv2d" if isinstance(base, nn.Conv2d) else layer_kind(base)
        fan_in, fan_out = self._fans(base, path)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        factory = adapter_tensor_kwargs(base.weight)
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, **factory))
        self.lora_E = nn.Parameter(torch.empty(rank, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(fan_out, rank, **factory))
        # allocation state: not saved (PEFT saves neither), but moved with the model
        self.register_buffer("kept", None, persistent=False)
        for factor in FACTORS:
            self.register_buffer(f"{factor}_sensitivity", None, persistent=False)
            self.register_buffer(f"{factor}_uncertainty", None, persistent=False)
        self._initialise()

    def _fans(self, base: nn.Module, path: str) -> tuple[int, int]:
        if self.kind == "linear":
            return base.in_features, base.out_features
        if self.kind == "conv1d_gpt2":
            fan_in, fan_out = base.weight.shape  # GPT-2's Conv1D stores (in, out)
            return fan_in, fan_out
        if base.groups != 1 or base.padding_mode != "zeros":
            raise SpecError(
                f"AdaLoRA on {path}: convolutions with groups or non-zero padding_mode are not "
                f"supported (PEFT cannot apply them either)"
            )
        return base.weight[0].numel(), base.out_channels

    @torch.no_grad()
    def _initialise(self) -> None:
        """PEFT's init: Λ zero, P and Q normal(0, 0.02), drawn in float32 then rounded through
        the base dtype. PEFT first fills A, E, B and its ranknum with randn before overwriting
        them; drawing those too keeps the global generator in step, so a seed gives the same
        adapter here and there."""
        self.lora_E.zero_()
        if self.lora_A.is_meta:
            return
        for shape in (self.lora_A.shape, self.lora_E.shape, self.lora_B.shape, (1,)):
            torch.randn(shape)
        for factor in ("lora_A", "lora_B"):
            param = getattr(self, factor)
            drawn = torch.empty(param.shape).normal_(mean=0.0, std=0.02)
            param.copy_(through_base_dtype(drawn, self.base.weight))

    @property
    def rows(self) -> int:
        """Triplets this layer holds (the initial rank, or fewer when built from a rank pattern)."""
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        """Triplets the latest allocation kept."""
        return self.rows if self.kept is None else int(self.kept.sum())

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.lora_A)
        e = ctx.attr("lora_E", self.lora_E)
        b = ctx.attr("lora_B", self.lora_B)
        cast = self.lora_A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.lora_A.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        # Λ and the scale fold into one r-vector that multiplies the rank-r intermediate
        if self.kind == "conv2d":
            base = self.base
            kernel = ctx.method("view", a, self.rows, base.in_channels, *base.kernel_size)
            h = ctx.call(F.conv2d, h, kernel, None, base.stride, base.padding, base.dilation)
            weights = ctx.call(torch.mul, ctx.method("view", e, -1, 1, 1), self.scale)
            mix = ctx.method("view", b, self.lora_B.shape[0], self.rows, 1, 1)
            delta = ctx.call(F.conv2d, ctx.call(torch.mul, h, weights), mix)
        else:
            weights = ctx.call(torch.mul, ctx.method("view", e, -1), self.scale)
            h = ctx.call(F.linear, h, a)
            delta = ctx.call(F.linear, ctx.call(torch.mul, h, weights), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        delta = self.lora_B @ (self.lora_A * self.lora_E) * self.scale
        if self.kind == "conv2d":
            return delta.view(self.base.weight.shape)
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """Only the kept triplets, as PEFT saves after allocation (with the rank_pattern)."""
        if self.kept is None:
            return self.peft_tensors()
        rows = self.kept.nonzero().flatten()
        return {
            "lora_A": self.lora_A.index_select(0, rows),
            "lora_E": self.lora_E.index_select(0, rows),
            "lora_B": self.lora_B.index_select(1, rows),
        }

    # -- rank allocation -----------------------------------------------------------------------

    @torch.no_grad()
    def update_importance(self, beta1: float, beta2: float) -> None:
        """Exponential averages of each entry's sensitivity ``|θ·∇θ|`` and of its deviation
        from that average (the uncertainty), in PEFT's arithmetic."""
        for factor in FACTORS:
            param = getattr(self, factor)
            if param.grad is None:
                raise SpecError(
                    f"AdaLoRA rank allocation: {factor} has no gradient; call update_ranks(step) "
                    f"after loss.backward() and before optimizer.zero_grad()"
                )
            importance = (param * param.grad).abs()
            sensitivity = getattr(self, f"{factor}_sensitivity")
            uncertainty = getattr(self, f"{factor}_uncertainty")
            if sensitivity is None:
                sensitivity, uncertainty = torch.zeros_like(param), torch.zeros_like(param)
            sensitivity = beta1 * sensitivity + (1 - beta1) * importance
            uncertainty = beta2 * uncertainty + (1 - beta2) * (importance - sensitivity).abs()
            setattr(self, f"{factor}_sensitivity", sensitivity)
            setattr(self, f"{factor}_uncertainty", uncertainty)

    def triplet_scores(self) -> torch.Tensor:
        """One importance per triplet: Λ's entry plus the mean entry scores of its Q row and
        its P column (each entry scores sensitivity x uncertainty)."""
        if self.lora_A_sensitivity is None:
            raise SpecError(
                "AdaLoRA rank allocation: no importance recorded yet; call update_ranks(step) "
                "after every backward from the first step on"
            )
        a, e, b = (
            getattr(self, f"{f}_sensitivity") * getattr(self, f"{f}_uncertainty") for f in FACTORS
        )
        return e.view(-1) + (a.mean(dim=1) + b.mean(dim=0))

    @torch.no_grad()
    def keep(self, kept: torch.Tensor) -> None:
        """Record an allocation (one flag per triplet) and zero the pruned singular values."""
        self.kept = kept
        self.prune()

    @torch.no_grad()
    def prune(self) -> None:
        if self.kept is not None:
            self.lora_E.masked_fill_(~self.kept.view(-1, 1), 0.0)

    def forget_importance(self) -> None:
        for factor in FACTORS:
            setattr(self, f"{factor}_sensitivity", None)
            setattr(self, f"{factor}_uncertainty", None)
