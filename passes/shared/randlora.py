"""RandLoRA: ``base(x) + (alpha/r) · B̄ (Ā(Λ, Γ) dropout(x))``, a full-rank update from shared
random bases (Albert et al., 2025, "RandLoRA: Full-rank parameter-efficient fine-tuning of
large models", https://arxiv.org/abs/2502.00987).

Every adapter holds one pair of frozen random bases, shared by its layers and sized for the
largest target: ``randlora_A`` (r, 1, min) and ``randlora_B`` (max, n, r), ``min``/``max`` the
smaller/larger of the targets' largest input and output sizes, ``n = ⌈min/r⌉`` bases, enough for
a full-rank update. A layer of sizes (in, out), ``m = min(in, out)``, ``M = max(in, out)`` and
``n_l = ⌈m/r⌉``, trains ``randlora_lambda`` Λ (r, n_l) and ``randlora_gamma`` Γ (n_l, m); it
scales its slice of A as ``Ā[k, b, j] = Λ[k, b] · A[k, 0, j] · Γ[b, j]`` and flattens it to
(r·n_l, m), and its slice ``B[:M, :n_l]`` to ``B̄`` (M, n_l·r). The small side of the layer goes
through Ā, the large one through B̄: ``ΔW = (alpha/r) · B̄ Ā`` when in <= out, its transpose
otherwise. The two flattenings run in different orders (r-major and basis-major): that is
PEFT's contraction, kept as it is so that files mean the same numbers. Λ starts at zero (a
fresh adapter changes nothing), Γ at ``1/max(n_l, m)``. Merging adds ΔW, as PEFT merges. PEFT
computes Λ's and Γ's gradients in a hand-written backward to save memory; autograd through the
same product gives the same gradients (up to summation order) and keeps one more (r, n_l, m)
tensor for the backward.

The bases come from a `torch.Generator` seeded with ``seed`` (PEFT's ``projection_prng_key``),
drawn exactly as PEFT draws them, so that files saved without them (``save_projection`` off)
load to the same outputs both ways: dense, Kaiming-uniform draws made in bfloat16 (float16 on a
CUDA machine without bfloat16, as PEFT decides), A then each basis of B, each divided by its
standard deviation; ``sparse``, ternary -1/0/1 with probability 1/6, 2/3, 1/6 from uniform
float32 draws; ``very_sparse`` (which wins over ``sparse``, as in PEFT), ternary with
probability ``1/(2√min)`` for each sign. They are rounded through the base weight's dtype and
held in the adapter's (float32 over half precision), as PEFT holds them. PEFT keys:
``base_model.randlora_A`` / ``base_model.randlora_B`` (with ``save_projection``), and per layer
``randlora_lambda`` and ``randlora_gamma``.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's RandLoRA supports).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_probability,
    check_seed,
)
from surgeon.errors import SpecError
from surgeon.layers import (
    adapter_tensor_kwargs,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

BIAS_MODES = ("none", "all", "randlora_only")
BASES_KEYS = ("base_model.randlora_A", "base_model.randlora_B")

PEFT_FORMAT = PeftFormat(
    "RANDLORA",
    keys=(
        PeftKey("r", "rank", 32, INT),
        # PEFT's RandLoRA has no exclude_modules: a selection that uses it is written out as the
        # chosen module paths
        *selection_keys(exclude=False),
        PeftKey("randlora_alpha", "alpha", 640, NUMBER),
        PeftKey("projection_prng_key", "seed", 0, INT),
        PeftKey("save_projection", "save_projection", True, BOOL),
        PeftKey("sparse", "sparse", False, BOOL),
        PeftKey("very_sparse", "very_sparse", False, BOOL),
        PeftKey("randlora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
    ),
    # fan_in_fan_out is implied by the layer type (PEFT corrects it alike); init_weights only
    # decides values that a file's Λ and Γ replace
    constants={"fan_in_fan_out": False, "init_weights": True},
)


@dataclass(frozen=True)
class RandLoRA(MethodSpec):
    """Full-rank adaptation through shared random bases scaled by trained Λ and Γ.

    ``rank``: the rank of each random basis (more bases, so more trained entries, as it
    shrinks). ``alpha``: the update is scaled by ``alpha / rank``. ``seed``: draws the bases.
    ``save_projection``: files hold the bases (else they are drawn again from ``seed``).
    ``sparse`` / ``very_sparse``: ternary bases instead of dense ones. ``bias``: ``all`` or
    ``randlora_only`` also train the base biases (all, or the adapted layers').
    """

    name = "randlora"
    peft_format = PEFT_FORMAT

    rank: int = 32
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float = 640
    seed: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    dropout: float = 0.0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_finite(owner, "alpha", self.alpha)
        check_seed(owner, "seed", self.seed)
        check_bool(owner, "save_projection", self.save_projection)
        check_bool(owner, "sparse", self.sparse)
        check_bool(owner, "very_sparse", self.very_sparse)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # rank 2 on the suite's 5-feature sides needs 3 bases, the last one partly past them;
        # the card runs very_sparse and the bias modes
        return {
            "default": cls(rank=2, alpha=8, targets=targets),
            "sparse-unsaved-dropout": cls(
                rank=3,
                alpha=5,
                seed=7,
                sparse=True,
                save_projection=False,
                dropout=0.1,
                targets=targets,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, RandLoRALayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        sizes = [in_out_features(b) for b in bases.values()]
        shared = RandomBases(
            self,
            max(i for i, _ in sizes),
            max(o for _, o in sizes),
            next(iter(bases.values())).weight,
        )
        scaling = self.alpha / self.rank
        return {p: RandLoRALayer(b, shared, scaling, self.dropout) for p, b in bases.items()}

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        shared = next(iter(layers.values())).bases
        return dict(zip(BASES_KEYS, (shared.randlora_A, shared.randlora_B)))

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """The file's tensors with the bases once, under `BASES_KEYS`, as PEFT loads them.

        PEFT's own files also hold a copy of the bases under every layer's path (each layer
        refers to the adapter's buffers); loading writes all of them into the one pair, the
        adapter-wide key last. Without ``save_projection`` the bases are not buffers PEFT loads
        at all: it draws them from the seed, whatever the file holds.
        """
        out = dict(tensors)
        for shared_key in BASES_KEYS:
            suffix = shared_key.removeprefix("base_model")
            copies = [out.pop(k) for k in list(out) if k.endswith(suffix) and k != shared_key]
            if not self.save_projection:
                out.pop(shared_key, None)
            elif shared_key not in out and copies:
                if any(not torch.equal(c, copies[0]) for c in copies[1:]):
                    raise SpecError(
                        f"{shared_key} is missing and the layers' copies of it differ: the "
                        f"file does not say which bases its adapter used"
                    )
                out[shared_key] = copies[0]
        return out


def bases_needed(smaller: int, rank: int) -> int:
    """How many rank-``rank`` bases span ``smaller`` dimensions: ``⌈smaller / rank⌉``."""
    return -(-smaller // rank)


def draw_dtype() -> torch.dtype:
    """The dtype PEFT draws dense bases in (accelerate's ``is_bf16_available``): bfloat16, or
    float16 on a CUDA machine whose device lacks bfloat16."""
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def kaiming_draw(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with ``a = √5`` (bound ``1/√fan_in``, fan_in = shape[1]·shape[2]), drawn
    in `draw_dtype` from ``generator``, as PEFT draws each dense basis."""
    tensor = torch.empty(shape, dtype=draw_dtype())
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def dense_bases(
    rank: int, smaller: int, larger: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, 1, smaller), then B (larger, n, r) one basis at a time; each divided by its
    standard deviation (in the draw's dtype, as PEFT divides)."""
    a = kaiming_draw((rank, 1, smaller), generator)
    count = bases_needed(smaller, rank)
    b = torch.cat([kaiming_draw((larger, 1, rank), generator) for _ in range(count)], dim=1)
    return a / a.std(), b / b.std()


def ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """-1 below ``1/(2s)``, +1 above ``1 - 1/(2s)``, 0 between; divided by its standard
    deviation."""
    edge = 1 / (2 * sparsity)
    signs = torch.zeros(uniform.shape)
    signs[uniform < edge] = -1
    signs[uniform > 1 - edge] = 1
    return signs / signs.std()


def sparse_bases(
    rank: int, smaller: int, larger: int, sparsity: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary A (r, 1, smaller) and B (larger, n, r) from uniform float32 draws, A first."""
    uniform_a = torch.rand((rank, 1, smaller), generator=generator)
    count = bases_needed(smaller, rank)
    uniform_b = torch.rand((larger, count, rank), generator=generator)
    return ternary(uniform_a, sparsity), ternary(uniform_b, sparsity)


class RandomBases(nn.Module):
    """The frozen ``randlora_A`` (r, 1, min) and ``randlora_B`` (max, n, r) of one adapter;
    buffers, shared by all of its layers."""

    def __init__(
        self, spec: RandLoRA, max_in: int, max_out: int, base_weight: torch.Tensor
    ) -> None:
        super().__init__()
        smaller, larger = min(max_in, max_out), max(max_in, max_out)
        generator = torch.Generator().manual_seed(spec.seed)  # on the CPU, as PEFT
        if spec.very_sparse:
            a, b = sparse_bases(spec.rank, smaller, larger, math.sqrt(smaller), generator)
        elif spec.sparse:
            a, b = sparse_bases(spec.rank, smaller, larger, 3, generator)
        else:
            a, b = dense_bases(spec.rank, smaller, larger, generator)
        self.register_buffer("randlora_A", through_base_dtype(a, base_weight))
        self.register_buffer("randlora_B", through_base_dtype(b, base_weight))


class RandLoRALayer(AdapterLayer):
    """``randlora_lambda`` Λ (r, n_l) and ``randlora_gamma`` Γ (n_l, min(in, out)) of one layer,
    over its adapter's shared bases."""

    method = "randlora"

    def __init__(self, base: nn.Module, bases: RandomBases, scaling: float, dropout: float) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.in_features, self.out_features = in_out_features(base)
        self.smaller = min(self.in_features, self.out_features)
        self.larger = max(self.in_features, self.out_features)
        rank = bases.randlora_A.shape[0]
        self.num_bases = bases_needed(self.smaller, rank)
        self.bases = bases
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.randlora_lambda = nn.Parameter(torch.zeros(rank, self.num_bases, **factory))
        gamma = torch.full((self.num_bases, self.smaller), 1 / max(self.num_bases, self.smaller))
        self.randlora_gamma = nn.Parameter(through_base_dtype(gamma, weight))
        # the two weights F.linear applies: built on every training call, kept in eval until
        # Λ, Γ or the bases change
        self.factors = Cached(self.linear_weights, self._factor_sources)

    def _factor_sources(self) -> tuple[torch.Tensor, ...]:
        return (
            self.randlora_lambda,
            self.randlora_gamma,
            self.bases.randlora_A,
            self.bases.randlora_B,
        )

    def linear_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of the two linear maps, input side first: Ā (r·n_l, in) then B̄
        (out, n_l·r) when in <= out, else B̄ᵀ (n_l·r, in) then Āᵀ (out, r·n_l)."""
        a = self.bases.randlora_A[:, :, : self.smaller]
        b = self.bases.randlora_B[: self.larger, : self.num_bases]
        # Λ scales each basis (rows of A), Γ each basis's columns: PEFT's order of products
        scaled = (self.randlora_lambda[:, :, None] * a * self.randlora_gamma).flatten(0, 1)
        spread = b.flatten(1)
        if self.in_features <= self.out_features:
            return scaled, spread
        return spread.t(), scaled.t()

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        factors = ctx.module("factors", self.factors)
        first = ctx.call(operator.getitem, factors, 0)
        second = ctx.call(operator.getitem, factors, 1)
        dtype = self.randlora_lambda.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        delta = ctx.call(F.linear, ctx.call(F.linear, h, first), second)
        out = ctx.call(torch.add, base_out, ctx.call(torch.mul, delta, self.scaling))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        first, second = self.linear_weights()
        delta = (second @ first) * self.scaling
        return delta.t() if self.kind == "conv1d_gpt2" else delta
