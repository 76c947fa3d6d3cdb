"""LoRA's weighted combinations (PEFT's add_weighted_adapter for LoRA), for `LoRA.combine`.

Each source adapter's scaling is folded into the new adapter's factors, so the new adapter runs
with scale 1 (alpha equals rank on every layer) and its file loads in PEFT unchanged.

* ``cat``: the factors side by side, ``A = [w_i s_i A_i]``, ``B = [B_i]``: exactly
  ``sum w_i s_i B_i A_i``, at the sum of the ranks.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A factors and
  the B factors are combined separately (``sqrt(|w_i s_i|)`` on each side, the sign on A), which
  keeps the rank but only approximates the weighted sum of the deltas.
* ``svd`` and ``<method>_svd``: combine the full deltas ``s_i B_i A_i`` with the method, then
  factor the result back to ``svd_rank`` by a truncated SVD.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgeon.combine import HOWS, MaskDrawer, Options, mask_drawer, merge_tensors
from surgeon.errors import SpecError
from surgeon.peft import PREFIX
from surgeon.spec import Combination, MethodSpec

COMBINATIONS = HOWS

Source = tuple[float, Any]  # (weight, the adapter's LoRALayer on one path)


def combine_lora(
    first: MethodSpec,
    model: nn.Module,
    sources: Sequence[Combination],
    how: str,
    opts: Options,
) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The LoRA (``first``'s dropout and bias) that combines ``sources`` by ``how``."""
    ranks = {c.name: max([c.spec.rank, *c.spec.rank_pattern.values()]) for c in sources}
    _check_equal_ranks(how, ranks)
    by_layer = _sources_by_layer(model, sources)
    draw = mask_drawer(opts.seed)
    svd_rank = opts.svd_rank or max(ranks.values())
    factors = {
        path: _combine_layer(how, path, layer_sources, opts, draw, svd_rank)
        for path, layer_sources in by_layer.items()
    }
    spec = _combined_spec(model, first, {p: a.shape[0] for p, (a, _) in factors.items()})
    tensors = {}
    for path, (a, b) in factors.items():
        names = by_layer[path][0][1].peft_names
        tensors[f"{PREFIX}{path}.{names['lora_A']}"] = a.detach().clone()
        tensors[f"{PREFIX}{path}.{names['lora_B']}"] = b.detach().clone()
    return spec, tensors


def _check_equal_ranks(how: str, ranks: Mapping[str, int]) -> None:
    """The largest rank each adapter's spec allows (PEFT's rule) must agree for factor-wise
    combinations."""
    if how == "cat" or how.endswith("svd") or len(set(ranks.values())) == 1:
        return
    shown = ", ".join(f"{n!r} has rank {r}" for n, r in ranks.items())
    raise SpecError(
        f"merge_adapters(how={how!r}) combines the A and B factors themselves, so every adapter "
        f"needs the same rank ({shown}); use how='cat' or how='svd' for different ranks"
    )


def _sources_by_layer(model: nn.Module, sources: Sequence[Combination]) -> dict[str, list[Source]]:
    """Path -> (weight, layer) of every adapter on it, paths in the model's module order (the
    order PEFT draws dare's random masks in)."""
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    by_path: dict[str, list[Source]] = {}
    for source in sources:
        for path, layer in source.layers.items():
            by_path.setdefault(path, []).append((source.weight, layer))
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
    a = merge_tensors(
        method,
        [layer.lora_A for _, layer in sources],
        torch.tensor(signed, device=device),
        opts,
        draw,
    )
    b = merge_tensors(
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
    delta = merge_tensors(method, deltas, weights, opts, draw)
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


def _combined_spec(model: nn.Module, first: MethodSpec, ranks: Mapping[str, int]) -> MethodSpec:
    """A LoRA with scale 1 everywhere on exactly ``ranks``' paths; dropout and bias as the first
    adapter's (as PEFT). rsLoRA is off: its scale would be sqrt(rank), not 1 (a PEFT bug,
    huggingface/peft#3449)."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    patterns = {re.escape(p): r for p, r in ranks.items() if r != rank}
    paths = sorted(ranks)
    targets: str | tuple[str, ...] = tuple(paths)
    if _suffixes_of_other_paths(model) & set(paths):
        # a list would also select the module that path ends in: name the paths exactly
        targets = "|".join(re.escape(p) for p in paths)
    return type(first)(
        rank=rank,
        alpha=rank,
        targets=targets,
        dropout=first.dropout,
        bias=first.bias,
        rank_pattern=patterns,
        alpha_pattern=patterns,
    )


def _suffixes_of_other_paths(model: nn.Module) -> set[str]:
    """Every ``b.c`` and ``c`` of a module path ``a.b.c``: what a list target would match too."""
    return {
        path.split(".", cut)[cut]
        for path, _ in model.named_modules()
        for cut in range(1, path.count(".") + 1)
    }
