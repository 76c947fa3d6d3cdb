"""`surgeon.compile` and the compiled model it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.adapter import (
    AdapterLayer,
    CallAdapter,
    ModelCall,
    _by_name,
    merge_layers,
    transform_call,
    transform_output,
    unmerge_layers,
)
from surgeon.combine import combine_adapters
from surgeon.copies import LayerCopy, copy_paths, present_names
from surgeon.errors import SpecError, did_you_mean
from surgeon.graph import Graph
from surgeon.inspect import Report
from surgeon.io import adapter_config, adapter_tensors, fill_adapter, read_adapter, write_adapter
from surgeon.passes.fuse import fuse_graph, fused_sites
from surgeon.quant import Linear4bit
from surgeon.rewrite import (
    escape,
    install,
    leaf_region,
    mixed_rows,
    reached_layers,
    rewrite_region,
    set_call_values,
    specialised_rewrite,
)
from surgeon.spec import MethodSpec, Spec, as_spec, check_adapter_name
from surgeon.trace import is_parameter_owner, retrace, trace_regions

BASE = "__base__"
"""In ``adapter_names``: this row runs the base model."""


class AdapterStore(nn.Module):
    """Adapter parameters, apart from the graphs: recompiling never reallocates them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.calls = nn.ModuleDict()  # adapters acting on the model call (prompt methods)
        self.specs: dict[str, MethodSpec] = {}
        self.paths: dict[str, list[str]] = {}

    def add(
        self,
        name: str,
        spec: MethodSpec,
        layers: Mapping[str, AdapterLayer],
        call: CallAdapter | None = None,
    ) -> None:
        self.layers[name] = nn.ModuleDict({escape(p): layer for p, layer in layers.items()})
        if call is not None:
            self.calls[name] = call
        self.paths[name] = list(layers)
        self.specs[name] = spec

    def call(self, name: str) -> CallAdapter | None:
        """The adapter of ``name`` if its method acts on the model call, else None."""
        return self.calls._modules.get(name)

    def remove(self, name: str) -> None:
        del self.layers[name]
        if name in self.calls:
            del self.calls[name]
        del self.specs[name]
        del self.paths[name]

    def items(self, name: str) -> list[tuple[str, AdapterLayer]]:
        group = self.layers[name]
        return [(p, group[escape(p)]) for p in self.paths[name]]


class CompiledModel(nn.Module):
    """The user's model with adapters grafted in. Calls, attributes and ``generate`` pass through."""

    def __init__(self, model: nn.Module, graph: Graph) -> None:
        super().__init__()
        self.model = model
        self.store = AdapterStore()
        self.graph = graph
        self._active: tuple[str, ...] = ()
        self._merged: list[str] = []
        self._folded: list[list[AdapterLayer]] = []  # each merge's layers, in their fold order
        self._disabled = False
        self._frozen = False
        self._fused = False
        self.training = model.training  # cm.training mirrors the model it wraps
        self._plans: dict[tuple, list] = {}
        self._calls: list[CallAdapter] = []  # the running call adapters (a forward pre-hook)
        self._call_hook = None  # the call adapters' forward pre-hook and forward hook
        self._running_call: ModelCall | None = None  # from the pre-hook to the forward hook
        self._call_extras: dict[str, Any] = {}
        self._layer_arguments: tuple[str, ...] = ()  # the stored layers' call_arguments
        self._running_names: tuple[str, ...] = ()  # the adapters the installed graphs run
        self._held_values: dict[str, Mapping[str, Any]] | None = None  # one generate's values

    # -- passing through to the model ---------------------------------------------------------

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The model's forward. ``adapter_names`` (one per batch row, ``"__base__"`` for none)
        runs each row through its own adapter in one call."""
        with self._adapter_arguments(kwargs):
            if adapter_names is None:
                return self.model(*args, **kwargs)
            with self._mixed(adapter_names):
                return self.model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """The model's ``generate``, with ``adapter_names`` as in `forward` (greedy and sampling;
        beam search multiplies rows and is refused with a clear error)."""
        with self._adapter_arguments(kwargs):
            if adapter_names is None:
                with self._values_for_generate(args, kwargs):
                    return self.model.generate(*args, **kwargs)
            with self._mixed(adapter_names), self._values_for_generate(args, kwargs):
                return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _values_for_generate(self, args: tuple, kwargs: dict[str, Any]) -> Iterator[None]:
        """The running adapters' `MethodSpec.call_values`, derived once from generate's own
        arguments (its prompt) and held for every step, as PEFT derives aLoRA's offsets."""
        named = dict(kwargs)
        prompt = kwargs.get("inputs", args[0] if args else None)
        if prompt is not None:
            named.setdefault("input_ids", prompt)
        previous, self._held_values = self._held_values, self._derived_values(named)
        try:
            yield
        finally:
            self._held_values = previous

    def _derived_values(
        self, call: Mapping[str, Any], by_name: Callable[[], Mapping[str, Any]] | None = None
    ) -> dict[str, Mapping[str, Any]]:
        """Per running adapter whose spec derives values from a call (`MethodSpec.call_values`),
        those of ``call``; ``by_name``: the call's arguments all by name, where some came by
        position (bound only if an adapter needs them)."""
        deriving = [
            n
            for n in self._running_names
            if type(self.store.specs[n]).call_values is not MethodSpec.call_values
        ]
        if deriving and by_name is not None:
            call = by_name()
        derived = {n: self.store.specs[n].call_values(n, call) for n in deriving}
        return {n: values for n, values in derived.items() if values}

    @contextlib.contextmanager
    def _adapter_arguments(self, kwargs: dict[str, Any]) -> Iterator[None]:
        """Take the running call adapters' own arguments (`CallAdapter.call_arguments`) out of
        ``kwargs`` and hand them to every model call of the block (each step of ``generate``)."""
        names = {name for call in self._calls for name in call.call_arguments}
        names.update(self._layer_arguments)
        extras = {name: kwargs.pop(name) for name in names if name in kwargs}
        previous, self._call_extras = self._call_extras, extras
        try:
            yield
        finally:
            self._call_extras = previous

    @contextlib.contextmanager
    def _mixed(self, adapter_names: Sequence[str]) -> Iterator[None]:
        if isinstance(adapter_names, str) or not adapter_names:
            raise SpecError("adapter_names: expected a list with one adapter name per batch row")
        for n in set(adapter_names) - {BASE}:
            self._require(n)
        if self._merged:
            raise SpecError(
                f"adapter_names: adapters {self._merged} are merged into the weights; "
                f"unmerge() first, or every row would get them"
            )
        names = tuple(sorted(set(adapter_names) - {BASE}))
        self._install(names, mixed=True)
        try:
            with mixed_rows(list(adapter_names)):
                yield
        finally:
            self._recompile()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__["_modules"].get("model")
            if model is None:
                raise
            return getattr(model, name)

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, adapters={self.adapters}, active={self.active})"

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        if "_plans" in self.__dict__:
            self._forget_plans()
        self._recompile()  # dtype casts in the graphs depend on parameter dtypes
        return out

    # -- adapters -----------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self.store.specs)

    @property
    def active(self) -> list[str]:
        return list(self._active)

    def spec(self, name: str) -> MethodSpec:
        self._require(name)
        return self.store.specs[name]

    def add_adapter(self, name: str, method: MethodSpec, activate: bool | None = None) -> None:
        """Add an adapter; it becomes active if it is the first one (or when ``activate``)."""
        if activate:
            self._check_call_adapters([*self._active, name], {name: method})
        self._build_adapter(name, method)
        if activate or (activate is None and not self._active):
            self._active = (*self._active, name)
        self._recompile()

    def _build_adapter(
        self,
        name: str,
        method: MethodSpec,
        tensors: Mapping[str, torch.Tensor] | None = None,
        calibration: Iterable[Mapping[str, Any]] | None = None,
    ) -> Callable[[], None]:
        """Create (and fill from ``tensors``) an adapter, a new one from ``calibration`` where
        its method reads data (`MethodSpec.create_layers_from_data`); on any error the model is
        left as it was. Returns the function that puts back what creating it changed in the base
        model (`MethodSpec.snapshot_base`), for a caller that must undo several adapters at
        once."""
        check_adapter_name(name)
        if name in self.store.specs:
            raise SpecError(
                f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name"
            )
        if not isinstance(method, MethodSpec):
            raise SpecError(
                f"adapter {name!r}: expected a method such as surgeon.LoRA(...), got {type(method).__name__}"
            )
        _check_no_conflict(name, method, self.store.specs)
        paths = method.select(self.model)
        _check_weights_have_values(method, self.model, paths)
        copies = copy_paths(self.model, method, paths)
        restore = method.snapshot_base(self.model, paths)
        with _unchanged_on_error(self.model, [restore]):
            if tensors is None:
                layers = method.create_layers_from_data(self.model, paths, calibration)
            else:
                layers = method.create_layers(self.model, paths)
            layers.update({p: LayerCopy(self.model.get_submodule(p)) for p in copies})
            call = method.create_call_adapter(self.model, self.graph, tensors is not None)
            base_trainable = method.trainable_base_parameters(self.model, paths)
            if tensors is not None:
                fill_adapter(self.model, name, method, layers, base_trainable, tensors, call)
        self._freeze_base()
        params = dict(self.model.named_parameters())
        for pname in base_trainable:
            params[pname].requires_grad_(True)
        for layer in [*layers.values(), *([call] if call is not None else [])]:
            layer.train(self.model.training)  # new adapters follow the model's mode
        if (call is not None or _reads_call_arguments(layers.values())) and self._call_hook is None:
            self._call_hook = (
                self.model.register_forward_pre_hook(self._transform_call, with_kwargs=True),
                self.model.register_forward_hook(self._transform_output),
            )
        self.store.add(name, method, layers, call)
        self._add_unreached_layers([*paths, *copies])
        self._forget_plans()
        return restore

    def set_active(self, names: str | Sequence[str] | None) -> None:
        """Which adapters run: a name, several names (applied in order), or None for none."""
        chosen = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        for n in chosen:
            self._require(n)
        if len(set(chosen)) != len(chosen):
            raise SpecError(f"set_active: adapter names repeat in {list(chosen)}")
        self._check_call_adapters(chosen)
        self._active = chosen
        self._recompile()

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self._merged:
            raise SpecError(
                f"adapter {name!r} is merged into the weights; unmerge() before deleting it"
            )
        self.store.specs[name].on_running(self.model, name, False, False)
        self.store.remove(name)
        self._active = tuple(n for n in self._active if n != name)
        self._forget_plans()
        self._recompile()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model: adapters off (merged ones are unmerged for the duration)."""
        merged = list(self._merged)
        if merged:
            self.unmerge()
        self._disabled = True
        self._recompile()
        try:
            yield
        finally:
            self._disabled = False
            if merged:
                self.merge(merged)
            self._recompile()

    def _check_call_adapters(
        self, names: Sequence[str], new: Mapping[str, MethodSpec] | None = None
    ) -> None:
        """At most one adapter acting on the model call (a prompt method) runs at a time: each
        would take the others' virtual tokens for its own."""
        specs = {**self.store.specs, **(new or {})}
        calls = [n for n in names if n in specs and specs[n].acts_on_call]
        if len(calls) > 1:
            kinds = ", ".join(f"{n!r} ({specs[n].name})" for n in calls)
            raise SpecError(
                f"adapters {kinds} all act on the model call (prompt methods); only one of them "
                f"can be active at a time, alongside any layer adapters: use set_active"
            )

    def _remove_call_hook(self) -> None:
        if self._call_hook is not None:
            for handle in self._call_hook:
                handle.remove()
            self._call_hook = None

    def _transform_call(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self._layer_arguments:
            # every call sets them (none given: none), so a call never reads an earlier one's
            given = {n: kwargs.pop(n) for n in self._layer_arguments if n in kwargs}
            values = {**self._call_extras, **given}
            derived = self._held_values
            if derived is None:
                derived = self._derived_values(kwargs, lambda: _by_name(module, args, kwargs))
            set_call_values({n: values[n] for n in self._layer_arguments if n in values}, derived)
        if not self._calls:
            return (args, kwargs) if self._layer_arguments else None
        self._running_call = transform_call(module, self._calls, args, kwargs, self._call_extras)
        return (), self._running_call.kwargs

    def _transform_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        call, self._running_call = self._running_call, None
        if call is None or not self._calls:
            return None
        return transform_output(self._calls, call, output)

    def _require(self, name: str) -> None:
        if name not in self.store.specs:
            raise SpecError(
                f"no adapter named {name!r}{did_you_mean(name, self.adapters)} "
                f"(adapters: {', '.join(self.adapters) or 'none'})"
            )

    # -- merging ------------------------------------------------------------------------------

    def merge_adapters(
        self, weights: Mapping[str, float], name: str, how: str = "linear", **options: Any
    ) -> None:
        """A new adapter ``name`` made from weighted existing ones (PEFT's add_weighted_adapter):
        ``how`` is linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, or one of
        ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd."""
        check_adapter_name(name)
        if name in self.store.specs:
            raise SpecError(
                f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name"
            )
        method, tensors = combine_adapters(self, dict(weights), how, **options)
        self._build_adapter(name, method, tensors)
        self._recompile()

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights; `unmerge` reverses it."""
        chosen = self._merge_candidates(names)
        layers = [layer for name in chosen for _, layer in self.store.items(name)]
        self._folded.append(merge_layers(layers))
        self._merged.extend(chosen)
        self._recompile()

    @torch.no_grad()
    def unmerge(self) -> None:
        for folded in reversed(self._folded):
            unmerge_layers(folded)
        self._merged, self._folded = [], []
        self._recompile()

    def _merge_candidates(self, names: Sequence[str] | None) -> list[str]:
        chosen = list(self._active if names is None else names)
        for n in chosen:
            self._require(n)
            if names is not None and n in self.store.calls:
                raise SpecError(
                    f"cannot merge adapter {n!r}: {self.store.specs[n].name} acts on the model "
                    f"call and has no weights to fold into; it keeps running unmerged"
                )
        chosen = [n for n in chosen if n not in self._merged]
        # a method acting on the call whose layers cannot fold (X-LoRA) refuses, as layer ones do
        self.refuse_unmergeable(chosen, "merge")
        # prompt methods have nothing to fold: merging the active adapters leaves them running
        chosen = [n for n in chosen if n not in self.store.calls]
        self._refuse_tied_weights(chosen)
        return chosen

    def refuse_unmergeable(self, names: Sequence[str], verb: str) -> None:
        """A `SpecError` for the first adapter whose method has no weight update to fold."""
        for n in names:
            reason = self.store.specs[n].merge_refusal
            if reason is not None:
                raise SpecError(
                    f"cannot {verb} adapter {n!r} ({self.store.specs[n].name}): {reason}; it "
                    f"runs unmerged (set_active without it to {verb} the others)"
                )

    def _refuse_tied_weights(self, names: Sequence[str]) -> None:
        """Folding into a weight another module shares (tied embeddings) would change that module too."""
        owners: dict[int, list[str]] = {}
        for pname, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(pname)
        for name in names:
            items = self.store.items(name)
            # a method that adapts every layer sharing the weight alike may write into it
            alike = self.store.specs[name].merges_into_shared_weights
            adapted = {f"{path}.weight" for path, _ in items} if alike else set()
            for path, layer in items:
                # getattr: a MultiheadAttention has no `weight` (nor tied projections)
                shared = owners.get(id(getattr(layer.base, "weight", None)), [])
                if any(n not in adapted for n in shared if n != f"{path}.weight"):
                    others = ", ".join(n for n in shared if n != f"{path}.weight")
                    raise SpecError(
                        f"cannot merge adapter {name!r}: {path}.weight is tied to {others}, so merging would "
                        f"change that layer too. Use the adapter unmerged, or untie the weights first "
                        f"(e.g. give the other layer its own copy of the weight)"
                    )

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(self, requantize: bool = False) -> nn.Module:
        """Fold the active adapters in and hand back the plain model (no surgeon code left in it).

        ``requantize``: bases stored in 4 bits (QLoRA) are stored in 4 bits again after folding
        (lossy); by default they come back as plain layers in their original dtype."""
        self.refuse_unmergeable(self._running(), "merge")
        running = [n for n in self._running() if n in self.store.calls]
        if running:
            raise SpecError(
                f"merge_and_unload: adapter {running[0]!r} ({self.store.specs[running[0]].name}) "
                f"acts on the model call and cannot be folded into the weights, so the plain model "
                f"would lose it. Deactivate it first, or export with surgeon.export_onnx, which "
                f"turns its prompts into constants"
            )
        self.merge()
        for name in self._merged:
            for _, layer in self.store.items(name):
                layer.unload(requantize)
        for region in self.graph.installable():
            install(self.model, region, None)
        for name in list(self.store.specs):
            self.store.remove(name)
        self._remove_call_hook()
        self._active, self._merged, self._folded = (), [], []
        self._forget_plans()
        return self.model

    # -- compiling ----------------------------------------------------------------------------

    def _freeze_base(self) -> None:
        if not self._frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._frozen = True

    def _add_unreached_layers(self, paths: Sequence[str]) -> None:
        """Targets that no region's graph calls (called from outside, say) get a region of their own."""
        self._keep_parameter_owners_called([p for p in paths if is_parameter_owner(self._at(p))])
        reached = reached_layers(self.model, self.graph.regions)
        for path in paths:
            if id(self.model.get_submodule(path)) not in reached:
                self.graph.regions.append(leaf_region(self.model, path))

    def _at(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def _keep_parameter_owners_called(self, owners: Sequence[str]) -> None:
        """Modules adapted through their own parameters (`is_parameter_owner`) were traced
        through before they were marked: regions holding one are traced again (a specialised
        region at its next call), and each gets a leaf region, which a region's fallback to its
        own forward calls."""
        leaves = {r.path for r in self.graph.regions if r.leaf}
        for owner in owners:
            for region in [*self.graph.regions, *self.graph.specialised]:
                inside = region.path == "" or owner.startswith(region.path + ".")
                if region.leaf or not inside:
                    continue
                if region.specialised:
                    region.variants.clear()
                    region.dynamic.clear()
                else:
                    region.base = retrace(self._at(region.path), region.path)
            if owner not in leaves:
                self.graph.regions.append(leaf_region(self.model, owner))

    def _layers_of(self, names: Sequence[str]) -> dict[int, list[tuple[str, AdapterLayer]]]:
        """id(base layer) -> the named adapters' layers on it, in order."""
        active: dict[int, list[tuple[str, AdapterLayer]]] = {}
        for name in names:
            for _, layer in self.store.items(name):
                active.setdefault(id(layer.base), []).append((name, layer))
        return active

    def _running(self) -> tuple[str, ...]:
        """The adapters the graphs run now: active, not merged, not disabled."""
        if self._disabled:
            return ()
        return tuple(n for n in self._active if n not in self._merged)

    def _recompile(self) -> None:
        if "graph" not in self.__dict__:
            return  # during nn.Module.__init__-time .to() calls
        self._install(self._running())

    def _install(self, names: tuple[str, ...], mixed: bool = False) -> None:
        """Install the rewrites for running ``names``; a set seen before reuses its rewrites, so
        switching adapters costs no tracing or code generation."""
        calls = [(n, self.store.calls[n]) for n in names if n in self.store.calls]
        if mixed:
            self._check_mixed_calls(calls)
        key = (names, mixed, self._fused)
        if key not in self._plans:
            active = self._layers_of(names)
            passes = self._graph_passes()
            self._plans[key] = [
                (region, rewrite_region(self.model, region, active, mixed, passes, calls))
                if (active and reached_layers(self.model, [region]) & active.keys())
                or any(call.touches(region) for _, call in calls)
                else (region, None)
                for region in self.graph.regions
            ] + [
                (region, specialised_rewrite(self.model, region, active, mixed, passes))
                if self.graph.specialising
                and active
                and not calls
                and reached_layers(self.model, [region]) & active.keys()
                else (region, None)
                for region in self.graph.specialised
            ]
        for region, rewrite in self._plans[key]:
            if rewrite is not None or region.gm is not None:
                install(self.model, region, rewrite)
        for name, spec in self.store.specs.items():
            spec.on_running(self.model, name, name in names, mixed)
        self._calls = [call for _, call in calls]
        self._running_names = names
        # every stored adapter's, running or not: the model never sees them (PEFT's Poly takes
        # task_ids out of the call with its adapters disabled too)
        self._layer_arguments = tuple(
            sorted(
                {
                    argument
                    for layers in self._layers_of(list(self.store.specs)).values()
                    for _, layer in layers
                    for argument in layer.call_arguments
                }
            )
        )

    def _check_mixed_calls(self, calls: Sequence[tuple[str, CallAdapter]]) -> None:
        """A mixed batch takes one adapter acting on the model call that serves one
        (X-LoRA: its rows of the call are its own), beside any layer adapters."""
        for name, call in calls:
            if not call.serves_mixed_batches:
                raise SpecError(
                    f"adapter_names: adapter {name!r} ({self.store.specs[name].name}) acts on "
                    f"the whole model call; mixed batches support layer adapters and X-LoRA only"
                )
        if len(calls) > 1:
            kinds = ", ".join(f"{n!r} ({self.store.specs[n].name})" for n, _ in calls)
            raise SpecError(
                f"adapter_names: adapters {kinds} all act on the model call; mixed batches take "
                f"one of them, beside layer adapters"
            )

    def _graph_passes(self) -> tuple:
        return (fuse_graph,) if self._fused else ()

    def fuse(self, enabled: bool = True) -> int:
        """Run the fusion pass (``passes/fuse.py``) on the rewritten graphs, now and after every
        recompile: each adapter subgraph it recognises becomes one fused op (Triton kernels on
        CUDA, the reference implementation elsewhere). ``fuse(False)`` goes back to the unfused
        graphs. Returns how many fused ops the installed graphs hold."""
        if not isinstance(enabled, bool):
            raise SpecError(f"fuse: expected True or False, got {enabled!r}")
        self._fused = enabled
        self._recompile()
        return sum(fused_sites(region.graph) for region in self.graph.rewritten())

    @property
    def fused(self) -> bool:
        """Whether the fusion pass runs (see `fuse`)."""
        return self._fused

    def _forget_plans(self) -> None:
        """Adapters, regions or dtypes changed: earlier rewrites no longer apply."""
        self._plans.clear()

    # -- training hooks -----------------------------------------------------------------------

    def update_ranks(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """In a custom loop, call after ``optimizer.step()`` and before ``zero_grad()`` (as PEFT's
        update_and_allocate): methods that adapt while training (AdaLoRA's rank allocation) do
        their per-step work here. Methods that restart their factors (ReLoRA, COLA) also reset
        the optimizer's moments for them, and need ``optimizer``."""
        for name in self._active:
            self.store.specs[name].after_backward(self._hooked_parts(name), step, optimizer)

    def lr_factor(self, step: int) -> float:
        """What the active methods multiply the learning-rate schedule by at ``step`` (ReLoRA's
        re-warm-up after each restart): 1 for most. A custom loop's scheduler applies it."""
        factor = 1.0
        for name in self._active:
            factor *= self.store.specs[name].lr_factor(step)
        return factor

    def regularization_loss(self) -> torch.Tensor | None:
        """The sum of the active methods' loss terms (AdaLoRA's orthogonality), or None."""
        terms = [
            t
            for name in self._active
            if (t := self.store.specs[name].loss_term(self._hooked_parts(name))) is not None
        ]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def _hooked_parts(self, name: str) -> dict[str, AdapterLayer | CallAdapter]:
        """What adapter ``name``'s training hooks get: its layers by path, and the adapter of a
        method acting on the model call under ``""`` (the whole model's path)."""
        parts: dict[str, AdapterLayer | CallAdapter] = dict(self.store.items(name))
        call = self.store.call(name)
        if call is not None:
            parts[""] = call
        return parts

    # -- reporting, files ---------------------------------------------------------------------

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the base model and the adapters, with transformers' options (its
        ``Trainer`` counts FLOPs with ``exclude_embeddings=True``). A weight stored in 4 bits
        counts the values it holds, not its packed bytes (as PEFT counts bitsandbytes weights)."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        unpacked = {
            id(m.weight): m.in_features * m.out_features
            for m in self.model.modules()
            if isinstance(m, Linear4bit)
        }
        return sum(
            unpacked.get(id(p), p.numel())
            for p in self.parameters()
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def inspect(self) -> Report:
        return Report.of(self)

    def adapter_state_dict(self, name: str = "default") -> dict[str, torch.Tensor]:
        """The tensors `save_adapters` writes for adapter ``name``, under PEFT's keys (on the CPU)."""
        self._require(name)
        items = dict(self.store.items(name))
        return adapter_tensors(self.model, self.spec(name), items, self.store.call(name))

    def save_adapters(self, path: str | Path, names: Sequence[str] | None = None) -> None:
        """PEFT layout: the adapter named "default" at ``path``, every other one in
        ``path/<name>``. Every file is written atomically; nothing is written if any adapter
        cannot be saved."""
        chosen = list(self.adapters if names is None else names)
        if not chosen:
            raise SpecError("save_adapters: the model has no adapters to save")
        for n in chosen:
            self._require(n)
        if any(n in self.merged for n in chosen):
            warnings.warn(
                "saving adapters that are merged into the weights: the saved adapter is the "
                "adapter itself, not the merged model",
                stacklevel=2,
            )
        prepared = []
        for n in chosen:
            items, call = dict(self.store.items(n)), self.store.call(n)
            config = adapter_config(self.model, self.spec(n), items, call)
            prepared.append((n, config, adapter_tensors(self.model, self.spec(n), items, call)))
        for n, config, tensors in prepared:
            write_adapter(Path(path) if n == "default" else Path(path) / n, config, tensors)

    def hotswap_adapter(self, path: str | Path, name: str = "default") -> None:
        """Replace adapter ``name``'s weights in place from a saved adapter (for serving): no
        parameter is reallocated, and nothing is recompiled unless the scaling (alpha) differs.
        The file must adapt the same layers with the same shapes; otherwise nothing changes."""
        self._require(name)
        method, tensors = read_adapter(Path(path))
        method._set("modules_to_save", present_names(self.model, method.modules_to_save))
        current = self.store.specs[name]
        if not isinstance(current, type(method)):
            raise SpecError(
                f"hotswap_adapter: {path} holds a {method.name} adapter, {name!r} is {current.name}"
            )
        changed = sorted(
            f.name
            for f in dataclasses.fields(method)
            if getattr(method, f.name) != getattr(current, f.name)
        )
        if type(current) is not type(method):  # a LoRA file for a QLoRA adapter: keep its quant
            fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
            method = dataclasses.replace(current, **fields)
        if set(changed) - {"alpha", "alpha_pattern"} or (
            changed and not hasattr(method, "rank_and_scale")
        ):
            raise SpecError(
                f"hotswap_adapter: {path} differs from adapter {name!r} in {', '.join(changed)}; "
                f"only weights (and LoRA's alpha) can be swapped in place: use load_adapters instead"
            )
        paths = method.select(self.model)
        if [*paths, *copy_paths(self.model, method, paths)] != self.store.paths[name]:
            raise SpecError(f"hotswap_adapter: {path} adapts other layers than adapter {name!r}")
        layers = dict(self.store.items(name))
        base_trainable = method.trainable_base_parameters(self.model, paths)
        call = self.store.call(name)
        fill_adapter(self.model, name, method, layers, base_trainable, tensors, call)
        self.store.specs[name] = method
        if method != current and hasattr(method, "rank_and_scale"):
            for p, layer in layers.items():
                layer.scale = method.rank_and_scale(p)[1]
            self._forget_plans()
            self._recompile()

    def load_adapters(
        self, path: str | Path, name: str = "default", activate: bool | None = None
    ) -> None:
        """Load the adapter saved at ``path`` (surgeon- or PEFT-saved) as ``name``; it becomes
        active if it is the first one (or when ``activate``). On any error nothing changes."""
        method, tensors = read_adapter(Path(path))
        method._set("modules_to_save", present_names(self.model, method.modules_to_save))
        if activate:
            self._check_call_adapters([*self._active, name], {name: method})
        self._build_adapter(name, method, tensors)
        if activate or (activate is None and not self._active):
            self._active = (*self._active, name)
        self._recompile()


def _check_weights_have_values(method: MethodSpec, model: nn.Module, paths: Sequence[str]) -> None:
    if not method.shapes_from_weight_values:
        return
    for path in paths:
        weight = getattr(model.get_submodule(path), "weight", None)
        if weight is not None and weight.is_meta:
            raise SpecError(
                f"{type(method).__name__} on {path}: its shapes come from the weight's values, "
                f"which the meta device does not hold; compile it on the loaded weights"
            )


@contextlib.contextmanager
def _unchanged_on_error(model: nn.Module, restores: Sequence[Callable[[], None]]) -> Iterator[None]:
    """Leave ``model`` as it was if the block fails: trainable flags, and what the methods changed
    in the base (``restores``, from `MethodSpec.snapshot_base`: residual inits, 4-bit storage)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for restore in reversed(restores):
            restore()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _check_no_conflict(name: str, method: MethodSpec, others: Mapping[str, MethodSpec]) -> None:
    """Refuse an adapter whose method and an existing adapter's cannot share a model."""
    for other_name, other in others.items():
        reason = method.conflict_with(other) or other.conflict_with(method)
        if reason:
            raise SpecError(
                f"adapter {name!r} ({type(method).__name__}) cannot be added beside adapter "
                f"{other_name!r} ({type(other).__name__}): {reason}"
            )


def compile(
    model: nn.Module,
    spec_or_method: Spec | MethodSpec | Mapping[str, Any] | None = None,
    name: str = "default",
    fuse: bool = False,
    specialise: bool = True,
    calibration: Iterable[Mapping[str, Any]] | None = None,
) -> CompiledModel:
    """Trace ``model`` into regions and graft the spec's adapters in (all of them active).

    ``calibration``: batches (keyword-argument dicts for the model's forward) that inits
    reading data run through the model before their adapter exists (LoRA's ``eva``,
    ``corda``, ``lora_ga``); adapters whose init needs none ignore them.

    ``specialise``: modules plain FX cannot trace (transformers' decoder layers) are traced at
    call time per kind of call (surgeon/specialise.py); False keeps every call on the plain
    regions (no tracing at call time)."""
    if not isinstance(model, nn.Module):
        raise SpecError(f"compile: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, CompiledModel):
        raise SpecError(
            "compile: this model is already compiled; use add_adapter() to add another adapter"
        )
    if not isinstance(fuse, bool):
        raise SpecError(f"compile: fuse must be True or False, got {fuse!r}")
    if not isinstance(specialise, bool):
        raise SpecError(f"compile: specialise must be True or False, got {specialise!r}")
    spec = as_spec(spec_or_method, name) if spec_or_method is not None else None
    result = trace_regions(model)
    cm = CompiledModel(
        model, Graph(result.regions, result.breaks, result.seconds, result.specialised)
    )
    cm._fused = fuse
    cm.graph.specialising = specialise
    if spec is not None:
        cm._check_call_adapters(list(spec.adapters), spec.adapters)
        # the model's own hook for prompt methods goes too if a later adapter fails
        restores: list[Callable[[], None]] = [cm._remove_call_hook]
        with _unchanged_on_error(model, restores):
            for adapter_name, method in spec.adapters.items():
                restores.append(cm._build_adapter(adapter_name, method, calibration=calibration))
        cm._active = tuple(spec.adapters)
        cm._recompile()
    return cm


def _reads_call_arguments(layers: Iterable[AdapterLayer]) -> bool:
    return any(getattr(layer, "call_arguments", ()) for layer in layers)
