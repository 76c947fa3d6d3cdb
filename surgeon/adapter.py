"""The contract between a method and the compiler.

A method (one file in ``passes/``) supplies:

* a spec class (`surgeon.spec.MethodSpec`) that validates its fields, says which layers it
  supports, and builds one `AdapterLayer` per targeted layer;
* the `AdapterLayer`: a plain module that owns the method's parameters for one layer, emits its
  subgraph next to the base node, knows its merged weight delta and its PEFT state-dict keys;
* or, for methods that act on the model call instead of a layer (prompt methods), one
  `CallAdapter` that rewrites the call's arguments.

Merge, unmerge, save, load and lowering are written once on top of that.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from surgeon.trace import Region


class EmitContext:
    """Builds adapter nodes in a region graph; records the objects that get_attr/call_module name."""

    def __init__(
        self,
        graph: fx.Graph,
        root: dict[str, Any],
        prefix: str,
        adapter: str,
        method: str,
        fuses_as: str | None = None,
    ) -> None:
        self.graph = graph
        self.root = root
        self.prefix = prefix
        self.tag = {"adapter": adapter, "method": method, "fuses_as": fuses_as}
        self.inserted: list[fx.Node] = []

    def _mark(self, node: fx.Node) -> fx.Node:
        node.meta["surgeon"] = dict(self.tag)
        self.inserted.append(node)
        return node

    def attr(self, name: str, value: Any) -> fx.Node:
        target = f"{self.prefix}.{name}"
        self.root[target] = value
        return self._mark(self.graph.get_attr(target))

    def module(self, name: str, module: nn.Module, *args: Any, **kwargs: Any) -> fx.Node:
        target = f"{self.prefix}.{name}"
        self.root[target] = module
        return self._mark(self.graph.call_module(target, args, kwargs))

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self._mark(self.graph.call_function(fn, args, kwargs))

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self._mark(self.graph.call_method(name, args, kwargs))


class AdapterLayer(nn.Module):
    """One method's parameters for one target layer."""

    method: ClassVar[str]
    no_weight_decay: ClassVar[tuple[str, ...]] = ()
    """Parameters weight decay must leave alone (DoRA's magnitudes: decay would shrink the
    adapted weight's norm towards zero, not the update)."""
    peft_names: ClassVar[Mapping[str, str]] = {}
    """PEFT's key (under the layer's path) of each parameter whose name differs from it."""
    loraplus_b: ClassVar[tuple[str, ...]] = ()
    """Parameters LoRA+ trains at its raised learning rate besides vectors (the B factors)."""
    fuses_as: ClassVar[str | None] = None
    """The fusion rule (``passes/fuse.py``) that matches the subgraph `emit` builds: the shape of
    the computation, not the method's name (LoRA on a 4-bit base fuses as ``qlora``)."""

    @property
    def transforms_input(self) -> bool:
        """Whether `emit_input` changes this layer's input (a mixed batch then transforms each
        adapter's rows of it before the layer runs)."""
        return False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        # Kept outside the module tree: the base layer belongs to the user's model.
        object.__setattr__(self, "_base", base)

    @property
    def base(self) -> nn.Module:
        return self._base

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        """Add this adapter's nodes; return the node that replaces ``base_out``."""
        raise NotImplementedError

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        """Optionally replace the base layer's call with explicit nodes computing its output from
        ``x`` (a 4-bit base shows its dequantize and matmul); None keeps the call."""
        return None

    def emit_input(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        """Optionally transform the base layer's input (IA³ on feed-forward layers scales it).

        Return the node the base layer should read instead of ``x``, or None to leave it. Several
        adapters on one layer transform it in turn (each gets the previous one's result); their
        `emit` still sees the original ``x``.
        """
        return None

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base weight (same shape and layout as ``base.weight``)."""
        raise NotImplementedError

    def prepare_merge(self) -> None:
        """Called on every layer of a merge before any of them merges: a method whose fold
        depends on the base weight (DoRA's norm) reads it here, before other adapters on the
        same layer change it."""

    @torch.no_grad()
    def merge(self) -> None:
        """Fold this adapter into the base layer in place. Additive by default; methods whose
        fold is not a sum (IA³ scales, DoRA renormalises) override `merge` and `unmerge`."""
        weight = self.base.weight
        weight.add_(self.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exactly in float32, up to rounding in half precision)."""
        weight = self.base.weight
        weight.sub_(self.delta_weight().to(weight.dtype))

    def unload(self, requantize: bool = False) -> None:
        """``merge_and_unload`` folded this adapter in and lets go of the base layer. Methods that
        changed how the base is stored (QLoRA's 4 bits) store it that way again if asked."""

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """State-dict entries under the layer's path, in PEFT's naming without the adapter name:
        the layer's own parameters, renamed by `peft_names`."""
        names = self.peft_names
        return {names.get(n, n): p for n, p in self.named_parameters(recurse=False)}

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """What a save writes; `peft_tensors` unless training shrank the layer (AdaLoRA)."""
        return self.peft_tensors()

    def loraplus_group(self, name: str, param: nn.Parameter) -> str:
        """LoRA+'s learning-rate group of parameter ``name``, by PEFT's rule: ``"B"`` (raised)
        for the B factors and for vectors, ``"A"`` (the base rate) for the rest."""
        return "B" if name in self.loraplus_b else loraplus_group_by_shape(param)


def loraplus_group_by_shape(param: nn.Parameter) -> str:
    """PEFT's LoRA+ rule for a parameter no name singles out: vectors at the raised rate."""
    return "B" if param.ndim == 1 else "A"


@torch.no_grad()
def merge_layers(layers: Sequence[AdapterLayer]) -> None:
    """Merge ``layers`` in order, as the unmerged graph applies them (see `prepare_merge`)."""
    for layer in layers:
        layer.prepare_merge()
    for layer in layers:
        layer.merge()


# -- methods that act on the model call rather than on a layer --------------------------------


@dataclass
class ModelCall:
    """One call of the model as a call adapter sees it: every argument by name, and whether it
    starts a sequence (no cached tokens yet) or continues one (a generation step)."""

    model: nn.Module
    kwargs: dict[str, Any]
    prefill: bool


class CallAdapter(nn.Module):
    """One method's parameters for the whole model (prompt tuning, prefix tuning, ...).

    Instead of emitting nodes next to a layer, it rewrites the keyword arguments of every model
    call (input embeddings, attention mask, position ids, labels, the key/value cache) in
    `transform`, for ``forward`` and for each step of ``generate`` alike. Where it acts inside the
    model (a prefix concatenated before an attention call), it also adds nodes to the traced
    regions it `touches`. Activation, save, load and export handle it like the layer adapters.
    """

    method: ClassVar[str]
    target: str = "model call"
    """What ``inspect()`` shows in its target column."""
    where: str = "-"
    """How it reaches the model, shown in ``inspect()``'s region column."""

    def transform(self, call: ModelCall) -> None:
        """Rewrite ``call.kwargs`` in place."""
        raise NotImplementedError

    def touches(self, region: Region) -> bool:
        """Whether `emit_region` adds nodes to ``region``'s graph."""
        return False

    def emit_region(self, ctx: EmitContext, region: Region) -> None:
        """Add this adapter's nodes to a copy of ``region``'s graph (``ctx.graph``)."""

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a load fills, by their full key in PEFT's file."""
        raise NotImplementedError

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        return self.peft_tensors()

    def peft_config(self) -> dict[str, Any]:
        """adapter_config.json fields that come from the model (sizes, task type)."""
        return {}

    @contextlib.contextmanager
    def as_constants(self) -> Iterator[None]:
        """Within the block, the adapter's outputs are constants (detached), for lowering."""
        yield


def transform_call(
    model: nn.Module, adapters: Sequence[CallAdapter], args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]]:
    """The arguments of a model call after ``adapters`` rewrote them (a forward pre-hook)."""
    named = _by_name(model, args, kwargs)
    call = ModelCall(model, named, prefill=cached_length(named) == 0)
    for adapter in adapters:
        adapter.transform(call)
    return (), call.kwargs


CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The names transformers gives the key/value cache argument (``cache`` from version 5.2x)."""


def cached_length(kwargs: Mapping[str, Any]) -> int:
    """How many tokens the call's key/value cache already holds (0 without a cache)."""
    for key in CACHE_ARGUMENTS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
            return int(cache[0][0].shape[-2])  # the legacy tuple-of-tuples layout
    return 0


def _by_name(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not args:
        return dict(kwargs)
    signature = inspect.signature(model.forward)
    bound = signature.bind_partial(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(
                f"{type(model).__name__}.forward takes *{name}: prompt methods need its "
                f"arguments by name"
            )
        else:
            named[name] = value
    return named
