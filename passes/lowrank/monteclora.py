"""MonteCLoRA: LoRA whose A is averaged over Monte Carlo samples while training (Sengupta et
al., 2024, arXiv:2411.04358), as PEFT's ``monteclora_config``.

Eval (and merging) is LoRA's: ``base(x) + scale * B A x``. In training, A (``r x in``) becomes
``Ã = (Σ_k w_k (Aᵀ + ε_k))ᵀ`` over ``samples`` draws: noise ``ε_k = sample_scale · z_k · √d``
(``z_k`` Gaussian, ``in x r``; ``d = max(exp(s)² ⊙ diag(Z_W), 10⁻³)`` per rank, ``Z_W`` a
standard Wishart draw of ``r x r``, ``s`` the trained ``std_prior``) and mixing weights
``w = softmax(√(σ² + 10⁻⁶) ⊙ z + μ)``, a Laplace approximation of a Dirichlet with
``alpha = exp(expert_weights_prior)`` (``μ = log alpha - mean(log alpha)``,
``σ² = (1 - 2/K)/alpha + Σ(1/alpha)/K²``, each clamped at 10⁻⁶). The draws come from a pool of
``buffer_size`` sets drawn from torch's generator when the layer is built and again whenever
it runs out, in PEFT's order (on the device and in the dtype the layer was built with), so a
layer built from the same seed as PEFT's draws what PEFT's does. Files do not hold the pool
(PEFT's neither); checkpoints hold the generator state it was drawn from and how much of it was
used (buffers ``pool_state``, ``pool_next``), so ``surgeon.train`` resumes exactly.

The regulariser (`MonteCLoRA.loss_term`, added once a step by ``surgeon.train``), per layer
``kl_weight · (KL_Dirichlet(alpha ‖ dirichlet_prior) + KL_Wishart(s) + KL_Gaussian(d))`` (plus
``Σ w²`` with ``entropy``), the d and w of the layer's last training forward, averaged over the
layers: PEFT's ``_get_monteclora_loss`` (which averages over every active adapter's layers
at once; here each adapter averages over its own).

Layers: Linear and GPT-2's ``Conv1D``, as PEFT (which refuses embeddings and convolutions).
PEFT's keys: LoRA's plus ``lora_monteclora_sampler.{std_prior, expert_weights_prior}`` and the
buffers ``gaussian_var_prior`` (``diag(d)``) and ``expert_weights`` (``w``) of the last draw.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.distributions import Wishart

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_finite, check_int, check_positive
from surgeon.layers import layer_kind
from surgeon.passes.lowrank.lora import PISSA_NITER, LoRA, LoRALayer
from surgeon.passes.lowrank.velora import layer_in_features, sub_config_keys

MONTECLORA_KEYS = {
    "num_samples": ("samples", 8),
    "use_entropy": ("entropy", False),
    "dirichlet_prior": ("dirichlet_prior", 0.1),
    "sample_scaler": ("sample_scale", 1e-4),
    "kl_loss_weight": ("kl_weight", 1e-5),
    "buffer_size": ("buffer_size", 150),
}
"""``monteclora_config``'s keys, the fields that carry them and PEFT's defaults."""

SAVED = ("std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")
"""The sampler's tensors PEFT's files hold (not the pool's position)."""

VARIANCE_FLOOR = 1e-3  # the least per-rank noise variance d
EPS = 1e-6


@dataclass(frozen=True)
class MonteCLoRA(LoRA):
    """LoRA with Monte Carlo averaged A in training; LoRA's fields, plus ``samples`` (draws
    averaged per forward), ``entropy`` (add ``Σ w²`` to the regulariser), ``dirichlet_prior``
    (the prior's concentration), ``sample_scale`` (the noise's scale), ``kl_weight`` and
    ``buffer_size`` (draw sets pooled at a time)."""

    name = "monteclora"
    peft_format = LoRA.peft_format.but(
        keys=(*LoRA.peft_format.keys, *sub_config_keys("monteclora_config", MONTECLORA_KEYS))
    )
    adapts_quantized = False
    combinations = ()

    samples: int = MONTECLORA_KEYS["num_samples"][1]
    entropy: bool = MONTECLORA_KEYS["use_entropy"][1]
    dirichlet_prior: float = MONTECLORA_KEYS["dirichlet_prior"][1]
    sample_scale: float = MONTECLORA_KEYS["sample_scaler"][1]
    kl_weight: float = MONTECLORA_KEYS["kl_loss_weight"][1]
    buffer_size: int = MONTECLORA_KEYS["buffer_size"][1]

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_int(owner, "samples", self.samples)
        check_bool(owner, "entropy", self.entropy)
        check_positive(owner, "dirichlet_prior", self.dirichlet_prior)
        check_finite(owner, "sample_scale", self.sample_scale)  # PEFT takes any value
        check_finite(owner, "kl_weight", self.kl_weight)
        check_int(owner, "buffer_size", self.buffer_size)

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        """LoRA files with ``monteclora_config`` set (even ``{}``: PEFT's defaults), and only those."""
        return isinstance(config.get("monteclora_config"), Mapping) and super().accepts_peft_config(
            config
        )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MonteCLoRA]:
        # small pools: each layer draws buffer_size x samples x in x r normals when built
        return {
            "default": cls(rank=4, targets=targets, samples=3, buffer_size=2, sample_scale=0.05),
            "entropy-dropout": cls(
                rank=2,
                targets=targets,
                samples=2,
                buffer_size=1,
                entropy=True,
                dropout=0.1,
                dirichlet_prior=0.5,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2") and super().supports(layer)

    def create_layer(self, layer: nn.Module, path: str) -> MonteCLoRALayer:
        rank, scale = self.rank_and_scale(path)
        return MonteCLoRALayer(layer, path, rank, scale, self, layer_in_features(layer))

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """The layers' variational losses, averaged (PEFT's ``_get_monteclora_loss``)."""
        samplers = [layer.sampler for layer in layers.values() if layer.sampler.training]
        if not samplers:
            return None
        return torch.stack([s.variational_loss() for s in samplers]).mean()


class MonteCLoRALayer(LoRALayer):
    """LoRA's factors (and B's bias with ``lora_bias``), A read through a `MonteCarloA`."""

    method = "monteclora"
    fuses_as = None  # A is a module's output

    def __init__(
        self, base: nn.Module, path: str, rank: int, scale: float, spec: MonteCLoRA, features: int
    ) -> None:
        if spec.init != "orthogonal" and not PISSA_NITER.fullmatch(spec.init):
            # PEFT's default-initialised factor layers draw first (those two inits draw them
            # already): the pool after them is PEFT's from the same seed
            for shape in LoRALayer._shapes(base, path, rank):
                nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))
        super().__init__(base, path, rank, scale, spec.dropout, spec.init, lora_bias=spec.lora_bias)
        self.sampler = MonteCarloA(features, rank, spec, self.lora_A)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.module("sampler", self.sampler, ctx.attr("lora_A", self.lora_A))
        b = ctx.attr("lora_B", self.lora_B)
        cast = self.lora_A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.lora_A.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        h = ctx.call(F.linear, h, a)
        delta = ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b, *self._emit_bias(ctx))
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        sampler = {f"lora_monteclora_sampler.{name}": getattr(self.sampler, name) for name in SAVED}
        return {**super().peft_tensors(), **sampler}


class MonteCarloA(nn.Module):
    """A's Monte Carlo average in training, A itself otherwise; owns the variational
    parameters, the last draw's ``d`` and ``w`` (buffers, saved as PEFT does) and the pool."""

    def __init__(self, features: int, rank: int, spec: MonteCLoRA, like: torch.Tensor) -> None:
        super().__init__()
        self.samples = spec.samples
        self.sample_scale = spec.sample_scale
        self.kl_weight = spec.kl_weight
        self.entropy = spec.entropy
        self.dirichlet_prior = spec.dirichlet_prior
        self.buffer_size = spec.buffer_size
        self.shape = (spec.samples, features, rank)
        dtype, device = like.dtype, like.device
        # drawn on the CPU and moved, as PEFT
        self.std_prior = nn.Parameter(torch.rand(rank, dtype=dtype).to(device))
        self.expert_weights_prior = nn.Parameter(torch.rand(spec.samples, dtype=dtype).to(device))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, dtype=dtype, device=device))
        self.register_buffer(
            "expert_weights",
            torch.full((spec.samples,), 1 / spec.samples, dtype=dtype, device=device),
        )
        # the pool, and as buffers (checkpoints keep them; PEFT's files do not) the device
        # generator's state it was drawn from and how many sets were used: a resumed run
        # redraws it and goes on where the run stopped
        self._pool: list[tuple[torch.Tensor, ...]] = []
        self._next = 0
        self.register_buffer("pool_state", None)
        self.register_buffer("pool_next", torch.zeros((), dtype=torch.long, device=device))
        self._pool_from: tuple[torch.Tensor | None, torch.Tensor] = (None, self.pool_next)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # d, w (with their graphs)
        # PEFT draws on the device and in the dtype the layer was built with, moved or not
        # (on the meta device: those of its first training call, where it builds its sampler)
        self._pool_on = (device, dtype)
        if device.type != "meta":
            self._refill()

    def _apply(self, fn: Any, recurse: bool = True) -> MonteCarloA:
        """Moving the module keeps the pool (only a checkpoint's buffers replace it)."""
        in_step = self._in_step()
        super()._apply(fn, recurse)
        if in_step:
            self._pool_from = (self.pool_state, self.pool_next)
        return self

    def _in_step(self) -> bool:
        """Whether the buffers are the ones the pool and its position were kept in."""
        return self._pool_from[0] is self.pool_state and self._pool_from[1] is self.pool_next

    def _refill(self) -> None:
        """A new pool from the generator as it is now (advancing it, as PEFT)."""
        device, dtype = self._pool_on
        self.pool_state = _generator_state(device)
        self._draw_pool(device, dtype)
        self._next = 0
        self.pool_next = torch.zeros((), dtype=torch.long, device=self.std_prior.device)
        self._pool_from = (self.pool_state, self.pool_next)

    @torch.no_grad()
    def _draw_pool(self, device: torch.device, dtype: torch.dtype) -> None:
        """``buffer_size`` draw sets, in PEFT's order: all Gaussian noise, all mixing noise, then
        the Wishart draws one by one (in float32, cast)."""
        size, (samples, features, rank) = self.buffer_size, self.shape
        z = torch.randn((size, samples, features, rank), device=device, dtype=dtype)
        z_mix = torch.randn((size, samples), device=device, dtype=dtype)
        wishart = Wishart(df=rank, scale_tril=torch.eye(rank, device=device))
        self._pool = [
            (z[i], wishart._bartlett_sampling(torch.Size()).to(dtype), z_mix[i])
            for i in range(size)
        ]

    def _restore_pool(self) -> None:
        """The pool and position a checkpoint set in the buffers, the generator left alone."""
        device, dtype = self._pool_on
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _set_generator_state(device, self.pool_state)
            self._draw_pool(device, dtype)
        self._next = int(self.pool_next)
        self._pool_from = (self.pool_state, self.pool_next)

    def _draw(self) -> tuple[torch.Tensor, ...]:
        like = self.std_prior
        if self.pool_state is None:  # built on the meta device
            self._pool_on = (like.device, like.dtype)
            self._refill()
        elif not self._in_step():
            self._restore_pool()
        if self._next >= self.buffer_size:
            self._refill()
        drawn = self._pool[self._next]
        self._next += 1
        self.pool_next.fill_(self._next)
        return tuple(t.to(device=like.device, dtype=like.dtype) for t in drawn)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return a
        z, z_wishart, z_mix = self._draw()
        std = torch.exp(self.std_prior)
        d = torch.clamp(std * z_wishart.diagonal() * std, min=VARIANCE_FLOOR)
        noise = torch.nan_to_num(self.sample_scale * (z * d.sqrt()), nan=0.0)
        w = torch.softmax(self._mixing_logits(z_mix), dim=-1)
        self._remember(d, w)
        if torch.isnan(w).any():
            warnings.warn(
                "MonteCLoRA's mixing weights are NaN: this step uses A as it is", stacklevel=2
            )
            return a
        return torch.einsum("n,nij->ij", w, a.t() + noise).t()

    def _mixing_logits(self, z_mix: torch.Tensor) -> torch.Tensor:
        """``√(σ² + 10⁻⁶) ⊙ z + μ``: the normal (in log space) that stands in for the Dirichlet."""
        alpha = torch.clamp(torch.exp(self.expert_weights_prior), min=EPS)
        log_alpha = torch.log(alpha)
        k = self.samples
        variance = torch.clamp((1 - 2 / k) / alpha + (1 / alpha).sum() / k**2, min=EPS)
        return torch.sqrt(variance + EPS) * z_mix + (log_alpha - log_alpha.mean())

    def _remember(self, d: torch.Tensor, w: torch.Tensor) -> None:
        """Keep the draw's ``d`` and ``w`` for the regulariser; the buffers hold their values."""
        self._last = (d, w)
        with torch.no_grad():
            self.gaussian_var_prior.copy_(torch.diag(d))
            self.expert_weights.copy_(w)

    def variational_loss(self) -> torch.Tensor:
        """``kl_weight · (KL_Dirichlet + KL_Wishart + KL_Gaussian)`` (+ ``Σ w²`` with entropy),
        from the last training draw (before any, the buffers)."""
        d, w = self._last or (self.gaussian_var_prior.diagonal(), self.expert_weights)
        kl = self._dirichlet_kl() + self._wishart_kl() + self._gaussian_kl(d)
        loss = self.kl_weight * kl
        return loss + (w**2).sum() if self.entropy else loss

    def _dirichlet_kl(self) -> torch.Tensor:
        """KL(Dir(alpha) ‖ Dir(prior)), ``alpha = exp(expert_weights_prior)``."""
        alpha = torch.exp(self.expert_weights_prior)
        prior = torch.full_like(alpha, self.dirichlet_prior, dtype=torch.float32)
        total = alpha.sum()
        return (
            torch.lgamma(total)
            - torch.lgamma(prior.sum())
            + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
            + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(total))).sum()
        )

    def _wishart_kl(self) -> torch.Tensor:
        """``r/2 · Σ (e^{2s} - 2s) - r²/2`` (PEFT's, for the diagonal scale ``e^s``)."""
        rank = self.std_prior.shape[0]
        var = torch.exp(self.std_prior) ** 2
        return 0.5 * (-torch.log(var).sum() * rank + var.sum() * rank - rank**2)

    def _gaussian_kl(self, d: torch.Tensor) -> torch.Tensor:
        """``K/2 · Σ (d - log d - 1)``, d clamped at 10⁻⁶."""
        d = torch.clamp(d, min=EPS)
        return self.samples * 0.5 * (d.sum() - torch.log(d).sum() - d.shape[0])


def _generator_state(device: torch.device) -> torch.Tensor:
    """The state of the generator that draws on ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
    else:
        torch.set_rng_state(state.cpu())
