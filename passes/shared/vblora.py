"""VB-LoRA: ``base(x) + B(A(dropout(x)))`` with A and B assembled from a bank of vectors shared
by every layer (Li et al., 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector
Banks", https://arxiv.org/abs/2405.15179).

A (r x in) and B (out x r) are cut into sub-vectors of ``vector_length`` L: each row of A into
in/L pieces, each column of B into out/L pieces. Every sub-vector is
``Σ_{i ∈ top-k(z)} softmax(z_top-k)_i · b_i``: a mix of the ``topk`` bank vectors ``b_i`` that
its own logits ``z`` (one per bank vector) rank highest. The bank (``num_vectors`` x L, one per
adapter) and every layer's logits train; there is no scaling factor (PEFT has none). Both are
drawn at random (the bank uniform in ``±init_vector_bank_bound``, the logits normal with
``init_logits_std``), in PEFT's order, so a fresh adapter already changes the outputs.

PEFT keys: ``vblora_logits_A`` (r, in/L, N) and ``vblora_logits_B`` (out/L, r, N) per layer,
``base_model.vblora_vector_bank`` (N, L) for the adapter. With ``save_only_topk_weights`` each
logits tensor is saved as its top-k indices (the smallest integer type that holds N) and its
first k - 1 softmax weights (``..._topk_indices``, ``..._topk_weights``); loading rebuilds the
logits as PEFT does (the weights' logarithms at the indices, -inf elsewhere), which computes
what the saved adapter computed, for inference and merging. The other logits are gone, so such
an adapter cannot train: a training forward raises, as PEFT's does.

Layers: Linear and transformers' GPT-2 ``Conv1D`` whose input and output features L divides
(those PEFT's VB-LoRA supports).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_bool, check_choice, check_int, check_number, check_probability
from surgeon.errors import SpecError
from surgeon.layers import (
    adapter_tensor_kwargs,
    in_out_features,
    layer_kind,
    through_base_dtype,
)
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

BIAS_MODES = ("none", "all", "vblora_only")
BANK_KEY = "base_model.vblora_vector_bank"
INDICES, WEIGHTS = "_topk_indices", "_topk_weights"

PEFT_FORMAT = PeftFormat(
    "VBLORA",
    keys=(
        PeftKey("r", "rank", 4, INT),
        *selection_keys(),
        PeftKey("num_vectors", "num_vectors", 256, INT),
        PeftKey("vector_length", "vector_length", 256, INT),
        PeftKey("topk", "topk", 2, INT),
        PeftKey("vblora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("save_only_topk_weights", "save_only_topk_weights", False, BOOL),
        PeftKey("init_vector_bank_bound", "init_vector_bank_bound", 0.02, NUMBER),
        PeftKey("init_logits_std", "init_logits_std", 0.1, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class VBLoRA(MethodSpec):
    """Vector-bank LoRA: every layer's low-rank factors mixed from one bank of vectors.

    ``bias``: ``all`` or ``vblora_only`` also train the base biases (all, or the adapted
    layers'). ``save_only_topk_weights``: files keep only what inference needs (see the module
    docstring); training such a file further is refused.
    """

    name = "vblora"
    peft_format = PEFT_FORMAT

    rank: int = 4
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    dropout: float = 0.0
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "num_vectors", self.num_vectors)
        check_int(owner, "vector_length", self.vector_length)
        check_int(owner, "topk", self.topk)
        if self.topk > self.num_vectors:
            raise SpecError(
                f"{owner}.topk={self.topk}: expected at most num_vectors ({self.num_vectors}), "
                f"the bank vectors a sub-vector can mix"
            )
        check_probability(owner, "dropout", self.dropout)
        check_bool(owner, "save_only_topk_weights", self.save_only_topk_weights)
        check_number(
            owner, "init_vector_bank_bound", self.init_vector_bank_bound, 0, low_inclusive=True
        )
        check_number(owner, "init_logits_std", self.init_logits_std, 0, low_inclusive=True)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # vector_length 1: the suite's layers (5 -> 6 features, the MLP's 24 -> 5 head) admit no
        # longer sub-vectors; the card runs longer ones
        return {
            "default": cls(rank=2, num_vectors=6, vector_length=1, targets=targets),
            "topk-files-dropout": cls(
                rank=3,
                num_vectors=5,
                vector_length=1,
                topk=3,
                dropout=0.1,
                save_only_topk_weights=True,
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return False  # the bank and the logits both start random

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, VBLoRALayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        self._check_sizes(bases)
        weight = next(iter(bases.values())).weight
        bank = VectorBank(self.num_vectors, self.vector_length, weight)
        layers, drawn = {}, None
        for path, base in bases.items():
            # PEFT draws a new bank before each layer's logits and keeps the last one: drawing
            # alike gives PEFT's fresh adapter for the same seed
            drawn = bank.draw(self.init_vector_bank_bound)
            layers[path] = VBLoRALayer(
                base, bank, self.rank, self.topk, self.dropout, self.save_only_topk_weights
            )
            layers[path].draw_logits(self.init_logits_std)
        if drawn is not None:
            bank.keep(drawn, weight)
        return layers

    def _check_sizes(self, bases: Mapping[str, nn.Module]) -> None:
        """PEFT refuses layers whose features the sub-vectors do not tile."""
        for path, base in bases.items():
            fan_in, fan_out = in_out_features(base)
            if fan_in % self.vector_length or fan_out % self.vector_length:
                raise SpecError(
                    f"VBLoRA.vector_length={self.vector_length} must divide the input and output "
                    f"features of every targeted layer; {path} has {fan_in} inputs and "
                    f"{fan_out} outputs"
                )

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        return {BANK_KEY: next(iter(layers.values())).bank.vblora_vector_bank}

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """A top-k file's indices and weights turned back into logits, as PEFT loads them."""
        if not self.save_only_topk_weights:
            return tensors
        out = dict(tensors)
        for key in [k for k in tensors if k.endswith(INDICES)]:
            stem = key.removesuffix(INDICES)
            if stem + WEIGHTS in out:  # else the load names the key that is missing
                out[stem] = logits_from_topk(
                    out.pop(key), out.pop(stem + WEIGHTS), self.num_vectors, stem
                )
        return out


def index_dtype(num_vectors: int) -> torch.dtype:
    """The integer type PEFT saves top-k indices in: the smallest that holds ``num_vectors``."""
    for dtype, bound in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if num_vectors < bound:
            return dtype
    return torch.int64


def logits_from_topk(
    indices: torch.Tensor, weights: torch.Tensor, num_vectors: int, key: str
) -> torch.Tensor:
    """Logits whose top-k softmax gives back the saved weights: their logarithms at the saved
    indices (the last weight is one minus the others), -inf at every other bank vector."""
    if indices.shape[:-1] != weights.shape[:-1] or indices.shape[-1] != weights.shape[-1] + 1:
        raise SpecError(
            f"{key}: top-k indices of shape {tuple(indices.shape)} do not go with weights of "
            f"shape {tuple(weights.shape)} (one weight fewer than indices per sub-vector)"
        )
    indices = indices.long()
    if indices.numel() and (indices.min() < 0 or indices.max() >= num_vectors):
        raise SpecError(f"{key}{INDICES}: indices outside the bank's {num_vectors} vectors")
    full = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    empty = torch.full((*full.shape[:-1], num_vectors), float("-inf"), dtype=full.dtype)
    return empty.scatter(-1, indices, full.log())


def mix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """The sub-vectors ``logits`` choose (``(..., N)``, a row per sub-vector -> ``(..., L)``):
    each row's top-k bank vectors weighted by the softmax of those k logits."""
    top, chosen = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[chosen]).sum(-2)


class VectorBank(nn.Module):
    """``vblora_vector_bank`` (N x L): one adapter's bank, shared by all of its layers."""

    def __init__(self, num_vectors: int, length: int, base_weight: torch.Tensor) -> None:
        super().__init__()
        factory = adapter_tensor_kwargs(base_weight)
        self.vblora_vector_bank = nn.Parameter(torch.empty(num_vectors, length, **factory))

    def draw(self, bound: float) -> torch.Tensor | None:
        """A bank drawn as PEFT draws it (uniform, float32, on the CPU); None on the meta device."""
        if self.vblora_vector_bank.is_meta:
            return None
        return torch.empty(self.vblora_vector_bank.shape).uniform_(-bound, bound)

    @torch.no_grad()
    def keep(self, drawn: torch.Tensor, base_weight: torch.Tensor) -> None:
        """Hold ``drawn``, rounded through the base dtype as PEFT moves it."""
        self.vblora_vector_bank.copy_(through_base_dtype(drawn, base_weight))


class VBLoRALayer(AdapterLayer):
    """``vblora_logits_A`` (r, in/L, N) and ``vblora_logits_B`` (out/L, r, N) of one layer,
    over its adapter's shared bank."""

    method = "vblora"

    def __init__(
        self,
        base: nn.Module,
        bank: VectorBank,
        rank: int,
        topk: int,
        dropout: float,
        saves_topk_only: bool,
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.bank = bank
        self.rank = rank
        self.topk = topk
        self.saves_topk_only = saves_topk_only
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        num_vectors, length = bank.vblora_vector_bank.shape
        fan_in, fan_out = in_out_features(base)
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.vblora_logits_A = nn.Parameter(
            torch.empty(rank, fan_in // length, num_vectors, **factory)
        )
        self.vblora_logits_B = nn.Parameter(
            torch.empty(fan_out // length, rank, num_vectors, **factory)
        )
        # (A, B): built on every training call, kept in eval until the logits or the bank change
        self.factors = Cached(self.lora_factors, self._factor_sources)

    @torch.no_grad()
    def draw_logits(self, std: float) -> None:
        """PEFT's draws: normal, float32, on the CPU, A then B; rounded through the base dtype."""
        if self.vblora_logits_A.is_meta:
            return
        for logits in (self.vblora_logits_A, self.vblora_logits_B):
            drawn = torch.empty(logits.shape).normal_(0, std)
            logits.copy_(through_base_dtype(drawn, self.base.weight))

    def _factor_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.vblora_logits_A, self.vblora_logits_B, self.bank.vblora_vector_bank)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` (r x in) and ``B`` (out x r) assembled from the bank."""
        logits_a, logits_b = self.vblora_logits_A, self.vblora_logits_B
        if self.training and self.saves_topk_only and not logits_a.is_meta:
            self._refuse_training_a_topk_file()
        bank = self.bank.vblora_vector_bank
        a = mix(logits_a, bank, self.topk).reshape(logits_a.shape[0], -1)
        # B's sub-vectors run down its columns: (out/L, r, L) -> (out/L, L, r) -> (out, r)
        b = mix(logits_b, bank, self.topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
        return a, b

    def _refuse_training_a_topk_file(self) -> None:
        # a top-k file leaves -inf at every logit but the top k of each sub-vector (checked on
        # one sub-vector, as PEFT does)
        if torch.isinf(self.vblora_logits_A[0, 0]).any():
            raise RuntimeError(
                "VB-LoRA cannot train an adapter loaded from a file saved with "
                "save_only_topk_weights: only each sub-vector's top-k logits were kept (the others "
                "are -inf). Such an adapter serves inference and merging; resume training from a "
                "file saved with save_only_topk_weights=False."
            )

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        factors = ctx.module("factors", self.factors)
        a = ctx.call(operator.getitem, factors, 0)
        b = ctx.call(operator.getitem, factors, 1)
        dtype = self.vblora_logits_A.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        delta = ctx.call(F.linear, ctx.call(F.linear, h, a), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_factors()
        delta = b @ a
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """The logits, or with ``save_only_topk_weights`` PEFT's compact form of them."""
        if not self.saves_topk_only:
            return self.peft_tensors()
        num_vectors = self.bank.vblora_vector_bank.shape[0]
        out = {}
        for name, logits in self.peft_tensors().items():
            top, chosen = logits.topk(self.topk, dim=-1)
            out[name + INDICES] = chosen.to(index_dtype(num_vectors))
            out[name + WEIGHTS] = F.softmax(top, dim=-1)[..., :-1].contiguous()
        return out
