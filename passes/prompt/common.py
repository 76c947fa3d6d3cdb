"""What the prompt methods (PromptTuning, PrefixTuning, PTuningV2) share.

They act on the model call (a `surgeon.adapter.CallAdapter`), not on layers:

* the model's sizes, read from its config the way PEFT reads them, so files go both ways;
* the call rewrites: the attention mask, position ids, labels and token type ids extended over
  the virtual tokens, which come first (as in PEFT, real tokens are positioned after them);
* prefixes reach attention by one of two routes. The *cache route* hands them to the model
  through its key/value cache (a transformers ``DynamicCache`` holding the prefixes, as PEFT
  does; for rotary models the cached keys count as already rotated). The *graph route*, for
  regions whose attention traces, concatenates them to the keys and values right before
  attention in the region graph and pads the attention mask to match (`prefix_graph`). Both
  give the same outputs;
* the prefix encoder (PEFT's prefix projection; P-tuning v2's MLP of any depth), trained as is
  and folded into plain prefixes for inference and export.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import CACHE_ARGUMENTS, CallAdapter, EmitContext, ModelCall, cached_length
from surgeon.checks import check_choice, check_int
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.layers import adapter_tensor_kwargs
from surgeon.passes.prompt.graph import LayerPrefix, graph_sites, insert_prefix
from surgeon.peft import BOOL, INT, REQUIRED, PeftFormat, PeftKey, task_type
from surgeon.spec import MethodSpec
from surgeon.trace import Region

ROUTES = ("auto", "cache", "graph")
IGNORE_INDEX = -100  # labels on virtual tokens: no loss there (PyTorch's and transformers' value)

# -- the model, as PEFT reads it ----------------------------------------------------------------


def _config_value(config: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_config(model: nn.Module, owner: str) -> Any:
    """The model's (text) config: where prompt methods read layer and head counts."""
    config = getattr(model, "config", None)
    if config is None:
        raise SpecError(
            f"{owner}: the model has no `config` to read its layer and head counts from "
            f"(a transformers model has one; give a custom model a config with "
            f"num_hidden_layers, hidden_size and num_attention_heads)"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise SpecError(
            f"{owner}: encoder-decoder models (such as {type(model).__name__}) are not supported "
            f"by the prompt methods yet; decoder-only and encoder-only models are"
        )
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def _required(config: Any, names: tuple[str, ...], owner: str) -> int:
    value = _config_value(config, names)
    if not isinstance(value, int):
        raise SpecError(f"{owner}: the model's config has none of {', '.join(names)}")
    return value


@dataclass(frozen=True)
class PrefixShape:
    """Key/value prefix sizes: one (heads, tokens, head_dim) key and value per layer."""

    num_layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """One token's key (or value) across heads: PEFT's ``token_dim``."""
        return self.heads * self.head_dim

    @property
    def flat(self) -> int:
        """One virtual token's row in PEFT's ``prompt_embeddings``: every layer's key and value."""
        return self.num_layers * 2 * self.width


def prefix_shape(model: nn.Module, owner: str) -> PrefixShape:
    """PEFT's rule: key/value heads (grouped-query attention) and the config's head_dim if set."""
    config = model_config(model, owner)
    layers = _required(config, ("num_hidden_layers", "num_layers", "n_layer"), owner)
    hidden = _required(config, ("hidden_size", "n_embd", "d_model"), owner)
    heads = _required(config, ("num_attention_heads", "n_head", "num_heads"), owner)
    kv_heads = _config_value(config, ("num_key_value_heads",))
    head_dim = getattr(config, "head_dim", None) if kv_heads is not None else None
    return PrefixShape(layers, kv_heads or heads, head_dim or hidden // heads)


def peft_sizes(model: nn.Module, owner: str, token_dim: int) -> dict[str, int]:
    """adapter_config.json's size fields as PEFT fills them for this model."""
    config = model_config(model, owner)
    return {
        "num_layers": _required(config, ("num_hidden_layers", "num_layers", "n_layer"), owner),
        "num_attention_heads": _required(
            config, ("num_attention_heads", "n_head", "num_heads"), owner
        ),
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
    }


def check_file_sizes(
    expected: Mapping[str, Any] | None, actual: Mapping[str, int], owner: str
) -> None:
    """A file's size fields must be this model's (a different head split can have equal shapes)."""
    for key, value in (expected or {}).items():
        if value is not None and key in actual and value != actual[key]:
            raise SpecError(
                f"{owner}: the adapter file has {key}={value!r}, this model needs {actual[key]!r}; "
                f"it was made for another model"
            )


def input_embeddings(model: nn.Module, owner: str) -> nn.Embedding:
    """The model's input embedding table; prompt methods prepend to what it returns."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if not isinstance(embeddings, nn.Embedding) or not accepts(model, "inputs_embeds"):
        raise SpecError(
            f"{owner}: the model needs get_input_embeddings() (an nn.Embedding) and an "
            f"inputs_embeds argument, as transformers models have; {type(model).__name__} has not"
        )
    return embeddings


def model_dtype(model: nn.Module) -> torch.dtype:
    embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(embeddings(), "weight", None) if callable(embeddings) else None
    if weight is not None:
        return weight.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model: nn.Module) -> str | None:
    """The name under which the model (or the backbone it passes ``**kwargs`` to) takes its
    key/value cache, or None."""
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, nn.Module):
            for name in CACHE_ARGUMENTS:
                if accepts(candidate, name):
                    return name
    return None


# -- the call rewrites --------------------------------------------------------------------------


def batch_and_length(kwargs: Mapping[str, Any]) -> tuple[int, int]:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[0], value.shape[1]
    raise SpecError("prompt methods need input_ids or inputs_embeds in the model call")


def _input_device(kwargs: Mapping[str, Any]) -> torch.device:
    value = kwargs.get("input_ids")
    return (value if value is not None else kwargs["inputs_embeds"]).device


def extend_mask(kwargs: dict[str, Any], n: int) -> None:
    """The attention mask grows by ``n`` attended columns in front (the virtual tokens)."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise SpecError(
            f"prompt methods need a 2-D attention_mask (batch, sequence) or none; got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def shift_positions(kwargs: dict[str, Any], n: int) -> None:
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n


def prepend(kwargs: dict[str, Any], key: str, n: int, length: int, fill: int) -> None:
    """Put ``n`` entries of ``fill`` in front of a (batch, sequence) argument."""
    value = kwargs.get(key)
    if value is None or value.dim() < 2 or value.shape[1] != length:
        return
    front = value.new_full((value.shape[0], n, *value.shape[2:]), fill)
    kwargs[key] = torch.cat([front, value], dim=1)


def prepend_positions(kwargs: dict[str, Any], n: int) -> None:
    """Virtual tokens take positions 0..n-1 and the given positions move up by ``n``."""
    positions = kwargs.get("position_ids")
    if positions is None:
        return
    front = torch.arange(n, device=positions.device, dtype=positions.dtype)
    front = front.expand(*positions.shape[:-1], n)
    kwargs["position_ids"] = torch.cat([front, positions + n], dim=-1)


def new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache, PretrainedConfig

    config = getattr(model, "config", None)
    return DynamicCache(config=config) if isinstance(config, PretrainedConfig) else DynamicCache()


def call_cache(kwargs: dict[str, Any], model: nn.Module) -> Any:
    """The call's (empty) cache, or a new one for the model."""
    for key in CACHE_ARGUMENTS:
        if kwargs.get(key) is not None:
            cache = kwargs[key]
            if not hasattr(cache, "update"):
                raise SpecError(
                    f"prefix methods need a transformers Cache as {key}, got {type(cache).__name__}"
                )
            return cache
    return new_cache(model)


# -- the prefix adapter (PrefixTuning, PTuningV2) -----------------------------------------------


class PrefixEncoder(nn.Module):
    """Virtual-token embeddings through an MLP to every layer's keys and values: PEFT's
    ``prefix_projection`` (``depth=2``: Linear, Tanh, Linear) or P-tuning v2's encoder of any
    depth. Names follow PEFT's (``embedding``, ``transform.<i>``)."""

    def __init__(self, n: int, width: int, hidden: int, depth: int, out: int, **factory) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, width, **factory)
        layers: list[nn.Module] = []
        size = width
        for _ in range(depth - 1):
            layers += [nn.Linear(size, hidden, **factory), nn.Tanh()]
            size = hidden
        layers.append(nn.Linear(size, out, **factory))
        self.transform = nn.Sequential(*layers)

    def forward(self, rows: slice | None = None) -> torch.Tensor:
        """(tokens, every layer's keys and values), or only the output ``rows``."""
        hidden = self.embedding.weight
        for layer in self.transform[:-1]:
            hidden = layer(hidden)
        last = self.transform[-1]
        if rows is None:
            return last(hidden)
        return F.linear(hidden, last.weight[rows], last.bias[rows])


class PrefixAdapter(CallAdapter):
    """Key/value prefixes for every attention layer: plain (``prefixes``, PEFT's
    ``prompt_embeddings`` layout) or produced by a `PrefixEncoder`. Under ``torch.no_grad`` the
    encoder's output is folded once and reused until its parameters change."""

    def __init__(
        self,
        method: str,
        model: nn.Module,
        shape: PrefixShape,
        n: int,
        encoder: PrefixEncoder | None,
        route: str,
        sites: Mapping[str, list[int]],
        peft_config: dict[str, Any],
        **factory,
    ) -> None:
        super().__init__()
        self.method = method
        self.shape = shape
        self.n = n
        self.encoder = encoder
        if encoder is None:
            self.prefixes = nn.Parameter(torch.empty(n, shape.flat, **factory))
            nn.init.normal_(self.prefixes)  # PEFT's: nn.Embedding's default init
        self.route = route
        self.sites = dict(sites)
        self.cache_name = cache_argument(model) if route == "cache" else None
        self.takes_positions = accepts(model, "position_ids")
        self.config_fields = peft_config
        self.target = f"attention keys/values, {shape.num_layers} layers"
        self.where = f"{route} route"
        self._constants: torch.Tensor | None = None
        self._folded: tuple[tuple, torch.Tensor] | None = None

    # the prefixes ---------------------------------------------------------------------------

    def flat(self) -> torch.Tensor:
        """(tokens, layers * 2 * heads * head_dim): PEFT's ``prompt_embeddings`` layout."""
        if self._constants is not None:
            return self._constants
        if self.encoder is None:
            return self.prefixes
        if torch.is_grad_enabled():
            return self.encoder()
        return self._fold()

    def _fold(self) -> torch.Tensor:
        params = list(self.encoder.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, self.encoder())
        return self._folded[1]

    def _rows(self, layer: int) -> slice:
        width = 2 * self.shape.width
        return slice(layer * width, (layer + 1) * width)

    def _key_value(
        self, rows: torch.Tensor, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, 2 * heads * head_dim) rows of one layer -> its (batch, heads, tokens, head_dim)
        key and value."""
        shape = self.shape
        kv = rows.view(self.n, 2, shape.heads, shape.head_dim).permute(1, 2, 0, 3).to(dtype)
        size = (batch, shape.heads, self.n, shape.head_dim)
        return kv[0].unsqueeze(0).expand(size), kv[1].unsqueeze(0).expand(size)

    def layer_prefix(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's key and value prefix for the batch and dtype of ``like`` (graph route)."""
        if self.encoder is not None and self._constants is None and torch.is_grad_enabled():
            rows = self.encoder(self._rows(layer))  # only this layer's outputs
        else:
            rows = self.flat()[:, self._rows(layer)]
        return self._key_value(rows, like.shape[0], like.dtype)

    # the call -------------------------------------------------------------------------------

    def transform(self, call: ModelCall) -> None:
        if self.route == "graph":
            self._shift_positions(call)
            return
        kwargs = call.kwargs
        if call.prefill:
            batch, _ = batch_and_length(kwargs)
            cache = call_cache(kwargs, call.model)
            flat = self.flat()
            dtype = model_dtype(call.model)
            for layer in range(self.shape.num_layers):
                key, value = self._key_value(flat[:, self._rows(layer)], batch, dtype)
                cache.update(key, value, layer)
            for name in CACHE_ARGUMENTS:
                kwargs.pop(name, None)
            kwargs[self.cache_name] = cache
        extend_mask(kwargs, self.n)
        shift_positions(kwargs, self.n)

    def _shift_positions(self, call: ModelCall) -> None:
        """Graph route: the cache holds no prefix, so positions count the prefix explicitly
        (the same positions the cache route gets)."""
        kwargs = call.kwargs
        if kwargs.get("position_ids") is not None or not self.takes_positions:
            shift_positions(kwargs, self.n)
            return
        _, length = batch_and_length(kwargs)
        start = cached_length(kwargs) + self.n
        positions = torch.arange(start, start + length, device=_input_device(kwargs))
        kwargs["position_ids"] = positions.unsqueeze(0)

    def touches(self, region: Region) -> bool:
        return self.route == "graph" and not region.leaf and region.path in self.sites

    def emit_region(self, ctx: EmitContext, region: Region) -> None:
        for i, layer in enumerate(self.sites[region.path]):
            insert_prefix(ctx, i, LayerPrefix(self, layer))

    # files and lowering -----------------------------------------------------------------------

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.encoder is not None:
            raise SpecError(
                f"this {self.method} adapter trains a prefix encoder; a saved file holds only the "
                f"prefixes it produces, which cannot be loaded back into an encoder. Load the file "
                f"as a new adapter (load_adapters) instead"
            )
        return {"prompt_embeddings": self.prefixes}

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.flat().detach()}

    def peft_config(self) -> dict[str, Any]:
        return dict(self.config_fields)

    @contextlib.contextmanager
    def as_constants(self) -> Iterator[None]:
        with torch.no_grad():
            self._constants = self.flat().detach().clone()
        try:
            yield
        finally:
            self._constants = None


def choose_route(
    owner: str, route: str, model: nn.Module, graph: Graph, shape: PrefixShape
) -> tuple[str, dict[str, list[int]]]:
    """The graph route where every layer's attention is traced, else the cache route."""
    sites, why_not = graph_sites(graph, shape.num_layers)
    if route == "graph" and why_not:
        raise SpecError(f"{owner}.route='graph': {why_not}")
    if route in ("graph", "auto") and not why_not:
        return "graph", sites
    if cache_argument(model) is None:
        raise SpecError(
            f"{owner}: attention is not traced in this model ({why_not}) and its forward takes "
            f"no {' or '.join(CACHE_ARGUMENTS)} argument to hand prefixes through"
        )
    return "cache", {}


def _one_submodule(value: Any, config: Mapping[str, Any], where: str) -> None:
    if value not in (None, 1):
        raise SpecError(
            f"{where}: num_transformer_submodules={value!r}: encoder-decoder prompt adapters "
            f"are not supported yet (only 1)"
        )


SIZE_KEYS = (
    PeftKey("num_layers", None, None, INT.optional()),
    PeftKey("token_dim", None, None, INT.optional()),
    PeftKey("num_attention_heads", None, None, INT.optional()),
    PeftKey("num_transformer_submodules", None, None, INT.optional(), load=_one_submodule),
)
"""The model sizes a PEFT prompt-learning config records; a load checks them against the model
(the adapter writes them from the model it is on, `CallAdapter.peft_config`)."""


class PromptMethod(MethodSpec):
    """A method acting on the model call whose PEFT file records the model's sizes."""

    acts_on_call = True

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], where: str) -> MethodSpec:
        spec = super().from_peft_config(config, where)
        sizes = {k: config.get(k) for k in ("num_layers", "token_dim", "num_attention_heads")}
        spec._set("_file_sizes", sizes)
        return spec


def _projection(value: Any, config: Mapping[str, Any], where: str) -> int | None:
    """PEFT's prefix projection width: ``encoder_hidden_size`` (or ``token_dim``) when
    ``prefix_projection`` is on."""
    if not config.get("prefix_projection"):
        return None
    width = value or config.get("token_dim")
    if not isinstance(width, int):
        raise SpecError(f"{where}: prefix_projection is set but encoder_hidden_size is missing")
    return width


PREFIX_FORMAT = PeftFormat(
    "PREFIX_TUNING",
    keys=(
        PeftKey("num_virtual_tokens", "num_virtual_tokens", REQUIRED, INT),
        PeftKey(
            "prefix_projection",
            None,
            False,
            BOOL,
            save=lambda spec, paths: spec.encoder_size() is not None,
        ),
        PeftKey(
            "encoder_hidden_size",
            "projection_dim",
            None,
            INT.optional(),
            save=lambda spec, paths: (spec.encoder_size() or (None,))[0],
            load=_projection,
        ),
        *SIZE_KEYS,
    ),
    constants={"init_weights": None},
)


class PrefixMethod(PromptMethod):
    """What PrefixTuning and PTuningV2 share: a file is PEFT's prefix tuning; subclasses say
    which encoder (if any) produces the prefixes."""

    peft_format = PREFIX_FORMAT

    num_virtual_tokens: int
    route: str

    def encoder_size(self) -> tuple[int, int] | None:
        """(hidden size, number of Linear layers) of the prefix encoder, or None for plain prefixes."""
        raise NotImplementedError

    @property
    def file_holds_trained_form(self) -> bool:
        return self.encoder_size() is None

    def check_common_fields(self) -> None:
        owner = type(self).__name__
        check_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        check_choice(owner, "route", self.route, ROUTES)

    def create_call_adapter(self, model: nn.Module, graph: Graph, from_file: bool) -> PrefixAdapter:
        owner = type(self).__name__
        shape = prefix_shape(model, owner)
        fields = {
            "num_layers": shape.num_layers,
            "token_dim": shape.width,
            "num_attention_heads": shape.heads,
            "num_transformer_submodules": 1,
        }
        check_file_sizes(getattr(self, "_file_sizes", None), fields, owner)
        route, sites = choose_route(owner, self.route, model, graph, shape)
        factory = adapter_factory(model)
        size = None if from_file else self.encoder_size()
        encoder = None
        if size is not None:
            hidden, depth = size
            n, width = self.num_virtual_tokens, shape.width
            encoder = PrefixEncoder(n, width, hidden, depth, shape.flat, **factory)
        return self.make_adapter(
            self.name,
            model,
            shape,
            self.num_virtual_tokens,
            encoder,
            route,
            sites,
            {**fields, "task_type": task_type(model)},
            **factory,
        )

    def make_adapter(self, *arguments: Any, **factory: Any) -> PrefixAdapter:
        """The adapter holding the prefixes (`PrefixAdapter`'s arguments)."""
        return PrefixAdapter(*arguments, **factory)


def adapter_factory(model: nn.Module) -> dict[str, Any]:
    """Device and dtype for prompt parameters: the model's, float32 for half-precision models."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return {}
    return adapter_tensor_kwargs(param)
