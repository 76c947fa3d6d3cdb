"""PSOFT: orthogonal fine-tuning in the principal subspace (Wu et al., 2025,
https://openreview.net/forum?id=FSHrinMArK).

``W x + b + scale · B (R - I) A dropout(x)``: the rank-r principal part ``U S Vᵀ`` of W (a
singular value decomposition of the base weight, taken when the adapter is built) is turned
by an r x r matrix ``R``, ``W' = W + U S (R - I) Vᵀ``, so only ``R`` trains. The frozen factors
are ``A = Vᵀ`` and ``B = U S / scale`` (``init="psoft"``) or ``A = √(S/scale) Vᵀ`` and
``B = U √(S/scale)`` (``init="pissa"``), with ``scale = alpha / r``: the scale cancels, as in
PEFT, which keeps it for its rounding.

``R = diag(b) C diag(a)``: ``C`` is the Cayley transform ``(I + Q)(I - Q)⁻¹`` of a
skew-symmetric ``Q`` (its r(r-1)/2 upper entries train, zero at first), or PEFT's truncated
Neumann series for it, or a free matrix (starting at I) when ``orthogonal=False``; ``a`` and
``b`` are optional trainable vectors (starting at one). A fresh adapter is the base layer.

The factors are not saved: they are recomputed from the base weight, in float32, exactly as
PEFT computes them (``torch.linalg.svd``, or ``torch.svd_lowrank`` with the default generator
of the weight's device seeded with ``seed``), so PEFT's files load with PEFT's outputs. PEFT
keys: ``psoft_R.weight``, ``psoft_R.vector_a`` (``a``), ``psoft_R.vector_b`` (``b``).

Layers: Linear (the only layer PEFT's PSOFT supports), in float32, float16 or bfloat16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_positive,
    check_probability,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_dtype, in_out_features, layer_kind
from surgeon.passes.orthogonal.common import cayley, cayley_neumann, skew_symmetric
from surgeon.peft import (
    BOOL,
    INT,
    NUMBER,
    STRING,
    PeftFormat,
    PeftKey,
    choices,
    selection_keys,
)
from surgeon.spec import MethodSpec

INITS = ("psoft", "pissa")
SVDS = ("full", "lowrank")
FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Base weight dtypes PEFT decomposes (in float32 whatever the dtype)."""


def _neumann_only(value: Any, config: Mapping[str, Any], where: str) -> Any:
    """PEFT ignores the Neumann options unless ``use_cayley_neumann`` is on: so does a load."""
    return value if config.get("use_cayley_neumann") else None


PEFT_FORMAT = PeftFormat(
    "PSOFT",
    keys=(
        PeftKey("r", "rank", 32, INT),
        PeftKey("psoft_alpha", "alpha", 32, NUMBER),
        *selection_keys(),
        PeftKey("psoft_dropout", "dropout", 0.0, NUMBER),
        PeftKey(
            "ab_svd_init",
            "init",
            "psoft_init",
            STRING,
            save=lambda spec, paths: f"{spec.init}_init",
            load=choices({f"{i}_init": i for i in INITS}, "ab_svd_init"),
        ),
        PeftKey("psoft_svd", "svd", "full", STRING),
        PeftKey("psoft_svd_lowrank_niter", "svd_iterations", 10, INT),
        PeftKey("random_seed", "seed", 0, INT),
        PeftKey("psoft_orth", "orthogonal", True, BOOL),
        PeftKey("psoft_mag_a", "scale_in", True, BOOL),
        PeftKey("psoft_mag_b", "scale_out", True, BOOL),
        # one field for two keys: no Neumann terms means the exact Cayley transform
        PeftKey(
            "use_cayley_neumann",
            None,
            False,
            BOOL,
            save=lambda spec, paths: spec.neumann_terms is not None,
        ),
        PeftKey(
            "num_cayley_neumann_terms",
            "neumann_terms",
            5,
            INT,
            save=lambda spec, paths: 5 if spec.neumann_terms is None else spec.neumann_terms,
            load=_neumann_only,
        ),
        PeftKey("cayley_neumann_eps", "neumann_eps", None, NUMBER.optional(), load=_neumann_only),
    ),
    # fan_in_fan_out: PEFT sets it False on the Linear layers PSOFT adapts; init_weights only
    # decides the values of R, which the file replaces
    constants={"fan_in_fan_out": False, "init_weights": True},
)


@dataclass(frozen=True)
class PSOFT(MethodSpec):
    """Orthogonal fine-tuning in the principal subspace of each weight."""

    name = "psoft"
    peft_format = PEFT_FORMAT

    rank: int = 32
    alpha: float = 32
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    init: str = "psoft"
    """How S splits between the factors: all in B (``psoft``, A's rows orthonormal) or its
    square root in each (``pissa``)."""
    svd: str = "full"
    """``full`` (``torch.linalg.svd``) or ``lowrank`` (``torch.svd_lowrank``, randomized)."""
    svd_iterations: int = 10
    """Power iterations of ``svd="lowrank"``."""
    seed: int = 0
    """What ``svd="lowrank"``'s random projection is drawn from."""
    orthogonal: bool = True
    """R from the Cayley transform of a skew-symmetric Q; False: R is a free r x r matrix."""
    scale_in: bool = True
    """A trainable vector scaling R's columns (its input side): PEFT's ``psoft_mag_a``."""
    scale_out: bool = True
    """A trainable vector scaling R's rows (its output side): PEFT's ``psoft_mag_b``."""
    neumann_terms: int | None = None
    """Terms of the Neumann series standing in for the Cayley transform's inverse; None: the
    exact transform (a linear solve)."""
    neumann_eps: float | None = None
    """With ``neumann_terms``: Q is scaled down to this Frobenius norm when it exceeds it."""
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "init", self.init, INITS)
        check_choice(owner, "svd", self.svd, SVDS)
        check_int(owner, "svd_iterations", self.svd_iterations, minimum=0)
        check_int(owner, "seed", self.seed, minimum=0)
        check_bool(owner, "orthogonal", self.orthogonal)
        check_bool(owner, "scale_in", self.scale_in)
        check_bool(owner, "scale_out", self.scale_out)
        if self.neumann_terms is not None:
            check_int(owner, "neumann_terms", self.neumann_terms)
        if self.neumann_eps is not None:
            check_number(owner, "neumann_eps", self.neumann_eps, 0, 1)
            if self.neumann_terms is None:
                raise SpecError(
                    f"{owner}.neumann_eps={self.neumann_eps!r}: only applies to the Neumann "
                    f"series; set neumann_terms too"
                )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, targets=targets),
            "pissa-lowrank-neumann-dropout": cls(
                rank=3,
                alpha=6,
                init="pissa",
                svd="lowrank",
                svd_iterations=2,
                seed=5,
                neumann_terms=5,
                neumann_eps=0.9,
                dropout=0.1,
                targets=targets,
            ),
            "free-matrix": cls(rank=2, orthogonal=False, scale_out=False, targets=targets),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> PSOFTLayer:
        fan_in, fan_out = in_out_features(layer)
        if self.rank > min(fan_in, fan_out):
            raise SpecError(
                f"PSOFT.rank={self.rank} on {path}: must be at most min(in_features, "
                f"out_features) = {min(fan_in, fan_out)}"
            )
        if layer.weight.dtype not in FACTOR_DTYPES:
            raise SpecError(
                f"PSOFT on {path}: the weight is {layer.weight.dtype}; PSOFT decomposes float32, "
                f"float16 or bfloat16 weights"
            )
        return PSOFTLayer(layer, self)


# -- the factors: the principal subspace of W --------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside the block, ``device``'s default generator is seeded with ``seed``; its state is
    restored after. ``torch.svd_lowrank`` takes no generator: PEFT seeds it this way."""
    if device.type in ("cpu", "meta"):  # meta tensors draw nothing
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    backend = torch.get_device_module(device.type)
    with torch.random.fork_rng(devices=[device], device_type=device.type), backend.device(device):
        backend.manual_seed(seed)
        yield


@torch.no_grad()
def principal_factors(weight: torch.Tensor, spec: PSOFT) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (r x in) and ``B`` (out x r) from the top ``spec.rank`` singular triplets of the
    (out x in) ``weight``, in float32, as PEFT's ``_build_psoft_ab_cache_buffers``."""
    w = weight.to(torch.float32)
    r = spec.rank
    if spec.svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        with seeded(spec.seed, w.device):
            u, s, v = torch.svd_lowrank(w, q=r, niter=spec.svd_iterations)
        vh = v.t()
    u, s, vh = u[:, :r], s[:r] / (spec.alpha / r), vh[:r]
    if spec.init == "psoft":
        a, b = vh, u * s
    else:
        root = s.sqrt()
        a, b = root[:, None] * vh, u * root
    return a.contiguous(), b.contiguous()


# -- R: the r x r matrix between them ----------------------------------------------------------


def bounded(q: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Q scaled down to Frobenius norm ``eps`` when above it (PEFT's ``cayley_neumann_eps``),
    with no data-dependent branch, so meta tensors run."""
    if eps is None:
        return q
    norm = torch.linalg.norm(q, ord="fro")
    return q * torch.where(torch.isfinite(norm) & (norm > eps), eps / (norm + 1e-12), 1.0)


class Rotation(nn.Module):
    """The trainable r x r matrix ``R = diag(scale_out) C diag(scale_in)`` (PEFT's ``psoft_R``);
    calling it builds R from its parameters."""

    def __init__(self, spec: PSOFT, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        r = spec.rank
        factory = {"device": device, "dtype": dtype}
        self.size = r
        self.orthogonal = spec.orthogonal
        self.neumann_terms = spec.neumann_terms
        self.neumann_eps = spec.neumann_eps
        # the upper entries of Q (zero: C = I), or the free matrix itself (I)
        self.weight = nn.Parameter(
            torch.zeros(r * (r - 1) // 2, **factory) if self.orthogonal else torch.eye(r, **factory)
        )
        self.scale_in = nn.Parameter(torch.ones(r, **factory)) if spec.scale_in else None
        self.scale_out = nn.Parameter(torch.ones(r, **factory)) if spec.scale_out else None

    def forward(self) -> torch.Tensor:
        matrix = self.weight
        if self.orthogonal:
            q = skew_symmetric(self.weight, self.size)
            if self.neumann_terms is None:
                # PSOFT's (I + Q)(I - Q)^-1 is OFT's convention on -Q, to the bit
                matrix = cayley(-q)
            else:
                matrix = cayley_neumann(bounded(q, self.neumann_eps), self.neumann_terms)
        if self.scale_out is not None:
            matrix = self.scale_out[:, None] * matrix
        if self.scale_in is not None:
            matrix = matrix * self.scale_in[None, :]
        return matrix


PEFT_NAMES = {
    "weight": "psoft_R.weight",
    "scale_in": "psoft_R.vector_a",
    "scale_out": "psoft_R.vector_b",
}


class PSOFTLayer(AdapterLayer):
    """One Linear layer's frozen factors ``A``, ``B`` (float32 buffers, left out of adapter
    files: a load recomputes them) and its trainable `Rotation`."""

    method = "psoft"

    def __init__(self, base: nn.Module, spec: PSOFT) -> None:
        super().__init__(base)
        weight = base.weight
        self.scale = spec.alpha / spec.rank
        a, b = principal_factors(weight, spec)
        self.register_buffer("A", a)
        self.register_buffer("B", b)
        self.rotation = Rotation(spec, weight.device, adapter_dtype(weight))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("A", self.A)
        b = ctx.attr("B", self.B)
        rotation = ctx.module("rotation", self.rotation)
        cast = self.A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.A.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        h = ctx.call(F.linear, h, a)
        # (R - I) applied as R h - h, as PEFT; the scale multiplies the rank-r intermediate
        turned = ctx.call(torch.sub, ctx.call(F.linear, h, rotation), h)
        delta = ctx.call(F.linear, ctx.call(torch.mul, turned, self.scale), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        rotation = self.rotation()
        eye = torch.eye(rotation.shape[0], device=rotation.device, dtype=rotation.dtype)
        return self.B @ (rotation - eye) @ self.A * self.scale

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {PEFT_NAMES[n]: p for n, p in self.rotation.named_parameters()}
