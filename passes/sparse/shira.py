"""SHiRA: sparse high-rank adapters (Bhardwaj et al., 2024, "Sparse High Rank Adapters",
https://arxiv.org/abs/2406.13175).

``(W + ΔW) x + b`` with ``ΔW`` nonzero only on a fixed mask of ``r·(in + out)`` entries, as many
as LoRA of rank r trains (the update itself is of high rank). Only the values on the mask train
(PEFT's ``shira_weight``, zero at first: a fresh adapter is the base layer); the mask's positions
are saved beside them (``shira_indices``, int32, rows then columns).

The mask: ``mask_type="random"`` draws it as PEFT's ``random_mask`` does, a permutation from a
CPU `torch.Generator` seeded with ``seed`` (left unseeded when ``seed`` is None, which is the
generator's fixed default seed: every layer of one shape then gets the same mask). Any other
``mask_type`` names a custom mask that ``mask_fn(layer, rank)`` computes: a 0/1 tensor shaped
like the weight with ``r·(in + out)`` ones (PEFT's mask function signature, so PEFT's functions
work here). A function cannot be written to a file; the file's ``shira_indices`` keep the mask,
so a saved custom-mask adapter loads without its function.

The layer runs as PEFT's: ``F.linear(x, W + ΔW, b)``, the sparse values added in their dtype and
rounded to the weight's once; in eval the adapted weight is kept until W or the adapter change
(`surgeon.adapter.Cached`). Several SHiRA or Super-Tuning adapters on one layer add their entries
to that one weight in turn, as PEFT composes them; after an adapter of another method on the
layer, the update is added to that adapter's output instead (``+ ΔW x``), as merging folds it.
Merging adds the entries to W.

Layers: Linear (the only type PEFT's SHiRA supports).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_int, is_int
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import INT, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

MaskFunction = Callable[[nn.Module, int], torch.Tensor]
"""``mask_fn(layer, rank)``: a 0/1 tensor shaped like ``layer.weight`` with ``rank·(in + out)``
ones (PEFT's mask function signature)."""

PEFT_FORMAT = PeftFormat(
    "SHIRA",
    keys=(
        PeftKey("r", "rank", 32, INT),
        # PEFT's SHiRA has neither exclude_modules nor layers_to_transform: a selection that
        # uses them is written out as the chosen module paths
        *selection_keys(exclude=False, layers=False),
        PeftKey("mask_type", "mask_type", "random", STRING),
        PeftKey("random_seed", "seed", None, INT.optional()),
    ),
    # fan_in_fan_out: PEFT sets it False on the Linear layers SHiRA adapts; init_weights=False
    # draws values that the file's weights replace
    constants={"fan_in_fan_out": False, "init_weights": True},
)


@dataclass(frozen=True)
class SHiRA(MethodSpec):
    """Sparse high-rank adaptation: a trained update on a fixed sparse mask of each weight."""

    name = "shira"
    peft_format = PEFT_FORMAT

    rank: int = 32
    """Decides the number of trained entries per layer, ``rank·(in + out)``, not the update's rank."""
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    mask_type: str = "random"
    """``random`` (drawn from ``seed``), or the name of the custom mask ``mask_fn`` computes."""
    seed: int | None = None
    """What the random mask is drawn from; None: the generator's default seed, as PEFT."""
    mask_fn: MaskFunction | None = None
    """The custom mask's function (not saved: adapter files hold the mask's indices)."""
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        if not isinstance(self.mask_type, str) or not self.mask_type:
            raise SpecError(
                f"{owner}.mask_type={self.mask_type!r}: expected 'random' or the name of a "
                f"custom mask"
            )
        if self.seed is not None and not (is_int(self.seed) and -(2**63) <= self.seed < 2**64):
            raise SpecError(
                f"{owner}.seed={self.seed!r}: expected an integer (a torch seed) or None"
            )
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise SpecError(
                f"{owner}.mask_fn={self.mask_fn!r}: expected a function (layer, rank) -> mask"
            )
        if self.mask_fn is not None and self.mask_type == "random":
            raise SpecError(
                f"{owner}.mask_fn is set but mask_type='random' (the mask drawn from seed): name "
                f"the custom mask, e.g. mask_type='custom'"
            )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # custom masks (a function) cannot be written in a spec file: the card covers them
        return {
            "default": cls(rank=1, targets=targets),
            "seeded": cls(rank=2, seed=3, targets=targets),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], where: str) -> MethodSpec:
        spec = super().from_peft_config(config, where)
        if spec.mask_type != "random":
            # a custom mask's function is not in the file; its shira_indices are the mask
            spec._set("_mask_from_file", True)
        return spec

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        layers = super().create_layers(model, paths)
        # a file fills these layers' indices once; building another adapter needs mask_fn
        self.__dict__.pop("_mask_from_file", None)
        return layers

    def create_layer(self, layer: nn.Module, path: str) -> SHiRALayer:
        fan_in, fan_out = in_out_features(layer)
        count = self.rank * (fan_in + fan_out)
        if count > fan_in * fan_out:
            raise SpecError(
                f"SHiRA.rank={self.rank} on {path}: rank·(in + out) = {count} trained entries, "
                f"more than the {fan_in * fan_out} of its weight"
            )
        return SHiRALayer(layer, self.rank, self._mask_indices(layer, path, count))

    def _mask_indices(self, layer: nn.Module, path: str, count: int) -> torch.Tensor:
        """The mask's positions, (2, count) int32 rows then columns, in row-major order."""
        if layer.weight.is_meta:  # nothing to draw or compute on the meta device
            return torch.empty((2, count), dtype=torch.int32, device="meta")
        if self.mask_fn is not None:
            return _positions(self.mask_fn(layer, self.rank), layer, path, count)
        if self.mask_type == "random":
            return random_mask_indices(layer, count, self.seed)
        if getattr(self, "_mask_from_file", False):
            # a load fills these from the file's shira_indices
            return torch.zeros((2, count), dtype=torch.int32, device=layer.weight.device)
        raise SpecError(
            f"SHiRA.mask_type={self.mask_type!r} names a custom mask: pass mask_fn (a function "
            f"(layer, rank) -> 0/1 mask) to build a new adapter; only a saved adapter, whose "
            f"file holds the mask's indices, loads without it"
        )


def random_mask_indices(layer: nn.Module, count: int, seed: int | None) -> torch.Tensor:
    """``count`` positions drawn as PEFT's ``random_mask``: the first ``count`` of a permutation
    of the weight's entries from a CPU generator (seeded with ``seed`` unless None), in
    row-major order (PEFT reads them back from a 0/1 mask)."""
    fan_in, fan_out = in_out_features(layer)
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(fan_in * fan_out, generator=generator)[:count].sort().values
    rows, columns = flat // fan_in, flat % fan_in
    return torch.stack((rows, columns)).to(device=layer.weight.device, dtype=torch.int32)


def _positions(mask: Any, layer: nn.Module, path: str, count: int) -> torch.Tensor:
    """The ones of a custom mask, (2, n) int32 in row-major order, checked against PEFT's
    rule: shaped like the weight, with ``count`` ones."""
    shape = tuple(layer.weight.shape)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SpecError(f"SHiRA.mask_fn on {path}: returned {found}, expected a {shape} mask")
    positions = torch.stack(torch.where(mask == 1)).to(torch.int32)
    if positions.shape[1] != count:
        raise SpecError(
            f"SHiRA.mask_fn on {path}: the mask has {positions.shape[1]} ones; SHiRA trains "
            f"rank·(in + out) = {count} entries here"
        )
    return positions


# -- the layer's weight math, shared by the sparse methods --------------------------------------


def sparse_added(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weight`` with ``values`` added at ``indices`` (rows, columns), in the values' dtype
    and rounded to the weight's once, as PEFT adds its sparse update to a dense weight."""
    rows, columns = indices.long()
    summed = weight.to(values.dtype).index_put((rows, columns), values, accumulate=True)
    return summed.to(weight.dtype)


WEIGHT_COMPOSING = frozenset({"shira", "supertuning"})
"""Methods whose layers run the base layer with their entries added to its weight
(`SparseUpdateLayer`): later ones on the same layer add theirs to that weight."""


def composed_linear(node: fx.Node) -> fx.Node | None:
    """The ``F.linear`` call that a sparse adapter put in place of its base layer's call, if
    ``node`` is its output or follows from it only through nodes such adapters add after it
    (each takes the output it adds to first): its weight may take more entries then."""
    while isinstance(node, fx.Node):
        tag = node.meta.get("surgeon", {})
        if tag.get("method") not in WEIGHT_COMPOSING:
            return None
        if node.target is F.linear and "replaces" in tag:
            return node
        node = node.args[0] if node.args else None
    return None


class SparseUpdateLayer(AdapterLayer):
    """A Linear layer's update of some of its weight's entries: ``values`` at ``indices``
    (buffers and parameters named by the subclass), added to the weight by `add_entries`.

    The layer runs as ``F.linear(x, W', b)``, ``W'`` the weight with the entries of every such
    adapter stacked there in turn (the first one's ``W + ΔW`` kept in eval until a source
    changes), as PEFT's forward. Where an adapter of another method stands between (its output
    sees the layer's), or in a mixed batch's rows, the update runs as ``out + ΔW x`` instead."""

    indices_name: ClassVar[str]
    values_name: ClassVar[str]

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.adapted_weight = Cached(self.adapted_weight_now, self._sources)
        self.update = Cached(self.delta_weight, self._sources)

    @staticmethod
    def add_entries(
        weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """``weight`` with ``values`` added at ``indices``, rounded as PEFT rounds them."""
        raise NotImplementedError

    def _entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self.indices_name), getattr(self, self.values_name)

    def _sources(self) -> tuple[torch.Tensor, ...]:
        return (self.base.weight, *self._entries())

    def adapted_weight_now(self) -> torch.Tensor:
        """``W + ΔW`` in the weight's dtype."""
        return self.add_entries(self.base.weight, *self._entries())

    def delta_weight(self) -> torch.Tensor:
        """``ΔW``, dense, in the adapter's dtype."""
        indices, values = self._entries()
        zeros = torch.zeros(self.base.weight.shape, device=values.device, dtype=values.dtype)
        return self.add_entries(zeros, indices, values)

    # -- the graph ---------------------------------------------------------------------------

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        """The layer's own computation spelled out, ``F.linear(x, W, b)``, for `emit` to put
        the entries into its weight."""
        weight = ctx.attr("base_weight", self.base.weight)
        bias = ctx.attr("base_bias", self.base.bias) if self.base.bias is not None else None
        return ctx.call(F.linear, x, weight, bias)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        """The layer's output with this adapter's entries in: ``base_out`` with them in the
        weight of its linear (see `composed_linear`), else ``base_out + ΔW x``."""
        linear = composed_linear(base_out)
        if linear is not None:
            self._compose(ctx, linear)
            return base_out
        update = ctx.module("update", self.update)
        dtype = self._entries()[1].dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        delta = ctx.call(F.linear, h, update)
        delta = ctx.method("to", delta, self.base.weight.dtype) if cast else delta
        return ctx.call(torch.add, base_out, delta)

    def _compose(self, ctx: EmitContext, linear: fx.Node) -> None:
        """Put this adapter's entries into ``linear``'s weight: the plain base weight becomes
        this adapter's (cached) ``W + ΔW``; a weight other adapters composed takes them on top."""
        weight = linear.args[1]
        if weight.op == "get_attr":
            with ctx.graph.inserting_before(weight):
                linear.update_arg(1, ctx.module("adapted_weight", self.adapted_weight))
            ctx.root.pop(weight.target, None)
            ctx.graph.erase_node(weight)
            return
        with ctx.graph.inserting_before(linear):
            indices, values = self._entries()
            indices = ctx.attr(self.indices_name, indices)
            values = ctx.attr(self.values_name, values)
            linear.update_arg(1, ctx.call(self.add_entries, weight, indices, values))

    # -- merging -------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base.weight
        weight.copy_(self.add_entries(weight, *self._entries()))

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base.weight
        indices, values = self._entries()
        weight.copy_(self.add_entries(weight, indices, -values))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        indices, values = self._entries()
        return {self.values_name: values, self.indices_name: indices}


class SHiRALayer(SparseUpdateLayer):
    """``shira_weight`` (the trained values, float32 over a half-precision base, as PEFT keeps
    them) at ``shira_indices`` (a buffer: fixed positions, saved)."""

    method = "shira"
    indices_name = "shira_indices"
    values_name = "shira_weight"
    add_entries = staticmethod(sparse_added)

    def __init__(self, base: nn.Module, rank: int, indices: torch.Tensor) -> None:
        super().__init__(base)
        weight = base.weight
        self.rank = rank
        self.register_buffer("shira_indices", indices)
        self.shira_weight = nn.Parameter(
            torch.zeros(indices.shape[1], **adapter_tensor_kwargs(weight))
        )
