"""aLoRA: activated LoRA (Greenewald et al., 2025, arXiv:2504.12397).

``base(x)_t + m_t · scale · B(A(dropout(x_t)))`` with ``m_t = 1`` on the tokens from the last
occurrence of the adapter's invocation sequence on (in each row), ``0`` before it: the tokens
before the invocation see the base model, so their key/value cache is the base model's and can be
reused across adapters.

PEFT writes it as LoRA with ``alora_invocation_tokens`` (the invocation sequence's token ids);
its other keys are LoRA's. Per row, the offset (how many tokens, counted from the end, the adapter
acts on) comes from the call's ``input_ids`` (`ALoRA.call_values`); within ``generate``, from the
prompt, once, held for every step (as PEFT: each new token is adapted where the prompt holds the
invocation). A call may also pass ``alora_offsets`` (one per row; None or 0: none) itself, as to
PEFT's model, which then applies to every aLoRA adapter of the call. A row without the invocation,
or a call with ``inputs_embeds`` only, runs the base model (the latter with a warning, as PEFT).

Layers: Linear and GPT-2's ``Conv1D`` (PEFT has aLoRA on its Linear only: it refuses
convolutions and embeddings), and layers stored in 4 bits (QLoRA's layer with the masked update,
as PEFT's aLoRA on bitsandbytes' ``Linear4bit``). Merging is refused (a weight cannot tell
tokens apart; PEFT refuses too), so is export. Beam search and several returned sequences per
prompt are refused (the offsets are one per prompt row; PEFT refuses beam search).

In training, dropout draws over every token of the layer's input (PEFT draws over the adapted
tokens only): the same distribution, other random numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import is_int
from surgeon.errors import SpecError
from surgeon.layers import layer_kind
from surgeon.passes.lowrank.lora import LoRA, LoRALayer, QLoRALayer
from surgeon.peft import REQUIRED, JsonType, PeftKey, is_off, task_type
from surgeon.quant import is_quantized
from surgeon.rewrite import call_value, own_rows
from surgeon.spec import MethodSpec

OFFSETS = "alora_offsets"
"""The call argument (PEFT's name) with each row's count of adapted tokens, from the end."""

TOKENS = JsonType(
    "a list of token ids", lambda v: isinstance(v, (list, tuple)) and all(map(is_int, v))
)

_LORA = LoRA.peft_format
PEFT_FORMAT = _LORA.but(
    keys=(
        *_LORA.keys,
        PeftKey(
            "alora_invocation_tokens",
            "invocation_tokens",
            REQUIRED,
            TOKENS,
            load=lambda value, config, where: tuple(value),
            why_required="aLoRA needs its invocation tokens",
        ),
    ),
    switches={k: v for k, v in _LORA.switches.items() if k != "alora_invocation_tokens"},
)


@dataclass(frozen=True)
class ALoRA(LoRA):
    """Activated LoRA: LoRA's fields, and ``invocation_tokens``, the token ids of the sequence
    from whose last occurrence on the adapter acts."""

    name = "alora"
    peft_format = PEFT_FORMAT
    adapts_quantized = True  # on 4-bit layers it builds `QALoRALayer`
    combinations = ()
    merge_refusal = (
        "aLoRA acts only on the tokens from its invocation on, which a merged weight cannot "
        "tell apart (PEFT refuses to merge aLoRA too)"
    )

    invocation_tokens: tuple[int, ...] = ()

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        tokens = self.invocation_tokens
        if (
            not isinstance(tokens, (list, tuple))
            or not tokens
            or not all(is_int(t) and t >= 0 for t in tokens)
        ):
            raise SpecError(
                f"{owner}.invocation_tokens={tokens!r}: expected a non-empty list of token ids "
                f"(integers >= 0)"
            )
        self._set("invocation_tokens", tuple(tokens))

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        """A LoRA file with ``alora_invocation_tokens`` set (PEFT's empty list is plain LoRA)."""
        return super().accepts_peft_config(config) and not is_off(
            config.get("alora_invocation_tokens")
        )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the conformance cards pass alora_offsets (call_inputs); the invocation search is
        # the card's business
        return {
            "default": cls(rank=4, targets=targets, invocation_tokens=(5, 6)),
            "rslora-dropout-bias": cls(
                rank=2,
                alpha=3,
                rslora=True,
                dropout=0.1,
                lora_bias=True,
                targets=targets,
                invocation_tokens=(7,),
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2") or is_quantized(layer)

    def create_layer(self, layer: nn.Module, path: str) -> ALoRALayer:
        rank, scale = self.rank_and_scale(path)
        with warnings.catch_warnings():  # LoRA's "cannot be merged": aLoRA never merges
            warnings.filterwarnings("ignore", "LoRA.lora_bias=True on .* a layer without bias")
            if is_quantized(layer):
                return QALoRALayer(
                    layer, path, rank, scale, self.dropout, self.init, layer.quant, self.lora_bias
                )
            return ALoRALayer(
                layer, path, rank, scale, self.dropout, self.init, lora_bias=self.lora_bias
            )

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        """LoRA's layers; each notes whether the model is a causal LM, for the file's
        ``task_type``."""
        layers = super().create_layers(model, paths)
        causal = task_type(model) == "CAUSAL_LM"
        for layer in layers.values():
            layer.causal_lm = causal
        return layers

    def peft_config_from_training(self, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """``task_type`` CAUSAL_LM for a causal LM: PEFT finds the invocation tokens in
        ``input_ids`` only in its causal-LM model (another class would run the base model)."""
        if any(getattr(layer, "causal_lm", False) for layer in layers.values()):
            return {"task_type": "CAUSAL_LM"}
        return {}

    def call_values(self, name: str, call: Mapping[str, Any]) -> Mapping[str, Any]:
        """Each row's offset from ``input_ids``; none without them (the adapter then acts on no
        token, with a warning where only ``inputs_embeds`` came, as PEFT)."""
        ids = call.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            if call.get("inputs_embeds") is not None:
                warnings.warn(
                    f"aLoRA adapter {name!r}: the call has inputs_embeds but no input_ids, so "
                    f"its invocation tokens cannot be found; it acts on no token (pass "
                    f"{OFFSETS}=... to choose them)",
                    stacklevel=2,
                )
            return {}
        return {OFFSETS: invocation_offsets(ids, self.invocation_tokens)}


def invocation_offsets(ids: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    """Per row of ``ids`` (one sequence, or a batch of them), how many tokens from the end
    start at the last occurrence of ``tokens`` (0 where it does not occur)."""
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    rows, length = ids.shape
    if length < len(tokens):
        return torch.zeros(rows, dtype=torch.long, device=ids.device)
    wanted = torch.tensor(tokens, dtype=ids.dtype, device=ids.device)
    found = (ids.unfold(1, len(tokens), 1) == wanted).all(-1)  # rows x starts
    starts = torch.arange(found.shape[1], device=ids.device)
    last = torch.where(found, starts, -1).amax(-1)
    return torch.where(last >= 0, length - last, 0)


def invocation_mask(adapter: str, out: torch.Tensor) -> torch.Tensor:
    """1 where ``adapter`` acts on the layer output ``out`` ((rows, tokens, features), or
    (rows, features): one token), 0 elsewhere, in ``out``'s dtype, shaped to broadcast
    against it: per row, the last ``offset`` tokens (PEFT's rule)."""
    if out.dim() not in (2, 3):
        raise SpecError(
            f"aLoRA adapter {adapter!r}: expected the layer's output as (rows, tokens, "
            f"features) or (rows, features), got shape {tuple(out.shape)}"
        )
    rows, tokens = out.shape[0], out.shape[1] if out.dim() == 3 else 1
    shape = (rows, tokens, 1) if out.dim() == 3 else (rows, 1)
    offsets = call_value(OFFSETS, adapter)
    if offsets is None:  # no input_ids and none given: the base model (PEFT's None)
        return out.new_zeros(shape)
    offsets = own_rows(adapter, _as_offsets(offsets, out.device))
    if offsets.shape != (rows,):
        raise SpecError(
            f"aLoRA adapter {adapter!r}: {offsets.numel()} offsets for {rows} rows; beam "
            f"search and several sequences per prompt are not supported (as in PEFT)"
        )
    positions = torch.arange(tokens, device=out.device)
    mask = positions >= tokens - offsets.clamp(max=tokens).unsqueeze(1)
    return mask.to(out.dtype).view(shape)


def _as_offsets(value: Any, device: torch.device) -> torch.Tensor:
    """A call's offsets (a tensor, or a list where None means none) as a long tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.long)
    return torch.tensor([0 if o is None else int(o) for o in value], device=device)


class ALoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` (and B's bias), whose update reaches the output only where
    `invocation_mask` is 1."""

    method = "alora"
    fuses_as = None  # the mask is not part of LoRA's fused kernel
    call_arguments = (OFFSETS,)
    causal_lm = False  # set by `ALoRA.create_layers`

    def emit_update(self, ctx: EmitContext, h: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        delta = super().emit_update(ctx, h, a, b)
        return ctx.call(torch.mul, delta, ctx.call(invocation_mask, ctx.adapter, delta))


class QALoRALayer(ALoRALayer, QLoRALayer):
    """aLoRA's masked update on a base stored in 4 bits: QLoRA's layer (the dequantized base
    spelled out, LoRA in the compute dtype) with `ALoRALayer.emit_update`."""
