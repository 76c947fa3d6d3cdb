"""Weighted combinations of LoRA adapters: `CompiledModel.merge_adapters`, PEFT's add_weighted_adapter.

Each source adapter's scaling is folded into the new adapter's factors, so the new adapter runs
with scale 1 (alpha equals rank on every layer) and its file loads in PEFT unchanged.

* ``cat``: the factors side by side, ``A = [w_i s_i A_i]``, ``B = [B_i]``: exactly
  ``sum w_i s_i B_i A_i``, at the sum of the ranks.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A factors and
  the B factors are combined separately (``sqrt(|w_i s_i|)`` on each side, the sign on A), which
  keeps the rank but only approximates the weighted sum of the deltas.
* ``svd`` and ``<method>_svd``: combine the full deltas ``s_i B_i A_i`` with the method, then
  factor the result back to ``svd_rank`` by a truncated SVD.

As in PEFT, a single adapter is always combined linearly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from surgeon.errors import SpecError, did_you_mean
from surgeon.io import PREFIX

if TYPE_CHECKING:
    from passes.lora import LoRA, LoRALayer
    from surgeon.compiled import CompiledModel
    from surgeon.spec import MethodSpec

TASK_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
HOWS = ("cat", *TASK_METHODS, "svd", *(f"{m}_svd" for m in TASK_METHODS[1:]))
SIGN_METHODS = ("total", "frequency")
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


OPTION_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "density": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "majority_sign_method": (lambda v: v in SIGN_METHODS, f"one of {SIGN_METHODS}"),
    "svd_rank": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "svd_clamp": (lambda v: _is_number(v) and 0 < v <= 1, "a quantile in (0, 1]"),
    "svd_full_matrices": (lambda v: isinstance(v, bool), "true or false"),
    "svd_driver": (lambda v: v in SVD_DRIVERS, f"one of {SVD_DRIVERS} (CUDA only)"),
    "seed": (_is_int, "an integer"),
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


Source = tuple[float, "LoRALayer"]  # (weight, the adapter's layer)
MaskDrawer = Callable[[torch.Tensor, float], torch.Tensor]  # (tensor, density) -> keep-mask


@torch.no_grad()
def combine_adapters(
    cm: CompiledModel, weights: dict[str, float], how: str = "linear", **options: Any
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The spec and PEFT-keyed tensors of the adapter that combines ``weights`` (name -> weight)."""
    opts = _check_options(how, options)
    if weights and all(n in cm.adapters and cm.spec(n).name == "ia3" for n in weights):
        return _combine_ia3(cm, weights, how)
    _check_weights(cm, weights)
    if len(weights) == 1:
        how = "linear"  # one adapter: the others have nothing to combine with (as in PEFT)
    ranks = {name: _config_rank(cm.spec(name)) for name in weights}
    _check_equal_ranks(how, ranks)
    sources = _sources_by_layer(cm, weights)
    draw = _mask_drawer(opts.seed)
    svd_rank = opts.svd_rank or max(ranks.values())
    factors = {
        path: _combine_layer(how, path, layer_sources, opts, draw, svd_rank)
        for path, layer_sources in sources.items()
    }
    kinds = {path: layer_sources[0][1].kind for path, layer_sources in sources.items()}
    first = cm.spec(next(iter(weights)))
    spec = _combined_spec(cm, first, {p: a.shape[0] for p, (a, _) in factors.items()})
    tensors = _peft_tensors(factors, kinds)
    params = dict(cm.model.named_parameters())
    for pname in spec.trainable_base_parameters(cm.model, list(factors)):
        tensors[PREFIX + pname] = params[pname].detach().clone()
    return spec, tensors


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


def _combine_ia3(
    cm: CompiledModel, weights: dict[str, float], how: str
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """IA³ vectors add up with their weights (PEFT's IA3 add_weighted_adapter): a layer that only
    some adapters cover gets only their terms. A layer must be feed-forward in all or none."""
    from passes.ia3 import IA3

    if how != "linear":
        raise SpecError(
            f"merge_adapters(how={how!r}): IA³ adapters combine linearly only (how='linear')"
        )
    for name, weight in weights.items():
        if not _is_number(weight):
            raise SpecError(
                f"merge_adapters: weights[{name!r}]={weight!r}: expected a finite number"
            )
    vectors: dict[str, torch.Tensor] = {}
    feedforward: dict[str, bool] = {}
    for name, weight in weights.items():
        for path, layer in cm.store.items(name):
            if feedforward.setdefault(path, layer.feedforward) != layer.feedforward:
                raise SpecError(
                    f"merge_adapters: {path} is a feed-forward target in some of the adapters and "
                    f"not in others; IA³ cannot combine those"
                )
            term = layer.peft_tensors()["ia3_l"].detach().float() * weight
            vectors[path] = vectors[path] + term if path in vectors else term
    paths = sorted(vectors)
    spec = IA3(targets=tuple(paths), feedforward=tuple(p for p in paths if feedforward[p]))
    return spec, {f"{PREFIX}{p}.ia3_l": v for p, v in vectors.items()}


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
                f"low-rank factors to combine"
            )
        method = cm.spec(name).name
        if method != "lora":
            raise SpecError(
                f"merge_adapters: adapter {name!r} is {method}; weighted merging is defined for LoRA adapters, or for IA³ adapters among themselves"
            )
        if not _is_number(weight):
            raise SpecError(
                f"merge_adapters: weights[{name!r}]={weight!r}: expected a finite number"
            )


def _config_rank(spec: LoRA) -> int:
    """The largest rank the adapter's spec allows (PEFT's rule for combining ranks)."""
    return max([spec.rank, *spec.rank_pattern.values()])


def _check_equal_ranks(how: str, ranks: Mapping[str, int]) -> None:
    if how == "cat" or how.endswith("svd") or len(set(ranks.values())) == 1:
        return
    shown = ", ".join(f"{n!r} has rank {r}" for n, r in ranks.items())
    raise SpecError(
        f"merge_adapters(how={how!r}) combines the A and B factors themselves, so every adapter "
        f"needs the same rank ({shown}); use how='cat' or how='svd' for different ranks"
    )


# -- combining --------------------------------------------------------------------------------


def _sources_by_layer(cm: CompiledModel, weights: Mapping[str, float]) -> dict[str, list[Source]]:
    """Path -> (weight, layer) of every adapter on it, paths in the model's module order (the
    order PEFT draws dare's random masks in)."""
    order = {path: i for i, (path, _) in enumerate(cm.model.named_modules())}
    by_path: dict[str, list[Source]] = {}
    for name, weight in weights.items():
        for path, layer in cm.store.items(name):
            by_path.setdefault(path, []).append((float(weight), layer))
    return {p: by_path[p] for p in sorted(by_path, key=order.__getitem__)}


def _combine_layer(
    how: str,
    path: str,
    sources: Sequence[Source],
    opts: Options,
    draw: MaskDrawer,
    svd_rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined adapter on one layer."""
    if how == "cat":
        return _cat(sources)
    method = "linear" if how == "svd" else how.removesuffix("_svd")
    if how.endswith("svd"):
        return _svd(sources, method, opts, draw, svd_rank)
    ranks = {layer.rank for _, layer in sources}
    if len(ranks) > 1:
        raise SpecError(
            f"merge_adapters(how={how!r}): {path} has ranks {sorted(ranks)} in the adapters; "
            f"use how='cat' or how='svd' for different ranks"
        )
    return _factorwise(sources, method, opts, draw)


def _cat(sources: Sequence[Source]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([layer.lora_A * weight * layer.scale for weight, layer in sources], dim=0)
    b = torch.cat([layer.lora_B for _, layer in sources], dim=1)
    return a, b


def _factorwise(
    sources: Sequence[Source], method: str, opts: Options, draw: MaskDrawer
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the A factors and the B factors apart; ``sqrt(|w s|)`` on each, the sign on A."""
    folded = [weight * layer.scale for weight, layer in sources]
    roots = [math.sqrt(abs(f)) for f in folded]
    signed = [r if f >= 0 else -r for r, f in zip(roots, folded)]
    device = sources[0][1].lora_A.device
    dtype = sources[0][1].lora_A.dtype
    a = _merge(
        method,
        [layer.lora_A for _, layer in sources],
        torch.tensor(signed, device=device),
        opts,
        draw,
    )
    b = _merge(
        method,
        [layer.lora_B for _, layer in sources],
        torch.tensor(roots, device=device),
        opts,
        draw,
    )
    return a.to(dtype), b.to(dtype)


def _svd(
    sources: Sequence[Source], method: str, opts: Options, draw: MaskDrawer, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the full deltas, then factor the result back to ``rank``.

    The deltas are combined in the base weight's layout, as PEFT does (DARE's random masks then
    fall on the same entries), and factored as out x in (kernel dims flattened)."""
    deltas = [layer.delta_weight() for _, layer in sources]
    device = deltas[0].device
    if opts.svd_driver is not None and device.type != "cuda":
        raise SpecError(
            f"merge_adapters: svd_driver={opts.svd_driver!r} works on CUDA only; the adapters "
            f"are on {device}"
        )
    weights = torch.tensor([weight for weight, _ in sources], device=device)
    delta = _merge(method, deltas, weights, opts, draw)
    if sources[0][1].kind in ("embedding", "conv1d_gpt2"):
        delta = delta.t()  # these store their weight as in x out
    u, s, vh = torch.linalg.svd(
        delta.flatten(1), full_matrices=opts.svd_full_matrices, driver=opts.svd_driver
    )
    kept = min(rank, s.shape[0])
    b = u[:, :kept] @ torch.diag(s[:kept])
    a = vh[:kept, :]
    if opts.svd_clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), opts.svd_clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    like_a, like_b = sources[0][1].lora_A, sources[0][1].lora_B
    a = a.reshape(kept, *like_a.shape[1:])
    b = b.reshape(like_b.shape[0], kept, *like_b.shape[2:])
    return a.to(like_a.dtype), b.to(like_b.dtype)


# -- the task-arithmetic family (Ilharco et al.; TIES: Yadav et al.; DARE: Yu et al.) ---------


def _mask_drawer(seed: int | None) -> MaskDrawer:
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


def _merge(
    method: str,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    opts: Options,
    draw: MaskDrawer,
) -> torch.Tensor:
    density = opts.density
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_drop_at_random(t, density, draw) for t in tensors]
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


def _drop_at_random(tensor: torch.Tensor, density: float, draw: MaskDrawer) -> torch.Tensor:
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


# -- the new adapter --------------------------------------------------------------------------


def _combined_spec(cm: CompiledModel, first: LoRA, ranks: Mapping[str, int]) -> LoRA:
    """A LoRA with scale 1 everywhere on exactly ``ranks``' paths; dropout and bias as the first
    adapter's (as PEFT). rsLoRA is off: its scale would be sqrt(rank), not 1 (a PEFT bug,
    huggingface/peft#3449)."""
    from passes.lora import LoRA

    rank = Counter(ranks.values()).most_common(1)[0][0]
    patterns = {re.escape(p): r for p, r in ranks.items() if r != rank}
    paths = sorted(ranks)
    targets: str | tuple[str, ...] = tuple(paths)
    if _suffixes_of_other_paths(cm.model) & set(paths):
        # a list would also select the module that path ends in: name the paths exactly
        targets = "|".join(re.escape(p) for p in paths)
    return LoRA(
        rank=rank,
        alpha=rank,
        targets=targets,
        dropout=first.dropout,
        bias=first.bias,
        rank_pattern=patterns,
        alpha_pattern=patterns,
    )


def _suffixes_of_other_paths(model: torch.nn.Module) -> set[str]:
    """Every ``b.c`` and ``c`` of a module path ``a.b.c``: what a list target would match too."""
    return {
        path.split(".", cut)[cut]
        for path, _ in model.named_modules()
        for cut in range(1, path.count(".") + 1)
    }


def _peft_tensors(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], kinds: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, (a, b) in factors.items():
        names = (
            ("lora_embedding_A", "lora_embedding_B")
            if kinds[path] == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{path}.{names[0]}"] = a.detach().clone()
        tensors[f"{PREFIX}{path}.{names[1]}"] = b.detach().clone()
    return tensors
