"""LongLoRA (Chen et al., ICLR 2024, arXiv 2309.12307): LoRA with shifted sparse attention in
training, and trainable embeddings and norms ("LoRA+" in the paper's naming).

    layers: ``base(x) + scale * B(A(dropout(x)))`` (LoRA's fields, `LoRA`)
    training attention: S²-Attn(Q, K, V) with groups of ``G = length * group_size_ratio`` tokens

S²-Attn (section 3.2, Algorithm 1): the sequence is split into groups of G tokens and each group
attends only within itself; the second half of the heads is shifted by G/2 first (and rolled back
after), so its groups straddle the first half's and information flows between groups. It acts
only in training mode: at inference the model runs its standard full attention, so an adapter in
eval mode computes exactly what LoRA computes, and merging folds the LoRA factors as LoRA does
(S²-Attn leaves nothing to merge). Each group is attended to with the model's own mask restricted
to the group's tokens (padding and causality as the model masks them) and causally within the
group, as the paper's flash-attention code does: in the shifted heads, the group that the shift
wraps around holds the last G/2 and the first G/2 tokens, and is two causal pieces, neither
seeing the other (Algorithm 1's plain roll would let the first tokens see the last ones). Groups
count from the first position of the padded sequence. The length must be a multiple of G (the
paper's code raises too; pad sequences to a multiple) and the heads even: otherwise a training
call is a `SpecError`, as is one over cached keys.

How S²-Attn reaches attention: transformers' attention modules are call-time specialised
regions (`surgeon.specialise`) whose traced variants are checked against, and fall back to, the
module's own forward, and the core rewrites them for layer adapters only; a node spliced into
one variant's graph would be lost whenever the own forward runs. So LongLoRA goes through
transformers' attention interface, which both paths call: while the adapter runs (`on_running`)
the model's ``config._attn_implementation`` names a function registered for this method (its
group ratio and the model's original implementation in the name, so a trace keys on it); that
function computes S²-Attn for attention modules in training mode and calls the original
implementation otherwise (the attention mask is built as the original's). When the adapter stops
running (deactivated, merged, disabled, deleted) the model's implementation is put back as it
was. Two LongLoRA adapters running together with different ratios, or a mixed batch, refuse to
train (eval mode runs full attention and needs neither).

Trainable embeddings and norms: ``trainable`` holds substrings of module paths, as the paper's
``trainable_params`` ("embed,norm"); every Embedding and norm layer whose path holds one trains
as a full copy (`TrainedCopy`, the base layer frozen; merging writes the copy into the layer,
unmerging puts the original back). An embedding tied to another layer (an LM head) is refused.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (LoRA), Embedding and norm layers (trained
copies). Models: any transformers model whose attention uses the attention interface (Llama,
GPT-2, ...); on a model without one, LongLoRA is LoRA with trained copies.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_LONGLORA"`` (PEFT has
no LongLoRA): LoRA's config keys plus ``group_size_ratio`` and ``trainable_params``; per layer
LoRA's ``lora_A.weight`` / ``lora_B.weight``, and ``longlora_trained.weight`` (``.bias``) for a
trained copy.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer
from surgeon.checks import check_number
from surgeon.copies import ParameterCopy
from surgeon.errors import SpecError
from surgeon.layers import is_norm, layer_kind
from surgeon.passes.lowrank.lora import PEFT_FORMAT as LORA_FORMAT
from surgeon.passes.lowrank.lora import LoRA
from surgeon.peft import NUMBER, JsonType, PeftKey
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_LONGLORA"
"""This project's own PEFT type: PEFT has no LongLoRA, and must not read the file as LoRA."""

PAPER_TRAINABLE = ("embed", "norm")
"""The paper's ``trainable_params``: its Llama's ``embed_tokens`` and every RMSNorm."""

SUBSTRINGS = JsonType(
    "a list of module-path substrings",
    lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
)

PEFT_FORMAT = LORA_FORMAT.but(
    peft_type=PEFT_TYPE,
    keys=(
        *LORA_FORMAT.keys,
        PeftKey("group_size_ratio", "group_size_ratio", 0.25, NUMBER),
        PeftKey(
            "trainable_params",
            "trainable",
            list(PAPER_TRAINABLE),
            SUBSTRINGS,
            load=lambda value, config, where: tuple(value),
        ),
    ),
)


@dataclass(frozen=True)
class LongLoRA(LoRA):
    """LoRA (the same fields; by default on the four attention projections, as the paper) with
    S²-Attn in training, groups of ``group_size_ratio`` of the length, and the Embedding and
    norm layers whose paths hold a ``trainable`` substring trained in full."""

    name = "longlora"
    peft_format = PEFT_FORMAT
    adapts_quantized = False
    combinations = ()

    targets: str | tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    group_size_ratio: float = 0.25
    trainable: tuple[str, ...] = PAPER_TRAINABLE

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_number(owner, "group_size_ratio", self.group_size_ratio, 0, 1, high_inclusive=True)
        given = self.trainable
        listed = isinstance(given, (list, tuple)) and all(isinstance(s, str) and s for s in given)
        if not listed:
            raise SpecError(
                f"{owner}.trainable={given!r}: expected a list of module-path substrings (the "
                f"paper's 'embed', 'norm'), possibly empty"
            )
        self._set("trainable", tuple(given))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the zoo's sequences have 7 tokens (a prime): only whole-length groups divide them, which
        # still shifts half of the heads (two causal pieces); the card runs the paper's 1/4
        return {
            "default": cls(rank=4, targets=targets, group_size_ratio=1.0),
            "rslora-dropout-untrained": cls(
                rank=2,
                alpha=3,
                rslora=True,
                dropout=0.1,
                init="gaussian",
                trainable=(),
                group_size_ratio=1.0,
                targets=targets,
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2") and super().supports(layer)

    def select(self, model: nn.Module) -> list[str]:
        """LoRA's targets, then the layers trained as copies."""
        paths = super().select(model)
        return paths + [p for p in self.trained_paths(model) if p not in paths]

    def trained_paths(self, model: nn.Module) -> list[str]:
        """The Embedding and norm layers whose paths hold a ``trainable`` substring; an
        embedding sharing its weight with another layer is refused."""
        chosen = [
            p
            for p, m in model.named_modules()
            if p and any(s in p for s in self.trainable) and _trains_as_copy(m)
        ]
        for path in chosen:
            _refuse_tied(model, path)
        return chosen

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        layers: dict[str, AdapterLayer] = {}
        for path in paths:
            layer = model.get_submodule(path)
            copy = _trains_as_copy(layer) and not self.supports(layer)
            layers[path] = TrainedCopy(layer, path) if copy else self.create_layer(layer, path)
        return layers

    def trainable_base_parameters(self, model: nn.Module, paths: Sequence[str]) -> list[str]:
        """LoRA's ``bias`` switch over the LoRA layers (a trained copy has its own bias)."""
        lora = [p for p in paths if self.supports(model.get_submodule(p))]
        return super().trainable_base_parameters(model, lora)

    def to_peft_config(self, paths: Sequence[str] = ()) -> dict[str, Any]:
        """LoRA's selection written from the LoRA layers' paths only (where the paths are
        written: presets PEFT lacks); ``trainable_params`` chooses the copies again. The copies
        are told apart by their substrings: a LoRA layer whose path holds one too (a Linear
        named like a norm) under such a preset would be left out, and its tensors refused as
        unexpected on load."""
        lora = [p for p in paths if not any(s in p for s in self.trainable)]
        return super().to_peft_config(lora)

    def on_running(self, model: nn.Module, name: str, running: bool, mixed: bool) -> None:
        """S²-Attn on the model's attention while this adapter runs; put back after."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            return  # not a transformers model: no attention interface to reach
        switch = SWITCHED.get(id(config))
        if running:
            if switch is None:
                switch = SWITCHED[id(config)] = AttentionSwitch(config)
            switch.running[name] = (self.group_size_ratio, mixed)
        elif switch is None or switch.running.pop(name, None) is None:
            return
        switch.apply()
        if not switch.running:
            del SWITCHED[id(config)]


def _trains_as_copy(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Embedding) or is_norm(layer)


def _refuse_tied(model: nn.Module, path: str) -> None:
    weight = getattr(model.get_submodule(path), "weight", None)
    tied = [
        p
        for p, m in model.named_modules()
        if p and p != path and getattr(m, "weight", None) is weight
    ]
    if weight is not None and tied:
        raise SpecError(
            f"LongLoRA.trainable: {path} shares its weight with {', '.join(tied)}; a trained copy "
            f"of it would leave {tied[0]} on the old weight (and merging would change both): "
            f"leave it out of trainable, or untie the weights"
        )


class TrainedCopy(ParameterCopy):
    """A trained full copy of one Embedding's or norm's parameters, in the layer's dtype (the
    paper trains the model's own parameters); the layer's own code runs with it."""

    method = "longlora"
    peft_names = {"weight": "longlora_trained.weight", "bias": "longlora_trained.bias"}

    def several_message(self, first: str, second: str) -> str:
        return (
            f"LongLoRA adapters {first!r} and {second!r} both train a copy of {self.path}, which "
            f"runs with one set of parameters at a time: activate one of them, or give each its "
            f"rows of a mixed batch"
        )


# -- S²-Attn ------------------------------------------------------------------------------------


def roll_second_half(states: torch.Tensor, steps: int) -> torch.Tensor:
    """(batch, heads, length, ...) with the second half of the heads rolled ``steps`` positions
    along the sequence (negative: towards the start)."""
    half = states.shape[1] // 2
    return torch.cat([states[:, :half], states[:, half:].roll(steps, dims=2)], dim=1)


def _group_blocks(square: torch.Tensor, groups: int) -> torch.Tensor:
    """The diagonal (group, group) blocks of a (..., length, length) tensor: (..., groups, G, G)."""
    size = square.shape[-1] // groups
    blocks = square.unflatten(-1, (groups, size)).unflatten(-3, (groups, size))
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


def _causal_in_groups(length: int, group: int, device: torch.device) -> torch.Tensor:
    """(2, 1, groups, G, G): where a token may attend to another of its group, in the plain
    and the shifted heads: earlier in the group and earlier in the sequence (the group the
    shift wraps around holds the last tokens before the first ones: two causal pieces)."""
    places = torch.arange(length, device=device)
    tokens = torch.stack([places, places.roll(-(group // 2))]).unflatten(1, (-1, group))
    earlier = tokens.unsqueeze(-2) <= tokens.unsqueeze(-1)
    inside = torch.ones(group, group, dtype=torch.bool, device=device).tril()
    return (earlier & inside).unsqueeze(1)


def mask_bias(mask: Any, length: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The model's attention mask as an additive (batch|1, heads|1, length, length) bias: a
    boolean mask (True attends) or a (batch, length) padding mask become 0 / dtype's minimum."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise SpecError(
            f"LongLoRA's S²-Attn takes attention masks as tensors, not {type(mask).__name__} "
            f"(flex attention): train with the sdpa or eager implementation"
        )
    if mask.dim() == 2:  # a key padding mask (flash attention's)
        mask = mask.bool()[:, None, None, :]
    if mask.dtype == torch.bool:
        low = torch.finfo(dtype).min
        mask = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, low)
    mask = mask[..., -length:]  # keys of this call only
    return mask.to(dtype).expand(*mask.shape[:-2], length, length)


def shifted_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
    causal: bool,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """S²-Attn of (batch, heads, length, head_dim) queries over keys and values (grouped-query
    heads repeated), with an additive ``bias`` from the model's mask: (batch, length, heads,
    head_dim), as transformers' attention functions return it."""
    heads, length = query.shape[1:3]
    repeat = heads // key.shape[1]
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    shift, groups = group // 2, length // group
    q, k, v = (
        roll_second_half(t, -shift).unflatten(2, (groups, group)) for t in (query, key, value)
    )
    # (batch, 2, heads / 2, groups, G, G): the plain half of the heads, then the shifted half
    scores = (q @ k.transpose(-2, -1) * scaling).unflatten(1, (2, heads // 2))
    low = torch.finfo(scores.dtype).min
    if bias is not None:
        # the mask moves with the tokens: the shifted heads read it rolled on both axes
        plain, rolled = bias, bias  # one mask for every head
        if bias.shape[1] > 1:  # a mask per head: each half of the heads has its own
            plain, rolled = bias.chunk(2, dim=1)
        rolled = rolled.roll((-shift, -shift), dims=(-2, -1))
        halves = torch.stack([_group_blocks(plain, groups), _group_blocks(rolled, groups)], 1)
        scores = (scores + halves).clamp_min(low)
    if causal:
        scores = scores.masked_fill(~_causal_in_groups(length, group, query.device), low)
    scores = scores.flatten(1, 2)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=True)
    out = roll_second_half((weights @ v).flatten(2, 3), shift)
    return out.transpose(1, 2).contiguous()


def group_size(ratio: float, length: int, key_length: int, heads: int) -> int:
    """G for a call of ``length`` tokens; a `SpecError` where S²-Attn cannot split it."""
    if key_length != length:
        raise SpecError(
            f"LongLoRA's S²-Attn (training mode) attends within the call's own tokens; this call "
            f"has {key_length - length} cached or extra keys: run it in eval mode, where the "
            f"model's full attention runs"
        )
    group = int(length * ratio)
    if group < 2 or length % group:
        why = "fewer than 2" if group < 2 else f"not a divisor of {length}"
        raise SpecError(
            f"LongLoRA.group_size_ratio={ratio}: a training sequence of {length} tokens gives "
            f"groups of int({length} * {ratio}) = {group} tokens, {why}; pad sequences to a "
            f"multiple of the group size (as the paper trains) or choose another ratio"
        )
    if heads % 2:
        raise SpecError(
            f"LongLoRA's S²-Attn shifts half of the attention heads; this attention has {heads}"
        )
    return group


def _eager_of(module: nn.Module) -> Callable | None:
    """The eager attention function of the module's model code (each modeling file has one)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def longlora_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    original: str | None,
    ratio: float | None,
    refusal: str | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function a running LongLoRA adapter puts in the model's config: S²-Attn
    in training mode, the model's ``original`` implementation otherwise."""
    if not module.training:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if original == "eager" and getattr(module, "reorder_and_upcast_attn", False):
            # GPT-2 takes its own upcast path instead of the interface when set to eager
            return module._upcast_and_reordered_attn(query, key, value, attention_mask)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(original, _eager_of(module))
        return attend(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if refusal is not None:
        raise SpecError(refusal)
    length = query.shape[-2]
    group = group_size(ratio, length, key.shape[-2], query.shape[1])
    out = shifted_sparse_attention(
        query,
        key,
        value,
        mask_bias(attention_mask, length, query.dtype),
        group,
        getattr(module, "is_causal", True),
        scaling if scaling is not None else query.shape[-1] ** -0.5,
        dropout,
    )
    return out, None


@functools.cache
def registered(original: str | None, ratio: float | None, refusal: str | None) -> str:
    """The attention implementation name of ``longlora_attention`` bound to these values,
    registered with transformers (its attention mask is built as ``original``'s)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    what = f"refuse:{refusal}" if refusal is not None else f"groups:{ratio}"
    name = f"surgeon_longlora|{original}|{what}"
    bound = functools.partial(longlora_attention, original=original, ratio=ratio, refusal=refusal)
    AttentionInterface.register(name, bound)
    mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(original or "eager")
    if mask is not None:
        AttentionMaskInterface.register(name, mask)
    return name


def _configs(config: Any) -> list[Any]:
    """A model config and its sub-configs (each holds its own attention implementation)."""
    found = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            found += _configs(sub)
    return found


class AttentionSwitch:
    """One model config while LongLoRA adapters run on it: their ratios and whether in a mixed
    batch, and the attention implementations to put back."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.original = config._attn_implementation
        self.saved = [(c, c._attn_implementation) for c in _configs(config)]
        self.running: dict[str, tuple[float, bool]] = {}

    def apply(self) -> None:
        """Name the function for the running adapters in the config, or put back the saved
        implementations when none runs."""
        if not self.running:
            for config, implementation in self.saved:
                config._attn_implementation_internal = implementation
            return
        ratios = sorted({ratio for ratio, _ in self.running.values()})
        refusal = None
        if len(ratios) > 1:
            names = ", ".join(repr(n) for n in self.running)
            refusal = (
                f"LongLoRA adapters {names} run together with different group_size_ratio "
                f"({', '.join(map(str, ratios))}); one S²-Attn runs per attention: train with "
                f"one of them active"
            )
        elif any(mixed for _, mixed in self.running.values()):
            refusal = (
                "LongLoRA's S²-Attn groups every row of the batch; a mixed batch (adapter_names) "
                "cannot train with it: train on batches of one adapter (in eval mode a mixed "
                "batch runs the model's full attention)"
            )
        name = registered(self.original, None if refusal else ratios[0], refusal)
        if self.config._attn_implementation != name:
            self.config._attn_implementation = name


SWITCHED: dict[int, AttentionSwitch] = {}
"""id(model config) -> its switch, while a LongLoRA adapter runs on the model."""
