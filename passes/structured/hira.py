"""HiRA: Hadamard high-rank adaptation (Huang et al., ICLR 2025, "HiRA: Parameter-Efficient
Hadamard High-Rank Adaptation for Large Language Models", https://openreview.net/forum?id=TwJrTz9cRS).

``base(x) + (W0 ⊙ B A) dropout(x)``: the update ``ΔW = W0 ⊙ (B A)`` is the frozen base weight
times a rank-r product, element by element, so its rank is not bounded by r. As in PEFT there is
no scaling (no alpha). ``B`` starts at zero (embeddings: ``A``), so a fresh adapter changes
nothing.

Forward: ``W0 ⊙ B A`` cannot run as two thin matmuls as LoRA's update does; it is built as a
whole matrix on every training call and, in eval mode, kept until ``W0``, ``A`` or ``B``
change (`Cached`), so inference pays for one matmul with it. Embeddings never build the
vocabulary-sized matrix: a token's row is ``W0[id] ⊙ (Aᵀ[id] Bᵀ)``, looked up per token. As in
PEFT, embeddings apply no dropout and look up without the base's padding index or norm options.

Merging adds ``W0 ⊙ B A`` with ``W0`` read before any adapter of the same merge changed it
(`prepare_merge`), as the unmerged graph sees it; unmerging puts back a copy of the weight taken
right before this adapter folded in (kept on the CPU, as PEFT keeps its copy), so it is exact.

Layers: Linear, transformers' GPT-2 ``Conv1D``, Conv1d/2d/3d and Embedding, as PEFT. Grouped
convolutions are not adaptable (PEFT refuses them: the Hadamard product needs ``B A`` shaped as
the grouped kernel); convolutions padding other than with zeros are refused (PEFT would pad its
update with zeros, so its merged and unmerged outputs differ). Conv3d kernels whose first two
sizes are 1, where PEFT's update fails, work here. Bases stored in 4 bits are refused (the
core's check: ``adapts_quantized`` is off); adapting them would mean dequantizing ``W0`` on every
forward and merge, as PEFT's bitsandbytes layers do, which is not built here.

PEFT config: every key of PEFT 0.21's HiraConfig is read; a non-empty ``rank_pattern`` is
refused (PEFT applies it only to a second adapter on a layer).

PEFT keys: ``hira_A`` (r, in) and ``hira_B`` (out, r); convolutions ``hira_A`` (r, in, *kernel)
and ``hira_B`` (out, r, 1, ...); embeddings ``hira_embedding_A`` (r, num_embeddings) and
``hira_embedding_B`` (dim, r).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_choice, check_int, check_probability
from surgeon.errors import SpecError
from surgeon.layers import (
    UpdateFromOriginalWeight,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import BOOL_OR_STRING, INT, MAPPING, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_INITS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "random": False}
"""surgeon's ``init`` -> PEFT's ``init_weights``."""


def _read_init(value: Any, config: Mapping[str, Any], where: str) -> str:
    """PEFT's ``init_weights``: true, false, "gaussian" (in any case, as PEFT compares it), or
    null, which PEFT treats as false (random draws)."""
    if value is False or config.get("init_weights", True) is None:
        return "random"
    if value is True:
        return "default"
    if isinstance(value, str) and value.lower() == "gaussian":
        return "gaussian"
    raise SpecError(
        f"{where}: init_weights={value!r} is not supported (supported: true, false, 'gaussian')"
    )


def _refuse_rank_pattern(value: Any, config: Mapping[str, Any], where: str) -> None:
    """PEFT 0.21's HiRA applies ``rank_pattern`` only to a layer that already holds another HiRA
    adapter: the layers it wraps first get ``r`` (its files hold rank ``r`` there), a second
    adapter on them the pattern's rank. What a file that sets it holds depends on how PEFT's
    model was built, so it is refused rather than guessed."""
    if value:
        raise SpecError(
            f"{where}: rank_pattern={value!r} is not supported: PEFT's HiRA applies it only to "
            f"layers that already hold another HiRA adapter, so the ranks it means are unclear; "
            f"use one rank (r)"
        )


PEFT_FORMAT = PeftFormat(
    "HIRA",
    keys=(
        PeftKey("r", "rank", 32, INT),
        *selection_keys(),
        PeftKey("hira_dropout", "dropout", 0.0, NUMBER),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL_OR_STRING.optional(),
            save=lambda spec, paths: PEFT_INITS[spec.init],
            load=_read_init,
        ),
        PeftKey("rank_pattern", None, {}, MAPPING.optional(), load=_refuse_rank_pattern),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class HiRA(MethodSpec):
    """Hadamard high-rank adaptation: the base weight times a low-rank product, element-wise."""

    name = "hira"
    peft_format = PEFT_FORMAT

    rank: int = 32
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    init: str = "default"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "init", self.init, tuple(PEFT_INITS))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, targets=targets),
            "gaussian-dropout": cls(rank=2, dropout=0.1, init="gaussian", targets=targets),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init != "random"

    def supports(self, layer: nn.Module) -> bool:
        kind = layer_kind(layer)
        if kind == "conv":
            return layer.groups == 1
        return kind is not None

    def create_layer(self, layer: nn.Module, path: str) -> HiRALayer:
        if layer_kind(layer) == "conv" and layer.padding_mode != "zeros":
            raise SpecError(
                f"HiRA on {path}: convolutions with padding_mode={layer.padding_mode!r} are not "
                f"supported (only 'zeros': PEFT pads the update with zeros whatever the mode)"
            )
        return HiRALayer(layer, self.rank, self.dropout, self.init)


def peft_draws(
    kind: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], rank: int, init: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` as PEFT draws them, from the global generator on the CPU in float32: both
    from ``randn`` first, then (unless ``random``) re-initialised, so that the same seed gives
    PEFT's values. Default: A kaiming-uniform, B zero; ``gaussian``: A normal with std 1/r on
    linear layers (PEFT's convolutions keep kaiming); embeddings: A zero, B standard normal."""
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    if init == "random":
        return a, b
    if kind == "embedding":
        nn.init.zeros_(a)
        nn.init.normal_(b)
        return a, b
    if init == "gaussian" and kind != "conv":
        nn.init.normal_(a, std=1 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)
    return a, b


def _factor_shapes(base: nn.Module, kind: str, rank: int) -> tuple[tuple[int, ...], ...]:
    if kind == "embedding":
        return (rank, base.num_embeddings), (base.embedding_dim, rank)
    fan_in, fan_out = in_out_features(base)
    if kind == "conv":
        ones = (1,) * len(base.kernel_size)
        return (rank, fan_in, *base.kernel_size), (fan_out, rank, *ones)
    return (rank, fan_in), (fan_out, rank)


class HiRALayer(UpdateFromOriginalWeight, AdapterLayer):
    """``hira_A`` and ``hira_B`` of one layer; float32 over a half-precision base (rounded
    through the base dtype first, as PEFT keeps them)."""

    method = "hira"

    def __init__(self, base: nn.Module, rank: int, dropout: float, init: str) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.rank = rank
        # PEFT's embeddings build a dropout and never apply it
        uses_dropout = dropout > 0 and self.kind != "embedding"
        self.dropout = nn.Dropout(dropout) if uses_dropout else None
        a, b = peft_draws(self.kind, *_factor_shapes(base, self.kind, rank), rank, init)
        self.hira_A = nn.Parameter(through_base_dtype(a, base.weight))
        self.hira_B = nn.Parameter(through_base_dtype(b, base.weight))
        # W0 ⊙ B A as the adapted part's matmul or convolution reads it: recomputed on every
        # training call, kept in eval until W0, A or B change
        self.effective_weight = Cached(self.effective_weight_now, self._sources)

    # -- weight math -----------------------------------------------------------------------------

    def _product(self) -> torch.Tensor:
        """``B A`` with output features first: (out, in), convolutions (out, in, *kernel)."""
        a, b = self.hira_A, self.hira_B
        return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])

    def modulation(self) -> torch.Tensor:
        """``B A`` laid out as the base weight (GPT-2's Conv1D and embeddings store it transposed),
        in the adapter's dtype: merging adds ``W0 ⊙`` this."""
        product = self._product()
        return product.t() if self.kind in ("conv1d_gpt2", "embedding") else product

    def update_from(self, w0: torch.Tensor) -> torch.Tensor:
        """What merging adds: ``W0 ⊙ B A`` in the weight's dtype, as PEFT merges."""
        return w0 * self.modulation().to(w0.dtype)

    def _sources(self) -> tuple:
        return (self.base.weight, self.hira_A, self.hira_B)

    def effective_weight_now(self) -> torch.Tensor:
        """``W0 ⊙ B A`` with output features first (the layout F.linear and convolutions take), in
        the adapter's dtype: a half-precision W0 is promoted exactly, as in PEFT."""
        weight = self.base.weight
        return (weight.t() if self.kind == "conv1d_gpt2" else weight) * self._product()

    # -- the graph -------------------------------------------------------------------------------

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.hira_A.dtype
        cast = dtype != self.base.weight.dtype
        if self.kind == "embedding":
            update = self._emit_embedding(ctx, x)
        else:
            h = ctx.method("to", x, dtype) if cast else x
            if self.dropout is not None:
                h = ctx.module("dropout", self.dropout, h)
            weight = ctx.module("effective_weight", self.effective_weight)
            update = self._emit_through(ctx, h, weight)
        # a float32 update promotes a half-precision output; cast back as PEFT does
        out = ctx.call(torch.add, base_out, update)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _emit_through(self, ctx: EmitContext, h: fx.Node, weight: fx.Node) -> fx.Node:
        """The base layer's operation on ``h`` with ``weight``, without the bias."""
        if self.kind != "conv":
            return ctx.call(F.linear, h, weight)
        base = self.base
        conv = getattr(F, f"conv{len(base.kernel_size)}d")
        return ctx.call(conv, h, weight, None, base.stride, base.padding, base.dilation)

    def _emit_embedding(self, ctx: EmitContext, ids: fx.Node) -> fx.Node:
        """Per token: ``W0[id] ⊙ (Aᵀ[id] Bᵀ)``, the rows of ``W0 ⊙ (B A)ᵀ`` the tokens pick."""
        rows = ctx.call(F.embedding, ids, ctx.attr("base_weight", self.base.weight))
        a_rows = ctx.call(F.embedding, ids, ctx.method("t", ctx.attr("hira_A", self.hira_A)))
        modulation = ctx.call(F.linear, a_rows, ctx.attr("hira_B", self.hira_B))
        return ctx.call(torch.mul, rows, modulation)

    @property
    def peft_names(self) -> dict[str, str]:
        if self.kind == "embedding":
            return {"hira_A": "hira_embedding_A", "hira_B": "hira_embedding_B"}
        return {}
