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

OPTIMIZERS = ("adamw", "lorafa", "riemannian")
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


def build(
    kind: str, groups: Sequence[dict[str, Any]], lr: float, reg: float
) -> torch.optim.Optimizer:
    """The optimizer ``TrainingConfig.optimizer`` names, over ``groups`` (parameter group
    dicts, ``"pairs"`` groups included)."""
    if kind == "lorafa":
        return LoraFA(groups, lr=lr)
    if kind == "riemannian":
        return RiemannianAdamW(groups, lr=lr, reg=reg)
    return torch.optim.AdamW(groups, lr=lr)
