"""OFT: orthogonal finetuning (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by
Orthogonal Finetuning"): ``W' = W R^T``, ``R`` block-diagonal and orthogonal.

A targeted layer's ``n`` input features fall into blocks of ``b``; block ``i`` has a skew-symmetric
``S_i`` (``b (b - 1) / 2`` trained values, PEFT's ``oft_R``) and its rotation ``R_i``, the Cayley
transform of ``S_i``: ``(I - S)(I + S)^-1`` exactly, or (``cayley_neumann``, PEFT's default) the
series of ``(I + S)(I - S)^-1`` (the other sign, as PEFT), ``I + 2S + 2S² + ... + S^k``, cut after
``neumann_terms`` terms. As PEFT 0.21, the rotation
acts on the layer's input, each block as a row vector: ``x_i ← x_i R_i``, then the base layer
runs (``W (x R)^T = (W R^T) x``); on an embedding it acts on the output rows (``W' = W R``). The
activations pay ``O(n b)`` per vector and ``R`` (``n / b`` blocks of ``b x b``) is never built as
an ``n x n`` matrix; in eval mode without gradients the blocks are cached until the parameter
changes, so the unmerged forward is one batched block matmul plus the base layer.

Options, as PEFT: ``block_size`` or ``blocks`` (one of them; the other follows from the layer's
size, and a size that does not divide it is moved to the nearest that does, with a warning);
``block_share`` (one block for all); ``coft`` (constrained OFT: each forward first clips the
parameter, in place, to a Frobenius radius ``coft_eps / sqrt(stored blocks)`` per block);
``module_dropout`` (training only: ``int(p · blocks)`` blocks, drawn at random, become the
identity; not on embeddings, where PEFT has none; PEFT 0.21 builds this dropout for the other
layers but never applies it); ``init`` (``default``: ``S = 0``,
``R = I``; ``random``: normal with std 0.1); ``bias`` (base biases trained too).

Merging multiplies the weight by the block-diagonal matrix; unmerging by its exact inverse (the
cut series is not orthogonal, so not its transpose). Layers: Linear, Embedding, and Conv2d with a
1 x 1 kernel, no groups or dilation (the input rotation then runs over channels). PEFT 0.21 also
takes larger kernels, but rotates overlapping input patches and sums them back, so its unmerged
outputs disagree with its own merge (a fresh adapter already changes them): no implementation
can match both, and those layers are refused.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_probability,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind, through_base_dtype
from surgeon.passes.orthogonal.common import (
    cayley,
    cayley_neumann,
    fold_blocks,
    rotate_blocks,
    skew_symmetric,
    upper_triangle,
)
from surgeon.peft import (
    BOOL,
    INT,
    NUMBER,
    REQUIRED,
    STRING,
    PeftFormat,
    PeftKey,
    choices,
    selection_keys,
)
from surgeon.spec import MethodSpec

DEFAULT_BLOCK_SIZE = 32
"""PEFT's ``oft_block_size`` when neither it nor ``r`` is set."""
BIAS_MODES = ("none", "all", "oft_only")
INITS = {"default": True, "random": False}
"""surgeon's ``init`` -> PEFT's ``init_weights``."""
NEUMANN_SINCE = (0, 18)
"""The PEFT release that changed the Cayley-Neumann series (files from before it meant another)."""
WRITTEN_PEFT_VERSION = "0.21.2@surgeon-peft"
"""``peft_version`` of the files surgeon writes: PEFT's OFT parses it as a version (the part
before ``@``) when the Cayley-Neumann series is on, and refuses anything else."""


def _unset_as_none(value: int, config: Mapping[str, Any], where: str) -> int | None:
    """PEFT writes 0 for the one of ``r`` / ``oft_block_size`` that follows from the other."""
    return None if value == 0 else value


def _read_blocks(value: int, config: Mapping[str, Any], where: str) -> int | None:
    """``r``; PEFT requires exactly one of ``r`` and ``oft_block_size`` to be non-zero."""
    block_size = config.get("oft_block_size")
    if (value == 0) == (block_size == 0):
        raise SpecError(
            f"{where}: r={value!r} and oft_block_size={block_size!r}: exactly one of them must "
            f"be non-zero (r x oft_block_size is each layer's size, the other follows)"
        )
    return _unset_as_none(value, config, where)


def _peft_release(version: Any) -> tuple[int, int] | None:
    """``(major, minor)`` of a ``peft_version`` as PEFT writes it (``0.17.1``, ``0.18.0@hash``)."""
    match = re.match(r"(\d+)\.(\d+)", str(version).partition("@")[0])
    return (int(match.group(1)), int(match.group(2))) if match else None


def _read_neumann(value: bool, config: Mapping[str, Any], where: str) -> bool:
    """PEFT warns, and loads with its current series, when a Cayley-Neumann file comes from
    before the series changed (no ``peft_version``: older than the key itself); so does this."""
    version = config.get("peft_version")
    release = (0, 0) if version is None else _peft_release(version)
    if value and release is not None and release < NEUMANN_SINCE:
        warnings.warn(
            f"{where}: use_cayley_neumann=true in a file from PEFT {version or '< 0.18'}: PEFT "
            f"0.18 changed the Cayley-Neumann series, so this adapter loads (as PEFT loads it) "
            f"with other outputs than it was trained with",
            stacklevel=2,
        )
    return value


PEFT_FORMAT = PeftFormat(
    "OFT",
    keys=(
        *selection_keys(),
        PeftKey(
            "oft_block_size",
            "block_size",
            REQUIRED,
            INT,
            save=lambda spec, paths: spec.block_size or 0,
            load=_unset_as_none,
            why_required="OFT files from before PEFT 0.14 (another layout, which PEFT refuses "
            "too) lack it",
        ),
        PeftKey(
            "r", "blocks", 0, INT, save=lambda spec, paths: spec.blocks or 0, load=_read_blocks
        ),
        PeftKey("module_dropout", "module_dropout", 0.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: INITS[spec.init],
            load=choices({v: k for k, v in INITS.items()}, "init_weights"),
        ),
        PeftKey("coft", "coft", False, BOOL),
        PeftKey("eps", "coft_eps", 6e-5, NUMBER),
        PeftKey("block_share", "block_share", False, BOOL),
        PeftKey("use_cayley_neumann", "cayley_neumann", True, BOOL, load=_read_neumann),
        PeftKey("num_cayley_neumann_terms", "neumann_terms", 5, INT),
    ),
    # fan_in_fan_out: PEFT sets it False for Linear, the only layer it would concern
    constants={"fan_in_fan_out": False, "peft_version": WRITTEN_PEFT_VERSION},
)


def oft_kind(layer: nn.Module) -> str | None:
    """``linear``, ``conv`` (a 1 x 1 Conv2d without groups or dilation) or ``embedding`` when OFT
    can adapt ``layer``, else None."""
    kind = layer_kind(layer)
    if kind in ("linear", "embedding"):
        return kind
    if kind == "conv" and isinstance(layer, nn.Conv2d):
        plain = layer.groups == 1 and all(d == 1 for d in layer.dilation)
        return "conv" if plain and all(k == 1 for k in layer.kernel_size) else None
    return None


def rotated_features(layer: nn.Module) -> int:
    """How many features the rotation acts on: inputs (a convolution's channels), or an
    embedding's dimension."""
    if isinstance(layer, nn.Embedding):
        return layer.embedding_dim
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


def nearest_divisor(features: int, wanted: int) -> int:
    """PEFT's repair of a block size (or count) that does not divide ``features``: the nearest
    divisor, the smaller on a tie; ``features`` itself for anything larger."""
    if wanted >= features:
        return features
    higher = wanted
    while features % higher:
        higher += 1
    lower = wanted
    while lower > 1 and features % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def block_layout(
    features: int, block_size: int | None, blocks: int | None, path: str
) -> tuple[int, int]:
    """``(blocks, block_size)`` on a layer rotating ``features``, from the one the spec sets
    (moved to a divisor with a warning, as PEFT)."""
    field, wanted = ("block_size", block_size) if block_size is not None else ("blocks", blocks)
    given = nearest_divisor(features, wanted)
    if given != wanted:
        warnings.warn(
            f"OFT on {path}: {field}={wanted} does not divide its {features} features; using "
            f"{given} (as PEFT)",
            stacklevel=3,
        )
    other = features // given
    return (other, given) if field == "block_size" else (given, other)


@dataclass(frozen=True)
class OFT(MethodSpec):
    """Orthogonal finetuning: a block-diagonal Cayley rotation of each layer's input."""

    name = "oft"
    peft_format = PEFT_FORMAT

    block_size: int | None = None
    """Features per block (PEFT's ``oft_block_size``); 32 when ``blocks`` is not set either."""
    blocks: int | None = None
    """Blocks per layer (PEFT's ``r``), instead of ``block_size``."""
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    module_dropout: float = 0.0
    coft: bool = False
    coft_eps: float = 6e-5
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = 5
    init: str = "default"
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        if self.block_size is not None and self.blocks is not None:
            raise SpecError(
                f"{owner}.block_size={self.block_size!r}, {owner}.blocks={self.blocks!r}: set "
                f"only one (blocks x block_size is each layer's size, the other follows)"
            )
        if self.block_size is None and self.blocks is None:
            self._set("block_size", DEFAULT_BLOCK_SIZE)
        for field in ("block_size", "blocks"):
            if getattr(self, field) is not None:
                check_int(owner, field, getattr(self, field))
        check_probability(owner, "module_dropout", self.module_dropout)
        check_bool(owner, "coft", self.coft)
        check_number(owner, "coft_eps", self.coft_eps, 0, low_inclusive=True)
        check_bool(owner, "block_share", self.block_share)
        check_bool(owner, "cayley_neumann", self.cayley_neumann)
        check_int(owner, "neumann_terms", self.neumann_terms, minimum=0)  # 0 and 1: R = I
        check_choice(owner, "init", self.init, tuple(INITS))
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(block_size=4, targets=targets),
            "cayley-coft-dropout": cls(
                blocks=2,
                cayley_neumann=False,
                coft=True,
                coft_eps=1.0,
                module_dropout=0.5,
                targets=targets,
            ),
            "shared-block-3-terms": cls(
                block_size=8, block_share=True, neumann_terms=3, targets=targets
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "default"

    def supports(self, layer: nn.Module) -> bool:
        return oft_kind(layer) is not None

    def select(self, model: nn.Module) -> list[str]:
        try:
            return super().select(model)
        except SpecError as err:
            if "cannot adapt" not in str(err):
                raise
            raise SpecError(
                f"{err} (OFT adapts Linear, Embedding, and Conv2d with a 1 x 1 kernel, no groups "
                f"or dilation: PEFT 0.21's OFT on larger kernels disagrees with its own merge)"
            ) from None

    def create_layer(self, layer: nn.Module, path: str) -> OFTLayer:
        return OFTLayer(layer, path, self)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: exactly ``int(p · count)`` random blocks become the
    identity (none when one block is stored, as with ``block_share``)."""
    count, size, _ = blocks.shape
    dropped = int(p * count)
    if count == 1 or dropped == 0:
        return blocks
    mask = torch.zeros(count, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(count, device=blocks.device)[:dropped]] = 1
    mask = mask.view(count, 1, 1)
    eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype)
    return (1 - mask) * blocks + mask * eye


class OFTLayer(AdapterLayer):
    """``oft_R`` (stored blocks x ``b (b - 1) / 2``: each block's upper triangle, as PEFT) for
    one layer; PEFT keys ``oft_R.weight`` (``oft_embedding_R.weight`` on an embedding)."""

    method = "oft"

    def __init__(self, base: nn.Module, path: str, spec: OFT) -> None:
        super().__init__(base)
        self.kind = oft_kind(base)
        self.blocks, self.block_size = block_layout(
            rotated_features(base), spec.block_size, spec.blocks, path
        )
        self.cayley_neumann = spec.cayley_neumann
        self.neumann_terms = spec.neumann_terms
        self.coft_eps = spec.coft_eps if spec.coft else None
        weight = base.weight
        stored = 1 if spec.block_share else self.blocks
        shape = (stored, self.block_size * (self.block_size - 1) // 2)
        start = torch.zeros(shape, **adapter_tensor_kwargs(weight))
        if spec.init == "random" and weight.device.type != "meta":
            start = through_base_dtype(torch.randn(shape) * 0.1, weight)
        self.oft_R = nn.Parameter(start)
        self.module_dropout = 0.0 if self.kind == "embedding" else spec.module_dropout
        # the blocks the graph applies: kept in eval until oft_R changes
        self.rotation = Cached(self.rotation_blocks, self._rotation_sources)
        self._folded: torch.Tensor | None = None

    # -- the rotation --------------------------------------------------------------------------

    def rotation_blocks(self) -> torch.Tensor:
        """The blocks the graph applies: through module dropout while training."""
        blocks = self.blocks_now()
        return drop_blocks(blocks, self.module_dropout) if self.training else blocks

    def _rotation_sources(self) -> tuple[torch.Tensor]:
        return (self.oft_R,)

    def blocks_now(self) -> torch.Tensor:
        """The rotation's blocks from the parameter now, in its dtype; COFT first clips the
        parameter in place, as PEFT does on every forward and merge."""
        if self.coft_eps is not None:
            self._clip()
        skew = skew_symmetric(self.oft_R, self.block_size)
        if self.cayley_neumann:
            return cayley_neumann(skew, self.neumann_terms)
        return cayley(skew)

    @torch.no_grad()
    def _clip(self) -> None:
        """COFT: each stored block's skew matrix clipped to Frobenius norm ``eps / sqrt(count)``
        (computed as PEFT computes it, so both sides hold the same values after a forward)."""
        skew = skew_symmetric(self.oft_R, self.block_size)
        radius = self.coft_eps / torch.sqrt(torch.tensor(float(skew.shape[0])))
        norm = torch.linalg.vector_norm(skew, dim=(-2, -1), keepdim=True)
        clipped = torch.where(norm <= radius.to(norm), skew, radius.to(skew) * (skew / norm))
        self.oft_R.copy_(upper_triangle(clipped))

    # -- the graph -----------------------------------------------------------------------------

    @property
    def transforms_input(self) -> bool:
        return self.kind != "embedding"

    def emit_input(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        if self.kind == "embedding":
            return None
        return self._rotated(ctx, x, -3 if self.kind == "conv" else -1)  # channels: (N,) C, H, W

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        return self._rotated(ctx, base_out, -1) if self.kind == "embedding" else base_out

    def _rotated(self, ctx: EmitContext, h: fx.Node, dim: int) -> fx.Node:
        """``h`` rotated along ``dim`` in the adapter's dtype, back in the base's (as PEFT)."""
        dtype, base_dtype = self.oft_R.dtype, self.base.weight.dtype
        blocks = ctx.module("rotation", self.rotation)
        h = ctx.method("to", h, dtype) if dtype != base_dtype else h
        out = ctx.call(rotate_blocks, h, blocks, dim)
        return ctx.method("to", out, base_dtype) if dtype != base_dtype else out

    # -- merging -------------------------------------------------------------------------------

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as rows over the rotated features (a 1 x 1 convolution's: out x in)."""
        return weight.flatten(1)

    @torch.no_grad()
    def merge(self) -> None:
        blocks = self.blocks_now().detach()
        weight = self.base.weight
        rows = fold_blocks(self._rows(weight).to(blocks.dtype), blocks, self.transforms_input)
        weight.copy_(rows.view_as(weight))
        self._folded = blocks

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._folded is None:
            raise RuntimeError("OFT unmerge() without a merge() before it")
        inverse = torch.linalg.inv(self._folded.double())
        weight = self.base.weight
        rows = fold_blocks(self._rows(weight).double(), inverse, self.transforms_input)
        weight.copy_(rows.view_as(weight))
        self._folded = None

    @property
    def peft_names(self) -> dict[str, str]:
        key = "oft_embedding_R" if self.kind == "embedding" else "oft_R"
        return {"oft_R": f"{key}.weight"}
