"""NOLA: ``base(x) + (alpha/r) · B A dropout(x)`` with ``A = Σ_i c_i A_i`` and ``B = Σ_j d_j B_j``,
LoRA's factors as linear combinations of frozen random bases (Koohpayegani et al., 2023, "NOLA:
Compressing LoRA using linear combination of random basis", https://arxiv.org/abs/2310.02556,
§3, Eq. 2-3).

Only the coefficients train: per layer ``nola_alpha`` c (num_basis_A,) and ``nola_beta`` d
(num_basis_B,), the paper's alpha and beta (``alpha`` here is LoRA's scale). The bases ``A_i``
(r x in) and ``B_j`` (out x r) are never trained nor saved: as in the paper, they are
regenerated from a seed. Sources of the facts below: the authors' code (github.com/UCDvision/NOLA;
the paper's text itself could not be read here).

- Distribution: each basis is uniform in ``±1`` scaled by ``1/√k``, ``k`` the number of bases of
  its factor (``num_basis_A`` for the A_i, ``num_basis_B`` for the B_j), as the authors'
  ``GenerateParams`` draws them for the LLaMA and GPT-2 experiments (``llama/peft/tuners/lora.py``,
  ``gpt/src/model_nola.py``). (Their ViT code, ``vit/NOLA.py``, draws kaiming-uniform bases.)
- Seeding and sharing: the authors' ViT code seeds every layer's bases with the same seed (0), so
  layers of one shape share them; their LLaMA/GPT-2 code gives every factor of every layer its
  own random seed, saved in the checkpoint. Here one ``seed`` (saved in the config) serves the
  whole adapter and one pair of bases serves every adapted layer of the same shape (in, out), as
  the ViT code; each layer mixes them with its own coefficients. A CPU generator seeded with
  ``seed`` draws them in float32, shape after shape in the order their first layers come in the
  model, the A bases then the B bases of each shape.
- Coefficients: the authors' LLaMA/GPT-2 code starts c and d at zero and adds to A a frozen
  kaiming-uniform matrix (LoRA's A, their ``NOLALinear.weight``), so that B = 0 and d gets
  gradients first. Here there is no such extra frozen matrix (the paper's A is the mixture
  alone, Eq. 2): c starts uniform in ``±1/√num_basis_A`` (from the global generator, as LoRA's
  A) and d at zero, which keeps both properties: a fresh adapter leaves the model as it is and d
  gets gradients from the first step.

In eval mode A and B are kept until a coefficient or a basis changes. Merging adds
``(alpha/r) · B A``.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_NOLA"`` (PEFT has no
NOLA; its loader refuses such a file). The config holds ``r``, ``num_basis_A``, ``num_basis_B``,
``basis_seed``, ``lora_alpha``, ``nola_dropout`` and the selection; per layer the file holds
``nola_alpha`` and ``nola_beta``, nothing else. Bases are rounded through the base weight's dtype
and, like the coefficients, kept in float32 over half precision.

Layers: Linear and transformers' GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_finite, check_int, check_probability, check_seed
from surgeon.layers import (
    adapter_tensor_kwargs,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_FORMAT = PeftFormat(
    "SURGEON_NOLA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        *selection_keys(),
        PeftKey("num_basis_A", "num_basis_A", 1024, INT),
        PeftKey("num_basis_B", "num_basis_B", 1024, INT),
        PeftKey("basis_seed", "seed", 0, INT),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        PeftKey("nola_dropout", "dropout", 0.0, NUMBER),
    ),
    # a bias switch would train base biases too: not this method
    switches={"bias": "none"},
    constants={"fan_in_fan_out": False},  # implied by the layer type
)


@dataclass(frozen=True)
class NOLA(MethodSpec):
    """LoRA's A and B as trained mixtures of frozen random bases regenerated from a seed.

    ``rank``: the rank of A and B. ``num_basis_A`` / ``num_basis_B``: how many random matrices
    each mixes (the coefficients trained per layer). ``seed``: draws the bases. ``alpha``: the
    update is scaled by ``alpha / rank``. ``dropout``: on the adapter's input, as LoRA's.
    """

    name = "nola"
    peft_format = PEFT_FORMAT

    rank: int = 8
    num_basis_A: int = 1024
    num_basis_B: int = 1024
    seed: int = 0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float = 8
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "num_basis_A", self.num_basis_A)
        check_int(owner, "num_basis_B", self.num_basis_B)
        check_seed(owner, "seed", self.seed)
        check_finite(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=2, num_basis_A=3, num_basis_B=4, alpha=4, targets=targets),
            "seeded-dropout": cls(
                rank=3, num_basis_A=5, num_basis_B=2, seed=7, dropout=0.1, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, NOLALayer]:
        generator = torch.Generator().manual_seed(self.seed)  # on the CPU: any device, same bases
        bases: dict[tuple[int, int], RandomBases] = {}
        layers = {}
        for path in paths:  # model order: each shape's bases are drawn as its first layer comes
            base = model.get_submodule(path)
            shape = in_out_features(base)
            if shape not in bases:
                bases[shape] = RandomBases(self, *shape, base.weight, generator)
            layers[path] = NOLALayer(base, bases[shape], self)
        return layers


def uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform in ``±bound``, float32, drawn from ``generator``."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class RandomBases(nn.Module):
    """The frozen ``nola_A_bases`` (num_basis_A x r x in) and ``nola_B_bases``
    (num_basis_B x out x r) of one shape: buffers shared by the adapter's layers of that shape."""

    def __init__(
        self,
        spec: NOLA,
        in_features: int,
        out_features: int,
        base_weight: torch.Tensor,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        a_shape = (spec.num_basis_A, spec.rank, in_features)
        b_shape = (spec.num_basis_B, out_features, spec.rank)
        # drawn on the CPU whatever the device (the meta device included), so every shape's
        # draws take the same place in the generator's stream
        # the authors' draw: uniform in ±1 over the square root of the number of bases
        a = uniform(a_shape, 1 / math.sqrt(spec.num_basis_A), generator)
        b = uniform(b_shape, 1 / math.sqrt(spec.num_basis_B), generator)
        self.register_buffer("nola_A_bases", through_base_dtype(a, base_weight))
        self.register_buffer("nola_B_bases", through_base_dtype(b, base_weight))


class NOLALayer(AdapterLayer):
    """One layer's coefficients ``nola_alpha`` (num_basis_A,) and ``nola_beta`` (num_basis_B,)
    over its shape's shared `RandomBases`."""

    method = "nola"

    def __init__(self, base: nn.Module, bases: RandomBases, spec: NOLA) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.bases = bases
        self.scale = spec.alpha / spec.rank
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        bound = 1 / math.sqrt(spec.num_basis_A)
        self.nola_alpha = nn.Parameter(torch.empty(spec.num_basis_A, **factory))
        nn.init.uniform_(self.nola_alpha, -bound, bound)
        self.nola_beta = nn.Parameter(torch.zeros(spec.num_basis_B, **factory))
        # A and B: mixed on every training call, kept in eval until a coefficient or basis changes
        self.factors = Cached(self.mixed_factors, self._factor_sources)

    def _factor_sources(self) -> tuple[torch.Tensor, ...]:
        bases = self.bases
        return (self.nola_alpha, self.nola_beta, bases.nola_A_bases, bases.nola_B_bases)

    def mixed_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = Σ_i c_i A_i`` (r x in) and ``B = Σ_j d_j B_j`` (out x r)."""
        a = torch.einsum("i,irk->rk", self.nola_alpha, self.bases.nola_A_bases)
        b = torch.einsum("j,jor->or", self.nola_beta, self.bases.nola_B_bases)
        return a, b

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        factors = ctx.module("factors", self.factors)
        a = ctx.call(operator.getitem, factors, 0)
        b = ctx.call(operator.getitem, factors, 1)
        cast = self.nola_alpha.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.nola_alpha.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        # the scale multiplies the rank-r intermediate: r/out of the work of scaling the output
        h = ctx.call(torch.mul, ctx.call(F.linear, h, a), self.scale)
        out = ctx.call(torch.add, base_out, ctx.call(F.linear, h, b))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) · B A`` in the base weight's layout."""
        a, b = self.mixed_factors()
        delta = (b @ a) * self.scale
        return delta.t() if self.kind == "conv1d_gpt2" else delta
