"""TinyLoRA: ``base(x) + B R A dropout(x)`` with ``R = Σ_i v_i P_i``, a trained vector ``v`` of
``u`` entries mixing fixed random r x r matrices ("Learning to Reason in 13 Parameters", 2026,
https://arxiv.org/abs/2602.04118).

``A = √S_r V_rᵀ`` (r x in) and ``B = U_r √S_r`` (out x r) are the top-r part of the base
weight's singular value decomposition, taken when the adapter is built (r is capped at the
weight's smaller side), the singular values split evenly between them as PEFT does (in float32,
then rounded through the weight's dtype). ``P`` (u x r x r) is drawn from N(0, 1/r) with a
generator seeded with ``seed`` plus the layer's position among the adapter's targets (model
order). Only ``v`` trains; ``weight_tying`` lets consecutive layers share one: the targets fall
into ``max(1, round(n (1 - weight_tying)))`` groups of consecutive layers, one ``v`` each
(0: one per layer, 1: one for the whole model). ``v`` starts at zero (``init="zeros"``: the
adapter starts as the base layer) or uniform in ``±init_v_bound``.

Embeddings look their rows up in B: ``W[ids] + B[ids] R A`` (dropout on ``B[ids]``, computed in
the base dtype, as PEFT).

PEFT keys: ``tinylora_A``, ``tinylora_B`` per layer (always saved: a load uses them as saved),
``tinylora_P`` per layer with ``save_projection`` (without it, both sides draw P again from the
seed, the same values), ``base_model.tinylora_v.<group>`` (u,) for the adapter. In half
precision every tensor is kept in float32 after rounding through the base dtype, as PEFT keeps
them.

Layers: Linear, transformers' GPT-2 ``Conv1D`` and Embedding (those PEFT's TinyLoRA supports);
all merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
    check_probability,
    check_seed,
)
from surgeon.layers import adapter_dtype, adapter_tensor_kwargs, layer_kind, through_base_dtype
from surgeon.peft import (
    BOOL,
    BOOL_OR_STRING,
    INT,
    NUMBER,
    STRING,
    PeftFormat,
    PeftKey,
    choices,
    selection_keys,
)
from surgeon.spec import MethodSpec

BIAS_MODES = ("none", "all", "tinylora_only")
INITS = ("zeros", "uniform")
VECTOR_KEY = "base_model.tinylora_v"
PROJECTION = "tinylora_P"

PEFT_FORMAT = PeftFormat(
    "TINYLORA",
    keys=(
        PeftKey("r", "rank", 2, INT),
        PeftKey("u", "u", 64, INT),
        # PEFT's TinyLoRA has no exclude_modules: a selection that uses it is written out as the
        # chosen module paths (model order, so PEFT numbers the layers as surgeon does)
        *selection_keys(exclude=False),
        PeftKey("weight_tying", "weight_tying", 0.0, NUMBER),
        PeftKey("projection_seed", "seed", 42, INT),
        PeftKey("save_projection", "save_projection", True, BOOL),
        PeftKey("init_v_bound", "init_v_bound", 0.02, NUMBER),
        PeftKey("tinylora_dropout", "dropout", 0.0, NUMBER),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL_OR_STRING,
            save=lambda spec, paths: True if spec.init == "zeros" else spec.init,
            # False leaves v as uninitialised memory in PEFT; a load replaces it from the file
            load=choices({True: "zeros", False: "zeros", "uniform": "uniform"}, "init_weights"),
            lossy=True,
        ),
        PeftKey("bias", "bias", "none", STRING),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class TinyLoRA(MethodSpec):
    """A trained vector of ``u`` entries per group of layers, mixing fixed random r x r
    matrices between the frozen top-r singular factors of each weight.

    ``weight_tying``: how much layers share their vector, from 0 (each its own) to 1 (one for
    all). ``seed``: draws the fixed matrices P (PEFT's ``projection_seed``). ``save_projection``:
    files also hold P. ``init``: v starts at ``zeros`` (PEFT's ``init_weights=True``) or
    ``uniform`` in ``±init_v_bound``. ``bias``: ``all`` or ``tinylora_only`` also train the base
    biases (all, or the adapted layers').
    """

    name = "tinylora"
    peft_format = PEFT_FORMAT

    rank: int = 2
    u: int = 64
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    weight_tying: float = 0.0
    seed: int = 42
    save_projection: bool = True
    init: str = "zeros"
    init_v_bound: float = 0.02
    dropout: float = 0.0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "u", self.u)
        check_number(
            owner, "weight_tying", self.weight_tying, 0, 1, low_inclusive=True, high_inclusive=True
        )
        check_seed(owner, "seed", self.seed)
        check_bool(owner, "save_projection", self.save_projection)
        check_choice(owner, "init", self.init, INITS)
        check_number(owner, "init_v_bound", self.init_v_bound, 0, low_inclusive=True)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=2, u=5, targets=targets),
            "tied-uniform-unsaved-dropout": cls(
                rank=3,
                u=4,
                weight_tying=0.6,
                seed=7,
                save_projection=False,
                init="uniform",
                dropout=0.1,
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "zeros"

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2", "embedding")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, TinyLoRALayer]:
        groups = tying_groups(len(paths), self.weight_tying)
        vectors: dict[int, TiedVector] = {}
        layers = {}
        for index, (path, group) in enumerate(zip(paths, groups)):
            base = model.get_submodule(path)
            if group not in vectors:  # PEFT draws each group's v as its first layer comes
                vectors[group] = TiedVector(
                    group, self.u, base.weight, self.init, self.init_v_bound
                )
            # P's seed: the layer's position among the targets, which PEFT numbers in model order
            layers[path] = TinyLoRALayer(base, vectors[group], self, self.seed + index)
        return layers

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        vectors = {
            layer.vector.group: layer.vector
            for layer in layers.values()
            if isinstance(layer, TinyLoRALayer)  # not the copies of modules_to_save
        }
        return {f"{VECTOR_KEY}.{g}": v.tinylora_v for g, v in sorted(vectors.items())}

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """Without ``save_projection`` PEFT does not load P, even from a file that holds it:
        the projections are always the seed's."""
        if self.save_projection:
            return tensors
        return {k: v for k, v in tensors.items() if not k.endswith("." + PROJECTION)}


def tying_groups(count: int, weight_tying: float) -> list[int]:
    """The group of each of ``count`` targets (model order), as PEFT splits them: consecutive
    runs of ``count // groups`` layers, the last group taking the rest."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return [min(i // size, groups - 1) for i in range(count)]


class TiedVector(nn.Module):
    """``tinylora_v`` (u,): one group's trained vector, shared by the group's layers."""

    def __init__(
        self, group: int, u: int, base_weight: torch.Tensor, init: str, bound: float
    ) -> None:
        super().__init__()
        self.group = group
        factory = adapter_tensor_kwargs(base_weight)
        self.tinylora_v = nn.Parameter(torch.zeros(u, **factory))
        if init == "uniform" and not base_weight.is_meta:
            # PEFT's draw: from the global generator, on the CPU, in the base weight's dtype
            drawn = torch.empty(u, dtype=base_weight.dtype).uniform_(-bound, bound)
            with torch.no_grad():
                self.tinylora_v.copy_(drawn)


@torch.no_grad()
def singular_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = √S_r V_rᵀ`` (r x in) and ``B = U_r √S_r`` (out x r) of an (out x in) ``weight``:
    decomposed in float32, the parts rounded to the weight's dtype and multiplied there, as
    PEFT; returned in the adapter's dtype."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    dtype = weight.dtype
    root = s[:rank].to(dtype).sqrt()
    a = root[:, None] * vh[:rank].to(dtype)
    b = u[:, :rank].to(dtype) * root[None, :]
    return a.to(adapter_dtype(weight)).contiguous(), b.to(adapter_dtype(weight)).contiguous()


def projections(u: int, rank: int, seed: int) -> torch.Tensor:
    """``P`` (u x r x r) from N(0, 1/r), drawn in float32 on the CPU from a generator seeded
    with ``seed``, as PEFT draws it."""
    generator = torch.Generator().manual_seed(seed)
    return torch.normal(0.0, 1.0 / rank**0.5, size=(u, rank, rank), generator=generator)


class TinyLoRALayer(AdapterLayer):
    """One layer's frozen ``tinylora_A`` (r x in), ``tinylora_B`` (out x r) and
    ``tinylora_P`` (u x r x r) buffers, over its group's shared `TiedVector`."""

    method = "tinylora"

    def __init__(self, base: nn.Module, vector: TiedVector, spec: TinyLoRA, seed: int) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.vector = vector
        self.saves_projection = spec.save_projection
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        weight = self._out_in(base.weight)
        rank = min(spec.rank, *weight.shape)
        factory = adapter_tensor_kwargs(weight)
        if weight.is_meta:
            a = torch.empty(rank, weight.shape[1], **factory)
            b = torch.empty(weight.shape[0], rank, **factory)
            p = torch.empty(spec.u, rank, rank, **factory)
        else:
            a, b = singular_factors(weight, rank)
            p = through_base_dtype(projections(spec.u, rank, seed), weight)
        self.register_buffer("tinylora_A", a)
        self.register_buffer("tinylora_B", b)
        self.register_buffer(PROJECTION, p)

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """GPT-2's Conv1D stores (in, out); the factors work in (out, in)."""
        return weight.t() if self.kind == "conv1d_gpt2" else weight

    def mixing_matrix(self) -> torch.Tensor:
        """``R = Σ_i v_i P_i`` (r x r)."""
        return torch.einsum("i,ijk->jk", self.vector.tinylora_v, self.tinylora_P)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("tinylora_A", self.tinylora_A)
        b = ctx.attr("tinylora_B", self.tinylora_B)
        v = ctx.attr("tinylora_v", self.vector.tinylora_v)
        p = ctx.attr(PROJECTION, self.tinylora_P)
        mixing = ctx.call(torch.einsum, "i,ijk->jk", v, p)
        if self.kind == "embedding":
            return self._emit_lookup(ctx, x, base_out, a, b, mixing)
        dtype = self.tinylora_A.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.module("dropout", self.dropout, x) if self.dropout is not None else x
        h = ctx.method("to", h, dtype) if cast else h
        h = ctx.call(F.linear, ctx.call(F.linear, h, a), mixing)
        out = ctx.call(torch.add, base_out, ctx.call(F.linear, h, b))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def _emit_lookup(
        self,
        ctx: EmitContext,
        ids: fx.Node,
        base_out: fx.Node,
        a: fx.Node,
        b: fx.Node,
        mixing: fx.Node,
    ) -> fx.Node:
        """``B[ids] R A``, in the base dtype (PEFT casts the factors to the output's)."""
        dtype = self.base.weight.dtype
        if self.tinylora_A.dtype != dtype:
            a, b, mixing = (ctx.method("to", t, dtype) for t in (a, b, mixing))
        h = ctx.call(F.embedding, ids, b)
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        delta = ctx.call(torch.matmul, ctx.call(torch.matmul, h, mixing), a)
        return ctx.call(torch.add, base_out, delta)

    def delta_weight(self) -> torch.Tensor:
        delta = self.tinylora_B @ self.mixing_matrix() @ self.tinylora_A
        return self._out_in(delta)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The factors, and P where the spec saves it: v is the adapter's
        (`TinyLoRA.peft_shared_tensors`)."""
        names = ("tinylora_A", "tinylora_B") + ((PROJECTION,) if self.saves_projection else ())
        return {name: getattr(self, name) for name in names}
