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
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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
        layer_call: fx.Node | None = None,
    ) -> None:
        self.graph = graph
        self.layer_call = layer_call
        """The base layer's call node (its other inputs, for an adapter that replaces it)."""
        self.root = root
        self.prefix = prefix
        self.tag = {"adapter": adapter, "method": method, "fuses_as": fuses_as}
        self.inserted: list[fx.Node] = []

    @property
    def adapter(self) -> str:
        """The name of the adapter whose nodes this context builds."""
        return self.tag["adapter"]

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

    call_arguments: ClassVar[tuple[str, ...]] = ()
    """Keyword arguments of the model call this layer reads (Poly's ``task_ids``, one per batch
    row): taken out of the call before the model sees it; ``emit`` reads one as a node
    ``ctx.call(surgeon.rewrite.call_argument, name, ctx.adapter, x)``."""

    input_order_as_merged: ClassVar[bool] = False
    """Whether several adapters of this method stacked on one layer transform its input in
    reverse stacking order, the last one's factor first (``W·T_a·T_b``: PEFT's BOFT and HRA,
    whose factors do not commute), rather than in stacking order (PEFT's OFT). Merging folds
    them to match either way (`fold_order`)."""

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
        adapters on one layer transform it in turn (each gets the previous one's result, in the
        order `input_order_as_merged` decides); their `emit` still sees the original ``x``.
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


class Cached(nn.Module):
    """A value an adapter derives from some of its tensors (DoRA's weight norm, OFT's rotation
    blocks), called from the graph as a module.

    While training, and while autograd needs the value (gradients on and a source requiring
    them, unless the value is ``detached`` anyway), it is computed on every call. Otherwise it is
    kept until a source changes: the sources' version counters, storage, dtype and device key it
    (other sources, such as a scale, by value; writes through ``.data`` bypass version
    counters). A value kept under inference mode is computed again outside it, where it could
    not enter autograd.
    """

    def __init__(
        self,
        compute: Callable[[], Any],
        sources: Callable[[], Sequence[Any]],
        detached: bool = False,
    ) -> None:
        super().__init__()
        # bound methods of the adapter: a deep copy rebinds them to the copied adapter
        self.compute = compute
        self.sources = sources
        self.detached = detached
        self._kept: tuple[tuple, Any] | None = None

    def forward(self) -> Any:
        if self.training or (not self.detached and self._needs_grad()):
            self._kept = None
            return self.compute()
        kept = self._kept
        if kept is None or kept[0] != self._key() or _unusable_outside_inference(kept[1]):
            with torch.no_grad():
                value = self.compute()
            self._kept = kept = (self._key(), value)  # computing may write a source (a clamp)
        return kept[1]

    def forget(self) -> None:
        """Drop the kept value (merged, the graph no longer reads it: memory need not keep a
        full-size matrix)."""
        self._kept = None

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in self.sources()
        )

    def _key(self) -> tuple:
        return tuple(
            (t._version, t.data_ptr(), t.dtype, t.device) if isinstance(t, torch.Tensor) else t
            for t in self.sources()
        )


def _unusable_outside_inference(value: Any) -> bool:
    if torch.is_inference_mode_enabled():
        return False
    values = value if isinstance(value, tuple) else (value,)
    return any(isinstance(v, torch.Tensor) and v.is_inference() for v in values)


@torch.no_grad()
def merge_layers(layers: Sequence[AdapterLayer]) -> list[AdapterLayer]:
    """Merge ``layers`` (in stacking order: adapter after adapter) so that the merged weights
    compute what the unmerged graph does; return them in the order they folded in, which
    `unmerge_layers` reverses."""
    order = fold_order(layers)
    for layer in order:
        layer.prepare_merge()
    for layer in order:
        layer.merge()
        for module in layer.modules():
            if isinstance(module, Cached):
                module.forget()
    return order


@torch.no_grad()
def unmerge_layers(folded: Sequence[AdapterLayer]) -> None:
    """Undo `merge_layers`, given the order it returned."""
    for layer in reversed(folded):
        layer.unmerge()


def fold_order(layers: Sequence[AdapterLayer]) -> list[AdapterLayer]:
    """The order ``layers`` merge in: per base layer, the adapters that transform its input
    first, the one nearest the weight (the last applied) first, as products ``W·M`` nest; then
    the others in stacking order (an additive term sees the layer's original input)."""
    by_base: dict[int, list[AdapterLayer]] = {}
    for layer in layers:
        by_base.setdefault(id(layer.base), []).append(layer)
    order = []
    for stacked in by_base.values():
        inputs = [layer for layer in stacked if layer.transforms_input]
        order += reversed(input_application_order(inputs))
        order += [layer for layer in stacked if not layer.transforms_input]
    return order


def input_application_order(stacked: Sequence[AdapterLayer]) -> list[AdapterLayer]:
    """The order in which a layer's input transforms run, given in stacking order: that order,
    or its reverse where an adapter follows PEFT's `input_order_as_merged` convention."""
    if any(layer.input_order_as_merged for layer in stacked):
        return list(reversed(stacked))
    return list(stacked)


# -- methods that act on the model call rather than on a layer --------------------------------


@dataclass
class ModelCall:
    """One call of the model as a call adapter sees it: every argument by name, and whether it
    starts a sequence (no cached tokens yet) or continues one (a generation step)."""

    model: nn.Module
    kwargs: dict[str, Any]
    prefill: bool
    extras: Mapping[str, Any] = field(default_factory=dict)
    """The compiled model's call arguments for the adapters (their `CallAdapter.call_arguments`),
    which the model itself never sees."""


class CallAdapter(nn.Module):
    """One method's parameters for the whole model (prompt tuning, prefix tuning, ...).

    Instead of emitting nodes next to a layer, it rewrites the keyword arguments of every model
    call (input embeddings, attention mask, position ids, labels, the key/value cache) in
    `transform`, for ``forward`` and for each step of ``generate`` alike. Where it acts inside the
    model (a prefix concatenated before an attention call), it also adds nodes to the traced
    regions it `touches`. Activation, save, load and export handle it like the layer adapters.
    """

    method: ClassVar[str]
    call_arguments: ClassVar[tuple[str, ...]] = ()
    """Keyword arguments of the compiled model's call (and ``generate``) that are this adapter's,
    not the model's (multitask prompt tuning's ``task_ids``): kept out of the model's call and
    handed to `transform` as ``call.extras``."""
    serves_mixed_batches: ClassVar[bool] = False
    """Whether a mixed batch (``adapter_names``) may give this adapter some of its rows: its
    layers then act on their rows only (X-LoRA). Prompt methods change the whole call (its
    length) and cannot."""
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

    def transform_output(self, call: ModelCall, output: Any) -> Any:
        """The model's output for ``call`` (as `transform` left it), rewritten: a method with a
        loss of its own replaces the model's. Returned as it is by default."""
        return output


def transform_call(
    model: nn.Module,
    adapters: Sequence[CallAdapter],
    args: tuple,
    kwargs: dict[str, Any],
    extras: Mapping[str, Any] | None = None,
) -> ModelCall:
    """A model call after ``adapters`` rewrote its arguments (a forward pre-hook runs the model
    on ``call.kwargs``; the forward hook hands the same call to `transform_output`).

    The adapters' own arguments (`CallAdapter.call_arguments`) come in ``extras`` (the compiled
    model's call holds them apart) or among the call's (a direct call of the model, an export):
    the model never sees them."""
    named = _by_name(model, args, kwargs)
    own = {name for adapter in adapters for name in adapter.call_arguments}
    extras = {**(extras or {}), **{name: named.pop(name) for name in own if name in named}}
    call = ModelCall(model, named, prefill=cached_length(named) == 0, extras=extras)
    for adapter in adapters:
        adapter.transform(call)
    return call


def transform_output(adapters: Sequence[CallAdapter], call: ModelCall, output: Any) -> Any:
    """The model's output for ``call`` after ``adapters`` rewrote it (a forward hook)."""
    for adapter in adapters:
        output = adapter.transform_output(call, output)
    return output


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


def cache_parameter(forward: Callable) -> str | None:
    """The name under which ``forward`` takes the key/value cache (None: neither name)."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def cache_passed_as(name: str, kwargs: dict[str, Any], callee: type) -> dict[str, Any]:
    """``kwargs`` with a cache passed under the other name moved to ``name``, the one the
    callee's forward takes: transformers deprecates ``past_key_values`` for ``cache`` and will
    stop renaming it. A caller's use of the deprecated name is still reported, as transformers
    reports it (a FutureWarning)."""
    other = next((k for k in CACHE_ARGUMENTS if k != name and k in kwargs), None)
    if other is None or name in kwargs:
        return kwargs
    if name == CACHE_ARGUMENTS[0]:
        warnings.warn(
            f"`{other}` is deprecated for {callee.__name__}.forward, which takes `{name}`: "
            f"pass `{name}=` (surgeon passed it on as `{name}`)",
            FutureWarning,
            stacklevel=4,
        )
    return {(name if k == other else k): v for k, v in kwargs.items()}


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
