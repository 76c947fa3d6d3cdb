"""LLaMA-Adapter (Zhang et al., 2023, arXiv 2303.16199): gated adaption prompts in the top layers.

In each of the top ``top_layers`` attention layers, ``prompt_length`` learned prompt tokens P go
through the layer's own key and value projections, the layer's queries attend to them on their
own (a softmax over the prompt only), and a gate g that starts at zero scales the result, which
is added to the attention's output (eq. 7-8 of the paper, as PEFT's ADAPTION_PROMPT computes it):

    out = Attn(x) + W_o (g · softmax(Q (W_k P)ᵀ / √d_head) · W_v P)

Q is the layer's rotated query. On GPT-2 (PEFT's variant) keys and values come from ``c_attn``
and the gated term is added without the output projection. Supported: the model types PEFT
supports (llama, mistral, gpt2); other models are refused with a SpecError. Merging is refused
(the term depends on the input, as in PEFT), and only one adaption prompt runs at a time.

How the term reaches the model: transformers' attention modules are graph breaks (each call is
traced on its own, and a method acting on the call does not rewrite those traces), and the
term needs what the attention module receives (its input, the rotary position embeddings of the
call). So while an adapter runs, each adapted attention module gets a forward hook that adds the
term to its output, exactly where PEFT's wrapper adds it: same inputs, same projections (with
any layer adapter on them, as in PEFT), same outputs and gradients, and at every step of
``generate`` (the prompt's keys and values are not cached: they are recomputed, as PEFT does).
The hooks are registered by the call rewrite of each model call the adapter runs in and
removed when the next model call starts (they must outlive the call for recomputed activations
under gradient checkpointing). Files are PEFT's: ``adaption_prompt`` (1, tokens, hidden) and
``adaption_gate`` (1,) under each adapted attention module's path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from surgeon.adapter import CallAdapter, ModelCall
from surgeon.checks import check_int
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.passes.prompt.common import model_config
from surgeon.peft import INT, PREFIX, REQUIRED, STRING, PeftFormat, PeftKey, task_type
from surgeon.spec import MethodSpec

# -- the gated prompt term, per model type --------------------------------------------------------

Term = Callable[[nn.Module, torch.Tensor, Mapping[str, Any], "PromptLayer"], torch.Tensor]
"""(attention module, its input, its keyword arguments, the layer's prompt) -> what is added to
the attention's output."""


def gated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """(batch, heads, length, head_dim) queries over one layer's (1, heads, tokens, head_dim)
    prompt keys and values, the softmax in float32 and scaled by the gate: (batch, length,
    heads * head_dim)."""
    dtype = query.dtype
    scores = query @ key.transpose(-2, -1).to(dtype) / math.sqrt(query.shape[-1])
    weights = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = weights @ value
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


def _heads(states: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(batch, length, heads * head_dim) -> (batch, heads, length, head_dim)."""
    return states.view(states.shape[0], states.shape[1], heads, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_term(
    attention: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any], layer: PromptLayer
) -> torch.Tensor:
    """Llama and Mistral: the query recomputed and rotated as the attention does (it does not
    return it); grouped key/value heads repeated for the query heads."""
    embeddings = kwargs.get("position_embeddings")
    if embeddings is None:
        raise SpecError(
            f"AdaptionPrompt: {type(attention).__name__} was called without "
            f"position_embeddings, which the adaption prompt needs to rotate the queries"
        )
    heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    kv_heads = attention.k_proj.out_features // head_dim
    cos, sin = (t.unsqueeze(1) for t in embeddings)
    query = _heads(attention.q_proj(hidden), heads, head_dim)
    query = query * cos + _rotate_half(query) * sin
    prompt = layer.adaption_prompt
    key = _heads(attention.k_proj(prompt), kv_heads, head_dim)
    value = _heads(attention.v_proj(prompt), kv_heads, head_dim)
    groups = heads // kv_heads
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return attention.o_proj(gated_attention(query, key, value, layer.adaption_gate))


def _gpt2_term(
    attention: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any], layer: PromptLayer
) -> torch.Tensor:
    """GPT-2: query, keys and values from ``c_attn``; PEFT adds the term unprojected."""
    width, heads, head_dim = attention.embed_dim, attention.num_heads, attention.head_dim
    query = _heads(attention.c_attn(hidden).split(width, dim=2)[0], heads, head_dim)
    _, key, value = attention.c_attn(layer.adaption_prompt).split(width, dim=2)
    key, value = _heads(key, heads, head_dim), _heads(value, heads, head_dim)
    return gated_attention(query, key, value, layer.adaption_gate)


@dataclass(frozen=True)
class ModelType:
    """How PEFT adapts one transformers model type."""

    attention: str
    """The attention modules' name (PEFT's ``target_modules`` default)."""
    dtype_from: str
    """The projection whose weight's dtype the prompts take (PEFT's rule)."""
    term: Term
    grouped: bool
    """Whether key/value heads may be grouped (inferred from ``k_proj`` as PEFT does)."""


MODEL_TYPES = {
    "llama": ModelType("self_attn", "q_proj", _llama_term, grouped=True),
    "mistral": ModelType("self_attn", "q_proj", _llama_term, grouped=True),
    "gpt2": ModelType("attn", "c_proj", _gpt2_term, grouped=False),
}


# -- the adapter ----------------------------------------------------------------------------------


class PromptLayer(nn.Module):
    """One attention layer's prompt (standard normal, as PEFT's) and its zero-initialised gate,
    under PEFT's names."""

    def __init__(self, length: int, width: int, **factory: Any) -> None:
        super().__init__()
        self.adaption_prompt = nn.Parameter(torch.empty(1, length, width, **factory).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, **factory))


class CallHooks:
    """The attention hooks of the model call an adapter last ran in."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def remove(self, *_: Any) -> None:
        """Remove them (also a model forward pre-hook: every call starts without them)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class AdaptionPromptAdapter(CallAdapter):
    """Every adapted attention layer's prompt and gate (`PromptLayer`), added to the attention
    modules' outputs by forward hooks during the model calls it runs in."""

    method = "adaption_prompt"

    def __init__(
        self,
        model: nn.Module,
        kind: ModelType,
        attentions: Mapping[str, nn.Module],
        length: int,
        peft_config: dict[str, Any],
        **factory: Any,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.paths = list(attentions)
        width = next(iter(attentions.values())).config.hidden_size
        # in PEFT's order, so a seeded init draws the same prompts
        self.layers = nn.ModuleList(PromptLayer(length, width, **factory) for _ in self.paths)
        object.__setattr__(self, "_attentions", list(attentions.values()))  # the user's modules
        self.config_fields = peft_config
        self.target = f"attention output, {len(self.paths)} top layers"
        self.where = "attention hooks"
        self._hooks = CallHooks()
        model.register_forward_pre_hook(self._hooks.remove, prepend=True)

    def transform(self, call: ModelCall) -> None:
        """The call's arguments stay as they are; its attention modules get the hooks."""
        self._hooks.remove()
        for attention, layer in zip(self._attentions, self.layers):
            hook = functools.partial(self._add_term, layer)
            self._hooks.handles.append(attention.register_forward_hook(hook, with_kwargs=True))

    def _add_term(
        self,
        layer: PromptLayer,
        attention: nn.Module,
        args: tuple,
        kwargs: dict[str, Any],
        output: tuple,
    ) -> tuple:
        hidden = args[0] if args else kwargs["hidden_states"]
        attended, *rest = output
        term = self.kind.term(attention, hidden, kwargs, layer)
        return ((attended + term).to(attended.dtype), *rest)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"{PREFIX}{path}.{name}": param
            for path, layer in zip(self.paths, self.layers)
            for name, param in layer.named_parameters()
        }

    def peft_config(self) -> dict[str, Any]:
        return dict(self.config_fields)


# -- the spec -------------------------------------------------------------------------------------


PEFT_FORMAT = PeftFormat(
    "ADAPTION_PROMPT",
    keys=(
        PeftKey("adapter_len", "prompt_length", REQUIRED, INT),
        PeftKey("adapter_layers", "top_layers", None, INT.optional()),
        PeftKey("target_modules", "attention", None, STRING.optional()),
    ),
)


@dataclass(frozen=True)
class AdaptionPrompt(MethodSpec):
    """LLaMA-Adapter's gated adaption prompts: ``prompt_length`` tokens in each of the top
    ``top_layers`` attention layers (None: every one); ``attention`` names the attention
    modules (None: the model type's, as PEFT)."""

    name = "adaption_prompt"
    peft_format = PEFT_FORMAT
    acts_on_call = True

    prompt_length: int = 10
    top_layers: int | None = None
    attention: str | None = None

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "prompt_length", self.prompt_length)
        if self.top_layers is not None:
            check_int(owner, "top_layers", self.top_layers)
        if self.attention is not None and (
            not isinstance(self.attention, str) or not self.attention
        ):
            raise SpecError(f"{owner}.attention={self.attention!r}: expected a module name")

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # one example: every option runs the same code (the card covers every layer adapted,
        # GPT-2 and Mistral, generation and gradient checkpointing)
        return {"top_layer": cls(prompt_length=3, top_layers=1)}

    @property
    def starts_as_base(self) -> bool:
        return True  # the gates start at zero

    def create_call_adapter(
        self, model: nn.Module, graph: Graph, from_file: bool
    ) -> AdaptionPromptAdapter:
        owner = type(self).__name__
        kind = _model_type(model, owner)
        name = self.attention or kind.attention
        if name != kind.attention:
            raise SpecError(
                f"{owner}.attention={name!r}: the adaption prompt adapts the attention modules "
                f"of this model type, {kind.attention!r}"
            )
        attentions = _top_attentions(model, graph, name, self.top_layers, owner)
        first = next(iter(attentions.values()))
        if kind.grouped:
            _check_grouping(first, owner)
        dtype = getattr(first, kind.dtype_from).weight.dtype
        fields = {
            "adapter_len": self.prompt_length,
            "adapter_layers": len(attentions),
            "target_modules": name,
            "task_type": task_type(model),
        }
        factory = {
            "device": next(first.parameters()).device,
            "dtype": dtype if dtype.is_floating_point else torch.float32,
        }
        return AdaptionPromptAdapter(model, kind, attentions, self.prompt_length, fields, **factory)


def _model_type(model: nn.Module, owner: str) -> ModelType:
    config = model_config(model, owner)
    found = getattr(config, "model_type", None)
    if found not in MODEL_TYPES:
        raise SpecError(
            f"{owner}: model type {found!r} is not supported; PEFT's adaption prompt (and "
            f"surgeon's) supports {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[found]


def _top_attentions(
    model: nn.Module, graph: Graph, name: str, top: int | None, owner: str
) -> dict[str, nn.Module]:
    """The last ``top`` modules named ``name``, in module order (PEFT's "top layers")."""
    found = {p: m for p, m in model.named_modules() if p.endswith(f".{name}")}
    if top is not None and top > len(found):
        raise SpecError(
            f"{owner}.top_layers={top}: the model has {len(found)} {name!r} attention modules"
        )
    chosen = dict(list(found.items())[-(top or len(found)) :])
    for path in chosen:
        region = _traced_region_holding(graph, path)
        if region is not None:
            raise SpecError(
                f"{owner}: {path} is traced inside region {region!r}, where a hook on it would "
                f"not run; the adaption prompt needs the attention module called as a module"
            )
    return chosen


def _traced_region_holding(graph: Graph, path: str) -> str | None:
    for region in graph.regions:
        if not region.leaf and (region.path == "" or path.startswith(f"{region.path}.")):
            return region.path or "<root>"
    return None


def _check_grouping(attention: nn.Module, owner: str) -> None:
    """PEFT infers the key/value grouping as ``k_proj.in_features // k_proj.out_features``;
    where that is not the model's grouping, PEFT's computation fails, and surgeon refuses."""
    heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    k_proj = attention.k_proj
    factor = k_proj.in_features // k_proj.out_features
    if factor < 1 or heads % factor or (heads // factor) * head_dim != k_proj.out_features:
        raise SpecError(
            f"{owner}: {type(attention).__name__} has {heads} heads of {head_dim} and k_proj "
            f"{k_proj.in_features} -> {k_proj.out_features}; PEFT's adaption prompt infers the "
            f"key/value heads from k_proj's sizes, which does not hold for this model"
        )
