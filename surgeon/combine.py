"""Weighted combinations of adapters: `CompiledModel.merge_adapters`, PEFT's add_weighted_adapter.

This module checks the arguments, then hands the sources to their method's `MethodSpec.combine`
(LoRA's ``cat``, ``svd`` and factor-wise combinations; IA³'s weighted sum), which uses the
task-arithmetic merges written here once: ``linear``, ``ties`` (Yadav et al.), ``dare_linear``
and ``dare_ties`` (Yu et al.) and ``magnitude_prune``. As in PEFT, a single adapter is always
combined linearly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from surgeon.checks import is_int
from surgeon.errors import SpecError, did_you_mean
from surgeon.peft import PREFIX
from surgeon.spec import METHODS, Combination, MethodSpec

if TYPE_CHECKING:
    from surgeon.compiled import CompiledModel

TASK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
HOWS = ("cat", *TASK_METHODS, "svd", *(f"{m}_svd" for m in TASK_METHODS[1:]))
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "density": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "majority_sign_method": (lambda v: v in SIGN_METHODS, f"one of {SIGN_METHODS}"),
    "svd_rank": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "svd_clamp": (lambda v: _is_number(v) and 0 < v <= 1, "a quantile in (0, 1]"),
    "svd_full_matrices": (lambda v: isinstance(v, bool), "true or false"),
    "svd_driver": (lambda v: v in SVD_DRIVERS, f"one of {SVD_DRIVERS} (CUDA only)"),
    "seed": (is_int, "an integer"),
}


@dataclass(frozen=True)
class Options:
    """The checked options of one combination."""

    density: float = 1.0
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    svd_driver: str | None = None
    seed: int | None = None


MaskDrawer = Callable[[torch.Tensor, float], torch.Tensor]  # (tensor, density) -> keep-mask


@torch.no_grad()
def combine_adapters(
    cm: CompiledModel, weights: dict[str, float], how: str = "linear", **options: Any
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The spec and PEFT-keyed tensors of the adapter that combines ``weights`` (name -> weight)."""
    opts = _check_options(how, options)
    _check_weights(cm, weights)
    first = _method_of(cm, weights)
    if how not in first.combinations:
        raise SpecError(
            f"merge_adapters(how={how!r}): {type(first).__name__} adapters combine by "
            f"{', '.join(first.combinations)} only"
        )
    if len(weights) == 1:
        how = "linear"  # one adapter: the others have nothing to combine with (as in PEFT)
    sources = [
        Combination(name, float(w), cm.spec(name), dict(cm.store.items(name)))
        for name, w in weights.items()
    ]
    spec, tensors = first.combine(cm.model, sources, how, opts)
    adapted = sorted({path for source in sources for path in source.layers})
    params = dict(cm.model.named_parameters())
    for pname in spec.trainable_base_parameters(cm.model, adapted):
        tensors[PREFIX + pname] = params[pname].detach().clone()
    return spec, tensors


def _method_of(cm: CompiledModel, weights: Mapping[str, float]) -> MethodSpec:
    """The spec of the first adapter, once every adapter is of its method and that combines."""
    combinable = sorted(cls.__name__ for cls in METHODS.values() if cls.combinations)
    names = list(weights)
    first = cm.spec(names[0])
    for name in names:
        spec = cm.spec(name)
        if not spec.combinations or type(spec) is not type(first):
            raise SpecError(
                f"merge_adapters: adapter {name!r} is {spec.name}"
                + (f" and {names[0]!r} is {first.name}" if spec.combinations else "")
                + "; weighted merging combines adapters of one method among themselves, for "
                f"{', '.join(combinable)}"
            )
    return first


# -- checking arguments -----------------------------------------------------------------------


def _allowed_options(how: str) -> tuple[str, ...]:
    method = how.removesuffix("_svd")
    allowed: list[str] = []
    if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        allowed.append("density")
    if method in ("ties", "dare_ties"):
        allowed.append("majority_sign_method")
    if how.endswith("svd"):
        allowed += ["svd_rank", "svd_clamp", "svd_full_matrices", "svd_driver"]
    if method.startswith("dare"):
        allowed.append("seed")
    return tuple(allowed)


def _check_options(how: str, options: Mapping[str, Any]) -> Options:
    if how not in HOWS:
        raise SpecError(
            f"merge_adapters: how={how!r} is not a combination{did_you_mean(str(how), HOWS)} "
            f"(allowed: {', '.join(HOWS)})"
        )
    allowed = _allowed_options(how)
    for key in options:
        if key not in allowed:
            raise SpecError(
                f"merge_adapters(how={how!r}) takes no option {key!r} "
                f"(its options: {', '.join(allowed) or 'none'})"
            )
    given = {k: v for k, v in options.items() if v is not None}
    if "density" in allowed and "density" not in given:
        raise SpecError(
            f"merge_adapters(how={how!r}) needs density: the fraction of values kept, in (0, 1]"
        )
    for key, value in given.items():
        accepts, expected = OPTION_CHECKS[key]
        if not accepts(value):
            raise SpecError(f"merge_adapters: {key}={value!r}: expected {expected}")
    return Options(**given)


def _check_weights(cm: CompiledModel, weights: Mapping[str, float]) -> None:
    if not weights:
        raise SpecError(
            "merge_adapters: weights is empty; map at least one adapter name to a weight"
        )
    for name, weight in weights.items():
        if name not in cm.adapters:
            raise SpecError(
                f"merge_adapters: no adapter named {name!r}{did_you_mean(str(name), cm.adapters)} "
                f"(adapters: {', '.join(cm.adapters) or 'none'})"
            )
        if cm.spec(name).modules_to_save:
            raise SpecError(
                f"merge_adapters: adapter {name!r} trains full copies of "
                f"{', '.join(cm.spec(name).modules_to_save)} (modules_to_save); copies have no "
                f"weights to combine"
            )
        if not _is_number(weight):
            raise SpecError(
                f"merge_adapters: weights[{name!r}]={weight!r}: expected a finite number"
            )


# -- the task-arithmetic family (Ilharco et al.; TIES: Yadav et al.; DARE: Yu et al.) ---------


def mask_drawer(seed: int | None) -> MaskDrawer:
    """Bernoulli keep-masks for DARE: from torch's global RNG (as PEFT), or from ``seed``."""
    generators: dict[torch.device, torch.Generator] = {}

    def draw(tensor: torch.Tensor, density: float) -> torch.Tensor:
        generator = None
        if seed is not None:
            if tensor.device not in generators:
                generators[tensor.device] = torch.Generator(tensor.device).manual_seed(seed)
            generator = generators[tensor.device]
        return torch.bernoulli(torch.full_like(tensor, density), generator=generator)

    return draw


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    opts: Options,
    draw: MaskDrawer,
) -> torch.Tensor:
    """``tensors`` (one per adapter, same shape) merged by a task-arithmetic ``method`` with
    ``weights``: pruned (ties, magnitude_prune) or dropped at random (dare), weighted, summed
    (or, for ties, averaged over the adapters that agree with the elected sign)."""
    density = opts.density
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [drop_at_random(t, density, draw) for t in tensors]
    stacked = torch.stack(list(tensors))
    weighted = stacked * weights.view(-1, *(1,) * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    agrees = _agrees_with_majority_sign(stacked, opts.majority_sign_method)
    # the mean over the adapters that agree with the elected sign (at least one, to avoid 0/0)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``density`` fraction of entries with the largest magnitude."""
    if density >= 1:
        return tensor
    keep = torch.zeros_like(tensor).flatten()
    keep[torch.topk(tensor.abs().flatten(), k=int(density * tensor.numel())).indices] = 1
    return tensor * keep.view(tensor.shape)


def drop_at_random(tensor: torch.Tensor, density: float, draw: MaskDrawer) -> torch.Tensor:
    """Keep each entry with probability ``density``, rescaled to keep the expectation."""
    if density >= 1:
        return tensor
    return tensor * draw(tensor, density) / density


def _agrees_with_majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each adapter's sign matches the elected one: the sign of the sum of the values
    (``total``) or the more frequent sign (``frequency``); zero elects plus."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return signs == elected
