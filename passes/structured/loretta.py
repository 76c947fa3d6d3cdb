"""LoRETTA_rep: the weight update as a tensor-train matrix (Yang et al., 2024, "LoRETTA:
Low-Rank Economic Tensor-Train Adaptation for Ultra-Low-Parameter Fine-Tuning of Large Language
Models", https://arxiv.org/abs/2402.11417, §3, the reparameterised variant LoRETTA_rep).

``h = W x + b + (alpha / rank) · ΔW · dropout(x)``, ``ΔW`` (out x in) held as ``d`` TT cores
``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` with ``out = m_1 ⋯ m_d``, ``in = n_1 ⋯ n_d``,
``r_0 = r_d = 1`` and every inner TT rank ``rank``:
``ΔW[(i_1 … i_d), (j_1 … j_d)] = G_1[:, i_1, j_1, :] G_2[:, i_2, j_2, :] ⋯ G_d[:, i_d, j_d, :]``
(row and column indices split row-major: ``i_1`` and ``j_1`` the most significant). This is the
paper's LoRETTA_rep, a reparameterised weight update, hence mergeable; its other variant,
LoRETTA_adp (tensorised bottleneck adapters after attention and feed-forward blocks), is not
implemented. The authors' released code tensorises LoRA's two factors ``A`` and ``B`` each as a
TT matrix; here, as the issue asks, the whole update is one TT matrix.

Factorisation (deterministic, per layer): a size's prime factors, largest first, are each
multiplied into the currently smallest of ``cores`` factors (the first of equal ones), and the
factors are sorted in decreasing order (32 in 3 cores: 4, 4, 2; 24 in 2: 6, 4). A size with
fewer prime factors than cores gets factors of 1 (5 in 2 cores: 5, 1), so every size factors;
``cores=1`` would be a full matrix and is refused.

Init: the cores ``G_1 … G_{d-1}`` are drawn from ``N(0, 1 / (r_{k-1} n_k))`` (the global
generator, as LoRA's ``A``), the last core is zero, so a fresh adapter is the base layer (the
paper's noise-reduction init is not followed). The forward contracts the input with the cores
one by one (never building ΔW); merging adds ΔW, built as the identity's rows through the same
contraction.

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_LORETTA"`` (PEFT has no LoRETTA; its loader refuses
such a file). The config holds ``r`` (TT rank), ``tt_cores``, ``lora_alpha``, ``lora_dropout``
and the selection; per layer the file holds ``loretta_core_0`` … ``loretta_core_{d-1}``.

Layers: Linear and transformers' GPT-2 ``Conv1D``; the cores are float32 over a half-precision
base (as PEFT keeps LoRA's factors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_int, check_positive, check_probability
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_LORETTA"
"""This project's own PEFT type: PEFT has no LoRETTA."""

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey("r", "rank", 4, INT),
        PeftKey("tt_cores", "cores", 3, INT),
        PeftKey("lora_alpha", "alpha", 4, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
    ),
    # a bias switch would train the base biases besides the cores: not this method
    switches={"bias": "none"},
    constants={"fan_in_fan_out": False},  # implied by the layer type
)


@dataclass(frozen=True)
class LoRETTA(MethodSpec):
    """A tensor-train weight update (LoRETTA_rep).

    ``rank``: the inner TT ranks; ``cores``: how many TT cores (each layer's input and output
    sizes are split into that many factors, see the module); ``alpha``: the update is scaled by
    ``alpha / rank``; ``dropout``: on the update's input, as LoRA's.
    """

    name = "loretta"
    peft_format = PEFT_FORMAT

    rank: int = 4
    cores: int = 3
    alpha: float = 4.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "cores", self.cores, minimum=2)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # three cores (factors of 1 on small or prime sizes); two cores with dropout and alpha
        return {
            "default": cls(rank=2, targets=targets),
            "two-cores-dropout": cls(rank=3, cores=2, alpha=6.0, dropout=0.1, targets=targets),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layer(self, layer: nn.Module, path: str) -> LoRETTALayer:
        return LoRETTALayer(layer, self.rank, self.cores, self.alpha / self.rank, self.dropout)


def factorise(size: int, count: int) -> tuple[int, ...]:
    """``size`` as ``count`` factors: its prime factors, largest first, each into the currently
    smallest factor; in decreasing order (1s where ``size`` has too few prime factors)."""
    factors = [1] * count
    for prime in reversed(_prime_factors(size)):
        smallest = factors.index(min(factors))
        factors[smallest] *= prime
    return tuple(sorted(factors, reverse=True))


def _prime_factors(size: int) -> list[int]:
    """``size``'s prime factors with multiplicity, in increasing order."""
    primes, divisor = [], 2
    while divisor * divisor <= size:
        while size % divisor == 0:
            primes.append(divisor)
            size //= divisor
        divisor += 1
    return primes + ([size] if size > 1 else [])


def tt_apply(h: torch.Tensor, in_factors: Sequence[int], *cores: torch.Tensor) -> torch.Tensor:
    """``ΔW h`` for ``h`` (..., in) with ΔW the TT matrix of ``cores`` (each ``(r, m, n, r')``),
    contracted one core at a time: the state ``(batch, outputs so far, r, inputs left)`` takes
    one input factor out and one output factor in per core."""
    lead = h.shape[:-1]
    state = h.reshape(-1, 1, 1, h.shape[-1])
    for n, core in zip(in_factors, cores):
        batch, done, rank, left = state.shape
        split = state.reshape(batch, done, rank, n, left // n)
        state = torch.einsum("bdrnl,rmns->bdmsl", split, core)
        state = state.reshape(batch, done * core.shape[1], core.shape[3], left // n)
    return state.reshape(*lead, -1)


class LoRETTALayer(AdapterLayer):
    """One layer's TT cores ``loretta_core_0`` … ``loretta_core_{d-1}`` (the last one zero at
    first)."""

    method = "loretta"

    def __init__(
        self, base: nn.Module, rank: int, cores: int, scaling: float, dropout: float
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        fan_in, fan_out = in_out_features(base)
        self.in_factors = factorise(fan_in, cores)
        self.out_factors = factorise(fan_out, cores)
        self.scaling = scaling
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        ranks = [1, *[rank] * (cores - 1), 1]
        for k, (m, n) in enumerate(zip(self.out_factors, self.in_factors)):
            core = torch.empty(ranks[k], m, n, ranks[k + 1], **factory)
            if k < cores - 1:
                nn.init.normal_(core, std=1 / math.sqrt(ranks[k] * n))
            else:
                nn.init.zeros_(core)
            setattr(self, f"loretta_core_{k}", nn.Parameter(core))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def cores(self) -> list[nn.Parameter]:
        return [getattr(self, f"loretta_core_{k}") for k in range(len(self.in_factors))]

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.loretta_core_0.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        cores = [ctx.attr(f"loretta_core_{k}", c) for k, c in enumerate(self.cores())]
        delta = ctx.call(tt_apply, h, self.in_factors, *cores)
        out = ctx.call(torch.add, base_out, delta, alpha=self.scaling)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        """``scaling · ΔW``: the identity's rows through the cores give ΔW transposed (in, out),
        the Conv1D layout; its transpose for a Linear."""
        first = self.loretta_core_0
        eye = torch.eye(math.prod(self.in_factors), dtype=first.dtype, device=first.device)
        delta = tt_apply(eye, self.in_factors, *self.cores()) * self.scaling
        return delta if self.kind == "conv1d_gpt2" else delta.t()
