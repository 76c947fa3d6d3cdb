"""UniLoRA: ``base(x) + B(A(dropout(x)))`` where every entry of every layer's A and B is an
entry of one trained vector θ_d, scaled (Li et al., 2025, "Uni-LoRA: One Vector Is All You
Need", https://arxiv.org/abs/2506.00799).

``A[i, j] = θ_d[I_A[i, j]] · s_A[i, j]`` (B alike): fixed indices ``I`` lay the adapter's
``D = Σ r·(in + out)`` LoRA entries, all layers in model order, A before B, onto θ_d's
``theta_d_length`` = d entries, each used ⌊D/d⌋ or ⌈D/d⌉ times, shuffled by ``seed``; an
entry's scale ``s`` is ``1/√(uses of its θ_d entry)``, so every θ_d entry spreads unit norm.
Only θ_d (one per adapter, shared by its layers) trains; it starts uniform in
``±init_theta_d_bound`` (``init="normal"``: standard normal), so a fresh adapter already
changes the outputs.

PEFT draws the indices with numpy's generator seeded with ``proj_seed`` and saves them (and
the scales) only with ``save_indices``: surgeon draws the same values in the same order, so
files without them load both ways to the same outputs. PEFT keys: ``base_model.unilora_theta_d``
(d,); with ``save_indices`` per layer ``unilora_indices_A`` / ``unilora_scales_A`` (r, in) and
``unilora_indices_B`` / ``unilora_scales_B`` (out, r), used as saved when loading. Scales are
rounded through the base weight's dtype and held in the adapter's (float32 over half
precision), as PEFT holds them.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's UniLoRA supports).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_bool, check_choice, check_int, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.layers import (
    adapter_tensor_kwargs,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, choices, selection_keys
from surgeon.spec import MethodSpec

BIAS_MODES = ("none", "all", "unilora_only")
INITS = ("uniform", "normal")
THETA_KEY = "base_model.unilora_theta_d"

PEFT_FORMAT = PeftFormat(
    "UNILORA",
    keys=(
        PeftKey("r", "rank", 4, INT),
        # PEFT's UniLoRA has no exclude_modules: a selection that uses it is written out as the
        # chosen module paths
        *selection_keys(exclude=False),
        PeftKey("theta_d_length", "theta_d_length", 256, INT),
        PeftKey("proj_seed", "seed", 42, INT),
        PeftKey("unilora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("save_indices", "save_indices", False, BOOL),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: spec.init == "uniform",
            load=choices({True: "uniform", False: "normal"}, "init_weights"),
        ),
        PeftKey("init_theta_d_bound", "init_theta_d_bound", 0.02, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class UniLoRA(MethodSpec):
    """One trained vector θ_d whose entries, indexed and scaled per layer, fill every LoRA factor.

    ``seed``: shuffles the fixed indices (PEFT's ``proj_seed``). ``init``: θ_d's first values,
    ``uniform`` in ``±init_theta_d_bound`` (PEFT's ``init_weights=True``) or ``normal``.
    ``save_indices``: files also hold the indices and scales. ``bias``: ``all`` or
    ``unilora_only`` also train the base biases (all, or the adapted layers').
    """

    name = "unilora"
    peft_format = PEFT_FORMAT

    rank: int = 4
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    theta_d_length: int = 256
    seed: int = 42
    dropout: float = 0.0
    save_indices: bool = False
    init: str = "uniform"
    init_theta_d_bound: float = 0.02
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "theta_d_length", self.theta_d_length)
        check_int(owner, "seed", self.seed, minimum=0)
        check_probability(owner, "dropout", self.dropout)
        check_bool(owner, "save_indices", self.save_indices)
        check_choice(owner, "init", self.init, INITS)
        check_positive(owner, "init_theta_d_bound", self.init_theta_d_bound)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=2, theta_d_length=16, targets=targets),
            "saved-indices-dropout": cls(
                rank=3,
                theta_d_length=7,
                seed=3,
                dropout=0.1,
                save_indices=True,
                init="normal",
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return False  # A and B both come from the random θ_d

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, UniLoRALayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        weight = next(iter(bases.values())).weight
        theta = SharedVector(self.theta_d_length, weight)
        theta.draw(self.init, self.init_theta_d_bound, weight)
        layers = {
            p: UniLoRALayer(b, theta, self.rank, self.dropout, self.save_indices)
            for p, b in bases.items()
        }
        if not theta.unilora_theta_d.is_meta:
            for layer in layers.values():
                layer.draw_peft_placeholders()
            assign_indices(list(layers.values()), self.theta_d_length, self.seed)
        return layers

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        return {THETA_KEY: next(iter(layers.values())).theta.unilora_theta_d}


class SharedVector(nn.Module):
    """``unilora_theta_d`` (d,): one adapter's trained vector, shared by all of its layers."""

    def __init__(self, length: int, base_weight: torch.Tensor) -> None:
        super().__init__()
        factory = adapter_tensor_kwargs(base_weight)
        self.unilora_theta_d = nn.Parameter(torch.empty(length, **factory))

    @torch.no_grad()
    def draw(self, init: str, bound: float, base_weight: torch.Tensor) -> None:
        """PEFT's draw from the global generator (float32, on the CPU), rounded through the base
        dtype as PEFT moves it."""
        theta = self.unilora_theta_d
        if theta.is_meta:
            return
        drawn = torch.empty(theta.shape)
        drawn = drawn.uniform_(-bound, bound) if init == "uniform" else drawn.normal_()
        theta.copy_(through_base_dtype(drawn, base_weight))


def balanced_indices(count: int, length: int, seed: int) -> torch.Tensor:
    """PEFT's assignment of ``count`` LoRA entries to θ_d's ``length`` entries: each entry
    ``count // length`` times, ``count % length`` distinct ones once more, shuffled; drawn with
    numpy's generator seeded with ``seed``, call for call as PEFT draws."""
    try:
        import numpy as np
    except ImportError:
        raise SpecError(
            "UniLoRA draws its indices with numpy's random generator, as PEFT does; install numpy"
        ) from None
    uses, extra = divmod(count, length)
    generator = np.random.default_rng(seed)
    indices = np.repeat(np.arange(length), uses)
    if extra:
        indices = np.concatenate([indices, generator.choice(length, size=extra, replace=False)])
    generator.shuffle(indices)
    return torch.as_tensor(indices, dtype=torch.long)


def assign_indices(layers: Sequence[UniLoRALayer], length: int, seed: int) -> None:
    """Every layer's indices, A then B, layer after layer, from one balanced assignment, and
    the scales ``1/√uses`` of the θ_d entries they point at."""
    indices = balanced_indices(sum(layer.entries() for layer in layers), length, seed)
    uses = torch.bincount(indices, minlength=length)
    inverse_root = torch.zeros(length, dtype=torch.float32)
    used = uses > 0
    inverse_root[used] = uses[used].float().rsqrt()
    start = 0
    for layer in layers:
        parts = []
        for shape in layer.factor_shapes():
            chunk = indices[start : start + shape.numel()].view(shape)
            parts.append((chunk, inverse_root[chunk]))
            start += shape.numel()
        layer.hold(*parts)


class UniLoRALayer(AdapterLayer):
    """The fixed indices and scales of one layer's A (r x in) and B (out x r), over its
    adapter's shared θ_d; buffers, derived from the seed unless a file brings them."""

    method = "unilora"

    def __init__(
        self,
        base: nn.Module,
        theta: SharedVector,
        rank: int,
        dropout: float,
        saves_indices: bool,
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.theta = theta
        self.rank = rank
        self.saves_indices = saves_indices
        self.in_features, self.out_features = in_out_features(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        for factor, shape in zip("AB", self.factor_shapes()):
            indices = torch.empty(shape, dtype=torch.long, device=weight.device)
            scales = torch.empty(shape, **adapter_tensor_kwargs(weight))
            self.register_buffer(f"unilora_indices_{factor}", indices, persistent=False)
            self.register_buffer(f"unilora_scales_{factor}", scales, persistent=False)
        # (A, B): built on every training call, kept in eval until θ_d or the buffers change
        self.factors = Cached(self.lora_factors, self._factor_sources)

    def factor_shapes(self) -> tuple[torch.Size, torch.Size]:
        return torch.Size((self.rank, self.in_features)), torch.Size((self.out_features, self.rank))

    def entries(self) -> int:
        """How many LoRA entries this layer draws from θ_d."""
        return self.rank * (self.in_features + self.out_features)

    def draw_peft_placeholders(self) -> None:
        """PEFT first fills each layer's indices with ``torch.randint`` from the global
        generator, then replaces them all: drawing as many keeps the generator where PEFT's is
        (so later draws, such as the next adapter's θ_d, match PEFT's)."""
        length = self.theta.unilora_theta_d.numel()
        for shape in self.factor_shapes():
            torch.randint(0, length, shape, dtype=torch.long)

    @torch.no_grad()
    def hold(
        self, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Take the (indices, float32 scales) of A and of B; the scales rounded through the base
        dtype, as PEFT moves them."""
        for (indices, scales), factor in ((a, "A"), (b, "B")):
            getattr(self, f"unilora_indices_{factor}").copy_(indices)
            getattr(self, f"unilora_scales_{factor}").copy_(
                through_base_dtype(scales, self.base.weight)
            )

    def _factor_sources(self) -> tuple[torch.Tensor, ...]:
        return (
            self.theta.unilora_theta_d,
            self.unilora_indices_A,
            self.unilora_scales_A,
            self.unilora_indices_B,
            self.unilora_scales_B,
        )

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (r x in) and ``B`` (out x r): θ_d at the indices, times the scales."""
        theta = self.theta.unilora_theta_d
        a = theta[self.unilora_indices_A] * self.unilora_scales_A
        b = theta[self.unilora_indices_B] * self.unilora_scales_B
        return a, b

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        factors = ctx.module("factors", self.factors)
        a = ctx.call(operator.getitem, factors, 0)
        b = ctx.call(operator.getitem, factors, 1)
        dtype = self.theta.unilora_theta_d.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        delta = ctx.call(F.linear, ctx.call(F.linear, h, a), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        delta = b @ a
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The indices and scales where the spec saves them (``save_indices``), else nothing:
        θ_d is the adapter's (`UniLoRA.peft_shared_tensors`)."""
        if not self.saves_indices:
            return {}
        return {
            name: getattr(self, name)
            for name in (
                "unilora_indices_A",
                "unilora_indices_B",
                "unilora_scales_A",
                "unilora_scales_B",
            )
        }
