"""Objects a traced forward makes and returns (the KV cache a causal LM creates when none is
passed in): the graph rebuilds a fresh one on every call, from a template of the traced one
whose proxies became slots for the values the graph computes."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.trace import PYTHON_VALUES, Unsound


def rebuilding(obj: Any) -> tuple[Rebuild, list[fx.Proxy]]:
    """The node target that rebuilds ``obj`` and the proxies whose values it takes."""
    proxies, kept = _proxies_and_modules(obj)
    memo: dict[Any, Any] = {id(m): m for m in kept}
    memo.update({id(p): _Slot(i) for i, p in enumerate(proxies)})
    try:
        template = copy.deepcopy(obj, memo)
    except Exception as err:
        raise Unsound(f"cannot rebuild the {type(obj).__name__} returned: {err}") from None
    if _proxies_and_modules(template)[0] or _holds_fake(template):
        raise Unsound(f"the {type(obj).__name__} returned holds values too deep to rebuild")
    return Rebuild(template, kept), proxies


def is_object(value: Any) -> bool:
    """An instance with attributes of its own (not a module, class, function or container)."""
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, (nn.Module, type, fx.Proxy, torch.Tensor, dict, tuple, list))
        and not callable(value)
    )


_REBUILD_DEPTH = 8


def _leaves(value: Any) -> Iterator[Any]:
    """What an object holds through its attributes, lists, tuples, sets and dicts, to
    `_REBUILD_DEPTH` levels: every value that is none of those, each once."""
    seen: set[int] = set()

    def walk(v: Any, depth: int) -> Iterator[Any]:
        if id(v) in seen or depth > _REBUILD_DEPTH:
            return
        seen.add(id(v))
        if isinstance(v, (tuple, list, set, frozenset)):
            children: Any = v
        elif isinstance(v, dict):
            children = v.values()
        elif is_object(v):
            children = vars(v).values()
        else:
            yield v
            return
        for child in children:
            yield from walk(child, depth + 1)

    yield from walk(value, 0)


def _proxies_and_modules(value: Any) -> tuple[list[fx.Proxy], list[nn.Module]]:
    """The proxies inside an object and the modules it refers to (kept as they are, never
    copied)."""
    leaves = list(_leaves(value))
    proxies = [v for v in leaves if isinstance(v, fx.Proxy)]
    return proxies, [v for v in leaves if isinstance(v, nn.Module)]


def _holds_fake(value: Any) -> bool:
    fake = (torch._subclasses.FakeTensor, torch.SymInt, torch.SymFloat)
    return any(isinstance(v, fake) for v in _leaves(value))


class _Slot:
    """Where a rebuilt object takes the ``index``-th value its node receives."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __deepcopy__(self, memo: dict[Any, Any]) -> Any:
        return memo[_Slot][self.index]


class Rebuild:
    """A graph node's target that builds an object the traced forward returned: a deep copy
    of its template, with the node's arguments in its slots and the modules it refers to
    shared, not copied."""

    def __init__(self, template: Any, modules: Sequence[nn.Module]) -> None:
        self.template, self.modules = template, list(modules)
        self.__name__ = self.__qualname__ = f"rebuild_{type(template).__name__}"
        self.__module__ = __name__
        try:
            self._build: Callable[[tuple], Any] | None = _builder(
                template, {id(m) for m in modules}, set()
            )
        except _SharedInside:
            self._build = None

    def __call__(self, *values: Any) -> Any:
        if self._build is not None:
            return self._build(values)
        memo: dict[Any, Any] = {id(m): m for m in self.modules}
        memo[_Slot] = values
        return copy.deepcopy(self.template, memo)


def _copied_by_dict(kind: type) -> bool:
    """Whether `copy.deepcopy` copies instances of ``kind`` field by field of ``__dict__``:
    no copy hooks of its own, no slots holding values."""
    hooks = ("__reduce_ex__", "__reduce__", "__getstate__")
    if any(getattr(kind, h) is not getattr(object, h) for h in hooks):
        return False
    if hasattr(kind, "__deepcopy__") or hasattr(kind, "__setstate__"):
        return False
    declared = [vars(k).get("__slots__", ()) for k in kind.__mro__]
    slots = [n for names in declared for n in ((names,) if isinstance(names, str) else names)]
    return all(n in ("__dict__", "__weakref__") for n in slots)


class _SharedInside(Exception):
    """An object the template refers to twice: only a deep copy keeps that."""


def _builder(value: Any, modules: set[int], seen: set[int]) -> Callable[[tuple], Any]:
    """What `copy.deepcopy` of a template does, planned once: plain objects, lists, tuples and
    dicts are built directly (a 32-layer KV cache: about 10x faster per call); anything else
    is deep-copied as it is."""
    if isinstance(value, _Slot):
        index = value.index
        return lambda values: values[index]
    if value is None or isinstance(value, PYTHON_VALUES) or id(value) in modules:
        return lambda values: value
    if id(value) in seen:
        raise _SharedInside
    seen.add(id(value))
    kind = type(value)
    if kind in (list, tuple):
        items = [_builder(item, modules, seen) for item in value]
        return lambda values: kind(build(values) for build in items)
    if kind is dict:
        entries = [(k, _builder(item, modules, seen)) for k, item in value.items()]
        return lambda values: {k: build(values) for k, build in entries}
    if is_object(value) and _copied_by_dict(kind):
        fields = [(k, _builder(item, modules, seen)) for k, item in vars(value).items()]

        def build_object(values: tuple) -> Any:
            made = kind.__new__(kind)
            made.__dict__.update({k: build(values) for k, build in fields})
            return made

        return build_object
    return lambda values: copy.deepcopy(value)
