"""OSF: orthogonal subspace fine-tuning (Nayak et al., 2025, "Sculpting Subspaces: Constrained
Full Fine-Tuning in LLMs for Continual Learning"): ``y = (W_high + U_low diag(S_low) V_low) x + b``
with the gradients of ``U_low`` and ``V_low`` kept orthogonal to ``W_high``'s singular vectors.

The base weight's SVD (in float32, ``W = U diag(S) Vh``) splits it at ``k``, the effective rank:
the top ``k`` singular directions form the frozen high part, the others the trainable low part
``U_low`` (out x r), ``S_low`` (r), ``V_low`` (r x in), with ``r = min(out, in) - k``. As PEFT,
the base weight stays untouched: the adapter adds ``U_low S_low V_low - U_0 S_0 V_0``, where
``U_0 S_0 V_0`` is the low part as the SVD gave it (frozen buffers), so a fresh adapter changes
nothing and ``W_high = W - U_0 S_0 V_0``. Merging adds that difference to the weight, unmerging
subtracts it. ``effective_rank``: an integer, a fraction in (0, 1] of the layer's smaller
dimension (a float: ``1.0`` freezes everything, ``1`` one direction), or None for half of it;
at most the smaller dimension. ``rank_pattern`` overrides it per layer: the first key (a regex)
found anywhere in the layer's path wins, as PEFT's ``re.search``.

The projection: ``U_low``'s gradient loses its component in the span of ``U_high`` (``G - U_high
U_highᵀ G``) and ``V_low``'s in the span of ``V_high`` (``G - G V_highᵀ V_high``). Where a factor
of the SVD is square, the kept subspace is exactly the span of the initial low factor and the
projection is written onto it (``U_0 U_0ᵀ G``, ``G V_0ᵀ V_0``), as PEFT does, so ``U_high`` or
``V_high`` is stored only where it is needed. PEFT applies it with gradient hooks on the two
parameters; here it is part of the compiled graph (an identity whose backward projects), so
``loss.backward()`` leaves projected gradients in ``.grad`` for `surgeon.train` and for any
plain PyTorch loop alike, with nothing to call (`MethodSpec.after_backward` runs after the
optimizer step: too late). It does not depend on hooks held by the parameter objects, which a
replaced parameter loses. Clipping, the optimizer and weight decay see the projected gradients;
an elementwise optimizer (AdamW) does not keep the update itself orthogonal, in PEFT as here. A
gradient that does not flow through the compiled graph (a loss on the factors themselves) is
not projected.

Half precision: the SVD runs in float32, its factors are rounded through the base dtype and kept
in float32 (PEFT's autocast_adapter_dtype), the delta is computed in float32 and rounded to the
base dtype before it is added. PEFT's upcast replaces the parameters after its hooks were
registered, so PEFT leaves half-precision gradients unprojected; surgeon projects them.

Layers: Linear (PEFT's OSF adapts ``nn.Linear`` only: GPT-2's ``Conv1D`` and other layers are
refused when named, and left out of presets such as ``all-linear``, as PEFT skips them). PEFT keys: ``osf_svd_params.U_low``, ``osf_svd_params.S_low``,
``osf_svd_params.V_low``; the frozen parts are not saved (a load takes them from the base
weight's SVD again).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_pattern_map, is_int
from surgeon.errors import SpecError
from surgeon.layers import layer_kind, through_base_dtype
from surgeon.peft import MAPPING, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_FORMAT = PeftFormat(
    "OSF",
    keys=(
        PeftKey("effective_rank", "effective_rank", None, NUMBER.optional()),
        # OSFConfig has neither exclude_modules nor layers_to_transform: a selection using them
        # is written as the chosen module paths
        *selection_keys(exclude=False, layers=False),
        PeftKey("rank_pattern", "rank_pattern", {}, MAPPING.optional()),
    ),
    # init_weights=False only draws random starting values that the file's weights replace
    constants={"init_weights": True},
    # PEFT accepts target_svd_config and never reads it
    ignored=frozenset({"target_svd_config"}),
)

EffectiveRank = int | float | None


def check_effective_rank(owner: str, name: str, value: Any) -> EffectiveRank:
    """None, an integer >= 1, or a fraction in (0, 1]; a whole float above 1 (``16.0``) is the
    integer PEFT reads it as. Other floats above 1 are refused: PEFT would truncate them."""
    if isinstance(value, float) and value > 1 and value.is_integer():
        return int(value)
    if value is None or (is_int(value) and value >= 1):
        return value
    if isinstance(value, float) and 0 < value <= 1:
        return value
    raise SpecError(
        f"{owner}.{name}={value!r}: expected an integer >= 1 (how many top singular directions "
        f"stay frozen), a fraction in (0, 1] of the layer's smaller dimension (a float), or "
        f"None (half of it)"
    )


def _pattern_for(path: str, keys: Iterable[str]) -> str | None:
    """The first of the rank_pattern ``keys`` found in ``path`` (PEFT's ``re.search``), or None."""
    return next((key for key in keys if re.search(key, path)), None)


def resolve_rank(value: EffectiveRank, smaller: int) -> int:
    """The effective rank ``value`` gives a layer whose smaller dimension is ``smaller``, by
    PEFT's rule: half of it for None, the fraction of it (rounded down) for a float, at most all
    of it."""
    if value is None:
        return smaller // 2
    rank = int(smaller * value) if isinstance(value, float) else value
    return min(rank, smaller)


@dataclass(frozen=True)
class OSF(MethodSpec):
    """Orthogonal subspace fine-tuning."""

    name = "osf"
    peft_format = PEFT_FORMAT

    effective_rank: EffectiveRank = None
    targets: str | tuple[str, ...] = "all-linear"
    rank_pattern: Mapping[str, EffectiveRank] = field(default_factory=dict)
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        self._set(
            "effective_rank", check_effective_rank(owner, "effective_rank", self.effective_rank)
        )
        self._set(
            "rank_pattern",
            check_pattern_map(owner, "rank_pattern", self.rank_pattern, check_effective_rank),
        )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(targets=targets),
            "rank-and-fraction-pattern": cls(
                effective_rank=3, rank_pattern={targets[0]: 0.25}, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def select(self, model: nn.Module) -> list[str]:
        paths = super().select(model)
        for key in self.rank_pattern:
            if not any(re.search(key, p) for p in paths):
                raise SpecError(
                    f"{type(self).__name__}.rank_pattern: key {key!r} matches no targeted module "
                    f"(targeted: {', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''})"
                )
        for path in paths:
            self._check_order_free(path, model.get_submodule(path))
        return paths

    def _check_order_free(self, path: str, layer: nn.Module) -> None:
        """PEFT takes the first matching key in the mapping's order, and adapter_config.json
        keeps keys sorted: refuse a layer whose rank those two orders decide differently."""
        first = _pattern_for(path, self.rank_pattern)
        in_file = _pattern_for(path, sorted(self.rank_pattern))
        smaller = min(layer.weight.shape)
        if first != in_file and resolve_rank(self.rank_pattern[first], smaller) != resolve_rank(
            self.rank_pattern[in_file], smaller
        ):
            raise SpecError(
                f"{type(self).__name__}.rank_pattern: keys {first!r} and {in_file!r} both match "
                f"{path} with different ranks; the first in the mapping's order decides (as in "
                f"PEFT), but adapter_config.json stores keys sorted, so the adapter would change "
                f"when saved and loaded: make the keys match different modules"
            )

    def rank_of(self, path: str, layer: nn.Module) -> int:
        """The layer's effective rank: the first ``rank_pattern`` key found in its path, else
        ``effective_rank``."""
        pattern = _pattern_for(path, self.rank_pattern)
        value = self.effective_rank if pattern is None else self.rank_pattern[pattern]
        smaller = min(layer.weight.shape)
        rank = resolve_rank(value, smaller)
        if rank < 1:
            where = "effective_rank" if pattern is None else f"rank_pattern[{pattern!r}]"
            raise SpecError(
                f"{type(self).__name__}.{where}={value!r} gives {path} (smaller dimension "
                f"{smaller}) an effective rank of 0; at least one direction must stay frozen"
            )
        return rank

    def create_layer(self, layer: nn.Module, path: str) -> OSFLayer:
        return OSFLayer(layer, self.rank_of(path, layer))


PEFT_NAMES = {name: f"osf_svd_params.{name}" for name in ("U_low", "S_low", "V_low")}


class OSFLayer(AdapterLayer):
    """The trainable low part ``U_low`` (out x r), ``S_low`` (r), ``V_low`` (r x in) of one
    layer's SVD, with the frozen buffers: the low part as the SVD gave it (``U_init``,
    ``S_init``, ``V_init``) and, where a factor is not square, the high part's singular vectors
    (``U_high``, ``V_high``) that the projection needs."""

    method = "osf"
    peft_names = PEFT_NAMES

    def __init__(self, base: nn.Module, effective_rank: int) -> None:
        super().__init__(base)
        self.effective_rank = effective_rank
        weight = base.weight
        u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
        k = effective_rank

        def kept(part: torch.Tensor) -> torch.Tensor:
            return through_base_dtype(part.contiguous(), weight).clone()

        self.U_low = nn.Parameter(kept(u[:, k:]))
        self.S_low = nn.Parameter(kept(s[k:]))
        self.V_low = nn.Parameter(kept(vh[k:]))
        # derived from the base weight again on every load: not saved, not in state dicts
        self.register_buffer("U_init", kept(u[:, k:]), persistent=False)
        self.register_buffer("S_init", kept(s[k:]), persistent=False)
        self.register_buffer("V_init", kept(vh[k:]), persistent=False)
        out_features, in_features = weight.shape
        # U is square when out <= in, V when out >= in: then the initial low factor spans the
        # kept subspace exactly and the high factor need not be stored
        self.u_square = out_features <= in_features
        self.v_square = out_features >= in_features
        self.register_buffer("U_high", None if self.u_square else kept(u[:, :k]), persistent=False)
        self.register_buffer("V_high", None if self.v_square else kept(vh[:k]), persistent=False)

    def _projected(self, ctx: EmitContext, name: str, init: fx.Node) -> fx.Node:
        """The factor ``name`` (``U_low`` or ``V_low``) as the graph reads it: unchanged, its
        gradient projected (onto its initial value's span where that factor of the SVD is
        square, else away from the stored high factor)."""
        factor = ctx.attr(name, getattr(self, name))
        rows = name == "V_low"
        square = self.v_square if rows else self.u_square
        if square:
            basis = init
        else:
            high = "V_high" if rows else "U_high"
            basis = ctx.attr(high, getattr(self, high))
        return ctx.call(projected_gradient, factor, basis, rows, square)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        u0, s0, v0 = (ctx.attr(n, getattr(self, n)) for n in ("U_init", "S_init", "V_init"))
        u = self._projected(ctx, "U_low", u0)
        v = self._projected(ctx, "V_low", v0)
        s = ctx.attr("S_low", self.S_low)
        cast = self.S_low.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.S_low.dtype) if cast else x
        # S scales the rank-r intermediate; the initial low part is subtracted the same way, so
        # a fresh adapter's two terms are the same numbers and cancel exactly
        trained = ctx.call(F.linear, ctx.call(torch.mul, ctx.call(F.linear, h, v), s), u)
        initial = ctx.call(F.linear, ctx.call(torch.mul, ctx.call(F.linear, h, v0), s0), u0)
        delta = ctx.call(torch.sub, trained, initial)
        if cast:
            delta = ctx.method("to", delta, self.base.weight.dtype)
        return ctx.call(torch.add, base_out, delta)

    def delta_weight(self) -> torch.Tensor:
        trained = (self.U_low * self.S_low) @ self.V_low
        initial = (self.U_init * self.S_init) @ self.V_init
        return trained - initial


def projected_gradient(
    factor: torch.Tensor, basis: torch.Tensor, rows: bool, basis_is_kept: bool
) -> torch.Tensor:
    """``factor`` unchanged; its gradient restricted to the trainable subspace: projected onto
    ``basis`` where it spans that subspace (``basis_is_kept``), else with its component along
    ``basis`` (the frozen high directions) removed. ``rows``: the basis vectors are rows (of
    ``V``), acting on the gradient from the right; else columns (of ``U``), from the left."""
    return _ProjectedGradient.apply(factor, basis, rows, basis_is_kept)


class _ProjectedGradient(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, factor: torch.Tensor, basis: torch.Tensor, rows: bool, basis_is_kept: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(basis)
        ctx.rows, ctx.basis_is_kept = rows, basis_is_kept
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (basis,) = ctx.saved_tensors
        if ctx.rows:
            along = (grad @ basis.transpose(0, 1)) @ basis
        else:
            along = basis @ (basis.transpose(0, 1) @ grad)
        return (along if ctx.basis_is_kept else grad - along), None, None, None
