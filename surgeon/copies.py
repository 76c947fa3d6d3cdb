"""Trained copies of layers: ``modules_to_save`` and `ParameterCopy`.

``modules_to_save``: modules an adapter trains as a full copy (PEFT's ModulesToSaveWrapper).

The usual case is a new task head (``classifier`` of a sequence classifier). Each adaptable
layer inside a named module gets a `LayerCopy`: a trainable copy of the layer whose output
replaces the original's while the adapter runs. The original layer is untouched, so the base
model (``cm.disabled()``) and other adapters still see it, and each adapter has its own head.
Saved under PEFT's keys: ``base_model.model.<layer path>.weight``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.errors import SpecError
from surgeon.spec import MethodSpec
from surgeon.targets import matches_suffix
from surgeon.trace import adaptable_types


class LayerCopy(AdapterLayer):
    """A trainable copy of one layer; its output replaces the layer's."""

    method = "copy"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.copy = _clone(base)
        for p in self.copy.parameters():
            p.requires_grad_(True)
        self._saved: dict[str, torch.Tensor] | None = None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        return ctx.module("copy", self.copy, x)

    @torch.no_grad()
    def merge(self) -> None:
        """Put the copy's parameters into the layer (keeping the originals for `unmerge`)."""
        own = dict(self.base.named_parameters(recurse=False))
        self._saved = {n: p.detach().clone() for n, p in own.items()}
        for n, p in self.copy.named_parameters(recurse=False):
            own[n].copy_(p.to(own[n].dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._saved is None:
            return
        own = dict(self.base.named_parameters(recurse=False))
        for n, p in self._saved.items():
            own[n].copy_(p)
        self._saved = None

    def delta_weight(self) -> torch.Tensor:
        raise SpecError(
            "a modules_to_save copy replaces its layer; it has no weight delta to combine"
        )

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.copy.named_parameters())


def _clone(layer: nn.Module) -> nn.Module:
    """A deep copy of ``layer`` without the rewritten forward surgeon may have installed on it."""
    installed = layer.__dict__.pop("forward", None)
    try:
        return copy.deepcopy(layer)
    finally:
        if installed is not None:
            layer.forward = installed


def copy_paths(model: nn.Module, method: MethodSpec, adapted: Sequence[str]) -> list[str]:
    """Paths of the adaptable layers inside the method's ``modules_to_save``."""
    owner = type(method).__name__
    names = method.modules_to_save
    if not names:
        return []
    leaf_types = adaptable_types()
    modules = dict(model.named_modules())
    paths: list[str] = []
    for name in names:
        roots = [p for p in modules if p and matches_suffix(p, name)]
        if not roots:
            raise SpecError(f"{owner}.modules_to_save: {name!r} matches no module")
        for root in roots:
            paths.extend(
                p for p in _layers_under(modules, root, leaf_types, owner) if p not in paths
            )
    overlap = sorted(set(paths) & set(adapted))
    if overlap:
        raise SpecError(
            f"{owner}.modules_to_save: {overlap[0]!r} is also a target of the method; "
            f"a layer is either adapted or trained as a copy, not both"
        )
    return paths


def _layers_under(
    modules: dict[str, nn.Module], root: str, leaf_types: tuple[type, ...], owner: str
) -> list[str]:
    inside = {p: m for p, m in modules.items() if p == root or p.startswith(root + ".")}
    layers = [p for p, m in inside.items() if isinstance(m, leaf_types)]
    covered = {id(p) for path in layers for p in inside[path].parameters()}
    loose = [
        f"{p}.{n}" if p else n
        for p, m in inside.items()
        for n, param in m.named_parameters(recurse=False)
        if id(param) not in covered
    ]
    if loose:
        raise SpecError(
            f"{owner}.modules_to_save: {root!r} holds parameters outside Linear/Conv/Embedding "
            f"layers ({', '.join(loose[:3])}); only those layers can be trained as copies"
        )
    return layers


def present_names(model: nn.Module, names: Sequence[str]) -> tuple[str, ...]:
    """The names that match a module of ``model``. PEFT writes every head name of a task
    (``["classifier", "score"]`` for sequence classification) whatever the model has."""
    paths = [p for p, _ in model.named_modules() if p]
    return tuple(n for n in names if any(matches_suffix(p, n) for p in paths))


# -- a layer run with a trained copy of its own parameters (LN tuning, LongLoRA's norms) ---------


class _ClassForward(nn.Module):
    """Runs a layer's class forward: the layer itself may carry a forward surgeon installed,
    which would run the adapters again."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.layer).forward(self.layer, *args, **kwargs)


def forward_with(
    layer: nn.Module,
    x: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    /,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``layer``'s output on ``x`` (and its other inputs ``args``/``kwargs``: an experts
    module's routing) computed with ``params`` in place of its own parameters, by its own code
    (RMS norms differ: Gemma scales by ``1 + w``, Llama casts before scaling)."""
    swapped = {f"layer.{name}": value for name, value in params.items()}
    return functional_call(_ClassForward(layer), swapped, (x, *args), kwargs)


def refuse_several(out: torch.Tensor, message: str) -> torch.Tensor:
    """Raised when the graph runs, not when it is built: as in PEFT, several such adapters may be
    loaded and active together (a mixed batch gives each its rows); only running one layer with
    several of them is refused."""
    raise SpecError(message)


class ParameterCopy(AdapterLayer):
    """A trained copy of one layer's own parameters (``weight``, ``bias``) in the layer's dtype,
    run by the layer's own code in place of the originals; merging writes the copy into the
    layer and unmerging puts the originals back exactly. One adapter at a time runs a layer
    (`several_message` says why to the user); a mixed batch gives each row its adapter's copy."""

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__(base)
        self.path = path
        for name, param in base.named_parameters(recurse=False):
            setattr(self, name, nn.Parameter(param.detach().clone()))
        self._saved: dict[str, torch.Tensor] | None = None

    def several_message(self, first: str, second: str) -> str:
        """The error for adapters ``first`` and ``second`` both running this layer."""
        raise NotImplementedError

    def _params(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters(recurse=False))

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        return self._forward(ctx, x)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        tag = base_out.meta.get("surgeon", {})
        if not tag.get("replaces"):  # a mixed batch: the base layer ran on this adapter's rows
            return self._forward(ctx, x)
        if tag["adapter"] == ctx.adapter:
            return base_out  # emit_base computed it with this adapter's copy
        message = self.several_message(tag["adapter"], ctx.adapter)
        return ctx.call(refuse_several, base_out, message)

    def _forward(self, ctx: EmitContext, x: fx.Node) -> fx.Node:
        params = {name: ctx.attr(name, p) for name, p in self._params().items()}
        return ctx.call(forward_with, ctx.attr("base_layer", self.base), x, params)

    @torch.no_grad()
    def merge(self) -> None:
        own = dict(self.base.named_parameters(recurse=False))
        self._saved = {name: p.detach().clone() for name, p in own.items()}
        for name, p in self._params().items():
            own[name].copy_(p)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.unmerge() without a merge() before it")
        own = dict(self.base.named_parameters(recurse=False))
        for name, value in self._saved.items():
            own[name].copy_(value)
        self._saved = None
