"""PVeRA: probabilistic vector-based random matrix adaptation (https://arxiv.org/abs/2512.07703).

``base(x) + λ_b ⊙ (B z)`` with ``z = μ + ε ⊙ exp(½ log σ²)`` and
``(μ, log σ²) = λ_d ⊙ (A dropout(x))``: VeRA whose rank-r intermediate is sampled. ``A``
(2r x in) projects the input onto a mean ``μ`` (its first r rows) and a log-variance
``log σ²`` (the last r), each scaled by its half of ``λ_d`` (2r); ``B`` (out x r) maps the
sample back. While training ``ε`` is standard normal noise (the reparameterisation trick); in
eval the layer uses the mean (``z = μ``) unless ``sample_at_inference``. PEFT adds no KL term
to the loss, and neither does surgeon.

``A`` and ``B`` are frozen projections shared by every targeted layer, sized for the largest
input and output and sliced per layer, drawn (kaiming-uniform, ``A`` first) from a CPU
`torch.Generator` seeded with ``seed``, exactly as PEFT draws them from
``projection_prng_key``: a file saved without them (``save_projection=False``) reloads to the
same outputs. ``λ_b`` (out) starts at zero, so a fresh adapter changes nothing; ``λ_d`` starts
at ``d_initial``.

The noise comes from torch's global generator, as PEFT's ``randn_like`` does; with
``noise_seed`` (PEFT's ``generator_seed``) each layer draws from its own CPU generator seeded
with it, as PEFT's per-layer generators do. That generator's state is a buffer of the layer, so
a training checkpoint keeps it and a resumed run draws on where it stopped. Merging folds in
the mean update ``(λ_b ⊙ B)(λ_d[:r] ⊙ A[:r])``, as PEFT merges (a merged model no longer
samples).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's PVeRA supports). PEFT keys:
``pvera_lambda_b`` (out), ``pvera_lambda_d`` (2r) per layer, ``base_model.pvera_A`` /
``base_model.pvera_B`` when the projections are saved.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_choice, check_int, check_positive, check_probability
from surgeon.layers import (
    adapter_tensor_kwargs,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.passes.vector.vera import kaiming_uniform
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

BIAS_MODES = ("none", "all", "pvera_only")

PEFT_FORMAT = PeftFormat(
    "PVERA",
    keys=(
        PeftKey("r", "rank", 256, INT),
        # PEFT's PveraConfig has no exclude_modules: an exclusion is written as module paths
        *selection_keys(exclude=False),
        PeftKey("projection_prng_key", "seed", 0, INT),
        PeftKey("save_projection", "save_projection", True, BOOL),
        PeftKey("pvera_dropout", "dropout", 0.0, NUMBER),
        PeftKey("d_initial", "d_initial", 0.1, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey("sample_at_inference", "sample_at_inference", False, BOOL),
        PeftKey("generator_seed", "noise_seed", None, INT.optional()),
    ),
    # fan_in_fan_out is implied by the layer type; init_weights only decides values the file
    # replaces
    constants={"fan_in_fan_out": False, "init_weights": True},
)
PROJECTION_KEYS = ("base_model.pvera_A", "base_model.pvera_B")


@dataclass(frozen=True)
class PVeRA(MethodSpec):
    """Probabilistic vector-based random matrix adaptation.

    ``rank``: r, the size of the sample (the mean and the log-variance are r each).
    ``sample_at_inference``: sample in eval mode too (else the mean). ``noise_seed``: draw the
    noise from a generator per layer seeded with it (None: torch's global generator).
    ``bias``: ``all`` or ``pvera_only`` also train the base biases (all, or the adapted layers').
    """

    name = "pvera"
    peft_format = PEFT_FORMAT

    rank: int = 256
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0
    save_projection: bool = True
    sample_at_inference: bool = False
    noise_seed: int | None = None
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "d_initial", self.d_initial)
        check_int(owner, "seed", self.seed, minimum=0)
        check_probability(owner, "dropout", self.dropout)
        check_bool(owner, "save_projection", self.save_projection)
        check_bool(owner, "sample_at_inference", self.sample_at_inference)
        if self.noise_seed is not None:
            check_int(owner, "noise_seed", self.noise_seed, minimum=0)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the first trains with seeded noise, so a train step draws what PEFT's draws; the
        # second redraws unsaved projections and samples from torch's generator
        return {
            "seeded-noise": cls(rank=4, noise_seed=3, targets=targets),
            "unsaved-projections-dropout": cls(
                rank=3, d_initial=0.5, seed=7, dropout=0.1, save_projection=False, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, PVeRALayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        sizes = [in_out_features(b) for b in bases.values()]
        projections = Projections(
            self.rank,
            max(i for i, _ in sizes),
            max(o for _, o in sizes),
            self.seed,
            next(iter(bases.values())).weight,
        )
        return {
            p: PVeRALayer(
                b,
                projections,
                self.dropout,
                self.d_initial,
                Reparameterisation(self.sample_at_inference, self.noise_seed),
            )
            for p, b in bases.items()
        }

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        projections = next(iter(layers.values())).projections
        return dict(zip(PROJECTION_KEYS, (projections.pvera_A, projections.pvera_B)))


class Projections(nn.Module):
    """The frozen ``pvera_A`` (2r x max_in: mean rows, then log-variance rows) and ``pvera_B``
    (max_out x r) of one adapter; buffers shared by all of its layers, rounded through the base
    dtype as PEFT's are."""

    def __init__(
        self, rank: int, max_in: int, max_out: int, seed: int, base_weight: torch.Tensor
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)  # on the CPU, as PEFT, whatever the device
        a = kaiming_uniform((2 * rank, max_in), generator)
        b = kaiming_uniform((max_out, rank), generator)
        self.register_buffer("pvera_A", through_base_dtype(a, base_weight))
        self.register_buffer("pvera_B", through_base_dtype(b, base_weight))


class Reparameterisation(nn.Module):
    """``z = μ + ε ⊙ exp(½ log σ²)`` from ``(μ, log σ²)`` concatenated on the last dim, while training
    (and in eval with ``sample_at_inference``); ``μ`` otherwise.

    With ``noise_seed``, ``ε`` comes from a CPU generator whose state lives in the
    ``noise_state`` buffer (so checkpoints keep it; the compiler's dry runs of a new graph put
    it back); it is read and written back on every draw, and the noise moves to the input's
    device afterwards, as PEFT draws it."""

    def __init__(self, sample_at_inference: bool, noise_seed: int | None) -> None:
        super().__init__()
        self.sample_at_inference = sample_at_inference
        state = (
            None if noise_seed is None else torch.Generator().manual_seed(noise_seed).get_state()
        )
        self.register_buffer("noise_state", state, persistent=False)

    def forward(self, mean_and_log_variance: torch.Tensor) -> torch.Tensor:
        mean, log_variance = mean_and_log_variance.chunk(2, dim=-1)
        if not (self.training or self.sample_at_inference):
            return mean
        std = torch.exp(0.5 * log_variance)
        return mean + self._noise(std) * std

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.noise_state is None or like.is_meta:
            return torch.randn_like(like)
        generator = torch.Generator()
        generator.set_state(self.noise_state.cpu())  # a buffer a checkpoint moved to the model
        noise = torch.randn(like.shape, dtype=like.dtype, generator=generator)
        self.noise_state = generator.get_state()
        return noise.to(like.device)


class PVeRALayer(AdapterLayer):
    """``pvera_lambda_b`` (out) and ``pvera_lambda_d`` (2r: the mean's scales, then the
    log-variance's) of one layer, over shared projections."""

    method = "pvera"

    def __init__(
        self,
        base: nn.Module,
        projections: Projections,
        dropout: float,
        d_initial: float,
        reparameterisation: Reparameterisation,
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.in_features, self.out_features = in_out_features(base)
        self.rank = projections.pvera_B.shape[1]
        self.projections = projections
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.reparameterisation = reparameterisation
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.pvera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
        d = torch.full((2 * self.rank,), d_initial, dtype=torch.float32)
        self.pvera_lambda_d = nn.Parameter(through_base_dtype(d, weight))

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's views of the shared projections (no copies)."""
        return (
            self.projections.pvera_A[:, : self.in_features],
            self.projections.pvera_B[: self.out_features],
        )

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        sliced_a, sliced_b = self._sliced()
        a = ctx.attr("pvera_A", sliced_a)  # sliced once here, not on every call
        b = ctx.attr("pvera_B", sliced_b)
        lambda_d = ctx.attr("pvera_lambda_d", self.pvera_lambda_d)
        lambda_b = ctx.attr("pvera_lambda_b", self.pvera_lambda_b)
        dtype = self.pvera_lambda_d.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        h = ctx.call(torch.mul, ctx.call(F.linear, h, a), lambda_d)  # (μ, log σ²): 2r wide
        z = ctx.module("reparameterisation", self.reparameterisation, h)
        delta = ctx.call(torch.mul, ctx.call(F.linear, z, b), lambda_b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        """The mean's update: the log-variance half has no weight to fold into."""
        sliced_a, sliced_b = self._sliced()
        mean_a = sliced_a[: self.rank]
        mean_d = self.pvera_lambda_d[: self.rank]
        delta = (self.pvera_lambda_b[:, None] * sliced_b) @ (mean_d[:, None] * mean_a)
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    @torch.no_grad()
    def merge(self) -> None:
        if self.reparameterisation.sample_at_inference:
            warnings.warn(
                "PVeRA with sample_at_inference merges its mean, as PEFT does: the merged "
                "model no longer samples",
                stacklevel=2,
            )
        super().merge()
