"""LoRA on the layers beyond Linear, Embedding, GPT-2's Conv1D and plain convolutions, as PEFT
0.21 adapts them (a helper module of `lora.py`, no method of its own).

Convolutions with ``groups``, ``dilation`` or a ``padding_mode``: A is a convolution with the
base's kernel, stride and padding but never its groups, dilation or padding mode (always
undilated, zero-padded, over all input channels); B is a 1x1 convolution with the base's groups,
``(out, r / groups, 1, ...)``, so the rank must divide by the groups. Merging is refused where
``B·A`` is no kernel of the base's kind: grouped (A mixes every input channel), dilated (A's
kernel is undilated) and padded with a mode other than zeros (A pads with zeros). PEFT refuses the
grouped merge and gives other outputs after the other two; a dilated kernel with numeric padding
is refused outright (A's output is not the layer's size: PEFT fails in forward), ``'same'``
padding keeps the sizes.

``nn.MultiheadAttention`` (query, key and value of one size, as PEFT): one rank-r update of the
packed q/k/v projection ``in_proj_weight`` (``lora_A`` r x E, ``lora_B`` 3E x r) and one of
``out_proj`` (PEFT's ``base_layer.out_proj.lora_A/B``); the graph calls the attention with
``W + ΔW`` as nodes. Base biases stay frozen (``bias='none'`` only). As PEFT: the LoRA dropout is not applied (PEFT merges the update into the
weights for each call), no DoRA, no B bias, no mixed-adapter batches, and the out_proj update
counts twice in outputs and merges (``W_out + 2·scale·B A``) while its gradient is that of one
copy: PEFT 0.21 merges out_proj by hand and then merges it again (huggingface/peft#3774).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs
from surgeon.spec import Combination

ConvLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d

PEFT_OUT_PROJ_REPEATS = 2
"""How many times PEFT 0.21's MultiheadAttention adds out_proj's update (see the docstring)."""


# -- convolutions -----------------------------------------------------------------------------


def _dilated(conv: ConvLayer) -> bool:
    """Whether dilation changes the layer: some dilated dimension has a kernel wider than 1."""
    return any(d != 1 and k != 1 for d, k in zip(conv.dilation, conv.kernel_size))


def _pads(conv: ConvLayer) -> bool:
    """Whether the layer pads its input at all (only then does ``padding_mode`` matter)."""
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return any(p != 0 for p in conv.padding)


def conv_factor_shapes(
    conv: ConvLayer, path: str, rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A (the base's kernel over all input channels) and of B (a 1x1 convolution
    with the base's groups) on ``conv``; refuses what PEFT cannot run."""
    if rank % conv.groups:
        raise SpecError(
            f"LoRA on {path}: rank {rank} does not divide by the convolution's groups="
            f"{conv.groups} (B is a grouped 1x1 convolution; PEFT's rule): choose a rank that "
            f"does, or another rank for this layer with rank_pattern"
        )
    if _dilated(conv) and conv.padding != "same":
        raise SpecError(
            f"LoRA on {path}: dilation={conv.dilation} with kernel_size={conv.kernel_size} and "
            f"padding={conv.padding}: A convolves undilated (as PEFT's), so its output is not "
            f"the layer's size (PEFT fails in forward); only padding='same' keeps the sizes"
        )
    ones = (1,) * len(conv.kernel_size)
    return (rank, conv.in_channels, *conv.kernel_size), (
        conv.out_channels,
        rank // conv.groups,
        *ones,
    )


def refuse_conv_options(conv: ConvLayer, path: str, owner: str) -> None:
    """For the LoRA layers that adapt plain convolutions only (DoRA's, ...): refuse groups,
    dilation and padding modes, naming the option."""
    options = {
        "groups": conv.groups if conv.groups != 1 else None,
        "dilation": conv.dilation if _dilated(conv) else None,
        "padding_mode": conv.padding_mode if conv.padding_mode != "zeros" else None,
    }
    used = ", ".join(f"{name}={value!r}" for name, value in options.items() if value is not None)
    if used:
        raise SpecError(
            f"{owner} on {path}: convolutions with {used} are not supported (LoRA takes them)"
        )


def refuse_combining(sources: Sequence[Combination]) -> None:
    """Combinations fold A and B factors per layer; grouped B's and the two updates of a
    MultiheadAttention do not fold that way."""
    for source in sources:
        for path, layer in source.layers.items():
            base = layer.base
            if isinstance(base, nn.MultiheadAttention) or getattr(base, "groups", 1) != 1:
                what = (
                    "a MultiheadAttention"
                    if isinstance(base, nn.MultiheadAttention)
                    else (f"a convolution with groups={base.groups}")
                )
                raise SpecError(
                    f"merge_adapters: adapter {source.name!r} adapts {path}, {what}: "
                    f"combining such LoRA layers is not supported"
                )


def conv_merge_refusal(conv: nn.Module, path: str) -> str | None:
    """Why LoRA on ``conv`` cannot be merged into its weight (None: it can, or it is no
    convolution)."""
    if not isinstance(conv, ConvLayer):
        return None
    if conv.groups > 1:
        why = (
            f"groups={conv.groups}: A mixes every input channel, so B·A is no grouped kernel "
            f"(PEFT refuses this merge too)"
        )
    elif _dilated(conv):
        why = (
            f"dilation={conv.dilation}: A's kernel is undilated, which no dilated kernel "
            f"reproduces (PEFT's merge changes the outputs)"
        )
    elif conv.padding_mode != "zeros" and _pads(conv):
        why = (
            f"padding_mode={conv.padding_mode!r}: A pads with zeros, the merged layer would pad "
            f"the update with {conv.padding_mode!r} (PEFT's merge changes the outputs)"
        )
    else:
        return None
    return f"cannot merge LoRA into {path}: {why}; run the adapter unmerged"


# -- nn.MultiheadAttention --------------------------------------------------------------------

_MHA_ARGUMENTS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


def mha_forward(
    mha: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    in_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``mha``'s forward (its general path) with the given projection weights: what
    ``nn.MultiheadAttention.forward`` computes with the packed q/k/v and the output projection
    replaced, all else (biases, masks, batch_first, dropout) the module's."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    batched_first = mha.batch_first and query.dim() == 3
    if batched_first:
        query, key, value = (t.transpose(1, 0) for t in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        mha.embed_dim,
        mha.num_heads,
        in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        mha.dropout,
        out_proj_weight,
        mha.out_proj.bias,
        training=mha.training,
        key_padding_mask=key_padding_mask,
        need_weights=need_weights,
        attn_mask=attn_mask,
        average_attn_weights=average_attn_weights,
        is_causal=is_causal,
    )
    return (out.transpose(1, 0) if batched_first else out), weights


def check_mha(mha: nn.MultiheadAttention, path: str, init: str, lora_bias: bool, bias: str) -> None:
    """Refuse what PEFT's MultiheadAttention LoRA refuses or computes differently from the
    formula (B's bias is trained on in_proj but never used there), and trained base biases
    (PEFT's files for them do not round-trip on this layer)."""
    if bias != "none":
        raise SpecError(
            f"LoRA.bias={bias!r} on {path}: trained base biases of a MultiheadAttention are "
            f"not supported (PEFT's files for them do not load back with its outputs)"
        )
    if not mha._qkv_same_embed_dim:
        raise SpecError(
            f"LoRA on {path}: MultiheadAttention with kdim/vdim other than embed_dim (separate "
            f"q/k/v weights) is not supported (PEFT's rule)"
        )
    if lora_bias:
        raise SpecError(
            f"LoRA.lora_bias=True on {path}: PEFT's MultiheadAttention adapter leaves B's bias "
            f"out of the in_proj update; not supported there"
        )
    if init not in ("default", "gaussian"):
        raise SpecError(
            f"LoRA.init={init!r} on {path}: MultiheadAttention takes init 'default' or "
            f"'gaussian' (PEFT's other inits read a weight it does not have)"
        )


class LoRAMultiheadAttentionLayer(AdapterLayer):
    """``lora_A`` (r x E) and ``lora_B`` (3E x r) on the packed q/k/v projection, ``out_A``
    (r x E) and ``out_B`` (E x r) on the output projection of one ``nn.MultiheadAttention``."""

    method = "lora"
    loraplus_b = ("lora_B", "out_B")
    peft_names: Mapping[str, str] = {
        "lora_A": "lora_A.weight",
        "lora_B": "lora_B.weight",
        "out_A": "out_proj.lora_A.weight",  # PEFT saves these under base_layer.out_proj
        "out_B": "out_proj.lora_B.weight",
    }

    def __init__(
        self, base: nn.MultiheadAttention, path: str, rank: int, scale: float, init: str
    ) -> None:
        super().__init__(base)
        self.path = path
        self.rank = rank
        self.scale = scale
        weight = base.in_proj_weight
        factory = adapter_tensor_kwargs(weight)
        embed = base.embed_dim
        self.lora_A = nn.Parameter(torch.empty(rank, embed, **factory))
        self.lora_B = nn.Parameter(torch.empty(3 * embed, rank, **factory))
        self.out_A = nn.Parameter(torch.empty(rank, embed, **factory))
        self.out_B = nn.Parameter(torch.empty(embed, rank, **factory))
        with torch.no_grad():
            for a, b in ((self.out_A, self.out_B), (self.lora_A, self.lora_B)):
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / rank)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: the out_proj factors under ``base_layer.out_proj`` (a load reads them
        with ``base_layer`` dropped, as every key)."""
        return {
            ("base_layer." + k if k.startswith("out_proj.") else k): v
            for k, v in self.peft_tensors().items()
        }

    # -- the graph ---------------------------------------------------------------------------

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        """The first adapter on the layer spells its call out as `mha_forward` with its base
        weights as nodes; each adapter adds its updates to those weight nodes."""
        if base_out.op == "call_module":
            call = self._emit_call(ctx, base_out)
        elif base_out.op == "call_function" and base_out.target is mha_forward:
            call = base_out
        else:
            raise SpecError(
                f"LoRA on {self.path} (MultiheadAttention): mixed-adapter batches are not "
                f"supported there (PEFT refuses them too)"
            )
        with ctx.graph.inserting_before(call):
            delta_in = self._emit_delta(ctx, "lora_A", "lora_B", call.kwargs["in_proj_weight"])
            weight = call.kwargs["in_proj_weight"]
            call.update_kwarg("in_proj_weight", ctx.call(torch.add, weight, delta_in))
            weight = call.kwargs["out_proj_weight"]
            delta_out = self._emit_delta(ctx, "out_A", "out_B", weight)
            weight = ctx.call(torch.add, weight, delta_out)
            for _ in range(PEFT_OUT_PROJ_REPEATS - 1):  # values only, as PEFT's second merge
                weight = ctx.call(torch.add, weight, ctx.method("detach", delta_out))
            call.update_kwarg("out_proj_weight", weight)
        return call

    def _emit_call(self, ctx: EmitContext, node: fx.Node) -> fx.Node:
        """`mha_forward` on the layer call ``node``'s arguments, weights read from the layer."""
        bound = inspect.signature(nn.MultiheadAttention.forward).bind(
            None, *node.args, **node.kwargs
        )
        bound.apply_defaults()
        arguments = [bound.arguments[name] for name in _MHA_ARGUMENTS]
        layer = ctx.attr("base_layer", self.base)
        in_proj = ctx.call(getattr, layer, "in_proj_weight")
        out_proj = ctx.call(getattr, ctx.call(getattr, layer, "out_proj"), "weight")
        return ctx.call(
            mha_forward, layer, *arguments, in_proj_weight=in_proj, out_proj_weight=out_proj
        )

    def _emit_delta(self, ctx: EmitContext, a: str, b: str, weight: fx.Node) -> fx.Node:
        """``scale · B A`` in the weight's dtype (PEFT casts the update before adding it)."""
        product = ctx.call(
            torch.matmul, ctx.attr(b, getattr(self, b)), ctx.attr(a, getattr(self, a))
        )
        delta = ctx.call(torch.mul, product, self.scale)
        if self.lora_A.dtype == self.base.in_proj_weight.dtype:
            return delta
        return ctx.method("to", delta, self.base.in_proj_weight.dtype)

    # -- merging ----------------------------------------------------------------------------

    def _deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The in_proj and out_proj updates as merging adds them, in the weights' dtype."""
        dtype = self.base.in_proj_weight.dtype
        delta_in = (self.lora_B @ self.lora_A) * self.scale
        delta_out = (self.out_B @ self.out_A) * self.scale
        return delta_in.to(dtype), (PEFT_OUT_PROJ_REPEATS * delta_out).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """The in_proj update (the out_proj one merges alongside, in `merge`)."""
        return self._deltas()[0]

    @torch.no_grad()
    def merge(self) -> None:
        delta_in, delta_out = self._deltas()
        self.base.in_proj_weight.add_(delta_in)
        self.base.out_proj.weight.add_(delta_out)

    @torch.no_grad()
    def unmerge(self) -> None:
        delta_in, delta_out = self._deltas()
        self.base.in_proj_weight.sub_(delta_in)
        self.base.out_proj.weight.sub_(delta_out)
