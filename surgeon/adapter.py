"""The contract between a method and the compiler.

A method (one file in ``passes/``) supplies:

* a spec class (`surgeon.spec.MethodSpec`) that validates its fields, says which layers it
  supports, and builds one `AdapterLayer` per targeted layer;
* the `AdapterLayer`: a plain module that owns the method's parameters for one layer, emits its
  subgraph next to the base node, knows its merged weight delta and its PEFT state-dict keys.

Merge, unmerge, save, load and lowering are written once on top of that.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn


class EmitContext:
    """Builds adapter nodes in a region graph; records the objects that get_attr/call_module name."""

    def __init__(
        self, graph: fx.Graph, root: dict[str, Any], prefix: str, adapter: str, method: str
    ) -> None:
        self.graph = graph
        self.root = root
        self.prefix = prefix
        self.tag = {"adapter": adapter, "method": method}
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

    @property
    def transforms_input(self) -> bool:
        """Whether `emit_input` changes this layer's input (mixed batches cannot do that yet)."""
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

        Return the node the base layer should read instead of ``x``, or None to leave it.
        Other adapters on the same layer still see the original ``x``.
        """
        return None

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base weight (same shape and layout as ``base.weight``)."""
        raise NotImplementedError

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
        """State-dict entries under the layer's path, in PEFT's naming without the adapter name."""
        raise NotImplementedError

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """What a save writes; `peft_tensors` unless training shrank the layer (AdaLoRA)."""
        return self.peft_tensors()
