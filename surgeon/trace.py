"""Region tracing: torch.fx graphs for the largest subtrees that trace *soundly*.

A subtree is traced as one region when its graph does not depend on Python values that can
change from call to call. Two such values are checked by tracing twice and comparing:

* the training flag (trace in train and in eval mode: `F.dropout(..., training=self.training)`
  and friends bake the flag into the graph);
* whether optional arguments are ``None`` (a Proxy is never ``None``, so ``if mask is not None``
  silently takes one branch; we also trace with those arguments fixed to ``None``).

A forward that takes ``*args``/``**kwargs`` is not traced symbolically at all: FX would hand it
one proxy for them, and whatever it reads from them (``kwargs.get("mask")``, an ``isinstance``)
would be answered once for every call.

A subtree that fails a check, or does not trace at all, is a graph break: its reason is
recorded and its children are tried. A broken module with a forward of its own is also listed as
a *specialised* region: surgeon/specialise.py traces it at call time, per kind of call.
Adaptable layers (Linear, Conv, Embedding, ...) are leaves: they always appear as
``call_module`` nodes, and one reached from a broken parent becomes a region of its own.
Subtrees without adaptable layers are not traced: no adapter can land there.

Structurally identical subtrees (the decoder layers of an LLM) are traced once: the graph only
names submodules relative to its root, so it serves every instance with the same structure.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.errors import SpecError
from surgeon.layers import gpt2_conv1d_type, is_norm
from surgeon.logs import TRACING, expected_noise

log = logging.getLogger(__name__)

_PRIMITIVES = (int, float, bool, str, type(None))
PYTHON_VALUES = (bool, int, float, str, torch.dtype, torch.device)
"""Values a trace takes as constants (a specialised region's key holds them)."""
MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}


@dataclass
class Break:
    """A module that could not be traced as one region, and why."""

    path: str
    module_type: str
    reason: str


@dataclass
class Region:
    """A traced subtree. ``base`` is the graph as traced; ``graph`` is what runs now."""

    path: str
    module_type: str
    base: fx.Graph
    leaf: bool = False
    specialised: bool = False
    graph: fx.Graph | None = None
    gm: nn.Module | None = None
    adapted: dict[str, list[str]] = field(default_factory=dict)
    variants: dict[tuple, Any] = field(default_factory=dict)
    dynamic: dict[tuple, Any] = field(default_factory=dict)
    state: Any = None  # specialise.ModuleState, made by the region's first dispatcher

    @property
    def current(self) -> fx.Graph:
        return self.graph if self.graph is not None else self.base


class Unsound(Exception):
    pass


class RegionTracer(fx.Tracer):
    """An FX tracer that keeps adaptable layers (and norms, which LN tuning adapts) as opaque
    ``call_module`` leaves."""

    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or is_norm(m) or is_parameter_owner(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


PARAMETER_OWNER = "surgeon_adapts_own_parameters"
"""Set (True) on a module an adapter adapts through its own parameters (LoRA's
``target_parameters``: a mixture-of-experts module's 3-D weights): traces keep it a call, which
the adapter replaces by the module's own forward run with its adapted parameters."""


def is_parameter_owner(module: nn.Module) -> bool:
    """Whether ``module`` is marked `PARAMETER_OWNER`: a leaf of every trace, like a layer."""
    return module.__dict__.get(PARAMETER_OWNER, False) is True


def adaptable_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding]
    conv1d = gpt2_conv1d_type()
    if conv1d is not None:
        types.append(conv1d)
    return tuple(types)


@dataclass
class TraceResult:
    regions: list[Region]
    breaks: list[Break]
    seconds: float
    specialised: list[Region] = field(default_factory=list)


class _Cache:
    """Traced graphs and failures of earlier modules, looked up for structurally identical ones.

    Keys are computed only once a second module of the same class shows up, so one-off modules
    (the root, the decoder stack) are never walked just to build a key. A failure is reused by
    the weaker key (class and submodule structure): reusing a failure only gives smaller regions.
    """

    def __init__(self) -> None:
        self.by_class: dict[type, list[tuple[nn.Module, fx.Graph | str]]] = {}
        self.keys: dict[int, tuple[tuple, tuple | None]] = {}

    def _keys(self, module: nn.Module, strong: bool) -> tuple[tuple, tuple | None]:
        weak, attributes = self.keys.get(id(module), (None, None))
        if weak is None:
            weak = _weak_key(module)
        if strong and attributes is None:
            attributes = _attribute_key(module)
        self.keys[id(module)] = (weak, attributes)
        return weak, attributes

    def lookup(self, module: nn.Module) -> fx.Graph | str | None:
        for other, outcome in self.by_class.get(type(module), ()):
            if self._keys(module, False)[0] != self._keys(other, False)[0]:
                continue
            if isinstance(outcome, str):
                return outcome
            if self._keys(module, True)[1] == self._keys(other, True)[1]:
                return outcome
        return None

    def record(self, module: nn.Module, outcome: fx.Graph | str) -> None:
        self.by_class.setdefault(type(module), []).append((module, outcome))


def trace_regions(model: nn.Module, leaf_types: tuple[type, ...] | None = None) -> TraceResult:
    """Split ``model`` into sound regions and graph breaks."""
    start = time.perf_counter()
    leaf_types = leaf_types or adaptable_types()
    regions: list[Region] = []
    breaks: list[Break] = []
    specialised: list[Region] = []
    cache = _Cache()
    contains = _adaptable_subtrees(model, leaf_types)
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, leaf_types) or is_parameter_owner(module):
            regions.append(Region(path, type(module).__name__, leaf_graph(module), leaf=True))
            continue
        if id(module) not in contains:
            continue
        try:
            graph = _trace_cached(module, leaf_types, cache)
        except Unsound as err:
            breaks.append(Break(path, type(module).__name__, str(err)))
            if type(module).forward is not nn.Module.forward:
                specialised.append(
                    Region(path, type(module).__name__, fx.Graph(), specialised=True)
                )
            children = [(f"{path}.{n}" if path else n, c) for n, c in module.named_children()]
            stack.extend(reversed(children))
            continue
        regions.append(Region(path, type(module).__name__, graph))
    return TraceResult(regions, breaks, time.perf_counter() - start, specialised)


def retrace(module: nn.Module, path: str) -> fx.Graph:
    """``module``'s region graph traced again (a module in it became a leaf); `SpecError` if it
    no longer traces soundly."""
    try:
        return _trace_soundly(module, adaptable_types())
    except Unsound as err:
        raise SpecError(f"region {path or '<root>'} no longer traces as one graph: {err}") from None


def _adaptable_subtrees(model: nn.Module, leaf_types: tuple[type, ...]) -> set[int]:
    """ids of modules whose subtree holds at least one adaptable layer."""
    found: set[int] = set()

    def visit(module: nn.Module) -> bool:
        hit = isinstance(module, leaf_types) or is_parameter_owner(module)
        for child in module.children():
            hit = visit(child) or hit
        if hit:
            found.add(id(module))
        return hit

    visit(model)
    return found


LEAF_TARGET = "base"


def leaf_graph(module: nn.Module) -> fx.Graph:
    """The one-node graph of an adaptable layer traced on its own (the layer is ``self.base``)."""
    graph = fx.Graph()
    params = _forward_parameters(type(module))
    args = [graph.placeholder(p.name, default_value=p.default) for p in params]
    out = graph.call_module(
        LEAF_TARGET, tuple(args[:1]), {p.name: a for p, a in zip(params[1:], args[1:])}
    )
    graph.output(out)
    return graph


@functools.cache
def _forward_parameters(cls: type) -> list[inspect.Parameter]:
    params = list(inspect.signature(cls.forward).parameters.values())[1:]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _trace_cached(module: nn.Module, leaf_types: tuple[type, ...], cache: _Cache) -> fx.Graph:
    if type(module).forward is nn.Module.forward:
        raise Unsound(f"{type(module).__name__} has no forward of its own (a container)")
    outcome = cache.lookup(module)
    if outcome is None:
        try:
            outcome = _trace_soundly(module, leaf_types)
        except Unsound as err:
            outcome = str(err)
        cache.record(module, outcome)
    if isinstance(outcome, str):
        raise Unsound(outcome)
    return outcome


def _trace_soundly(module: nn.Module, leaf_types: tuple[type, ...]) -> fx.Graph:
    """Trace in the current mode; accept only if the other mode and None-valued optional
    arguments give the same computation."""
    variadic = _variadic_parameters(module)
    if variadic:
        # FX hands a proxy in for *args/**kwargs: what the forward reads from them (a
        # kwargs.get, an isinstance) would be answered once for every call
        raise Unsound(f"forward takes {variadic}, which a symbolic trace cannot see into")
    first = _trace(module, leaf_types)
    none_args = _none_default_args(module)
    if none_args:
        specialised = _trace(module, leaf_types, {a: None for a in none_args})
        if _fingerprint(first) != _fingerprint(specialised):
            names = ", ".join(none_args)
            raise Unsound(f"forward branches on whether optional argument(s) {names} are None")
    with training_mode(module, not module.training):
        other = _trace(module, leaf_types)
    if _fingerprint(first) != _fingerprint(other):
        raise Unsound(
            "graph depends on the training flag (e.g. F.dropout(..., training=self.training))"
        )
    return first


def _trace(
    module: nn.Module, leaf_types: tuple[type, ...], concrete: dict | None = None
) -> fx.Graph:
    try:
        with expected_noise(TRACING, log):
            return RegionTracer(leaf_types).trace(module, concrete_args=concrete)
    except Exception as err:
        raise Unsound(why(err)) from None


def why(err: Exception) -> str:
    """An exception as a one-line reason: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _variadic_parameters(module: nn.Module) -> str:
    try:
        params = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):
        return ""
    star = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return ", ".join(star[p.kind] + p.name for p in params if p.kind in star)


def _none_default_args(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(type(module).forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is None and p.kind is not p.VAR_KEYWORD]


class training_mode:
    """Temporarily set a subtree's training flags, restoring each module's own flag after."""

    def __init__(self, module: nn.Module, mode: bool) -> None:
        self.module = module
        self.mode = mode
        self.saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for m in self.module.modules()]
        self.module.train(self.mode)

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.saved:
            m.training = flag


def _fingerprint(graph: fx.Graph) -> list[tuple]:
    """The graph's computation, ignoring placeholder renames and None-specialisation guards."""
    index: dict[fx.Node, Any] = {}
    out = []
    for node in graph.nodes:
        if node.op == "placeholder":
            index[node] = ("arg", node.target.lstrip("*"))
            continue
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            continue
        index[node] = len(out)
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("node", index.get(n)))
        out.append((node.op, str(node.target), repr(args)))
    return out


def _weak_key(module: nn.Module) -> tuple:
    return tuple((name, type(m)) for name, m in module.named_modules())


def _attribute_key(module: nn.Module) -> tuple:
    """Plain Python attributes of every module in the subtree: they may be baked into a graph.

    Primitives are compared by value; other objects (configs, callables) by identity, so
    layers that share one config object share one graph.
    """
    items = []
    for name, m in module.named_modules():
        for attr, value in vars(m).items():
            if attr in MODULE_INTERNALS:
                continue
            if isinstance(value, _PRIMITIVES) or (
                isinstance(value, tuple) and all(isinstance(v, _PRIMITIVES) for v in value)
            ):
                items.append((name, attr, value))
            elif isinstance(value, torch.dtype):
                items.append((name, attr, str(value)))
            else:
                items.append((name, attr, id(value)))
    return tuple(items)
