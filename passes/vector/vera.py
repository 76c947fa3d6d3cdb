"""VeRA: ``base(x) + λ_b ⊙ (B (λ_d ⊙ (A dropout(x))))`` (Kopiczko et al., 2024).

``A`` (r x in) and ``B`` (out x r) are frozen random projections shared by every targeted layer:
one pair per adapter, sized for the largest target and sliced per layer. They come from a
`torch.Generator` seeded with ``seed``, exactly as PEFT draws them from ``projection_prng_key``,
so an adapter saved without its projections still reloads to the same outputs. Only the vectors
``λ_b`` (out, starts at zero: a fresh adapter changes nothing) and ``λ_d`` (r, starts at
``d_initial``) train.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's VeRA supports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_int, check_positive, check_probability
from surgeon.layers import (
    adapter_tensor_kwargs,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import BOOL, INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_FORMAT = PeftFormat(
    "VERA",
    keys=(
        PeftKey("r", "rank", 256, INT),
        *selection_keys(exclude=False),
        PeftKey("projection_prng_key", "seed", 0, INT),
        PeftKey("save_projection", "save_projection", True, BOOL),
        PeftKey("vera_dropout", "dropout", 0.0, NUMBER),
        PeftKey("d_initial", "d_initial", 0.1, NUMBER),
    ),
    switches={"bias": "none"},
    # fan_in_fan_out is implied by the layer type; init_weights only decides values the file
    # replaces
    constants={"fan_in_fan_out": False, "init_weights": True},
)
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass(frozen=True)
class VeRA(MethodSpec):
    """Vector-based random matrix adaptation."""

    name = "vera"
    peft_format = PEFT_FORMAT

    rank: int = 256
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0
    save_projection: bool = True
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "d_initial", self.d_initial)
        check_int(owner, "seed", self.seed, minimum=0)
        check_probability(owner, "dropout", self.dropout)
        check_bool(owner, "save_projection", self.save_projection)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, targets=targets),
            "unsaved-projections-dropout": cls(
                rank=3, d_initial=0.5, seed=7, dropout=0.1, save_projection=False, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, VeRALayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        projections = shared_projections(self, bases)
        return {
            p: VeRALayer(b, projections, self.dropout, self.d_initial) for p, b in bases.items()
        }

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        projections = next(iter(layers.values())).projections
        return dict(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))


def shared_projections(spec: VeRA, bases: Mapping[str, nn.Module]) -> Projections:
    """The projections of one adapter over ``bases``: sized for the largest input and output,
    drawn from the spec's seed."""
    sizes = [in_out_features(b) for b in bases.values()]
    return Projections(
        spec.rank,
        max(i for i, _ in sizes),
        max(o for _, o in sizes),
        spec.seed,
        next(iter(bases.values())).weight,
    )


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) drawn from ``generator``, as PEFT draws."""
    bound = math.sqrt(6 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """The frozen ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r) of one adapter; buffers,
    shared by all of its layers."""

    def __init__(
        self, rank: int, max_in: int, max_out: int, seed: int, base_weight: torch.Tensor
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # on the CPU, as PEFT, whatever the device
        a = kaiming_uniform((rank, max_in), generator)
        b = kaiming_uniform((max_out, rank), generator)
        self.register_buffer("vera_A", through_base_dtype(a, base_weight))
        self.register_buffer("vera_B", through_base_dtype(b, base_weight))


class VeRALayer(AdapterLayer):
    """``vera_lambda_b`` (out) and ``vera_lambda_d`` (r) of one layer, over shared projections."""

    method = "vera"

    def __init__(
        self, base: nn.Module, projections: Projections, dropout: float, d_initial: float
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.in_features, self.out_features = in_out_features(base)
        self.rank = projections.vera_A.shape[0]
        self.projections = projections
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
        d = torch.full((self.rank,), d_initial, dtype=torch.float32)
        self.vera_lambda_d = nn.Parameter(through_base_dtype(d, weight))

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's views of the shared projections (no copies)."""
        return (
            self.projections.vera_A[:, : self.in_features],
            self.projections.vera_B[: self.out_features],
        )

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        sliced_a, sliced_b = self._sliced()
        a = ctx.attr("vera_A", sliced_a)  # sliced once here, not on every call
        b = ctx.attr("vera_B", sliced_b)
        lambda_d = ctx.attr("vera_lambda_d", self.vera_lambda_d)
        lambda_b = ctx.attr("vera_lambda_b", self.vera_lambda_b)
        dtype = self.vera_lambda_d.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        # λ_d scales the rank-r intermediate; λ_b the output, which it must
        h = ctx.call(torch.mul, ctx.call(F.linear, h, a), lambda_d)
        delta = ctx.call(torch.mul, ctx.call(F.linear, h, b), lambda_b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        sliced_a, sliced_b = self._sliced()
        delta = (self.vera_lambda_b[:, None] * sliced_b) @ (self.vera_lambda_d[:, None] * sliced_a)
        return delta.t() if self.kind == "conv1d_gpt2" else delta
