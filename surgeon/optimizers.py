"""Optimizers for LoRA factors: LoRA-FA and Riemannian-preconditioned AdamW.

Both act on LoRA's ``(A, B)`` pairs, ``ΔW = scale · B A`` with A ``r x in`` and B ``out x r``.
A parameter group flagged ``"pairs": True`` lists its parameters as ``A1, B1, A2, B2, ...``;
every other group holds parameters updated as the base optimizer updates them. The layout sits
in the groups (plain values: checkpoints store them as JSON), so ``state_dict`` and
``load_state_dict`` restore an optimizer exactly.

* `LoraFA` (Zhang et al., 2023, arXiv:2308.03303): A stays frozen; B's gradient becomes the one
  closest to the full-weight gradient, ``g_B (A Aᵀ)⁻¹ / scale²``, before a step of
  transformers' legacy AdamW (``eps`` added to the uncorrected root, decay after the update),
  as PEFT's ``create_lorafa_optimizer``.
* `RiemannianAdamW` (Zhang & Pilanci, 2024, arXiv:2402.02347): ``g_A ← (BᵀB + reg I)⁻¹ g_A``
  and ``g_B ← g_B (A Aᵀ + reg I)⁻¹``, then torch's AdamW step, as PEFT's
  ``create_riemannian_optimizer`` with ``torch.optim.AdamW``.
* `Flora` (Hao, Cao & Mou, ICML 2024, arXiv:2402.03293, Algorithm 2): Adafactor whose first
  moment of a weight matrix is kept compressed, ``M ← β₁ M + (1 - β₁) U Aᵀ`` with a seeded
  Gaussian ``A ~ N(0, 1/r)`` of ``r x m``, and the step reads ``M A``; every κ steps ``A`` is
  redrawn and the state moves onto it, ``M ← M A_old A_newᵀ``. Any trained parameter, not only
  LoRA's factors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.errors import SpecError

OPTIMIZERS = ("adamw", "lorafa", "riemannian", "flora")
FACTOR_OPTIMIZERS = ("lorafa", "riemannian")
"""The optimizers that act on LoRA's ``(A, B)`` pairs (parameter groups with ``"pairs"``)."""
LORA_METHODS = ("lora", "qlora", "dora")
"""Methods whose layers hold ``lora_A`` and ``lora_B`` with ``ΔW = scale · B A``."""
MATRIX_KINDS = ("linear", "conv1d_gpt2")
"""Layer kinds whose factors are matrices (PEFT preconditions these only)."""
LORAFA_DAMPING = 1e-8  # PEFT's, added to A Aᵀ before its pseudo-inverse


@dataclass(frozen=True)
class FactorPair:
    """One adapter layer's factors, by parameter name, and its scale."""

    a: str
    b: str
    scale: float


def factor_pairs(cm: Any, option: str) -> list[FactorPair]:
    """The ``(A, B)`` pairs ``TrainingConfig.optimizer=option`` acts on, adapter by adapter,
    layer by layer. Raises `SpecError` where an active adapter is not LoRA's, where LoRA-FA
    meets a layer it does not handle, or where no pair is left."""
    names = {id(p): n for n, p in cm.named_parameters()}
    pairs: list[FactorPair] = []
    for adapter in cm.active:
        for path, layer in cm.store.items(adapter):
            method = getattr(layer, "method", type(layer).__name__)
            if method not in LORA_METHODS or (option == "lorafa" and method == "dora"):
                allowed = "lora, qlora" if option == "lorafa" else ", ".join(LORA_METHODS)
                raise SpecError(
                    f"TrainingConfig.optimizer={option!r}: adapter {adapter!r} is {method} on "
                    f"{path}; it optimizes LoRA's A and B factors ({allowed} adapters only)"
                )
            if layer.kind in MATRIX_KINDS:
                pairs.append(
                    FactorPair(names[id(layer.lora_A)], names[id(layer.lora_B)], layer.scale)
                )
            elif option == "lorafa":
                raise SpecError(
                    f"TrainingConfig.optimizer='lorafa': {path} is a {layer.kind} layer; LoRA-FA "
                    f"projects B's gradient through matrix factors (Linear and Conv1D layers), "
                    f"and an embedding's A starts at zero, which freezing would keep"
                )
    if not pairs:
        raise SpecError(
            f"TrainingConfig.optimizer={option!r}: the active adapters have no LoRA A/B matrix "
            f"pair to optimize"
        )
    return pairs


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` inside the block (LoRA-FA's A: no gradient is
    computed for it), and back as it was after."""
    params = list(params)
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _pairs(group: dict[str, Any]) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
    params = group["params"]
    return zip(params[0::2], params[1::2])


def _damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + damping I)⁺``: the pseudo-inverse stays finite for a rank-deficient factor."""
    eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return torch.linalg.pinv(gram + damping * eye)


def _compute_dtype(param: torch.Tensor) -> torch.dtype:
    """At least float32: the r x r inverses lose too much in half precision."""
    return torch.promote_types(param.dtype, torch.float32)


class LoraFA(torch.optim.Optimizer):
    """LoRA-FA: transformers' legacy AdamW whose ``"pairs"`` groups update B only, with B's
    gradient projected as ``g_B (A Aᵀ + δ I)⁺ / scale²`` (``"scales"``: one per pair). The
    caller freezes A (`frozen`). ``eps`` is added to ``sqrt(v)`` before bias correction, and
    weight decay shrinks the updated weight, as PEFT's ``LoraFAOptimizer`` does."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "pairs": False,
            "scales": (),
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["pairs"]:
                for (a, b), scale in zip(_pairs(group), group["scales"]):
                    if b.grad is not None:
                        self._update(b, _projected(b.grad, a, scale), group)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, p.grad, group)
        return loss

    def _update(self, param: nn.Parameter, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step = state["step"]
            step_size *= math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        param.addcdiv_(state["exp_avg"], denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])


def _projected(grad_b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA-FA's B gradient: the least-squares fit of the full-weight gradient through the
    frozen A, ``g_B (A Aᵀ + δ I)⁺ / scale²``, in B's gradient dtype."""
    dtype = _compute_dtype(a)
    a = a.detach().to(dtype)
    inverse = _damped_inverse(a @ a.T, LORAFA_DAMPING)
    return (grad_b.to(dtype) @ inverse / scale**2).to(grad_b.dtype)


class RiemannianAdamW(torch.optim.AdamW):
    """torch's AdamW after the r x r Riemannian preconditioner on each ``"pairs"`` group's
    gradients: ``g_A ← (BᵀB + reg I)⁺ g_A``, ``g_B ← g_B (A Aᵀ + reg I)⁺``, both from the
    factors before the step, in place on ``.grad``. ``reg`` (damping) is a group option."""

    def __init__(self, params: Iterable[Any], reg: float = 1e-2, **adamw: Any) -> None:
        super().__init__(params, **adamw)
        for group in self.param_groups:
            group.setdefault("pairs", False)
            group.setdefault("reg", reg)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is not None:  # it would recompute the gradients after preconditioning
            raise SpecError("RiemannianAdamW.step: closures are not supported (as in PEFT)")
        for group in self.param_groups:
            if group["pairs"]:
                for a, b in _pairs(group):
                    _precondition(a, b, group["reg"])
        return super().step()


def _precondition(a: nn.Parameter, b: nn.Parameter, reg: float) -> None:
    dtype = _compute_dtype(a)
    a_value, b_value = a.detach().to(dtype), b.detach().to(dtype)
    if a.grad is not None:
        inverse = _damped_inverse(b_value.T @ b_value, reg)
        a.grad.copy_((inverse @ a.grad.to(dtype)).to(a.grad.dtype))
    if b.grad is not None:
        inverse = _damped_inverse(a_value @ a_value.T, reg)
        b.grad.copy_((b.grad.to(dtype) @ inverse).to(b.grad.dtype))


ADAFACTOR_DECAY = -0.8
"""Adafactor's second-moment decay schedule, ``β̂₂ₜ = 1 - t^-0.8`` (no bias correction)."""
ADAFACTOR_EPS = 1e-30  # Adafactor's ε₁, added to the squared gradient
ADAFACTOR_CLIP = 1.0  # Adafactor's d: an update's RMS is scaled down to at most d
SEED_MULTIPLIER, SEED_INCREMENT = 6364136223846793005, 1442695040888963407


def flora_compresses(shape: Sequence[int], rank: int) -> bool:
    """Whether Flora keeps ``shape``'s first moment compressed: matrices whose both sides exceed
    the rank (a weight, a whole-matrix delta). Vectors, LoRA-sized factors and tensors of other
    ranks keep a plain one: compressing them would save little or nothing."""
    return len(shape) == 2 and min(shape) > rank


def flora_projection(seed: int, rank: int, size: int, device: torch.device) -> torch.Tensor:
    """Flora's ``A``: ``rank x size``, entries ``N(0, 1/rank)``, drawn in float32 on ``device``
    from ``seed`` alone, so a checkpoint holds the seed and never the matrix."""
    generator = torch.Generator(device=device).manual_seed(seed)
    draw = torch.randn(rank, size, generator=generator, device=device, dtype=torch.float32)
    return draw / math.sqrt(rank)


def next_flora_seed(seed: int) -> int:
    """The seed of the projection drawn at a resampling: one 63-bit linear congruential step,
    so every later seed follows from the first."""
    return (seed * SEED_MULTIPLIER + SEED_INCREMENT) % 2**63


def _long_side_last(matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``matrix`` (laid out as ``shape``, or its compressed state) with the longer side of
    ``shape`` last: Flora projects that side, so the state keeps the shorter one,
    ``min(n, m) x r``. Its own inverse."""
    return matrix.T if shape[0] > shape[1] else matrix


class Flora(torch.optim.Optimizer):
    """Flora over Adafactor, the base optimizer of the paper's momentum experiments: a factored
    second moment (row and column means of ``g² + ε₁``, decay ``1 - t^-0.8``) normalizes the
    gradient, ``U = g / sqrt(V̂)``; the first moment ``β₁`` averages ``U``; the update is
    scaled to an RMS of at most 1 and applied at ``lr`` (Adafactor's relative step and parameter
    scale off: ``lr`` is the step size, as with AdamW), after decoupled weight decay
    ``θ ← θ - lr · weight_decay · θ``.

    For a matrix `flora_compresses` selects (``n x m``, longer side ``m``), the first moment is
    Flora's ``n x rank`` state: ``M ← β₁ M + (1 - β₁) U Aᵀ`` and the update is ``M A``, with
    ``A`` from `flora_projection` of the seed in the parameter's state (``seed`` + the
    parameter's position in the optimizer at first). At every step ``t`` that is a multiple of
    ``kappa``, before that step's gradient, a new seed is drawn (`next_flora_seed`) and the state
    moves onto the new projection, ``M ← M A_old A_newᵀ``. The state (seeds, step counts,
    compressed moments) lives in ``state_dict``, so a checkpoint resumes exactly on the same
    kind of device (projections are drawn with that device's generator)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        rank: int = 256,
        kappa: int = 1000,
        beta1: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        defaults = {
            "lr": lr,
            "rank": rank,
            "kappa": kappa,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "seed": seed,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        position = 0
        for group in self.param_groups:
            for param in group["params"]:
                position += 1
                if param.grad is not None:
                    self._update(param, group, position)
        return loss

    def _update(self, param: nn.Parameter, group: dict[str, Any], position: int) -> None:
        dtype = _compute_dtype(param)
        grad = param.grad.to(dtype)
        state = self.state[param]
        if not state:
            _init_flora_state(state, grad, group, group["seed"] + position)
        state["step"] += 1
        normalized = grad * _inverse_root_second_moment(state, grad)
        update = _first_moment(state, normalized, group)
        rms = update.norm() / math.sqrt(update.numel())
        update = update / (rms / ADAFACTOR_CLIP).clamp(min=1.0)
        value = param.detach().to(dtype)
        if group["weight_decay"] != 0.0:
            value.mul_(1.0 - group["lr"] * group["weight_decay"])
        value.add_(update, alpha=-group["lr"])
        if param.dtype != dtype:  # a half-precision parameter, stepped in float32
            param.copy_(value)


def _init_flora_state(
    state: dict[str, Any], grad: torch.Tensor, group: dict[str, Any], seed: int
) -> None:
    state["step"] = 0
    shape = grad.shape
    if flora_compresses(shape, group["rank"]):
        state["seed"] = seed
        state["exp_avg"] = grad.new_zeros(min(shape), group["rank"])
    else:
        state["exp_avg"] = torch.zeros_like(grad)
    if grad.dim() >= 2:
        state["exp_avg_sq_row"] = grad.new_zeros(shape[:-1])
        state["exp_avg_sq_col"] = grad.new_zeros(shape[:-2] + shape[-1:])
    else:
        state["exp_avg_sq"] = torch.zeros_like(grad)


def _inverse_root_second_moment(state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
    """Adafactor's ``V̂^-1/2``: factored (row and column means over the last two dimensions,
    ``V̂ = R Cᵀ / mean(R)``) for matrices, whole for vectors."""
    beta2 = 1.0 - state["step"] ** ADAFACTOR_DECAY
    square = grad.square().add_(ADAFACTOR_EPS)
    if grad.dim() < 2:
        state["exp_avg_sq"].mul_(beta2).add_(square, alpha=1.0 - beta2)
        return state["exp_avg_sq"].rsqrt()
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    row.mul_(beta2).add_(square.mean(dim=-1), alpha=1.0 - beta2)
    col.mul_(beta2).add_(square.mean(dim=-2), alpha=1.0 - beta2)
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
    return row_factor * col.rsqrt().unsqueeze(-2)


def _first_moment(
    state: dict[str, Any], normalized: torch.Tensor, group: dict[str, Any]
) -> torch.Tensor:
    """The step's update: the first moment, plain or through Flora's projection (resampled,
    with the state moved onto the new one, at every multiple of ``kappa``)."""
    beta1, moment = group["beta1"], state["exp_avg"]
    if "seed" not in state:
        moment.mul_(beta1).add_(normalized, alpha=1.0 - beta1)
        return moment.clone()
    shape, rank = normalized.shape, group["rank"]
    long = _long_side_last(normalized, shape)
    a = flora_projection(state["seed"], rank, long.shape[-1], long.device).to(long.dtype)
    if state["step"] % group["kappa"] == 0:
        state["seed"] = next_flora_seed(state["seed"])
        new = flora_projection(state["seed"], rank, long.shape[-1], long.device).to(long.dtype)
        moment.copy_(moment @ (a @ new.T))
        a = new
    moment.mul_(beta1).add_(long @ a.T, alpha=1.0 - beta1)
    return _long_side_last(moment @ a, shape)


def build(
    kind: str,
    groups: Sequence[dict[str, Any]],
    lr: float,
    reg: float,
    flora_rank: int = 256,
    flora_kappa: int = 1000,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """The optimizer ``TrainingConfig.optimizer`` names, over ``groups`` (parameter group
    dicts, ``"pairs"`` groups included)."""
    if kind == "lorafa":
        return LoraFA(groups, lr=lr)
    if kind == "riemannian":
        return RiemannianAdamW(groups, lr=lr, reg=reg)
    if kind == "flora":
        return Flora(groups, lr=lr, rank=flora_rank, kappa=flora_kappa, seed=seed)
    return torch.optim.AdamW(groups, lr=lr)
