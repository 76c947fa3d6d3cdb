"""Specialised regions: graphs for modules that plain symbolic FX cannot trace soundly.

transformers' attention and decoder layers take ``**kwargs``, splat shape tuples, branch on
shapes (``query.shape[2] > 1``) and on whether a cache or mask was passed. Such a module is
traced at call time, for the kind of inputs it gets, by a tracer whose proxies carry a fake
value (`FakeTensor`; sizes as they came at first, symbolic once a later call of the same kind
changes them, as torch.compile's automatic dynamic shapes): every Python decision the forward
takes on those values is answered from them and leaves a guard behind:

* the structure of the call (which arguments are None, Python values, tensor dtypes, devices,
  ranks; objects passed in by the same of their attributes; training flags, grad mode,
  autocast) is the variant's key;
* decisions on sizes, the sizes of tensors inside objects passed in (a KV cache) included,
  become symbolic-shape guards (``ShapeEnv``), checked before a variant runs;
* decisions on tensor data cannot be guarded before the call: the trace is refused and the
  module runs its own forward.

An object the forward makes and returns (the KV cache a causal LM creates when none is passed)
is rebuilt by the graph, per call, from a template of it holding the values the graph computes.

Tracing runs on fake values and on fake copies of objects passed in, so a refused trace has no
side effects and the module's own forward can always take over; what torch logs about it goes
to surgeon's debug log (`surgeon.logs`), not the user's terminal. A new variant's first run is
checked against the module's own forward (on copies) before it is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import logging
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import _symbolic_trace
from torch.fx.experimental.symbolic_shapes import (
    SYMPY_INTERP,
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
)

from surgeon.adapter import cache_parameter, cache_passed_as
from surgeon.logs import TRACING, expected_noise
from surgeon.rebuild import is_object, rebuilding
from surgeon.trace import MODULE_INTERNALS, PYTHON_VALUES, RegionTracer, Unsound, why

_CONTAINERS = (tuple, list, dict, torch.Size, *PYTHON_VALUES, type(None))
_OBJECT_DEPTH = 4
_SHAPE_QUERIES = frozenset({"size", "dim", "numel", "stride"})
# values whose proxies keep the proxy's class (a SymInt's would have C functions read its node)
_OWN_CLASS = (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool, *_CONTAINERS)
_FIXED_TENSOR_ATTRIBUTES = frozenset({"dtype", "device", "ndim", "is_cuda", "layout", "is_sparse"})
# an instance ``forward`` is surgeon's own (a rewrite or a dispatcher); traces use the class's
_MODULE_INTERNALS = MODULE_INTERNALS | {"forward"}

log = logging.getLogger(__name__)


# -- the kind of a call -----------------------------------------------------------------------


def value_key(value: Any, depth: int = 0) -> Any:
    """What a variant is specialised on for one argument: None-ness, Python values, tensors'
    dtypes, devices and ranks (their sizes are guarded separately); an object passed in (a KV
    cache) by the same of its attributes, to `_OBJECT_DEPTH` levels."""
    if value is None or isinstance(value, PYTHON_VALUES):
        return (type(value), value)
    if isinstance(value, torch.Tensor):
        return (torch.Tensor, value.dtype, value.device, value.dim(), value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(value_key(v, depth + 1) for v in value))
    if isinstance(value, dict):  # a ModelOutput passed in keys by its class too
        return (type(value), tuple((k, value_key(v, depth + 1)) for k, v in value.items()))
    attributes = _attributes(value, depth)
    if attributes is None:
        return (object, type(value), id(value))
    return (object, type(value), tuple((k, value_key(v, depth + 1)) for k, v in attributes))


def _attributes(value: Any, depth: int) -> list[tuple[str, Any]] | None:
    """The attributes of an object passed in that keys and guards look into (None: opaque)."""
    if depth >= _OBJECT_DEPTH or isinstance(value, (nn.Module, type)) or callable(value):
        return None
    attributes = getattr(value, "__dict__", None)
    return None if attributes is None else list(attributes.items())


class CallKey(NamedTuple):
    """The kind of a call, which a variant is specialised on."""

    state: int  # the version of the region's module state (`ModuleState`)
    training: bool  # the region's own flag (every module's is in ``state``)
    hooked: bool
    grad: bool
    autocast: tuple
    args: tuple
    kwargs: tuple


def call_key(state: ModuleState, args: tuple, kwargs: dict[str, Any]) -> CallKey:
    return CallKey(
        state.version(),
        state.module.training,
        state.hooked(),
        torch.is_grad_enabled(),
        _autocast_state(),
        tuple(value_key(a) for a in args),
        tuple((k, value_key(v)) for k, v in kwargs.items()),
    )


class ModuleState:
    """What a trace depends on besides the call, in the modules of a region: every module's
    training flag and settings (plain attributes: ``layer_idx``, ``gradient_checkpointing``),
    the configs they hold (a forward reads ``config.use_cache`` or ``output_hidden_states``),
    and the dtypes and devices of their parameters and buffers. `version` numbers each state
    seen, so a setting changed after a trace (or changed back) selects the variants traced
    under it.

    Configs are compared attribute by attribute (an object held in one, by identity): a change
    made inside a nested value (an item of ``config.rope_scaling``) is not seen."""

    LIMIT = 16  # states; a region whose settings keep changing (a call counter) is not traced

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.watch()
        self._seen: list[tuple[list[Any], list[dict[str, Any]]]] = []
        self.note_tensors()

    def note_tensors(self) -> None:
        """Read the parameters' and buffers' dtypes and devices (a trace bakes them in). Read
        when a dispatcher is made, as `CompiledModel.to()` and ``.half()`` do, not per call."""
        tensors = (*self.module.parameters(), *self.module.buffers())
        self._tensors = tuple((t.dtype, t.device) for t in tensors)

    def watch(self) -> None:
        """Find the settings and configs to compare (again, after a forward added one)."""
        modules = list(self.module.modules())
        self._getters = [(m, operator.attrgetter("training", *_settings(m))) for m in modules]
        configs = {id(v): v for m in modules for v in vars(m).values() if _is_config(v)}
        self._configs = list(configs.values())
        self._hooks = [
            hooks
            for m in modules
            for hooks in (
                m._forward_hooks,
                m._forward_pre_hooks,
                m._backward_hooks,
                m._backward_pre_hooks,
            )
        ]
        self._current = -1

    def hooked(self) -> bool:
        """A graph calls its layers past their hooks: a region with hooks (on any of its
        modules, or global module hooks) runs its own forward."""
        return any(self._hooks) or _global_hooks()

    def version(self) -> int | None:
        """The current state's number (None: more states than `LIMIT` were seen)."""
        try:
            values = self._values()
        except AttributeError:  # a setting was deleted since: watch what there is now
            self.watch()
            values = self._values()
        if self._current >= 0:
            seen_values, seen_configs = self._seen[self._current]
            if values == seen_values and all(
                vars(c) == seen for c, seen in zip(self._configs, seen_configs)
            ):
                return self._current
        state = (values, [dict(vars(c)) for c in self._configs])
        if state not in self._seen:
            if len(self._seen) >= self.LIMIT:
                return None
            self._seen.append(state)
        self._current = self._seen.index(state)
        return self._current

    def _values(self) -> list[Any]:
        return [self._tensors, *(get(m) for m, get in self._getters)]


def _settings(module: nn.Module) -> list[str]:
    return [
        name
        for name, value in vars(module).items()
        if name not in _MODULE_INTERNALS and is_plain(value)
    ]


def _is_config(value: Any) -> bool:
    return type(value).__name__.endswith("Config") and hasattr(value, "__dict__")


def _global_hooks() -> bool:
    hooks = torch.nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or hooks._global_backward_pre_hooks
    )


def _autocast_state() -> tuple:
    return tuple(
        (device, torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    )


def is_plain(value: Any) -> bool:
    """Arguments that are baked into a variant (its key names them) rather than passed in."""
    if value is None or isinstance(value, PYTHON_VALUES):
        return True
    if isinstance(value, (tuple, list)):
        return all(is_plain(v) for v in value)
    return False


def input_tensors(value: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors of an argument whose sizes guards read, in `value_key`'s order (objects'
    attributes included)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in input_tensors(v, depth + 1)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in input_tensors(v, depth + 1)]
    attributes = None if value is None else _attributes(value, depth)
    return [t for _, v in attributes or () for t in input_tensors(v, depth + 1)]


def call_tensors(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors a call passes (inside objects too), in the order traces and guards use."""
    values = [v for v in (*args, *kwargs.values()) if not is_plain(v)]
    return [t for v in values for t in input_tensors(v)]


def grown_dynamic(seen: tuple | None, tensors: list[torch.Tensor]) -> tuple[tuple, frozenset]:
    """Automatic dynamic sizes: a kind of call is first traced with the sizes it came with;
    a size that later differs is traced symbolically from then on (as torch.compile does).
    ``seen``: (first sizes, dims already dynamic) for this kind of call, or None."""
    sizes = tuple(tuple(t.shape) for t in tensors)
    if seen is None:
        return (sizes, frozenset()), frozenset()
    first, dynamic = seen
    changed = {
        (i, d)
        for i, (a, b) in enumerate(zip(first, sizes))
        for d in range(min(len(a), len(b)))
        if a[d] != b[d]
    }
    dynamic = frozenset(dynamic | changed)
    return (first, dynamic), dynamic


def module_fingerprint(module: nn.Module) -> tuple | None:
    """What a trace of ``module`` may depend on besides the call: its structure, its parameters'
    shapes and dtypes, and its plain attributes (configs by value). Equal fingerprints share
    traces (the zoo of a test suite, or two copies of one model); None: never shared."""
    items: list[Any] = []
    for name, m in module.named_modules():
        items.append((name, type(m)))
        tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        items.extend((name, k, t.shape, t.dtype, t.device) for k, t in tensors)
        for attr, value in vars(m).items():
            if attr in _MODULE_INTERNALS:
                continue
            if isinstance(value, (torch.Tensor, nn.Module)):
                return None
            items.append((name, attr, _attribute_value(value)))
    fingerprint = tuple(items)
    try:
        hash(fingerprint)
    except TypeError:
        return None
    return fingerprint


def _attribute_value(value: Any) -> Any:
    if value is None or isinstance(value, PYTHON_VALUES):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_attribute_value(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((k, _attribute_value(v)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), tuple(sorted(repr(v) for v in value)))
    if _is_config(value):
        return (type(value), repr(sorted(vars(value).items(), key=lambda item: item[0])))
    return _Identity(value)


class _Identity:
    """Compares by identity and keeps the object alive (so its id is never reused meanwhile)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.value is self.value


# -- variants ---------------------------------------------------------------------------------


@dataclass
class Variant:
    """One traced graph and the inputs it is valid for.

    ``slots``: where each placeholder's value comes from (a position or a keyword);
    ``guards``: Python source of the size guards (None: any sizes of this key).
    """

    graph: fx.Graph
    slots: tuple[int | str, ...]
    guards: str | None
    describe: str

    def __post_init__(self) -> None:
        self._check = compile(self.guards, "<surgeon guards>", "eval") if self.guards else None

    def inputs(self, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        return [args[s] if isinstance(s, int) else kwargs[s] for s in self.slots]

    def holds(self, values: list[Any]) -> bool:
        if self._check is None:
            return True
        tensors = [t for v in values for t in input_tensors(v)]
        return eval(self._check, SYMPY_INTERP, {"L": {f"t{i}": t for i, t in enumerate(tensors)}})


# -- the tracer -------------------------------------------------------------------------------


class ValueProxy(fx.Proxy):
    """An FX proxy that also holds the (fake) value the node computes."""

    value: Any
    state: str | None  # the type of the object passed in this value derives from

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """isinstance(proxy, SomeCache) answers as for the object passed in. Tensors and Python
        values keep the proxy's class: C functions take isinstance(x, Tensor) at its word."""
        value = self.__dict__.get("value")
        if self.__dict__.get("state") and not isinstance(value, _OWN_CLASS):
            return type(value)
        return type(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("value", "state", "node", "tracer"):
            raise AttributeError(name)
        value = getattr(self.value, name)  # AttributeError as the real object would raise
        if name in _FIXED_TENSOR_ATTRIBUTES and isinstance(self.value, torch.Tensor):
            return value  # follows from the key: inputs' dtypes, devices, ranks; the module state
        return ValueAttribute(self, name, value)

    def __setitem__(self, key: Any, value: Any) -> None:
        """``x[i] = v`` (a tensor written in place, a flag in a cache's dict): a node, run in
        its place at run time, and applied to the traced value now."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    @property
    def keys(self) -> Any:
        """A mapping's own ``keys`` (``**proxy`` unpacks by them); any other value's attribute
        of that name (a cache layer's ``keys`` tensor)."""
        if isinstance(self.value, Mapping):
            return self.value.keys
        return self.__getattr__("keys")

    def __bool__(self) -> bool:
        return self.tracer.decide(self, bool)

    def __index__(self) -> int:
        return self.tracer.decide(self, operator.index)

    def __int__(self) -> int:
        return self.tracer.decide(self, int)

    def __float__(self) -> float:
        return self.tracer.decide(self, float)

    def __len__(self) -> int:
        return self.tracer.decide(self, len, structural=True)

    def __iter__(self) -> Any:
        count = self.tracer.decide(self, len, structural=True)
        return iter([self[i] for i in range(count)])


class ValueAttribute(ValueProxy):
    """``proxy.name``: a getattr node made only when used as a value (a method call is a
    ``call_method`` node instead), as FX's own Attribute."""

    def __init__(self, root: ValueProxy, attr: str, value: Any) -> None:
        self.root, self.attr, self.tracer = root, attr, root.tracer
        self.value, self.state, self._node = value, root.state, None

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._node = self.tracer.create_proxy(
                "call_function", getattr, (self.root, self.attr), {}
            ).node
        return self._node

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)


class SpecialisingTracer(RegionTracer):
    """Traces ``module`` for one call: placeholders for the passed tensors and objects, Python
    values baked in, fake values propagated alongside every node."""

    def __init__(
        self,
        leaf_types: tuple[type, ...],
        args: tuple,
        kwargs: dict[str, Any],
        dynamic: frozenset[tuple[int, int]] = frozenset(),
    ) -> None:
        super().__init__(leaf_types)
        self.proxy_buffer_attributes = True  # a buffer read is a node, so it is read at run time
        self.dynamic = dynamic
        self.shape_env = ShapeEnv(duck_shape=False)
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.call_args, self.call_kwargs = args, kwargs
        self.slots: list[int | str] = []
        self.guard_inputs: list[torch.Tensor] = []
        self.constants: dict[str, torch.Tensor] = {}
        self._placeholder: tuple[Any, str | None] = (None, None)
        self._at_output = False
        self._evaluating = False
        self._paths: dict[int, str] | None = None
        self._modules: set[int] | None = None
        self._rebuilt: dict[int, fx.Node] = {}

    # inputs -----------------------------------------------------------------------------------

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None):
        module = self.root
        args = [self._input(i, a) for i, a in enumerate(self.call_args)]
        kwargs = {k: self._input(k, v) for k, v in self.call_kwargs.items()}

        def run() -> Any:
            out = root_fn(module, *args, **kwargs)
            self._at_output = True  # FX turns what it returns into graph arguments next
            return out

        return run, []

    def _input(self, slot: int | str, value: Any) -> Any:
        if is_plain(value):
            return value
        self.slots.append(slot)
        name = slot if isinstance(slot, str) else f"arg{slot}"
        state = type(value).__name__ if _holds_objects(value) else None
        self._placeholder = (self._fake(value), state)
        return self.create_proxy("placeholder", name, (), {})

    def _fake(self, value: Any, depth: int = 0) -> Any:
        """``value`` with fake tensors of symbolic sizes, in `input_tensors` order (the order
        guards name them in). An object passed in becomes a copy holding fakes: the trace may
        call its methods (a cache's ``update``) without touching the real one."""
        if isinstance(value, torch.Tensor):
            return self._fake_tensor(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self._fake(v, depth + 1) for v in value)
        if type(value) is dict:
            return {k: self._fake(v, depth + 1) for k, v in value.items()}
        if isinstance(value, dict):  # a ModelOutput passed in (encoder outputs): its class kept
            copied = copy.copy(value)
            for k, v in value.items():
                copied[k] = self._fake(v, depth + 1)
            return copied
        if is_plain(value):
            return value
        memo: dict[int, Any] = {}
        for tensor in input_tensors(value, depth):
            memo[id(tensor)] = self._fake_tensor(tensor, memo.get(id(tensor)))
        try:
            return copy.deepcopy(value, memo)
        except Exception as err:
            raise Unsound(f"cannot trace with a copy of {type(value).__name__}: {err}") from None

    def _fake_tensor(self, value: torch.Tensor, known: Any = None) -> Any:
        if known is None:
            index = len(self.guard_inputs)
            sizes = [
                DimDynamic.DYNAMIC if (index, d) in self.dynamic else DimDynamic.STATIC
                for d in range(value.dim())
            ]
            context = StatelessSymbolicContext(
                dynamic_sizes=sizes, constraint_sizes=[None] * value.dim()
            )
            known = self.fake_mode.from_tensor(value, symbolic_context=context)
        self.guard_inputs.append(known)
        return known

    # nodes ------------------------------------------------------------------------------------

    def proxy(self, node: fx.Node) -> ValueProxy:
        return ValueProxy(node, self)

    def create_proxy(
        self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None
    ):
        if kind == "placeholder":
            value, state = self._placeholder
        else:
            value, state = self._evaluate(kind, target, args, kwargs), _state_of((args, kwargs))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.value, proxy.state = value, state
        return proxy

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            return a.node
        if isinstance(a, torch._subclasses.FakeTensor):
            raise Unsound("a traced value leaks into the graph as a constant")
        if isinstance(a, torch.Tensor) and not self._known_tensor(a):
            # a tensor the forward made from constants: kept with the graph, not set on the
            # module as FX would (the graph may serve other modules of the same fingerprint)
            name = f"_surgeon_constant{len(self.constants)}"
            self.constants[name] = a
            return self.create_node("get_attr", name, (), {})
        if isinstance(a, dict) and type(a) is not dict:  # a ModelOutput: rebuilt as one
            fields = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), fields)
        if self._at_output and is_object(a):
            return self._rebuild(a)
        return super().create_arg(a)

    def _rebuild(self, obj: Any) -> fx.Node:
        """An object the forward made and returns (the KV cache a model creates when none is
        passed): a node that builds a fresh one per call from a template, holding the values
        the graph computes where the traced one held proxies."""
        if id(obj) not in self._rebuilt:
            rebuild, proxies = rebuilding(obj)
            args = tuple(p.node for p in proxies)
            self._rebuilt[id(obj)] = self.create_node("call_function", rebuild, args, {})
        return self._rebuilt[id(obj)]

    def _known_tensor(self, tensor: torch.Tensor) -> bool:
        """A parameter, buffer or tensor attribute of the module traced (read by its path)."""
        return tensor in self.tensor_attrs or id(tensor) in self._tensor_paths()

    def _tensor_paths(self) -> dict[int, str]:
        """Parameters' and buffers' paths by tensor (the first path of a shared one)."""
        if self._paths is None:
            self._paths = {}
            for path, tensor in (*self.root.named_parameters(), *self.root.named_buffers()):
                self._paths.setdefault(id(tensor), path)
        return self._paths

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """FX's: a parameter or buffer read is a ``get_attr`` node (found by a dict lookup
        rather than FX's search of every parameter on every read)."""
        if self._evaluating or not isinstance(attr_val, torch.Tensor):
            return attr_val
        path = self._tensor_paths().get(id(attr_val))
        if path is None:
            return attr_val
        if path not in parameter_proxy_cache:
            parameter_proxy_cache[path] = self.create_proxy("get_attr", path, (), {})
        return parameter_proxy_cache[path]

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        # the class's forward: an installed rewrite (or this very dispatcher) must not run here
        own_forward = lambda *a, **k: type(m).forward(m, *a, **k)  # noqa: E731
        if id(m) not in self._submodules():  # made by the forward (a loss): traced through
            return own_forward(*args, **kwargs)
        return super().call_module(m, own_forward, args, kwargs)

    def _submodules(self) -> set[int]:
        if self._modules is None:
            self._modules = {id(m) for m in self.root.modules()}
        return self._modules

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        """Modules behave as outside a trace while a value is computed (FX's patched module
        ``__call__``/``__getattr__`` pass through: cheaper than unpatching nn.Module, whose
        class attributes every module class inherits)."""
        self._evaluating = True
        try:
            yield
        finally:
            self._evaluating = False

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "get_attr":
            with self._evaluation():
                return operator.attrgetter(target)(self.root)
        args, kwargs = fx.node.map_aggregate((args, kwargs), _value_of)
        try:
            if kind == "call_module":
                with self.fake_mode, self._evaluation(), _FakeKernels():
                    module = self.root.get_submodule(target)
                    return type(module).forward(module, *args, **kwargs)
            with self.fake_mode:
                if kind == "call_function":
                    return _FAKE_KERNELS.get(target, target)(*args, **kwargs)
                return getattr(args[0], target)(*args[1:], **kwargs)
        except Unsound:
            raise
        except Exception as err:
            raise Unsound(f"{_name(target)}: {why(err)}") from None

    # decisions --------------------------------------------------------------------------------

    def decide(self, proxy: ValueProxy, convert: Callable, structural: bool = False) -> Any:
        """A Python decision on a traced value: answered from its value, guarded where it can be."""
        value = proxy.value
        if isinstance(value, torch.Tensor) and not structural:
            raise Unsound("forward branches on tensor values (data-dependent control flow)")
        try:
            return convert(value)
        except Exception as err:
            raise Unsound(f"forward branches on a value it cannot guard: {why(err)}") from None


def _value_of(a: Any) -> Any:
    return a.value if isinstance(a, ValueProxy) else a


def _state_of(args: Any) -> str | None:
    found: list[str] = []
    fx.node.map_aggregate(
        args, lambda a: found.append(a.state) if isinstance(a, ValueProxy) and a.state else None
    )
    return found[0] if found else None


def _holds_objects(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_objects(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_objects(v) for v in value.values())
    return not (value is None or isinstance(value, (*PYTHON_VALUES, torch.Tensor)))


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def specialise(
    module: nn.Module,
    leaf_types: tuple[type, ...],
    args: tuple,
    kwargs: dict[str, Any],
    dynamic: frozenset[tuple[int, int]] = frozenset(),
) -> Variant:
    """Trace ``module`` for a call with ``args``/``kwargs`` (raises `Unsound` when it cannot).

    ``dynamic``: the sizes traced symbolically, as (input tensor, dim) in `call_tensors` order;
    the others are traced as they are, and guarded to stay so."""
    tracer = SpecialisingTracer(leaf_types, args, kwargs, dynamic)
    structured = logging.getLogger("torch.__trace")  # symbolic shapes' records for TORCH_TRACE
    quiet, structured.disabled = structured.disabled, True
    try:
        with expected_noise(TRACING, log), _module_state_kept(module), _sizes_packed():
            graph = tracer.trace(module)
    except Unsound:
        raise
    except Exception as err:
        raise Unsound(why(err)) from None
    finally:
        structured.disabled = quiet
    _drop_unused_lookups(graph)
    graph.lint()
    graph.constants = tracer.constants  # type: ignore[attr-defined]  (read by the rewrite)
    guards = tracer.shape_env.produce_guards_expression(tracer.guard_inputs, ignore_static=False)
    return Variant(graph, tuple(tracer.slots), guards or None, _describe(args, kwargs))


# -- ops whose fake implementation refuses what their kernels run --------------------------------

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_fake(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    offs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``torch._grouped_mm``'s output on fake tensors, for what its kernel accepts. torch's own
    fake implementation follows the bf16 CUDA kernel and refuses float32 and float16, which the
    CPU kernel multiplies: transformers' mixture-of-experts layers call the op in the model's
    dtype, so every float32 trace of them was refused. The checks are the CPU kernel's (one
    float dtype, 2-D or 3-D operands, int32 offsets where an operand is 2-D, rows aligned to
    16 bytes, no bias); a new variant is compared with the module's own forward before use."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise RuntimeError(f"_grouped_mm: {message}")

    check(
        mat_a.dtype == mat_b.dtype and mat_a.dtype in _GROUPED_MM_DTYPES,
        f"expected float32, bfloat16 or float16 operands of one dtype, got {mat_a.dtype} and "
        f"{mat_b.dtype}",
    )
    check(mat_a.dim() in (2, 3) and mat_b.dim() in (2, 3), "operands must be 2-D or 3-D")
    check(bias is None, "a bias is not supported")
    check(out_dtype in (None, mat_a.dtype), "out_dtype must be the operands' dtype")
    split = mat_a.dim() == 2 or mat_b.dim() == 2
    check((offs is not None) == split, "offsets are needed exactly where an operand is 2-D")
    if offs is not None:
        check(offs.dim() == 1 and offs.dtype == torch.int32, "offsets must be 1-D int32")
    if mat_a.dim() == 3 or mat_b.dim() == 3:
        check(mat_a.size(-1) == mat_b.size(-2), "contraction dimensions must match")
    for mat in (mat_a, mat_b):
        check(_rows_aligned(mat), "strides should be multiple of 16 bytes")
    if not split:
        size = (mat_a.size(0), mat_a.size(1), mat_b.size(-1))
    elif mat_b.dim() == 3:
        size = (mat_a.size(0), mat_b.size(-1))
    elif mat_a.dim() == 3:
        size = (mat_a.size(1), mat_b.size(1))
    else:  # both 2-D (a weight gradient): one product per group
        size = (offs.size(0), mat_a.size(0), mat_b.size(1))  # type: ignore[union-attr]
    return mat_a.new_empty(size)


def _rows_aligned(mat: torch.Tensor) -> bool:
    """Whether one of the last two dims is contiguous and the other's stride spans 16 bytes."""
    alignment = max(16 // mat.element_size(), 1)
    inner, outer = mat.stride()[-1], mat.stride()[-2]
    if outer == 1 and inner >= max(1, mat.size(-2)):
        return inner % alignment == 0
    return inner == 1 and outer >= max(1, mat.size(-1)) and outer % alignment == 0


_FAKE_KERNELS: dict[Any, Callable[..., Any]] = {torch._grouped_mm: _grouped_mm_fake}
"""Ops a trace evaluates by surgeon's own fake implementation (the graph still calls the op)."""


class _FakeKernels(torch.overrides.TorchFunctionMode):
    """Calls of `_FAKE_KERNELS`' ops inside a leaf module's forward (an experts module kept as
    a call because LoRA adapts its parameters) go to surgeon's fake implementations too."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        return _FAKE_KERNELS.get(func, func)(*args, **(kwargs or {}))


_SIZED_FACTORIES = ("ones", "zeros", "empty", "rand", "randn")


@contextlib.contextmanager
def _sizes_packed() -> Iterator[None]:
    """``torch.ones(batch, length)`` with traced sizes: torch's argument parser takes sizes as
    separate arguments only when they are plain integers, so the factories get them packed
    in a tuple (the same call), where traced values reach ``__torch_function__``."""
    originals = {name: getattr(torch, name) for name in _SIZED_FACTORIES}

    def packing(factory: Callable) -> Callable:
        @functools.wraps(factory)
        def call(*args: Any, **kwargs: Any) -> Any:
            if len(args) > 1 and any(isinstance(a, fx.Proxy) for a in args):
                args = (args,)
            return factory(*args, **kwargs)

        return call

    for name, factory in originals.items():
        setattr(torch, name, packing(factory))
    try:
        yield
    finally:
        for name, factory in originals.items():
            setattr(torch, name, factory)


@contextlib.contextmanager
def _module_state_kept(module: nn.Module) -> Iterator[None]:
    """A forward may set attributes as it runs (a rotary cache, a lazily built table) or register
    hooks (transformers' output capturing); during a trace those would be fake tensors, or hooks
    registered twice, so every module's attributes and the contents of its dicts (parameters,
    buffers, submodules, hooks) are put back afterwards."""
    saved = [
        (m, dict(vars(m)), {k: dict(v) for k, v in vars(m).items() if isinstance(v, dict)})
        for m in module.modules()
    ]
    try:
        yield
        _check_settings_kept(module, [attributes for _, attributes, _ in saved])
    finally:
        for m, attributes, contents in saved:
            for name in set(vars(m)) - set(attributes):
                del m.__dict__[name]
            m.__dict__.update(attributes)
            for name, items in contents.items():
                m.__dict__[name].clear()
                m.__dict__[name].update(items)


class SettingSet(Unsound):
    """The forward set a setting of a module while traced."""


def _check_settings_kept(module: nn.Module, before: list[dict[str, Any]]) -> None:
    """A graph does not repeat what a forward sets on its modules: a trace during which a
    setting changed (a call counter, a flag set on the first call) is refused."""
    for (path, m), attributes in zip(module.named_modules(), before):
        for name in _settings(m):
            if name not in attributes or attributes[name] != getattr(m, name):
                where = f"{path}.{name}" if path else name
                raise SettingSet(f"its forward sets {where}, which a graph would not repeat")


def _drop_unused_lookups(graph: fx.Graph) -> None:
    """Lookups and comparisons nothing uses: what the answered decisions leave behind."""
    for node in reversed(list(graph.nodes)):
        pure = node.op == "call_function" and (
            node.target is getattr
            or (
                getattr(node.target, "__module__", "") == "_operator"
                and node.target is not operator.setitem
            )
        )
        pure = pure or (node.op == "call_method" and node.target in _SHAPE_QUERIES)
        if pure and not node.users:
            graph.erase_node(node)


def _describe(args: tuple, kwargs: dict[str, Any]) -> str:
    parts = [_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{'x'.join(map(str, value.shape))}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    if value is None or isinstance(value, PYTHON_VALUES):
        return repr(value)
    return type(value).__name__


# -- running a specialised region -------------------------------------------------------------


class Dispatcher(nn.Module):
    """Runs a specialised region in place of its module's forward: the variant whose key and
    guards fit the call, a variant traced now for a new kind of call, or, where tracing is
    refused, the module's own forward (whose adaptable layers carry their adapters themselves).

    ``build`` turns a variant's traced graph into the rewritten code that runs (the adapter
    pass). Variants live on the region and outlive the dispatcher; rewrites are per dispatcher.
    """

    def __init__(
        self,
        module: nn.Module,
        region: Any,
        build: Callable[[fx.Graph], Any],
        leaf_types: tuple[type, ...],
    ) -> None:
        super().__init__()
        object.__setattr__(self, "module", module)
        self.region, self.build, self.leaf_types = region, build, leaf_types
        if region.state is None or region.state.module is not module:
            region.state = ModuleState(module)
        else:
            region.state.note_tensors()
        self.rewrites: dict[int, Any] = {}
        self._fingerprints: dict[int, tuple | None] = {}  # per state version
        self.run = _with_signature_of(type(module).forward)
        self.cache_name = cache_parameter(type(module).forward)

    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        if self.cache_name is not None:  # traces, checks and own forwards get the name it takes
            kwargs = cache_passed_as(self.cache_name, kwargs, type(self.module))
        if _CHECKING.get() or _outside_eager(args, kwargs):
            return self._own_forward(args, kwargs)
        key = call_key(self.region.state, args, kwargs)
        if key.state is None:
            self.region.variants.setdefault(key, _UNSETTLED)
            return self._own_forward(args, kwargs)
        if key.hooked:
            self.region.variants.setdefault(key, _HOOKED)
            return self._own_forward(args, kwargs)
        entry = self.region.variants.get(key)
        if isinstance(entry, str):
            return self._own_forward(args, kwargs)
        for variant in entry or ():
            values = variant.inputs(args, kwargs)
            if variant.holds(values):
                return self._run(variant, values)
        return self._new_variant(key, args, kwargs)

    def _own_forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)

    def _new_variant(self, key: CallKey, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A call no variant of this region fits: one traced for an identical module, else a
        new trace; either is checked before it runs. A refusal is remembered for the key."""
        shared_key = self._shared_key(key)
        shared = _SHARED.get(shared_key, ()) if shared_key is not None else ()
        try:
            if isinstance(shared, str):
                raise Unsound(shared)
            variant = next((v for v in shared if v.holds(v.inputs(args, kwargs))), None)
            if variant is None:
                seen = self.region.dynamic.get(key)
                self.region.dynamic[key], dynamic = grown_dynamic(seen, call_tensors(args, kwargs))
                with buffers_kept(self.module):
                    variant = specialise(self.module, self.leaf_types, args, kwargs, dynamic)
                if not variant.holds(variant.inputs(args, kwargs)):
                    raise Unsound("the guards of the traced graph do not hold for its own call")
                _share(shared_key, variant)
            self._check(variant, args, kwargs)
        except SettingSet as err:
            self.region.variants[key] = str(err)  # not shared: another model has not set it yet
            out = self._own_forward(args, kwargs)
            # the own forward has set it: a flag set once is part of the next call's state,
            # which traces anew; a counter soon exceeds ModuleState.LIMIT
            self.region.state.watch()
            return out
        except Unsound as err:
            self.region.variants[key] = str(err)
            _share(shared_key, str(err))
            return self._own_forward(args, kwargs)
        self.region.variants.setdefault(key, []).append(variant)
        return self._run(variant, variant.inputs(args, kwargs))

    def _shared_key(self, key: CallKey) -> tuple | None:
        """The key of this kind of call in `_SHARED`: the module's fingerprint in its current
        state with every module's training flag (state versions are this region's own)."""
        if key.state not in self._fingerprints:
            self._fingerprints[key.state] = module_fingerprint(self.module)
        fingerprint = self._fingerprints[key.state]
        if fingerprint is None:
            return None
        flags = tuple(m.training for m in self.module.modules())
        return (fingerprint, flags, key._replace(state=0))

    def _check(self, variant: Variant, args: tuple, kwargs: dict[str, Any]) -> None:
        """Run a variant and the module's own forward on copies of any objects passed in, from
        the same random state and buffers, and refuse the variant if they disagree (a trace can
        miss a Python decision, an isinstance on a traced tensor say). Nothing real is touched."""
        values = variant.inputs(args, kwargs)
        devices = sorted({t.device for v in values for t in input_tensors(v) if t.is_cuda}, key=str)
        start = _rng_state(devices)
        token = _CHECKING.set(True)
        try:
            holder = self._rewrite(variant).holder
            with torch.no_grad():
                with buffers_kept(self.module, holder):
                    got = self._run(variant, variant.inputs(*_copy_objects(args, kwargs)))
                _set_rng_state(devices, start)
                with buffers_kept(self.module, holder):
                    expected = self._own_forward(*_copy_objects(args, kwargs))
        finally:
            _CHECKING.reset(token)
            _set_rng_state(devices, start)
        mismatch = _mismatch(got, expected)
        if mismatch:
            raise Unsound(f"the traced graph disagrees with the module's own forward: {mismatch}")

    def _rewrite(self, variant: Variant) -> Any:
        rewrite = self.rewrites.get(id(variant))
        if rewrite is None:
            rewrite = self.rewrites[id(variant)] = self.build(variant.graph)
            self.region.base, self.region.graph = variant.graph, rewrite.graph
        return rewrite

    def _run(self, variant: Variant, values: list[Any]) -> Any:
        rewrite = self._rewrite(variant)
        return rewrite.holder.run(rewrite.holder, *values)


@contextlib.contextmanager
def buffers_kept(*roots: nn.Module) -> Iterator[None]:
    """Every buffer under ``roots`` as it was on entry, on exit: tracing a call and checking the
    trace run the forward, which must not count as calls (BatchNorm's running statistics, a
    layer's own noise generator). A buffer a forward replaces is put back, not only its values."""
    modules = {id(m): m for root in roots for m in root.modules()}.values()
    kept = [
        (m, dict(m._buffers), {n: b.clone() for n, b in m._buffers.items() if b is not None})
        for m in modules
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers, values in kept:
                module._buffers.update(buffers)
                for name, value in values.items():
                    buffers[name].copy_(value)


def _with_signature_of(forward: Callable) -> Callable:
    """What `install` binds as the module's forward: it dispatches, and shows the module's own
    signature (generate() asks the forward which arguments it takes, position_ids say)."""

    def run(dispatcher: Dispatcher, *args: Any, **kwargs: Any) -> Any:
        return dispatcher._dispatch(*args, **kwargs)

    with contextlib.suppress(TypeError, ValueError):
        run.__signature__ = inspect.signature(forward)  # type: ignore[attr-defined]
    return run


_HOOKED = "modules in it have hooks (forward or backward), which a graph would not call"
_UNSETTLED = (
    f"the settings of its modules or their config changed more than {ModuleState.LIMIT} times "
    "(a forward that updates an attribute on every call?)"
)

_SHARED: dict[tuple, list[Variant] | str] = {}
"""(module fingerprint, call key) -> the variants traced for it, or why it was refused."""
_SHARED_LIMIT = 512


def _share(key: tuple | None, outcome: Variant | str) -> None:
    if key is None:
        return
    while len(_SHARED) >= _SHARED_LIMIT:
        _SHARED.pop(next(iter(_SHARED)))
    if isinstance(outcome, str):
        _SHARED.setdefault(key, outcome)
    elif isinstance(_SHARED.get(key, []), list):
        _SHARED.setdefault(key, []).append(outcome)


def _copy_objects(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The call with every object passed in (a cache a forward updates) deep-copied."""

    def copied(value: Any) -> Any:
        if not _holds_objects(value):
            return value
        memo = {id(t): t.detach().clone() for t in input_tensors(value)}
        return copy.deepcopy(value, memo)

    return tuple(copied(a) for a in args), {k: copied(v) for k, v in kwargs.items()}


_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar("surgeon_checking", default=False)
"""Set while a new variant is checked: the regions inside run their own forwards (no tracing)."""


def _outside_eager(args: tuple, kwargs: dict[str, Any]) -> bool:
    """torch.compile, torch.export and FX tracers see the module's own forward; so do calls on
    the meta device (a memory estimate, say), where there is nothing to run faster."""
    if torch.compiler.is_compiling() or _symbolic_trace.is_fx_symbolic_tracing():
        return True
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    return isinstance(first, (fx.Proxy, torch._subclasses.FakeTensor)) or (
        first is not None and first.is_meta
    )


def _rng_state(devices: list[torch.device]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(devices: list[torch.device], state: tuple) -> None:
    torch.set_rng_state(state[0])
    for device, cuda_state in zip(devices, state[1]):
        torch.cuda.set_rng_state(cuda_state, device)


def _mismatch(got: Any, expected: Any) -> str | None:
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(expected)
    if got_spec != want_spec:
        return f"outputs are structured differently ({got_spec} vs {want_spec})"
    for a, b in zip(got_leaves, want_leaves):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return f"an output is {a.dtype}{list(a.shape)}, expected {b.dtype}{list(b.shape)}"
            if a.is_meta or b.is_meta:
                continue  # shapes and dtypes are all a meta tensor has
            tolerance = 1e-4 if a.dtype in (torch.float32, torch.float64) else 2e-2
            if a.is_floating_point() and not torch.allclose(
                a.detach(), b, atol=tolerance, rtol=tolerance, equal_nan=True
            ):
                return f"max abs difference {(a.detach() - b).abs().max().item():.3g}"
            if not a.is_floating_point() and not torch.equal(a, b):
                return "an integer output differs"
        elif _holds_objects(a):
            inner = _mismatch(input_tensors(a), input_tensors(b))
            if inner:
                return f"{type(a).__name__} output: {inner}"
        elif not isinstance(a, torch.Tensor) and a != b:
            return f"output {a!r} differs from {b!r}"
    return None
