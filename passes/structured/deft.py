"""DEFT: decompositional efficient fine-tuning (Kumar et al., NeurIPS 2025, "DEFT:
Decompositional Efficient Fine-Tuning for Text-to-Image Models",
https://proceedings.neurips.cc/paper_files/paper/2025/hash/93a34a7138bdad95e874018d5f491cc6-Abstract-Conference.html).

``W' = (I - P_proj) W + s·Q R``: a rank-r subspace of each targeted weight's outputs is
projected away and replaced by a learned injection. ``P`` (PEFT's ``deft_P``, out x r) spans
the subspace, ``R`` (``deft_R``, r x in) is the injection, ``s = alpha / r`` (1 without
``alpha``). With ``decomposition="relu"`` (PEFT's default) ``Q = P`` and ``P_proj = P
relu(P)ᵀ`` (not orthogonal); with ``"qr"`` ``Q`` is P's orthonormal basis (QR) and ``P_proj =
Q Qᵀ``. ``para=True`` is PaRa (Chen et al., 2024, "PaRa: Personalizing Text-to-Image Diffusion
via Parameter Rank Reduction", https://arxiv.org/abs/2406.05641): the removal alone, no ``R``.
The rank is capped at the layer's out_features, as PEFT caps it (so is the ``r`` of ``alpha/r``).

Init, as PEFT draws it: ``P ~ N(0, 0.02)``; by default ``R = rightᵀ W / s`` (``right`` being
relu(P), or Q), which makes the update zero, so a fresh adapter leaves the layer as it was;
``init="random"`` draws ``R ~ N(0, 0.02·init_scale)`` instead (PEFT's ``init_weights=False``).
PaRa cannot start as the base layer.

Forward, in float32 as PEFT computes it: ``base(x) + Q (s R x - rightᵀ (W x))``. ``W x`` is the
layer's own output minus its bias where the graph has it (the base call, or a DEFT adapter's
before this one on the layer); after another method's output, or on an input another adapter
transformed, it is computed from W (one more full matmul). Otherwise only r-wide matmuls are
added. ``Q`` and ``right`` are recomputed on every call that trains P and kept in eval until P
changes.

Merging adds ``Q (s R - rightᵀ W)``, whose only part depending on the weight, ``rightᵀ W``
(r x in), is read before any adapter of the same merge changed W (`prepare_merge`) and kept,
as PEFT keeps it: the fold is not invertible, so unmerging subtracts the update rebuilt from that
factor, which is exact up to rounding.

Layers: Linear and transformers' GPT-2 ``Conv1D``, as PEFT.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_bool, check_choice, check_int, check_number, check_probability
from surgeon.layers import in_out_features, layer_kind, through_base_dtype
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, choices, selection_keys
from surgeon.spec import MethodSpec

DECOMPOSITIONS = ("relu", "qr")
INITS = {"default": True, "random": False}
"""surgeon's ``init`` -> PEFT's ``init_weights``."""
BIAS_MODES = ("none", "all", "deft_only")
COMPUTE_DTYPE = torch.float32
"""PEFT computes DEFT's update in float32 whatever the layer's dtype."""

PEFT_FORMAT = PeftFormat(
    "DEFT",
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("decomposition_method", "decomposition", "relu", STRING),
        # PEFT scales by alpha / r only for an alpha that is set and not zero
        PeftKey("alpha", "alpha", None, NUMBER.optional(), load=lambda v, c, w: v or None),
        PeftKey("para", "para", False, BOOL),
        PeftKey("deft_dropout", "dropout", 0.0, NUMBER),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: INITS[spec.init],
            load=choices({v: k for k, v in INITS.items()}, "init_weights"),
        ),
        PeftKey("init_scale", "init_scale", 1.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
        *selection_keys(),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class DEFT(MethodSpec):
    """Decompositional efficient fine-tuning: a rank-``rank`` subspace of each weight's outputs
    replaced by a learned injection.

    ``decomposition``: ``relu`` or ``qr`` (how the projection is built from P); ``alpha``: the
    injection's scale is ``alpha / rank`` (None: 1); ``para``: PaRa's removal alone, no
    injection; ``init``: ``default`` (the injection cancels the removal) or ``random``
    (``R ~ N(0, 0.02·init_scale)``); ``bias``: ``all`` or ``deft_only`` also train the base
    biases (all, or the adapted layers').
    """

    name = "deft"
    peft_format = PEFT_FORMAT

    rank: int = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    decomposition: str = "relu"
    alpha: float | None = None
    para: bool = False
    dropout: float = 0.0
    init: str = "default"
    init_scale: float = 1.0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_choice(owner, "decomposition", self.decomposition, DECOMPOSITIONS)
        if self.alpha is not None:
            check_number(owner, "alpha", self.alpha, 0)
        check_bool(owner, "para", self.para)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "init", self.init, tuple(INITS))
        check_number(owner, "init_scale", self.init_scale, 0, low_inclusive=True)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # rank 8 is capped on the MLP's 5-output head
        return {
            "default": cls(rank=4, targets=targets),
            "qr-alpha-random-dropout": cls(
                rank=8,
                decomposition="qr",
                alpha=16,
                init="random",
                init_scale=2.0,
                dropout=0.1,
                targets=targets,
            ),
            "para": cls(rank=4, para=True, targets=targets),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "default" and not self.para

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layer(self, layer: nn.Module, path: str) -> DEFTLayer:
        rank = min(self.rank, in_out_features(layer)[1])
        scale = self.alpha / rank if self.alpha else 1.0
        return DEFTLayer(layer, rank, scale, self)


def projection(p: torch.Tensor, decomposition: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, right)`` in float32 with ``P_proj = Q rightᵀ``: ``(P, relu(P))``, or QR's ``(Q, Q)``."""
    p = p.to(COMPUTE_DTYPE)
    if decomposition == "qr":
        q = torch.linalg.qr(p).Q
        return q, q
    return p, torch.relu(p)


class DEFTLayer(AdapterLayer):
    """``deft_P`` (out x r) and, unless PaRa, ``deft_R`` (r x in) of one Linear or GPT-2
    ``Conv1D``; float32 over a half-precision base, as PEFT keeps them."""

    method = "deft"

    def __init__(self, base: nn.Module, rank: int, scale: float, spec: DEFT) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.decomposition = spec.decomposition
        self.scale = scale
        weight = base.weight
        n_in, n_out = in_out_features(base)
        # PEFT draws in float32 on the CPU (P, then R), then moves the values to the base's dtype
        p = torch.empty(n_out, rank).normal_(0.0, 0.02)
        self.deft_P = nn.Parameter(through_base_dtype(p, weight))
        if spec.para:
            self.deft_R = None
        elif spec.init == "random":
            r = torch.empty(rank, n_in).normal_(0.0, 0.02 * spec.init_scale)
            self.deft_R = nn.Parameter(through_base_dtype(r, weight))
        else:  # R = rightᵀ W / s: the update starts at zero
            _, right = projection(p.to(weight.device), self.decomposition)
            r = right.t() @ self._logical(weight.detach().to(COMPUTE_DTYPE)) / scale
            self.deft_R = nn.Parameter(through_base_dtype(r, weight))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else None
        self.projection = Cached(self._projection_now, lambda: (self.deft_P,))
        # rightᵀ W as the last merge read it (unmerge rebuilds the update from it)
        self._pending_factor: torch.Tensor | None = None
        self._merged_factor: torch.Tensor | None = None

    def _logical(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` laid out out x in (GPT-2's Conv1D stores it in x out), and back."""
        return weight.t() if self.kind == "conv1d_gpt2" else weight

    def _projection_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        return projection(self.deft_P, self.decomposition)

    # -- the graph ---------------------------------------------------------------------------

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.base.weight.dtype
        cast = dtype != COMPUTE_DTYPE
        pair = ctx.module("projection", self.projection)
        q = ctx.call(operator.getitem, pair, 0)
        right = ctx.call(operator.getitem, pair, 1)
        out = ctx.method("to", base_out, COMPUTE_DTYPE) if cast else base_out
        h = ctx.method("to", x, COMPUTE_DTYPE) if cast else x
        product = self._emit_layer_product(ctx, x, h, base_out, out)
        removed = ctx.call(torch.matmul, product, right)  # rightᵀ W x
        if self.deft_R is None:
            out = ctx.call(torch.sub, out, ctx.call(F.linear, removed, q))
        else:
            r = ctx.attr("deft_R", self.deft_R)
            r = ctx.method("to", r, COMPUTE_DTYPE) if self.deft_R.dtype != COMPUTE_DTYPE else r
            r = ctx.call(torch.mul, r, self.scale) if self.scale != 1 else r
            h = ctx.module("dropout", self.dropout, h) if self.dropout is not None else h
            low = ctx.call(torch.sub, ctx.call(F.linear, h, r), removed)
            out = ctx.call(torch.add, out, ctx.call(F.linear, low, q))
        out = ctx.method("to", out, dtype) if cast else out
        out.meta["surgeon"]["layer_product"] = product  # for a DEFT adapter after this one
        return out

    def _emit_layer_product(
        self, ctx: EmitContext, x: fx.Node, h: fx.Node, base_out: fx.Node, out: fx.Node
    ) -> fx.Node:
        """``W x`` in float32 (``h``: x so cast, ``out``: base_out so cast): the layer's
        output minus its bias where base_out is that, the product a DEFT adapter before this one
        used, else computed from W."""
        if _runs_layer_on(base_out, x):
            if self.base.bias is None:
                return out
            bias = ctx.attr("base_bias", self.base.bias)
            cast = self.base.bias.dtype != COMPUTE_DTYPE
            return ctx.call(torch.sub, out, ctx.method("to", bias, COMPUTE_DTYPE) if cast else bias)
        earlier = base_out.meta.get("surgeon", {}).get("layer_product")
        if earlier is not None:
            return earlier
        weight = ctx.attr("base_weight", self.base.weight)
        if self.base.weight.dtype != COMPUTE_DTYPE:
            weight = ctx.method("to", weight, COMPUTE_DTYPE)
        if self.kind == "conv1d_gpt2":
            return ctx.call(torch.matmul, h, weight)
        return ctx.call(F.linear, h, weight)

    # -- merging -------------------------------------------------------------------------------

    def _weight_factor(self) -> torch.Tensor:
        """``rightᵀ W`` (r x in, float32) from the weight as it is now."""
        _, right = self._projection_now()
        return right.t() @ self._logical(self.base.weight.to(COMPUTE_DTYPE))

    def _update(self, factor: torch.Tensor) -> torch.Tensor:
        """``Q (s R - factor)`` (PaRa: ``-Q factor``) in the base weight's layout and dtype."""
        q, _ = self._projection_now()
        if self.deft_R is None:
            update = -(q @ factor)
        else:
            update = q @ (self.deft_R.to(COMPUTE_DTYPE) * self.scale - factor)
        return self._logical(update).to(self.base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self._update(self._weight_factor())

    @torch.no_grad()
    def prepare_merge(self) -> None:
        # the unmerged graph removes the subspace from the base weight: other adapters merged
        # before this one in the same merge change the weight, not that
        self._pending_factor = self._weight_factor()

    @torch.no_grad()
    def merge(self) -> None:
        factor = self._pending_factor if self._pending_factor is not None else self._weight_factor()
        self._pending_factor, self._merged_factor = None, factor
        self.base.weight.add_(self._update(factor))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged_factor is None:
            raise RuntimeError("DEFTLayer unmerge() without a merge() before it")
        weight = self.base.weight
        weight.sub_(self._update(self._merged_factor.to(weight.device)))
        self._merged_factor = None


def _runs_layer_on(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` is the base layer's own traced call on ``x`` or, in a mixed batch, the
    rows of that call which ``x`` gathers."""
    if node.op == "call_module" and "surgeon" not in node.meta:
        return (node.args[0] if node.args else next(iter(node.kwargs.values()))) is x
    gathered = node.op == x.op == "call_function" and node.target is x.target is torch.index_select
    return gathered and node.args[1:] == x.args[1:] and _runs_layer_on(node.args[0], x.args[0])
