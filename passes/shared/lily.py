"""Lily: ``base(x) + s · (A x) B_mix`` with ``B_mix = Σ_e p_e B_e``, a low-dimension projector A
shared by neighbouring layers and high-dimension projector experts B_e shared by all of them,
mixed per layer by a router (Zhong et al., 2024, "Low-Rank Interconnected Adaptation across
Layers", https://arxiv.org/abs/2407.09946).

``h = A x`` (A: r x in); the layer's router (num_B x r) scores each token's ``h``;
``p = mean over every token of the batch of softmax(router h)`` (one mix per call, as PEFT
computes it); ``B_mix`` (r x out) mixes the ``num_B`` experts ``B_e`` (r x out each, PEFT's
``lily_B`` of shape (num_B·r) x out) by ``p``; ``s`` is ``scaling``, a plain multiplier.

Sharing, as PEFT's: the targets fall into groups by the ``target_modules`` entry their path
ends with (a regex: one entry for all) and by the weight's shape; within a group, in model
order, every run of ``stride_A`` consecutive layers shares the first one's A, and all of the
group's layers share its first layer's experts B. Selections that PEFT's config cannot express
by names (presets other than ``all-linear``, a regex with ``layers``) are written out as module
paths, and PEFT expands ``all-linear`` into paths; PEFT shortens a list of 20 entries or more to
the fewest name suffixes that tell the targets apart from the other modules, and groups by
those (a shorter list of paths: each layer is a group of its own). A path that ends with
several entries is refused (PEFT's grouping then depends on the order of a Python set).

Init, as PEFT's and in its order of draws from the global generator: A and the router
kaiming-uniform, B zero (``init="zeros"``: the adapter starts as the base layer) or
kaiming-uniform (``init="kaiming"``). In half precision A, B and the router are float32 after
rounding through the base dtype, and the update is computed in float32, as PEFT does.

PEFT keys: ``lily_A.weight``, ``lily_B.weight``, ``lily_router.weight`` under every adapted
layer (a shared factor is saved under each layer that uses it, as PEFT saves it).

Layers: Linear (the only type PEFT's Lily supports). The mix depends on the input, so there is
no weight update to fold in: merging (and so unloading and ONNX export) is refused, as PEFT
refuses it. In a mixed batch each adapter mixes its experts over its own rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_choice, check_finite, check_int
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, layer_kind, through_base_dtype
from surgeon.peft import (
    BOOL,
    INT,
    NUMBER,
    PeftFormat,
    PeftKey,
    choices,
    selection_keys,
    written_targets,
)
from surgeon.spec import MethodSpec
from surgeon.targets import preset_paths

INITS = {True: "zeros", False: "kaiming"}
"""PEFT's ``init_weights`` -> surgeon's ``init`` (how the experts B start)."""

PEFT_FORMAT = PeftFormat(
    "LILY",
    keys=(
        PeftKey("r", "rank", 32, INT),
        *selection_keys(),
        PeftKey("stride_A", "stride_a", 1, INT),
        PeftKey("num_B", "num_b", 2, INT),
        PeftKey("scaling", "scaling", 1.0, NUMBER),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: spec.init == "zeros",
            load=choices(INITS, "init_weights"),
        ),
    ),
)


@dataclass(frozen=True)
class Lily(MethodSpec):
    """Low-rank interconnected adaptation across layers: projectors A shared by runs of
    ``stride_a`` layers, ``num_b`` expert projectors B shared by every layer of a target name
    and mixed per layer by a router.

    ``rank``: the inner dimension r (PEFT's ``r``). ``scaling``: multiplies the update as it
    is (no alpha / r). ``init``: the experts start at ``zeros`` (PEFT's ``init_weights=True``:
    a fresh adapter changes nothing) or ``kaiming``-uniform.
    """

    name = "lily"
    peft_format = PEFT_FORMAT
    merge_refusal = (
        "its router mixes the experts from each batch's inputs, so no weight update stands for "
        "it (PEFT refuses too)"
    )

    rank: int = 32
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    stride_a: int = 1
    num_b: int = 2
    scaling: float = 1.0
    init: str = "zeros"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "stride_a", self.stride_a)
        # a router needs two experts to choose between (PEFT refuses fewer too)
        check_int(owner, "num_b", self.num_b, minimum=2)
        check_finite(owner, "scaling", self.scaling)
        check_choice(owner, "init", self.init, tuple(INITS.values()))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=4, stride_a=2, targets=targets),
            "kaiming-experts-scaled": cls(
                rank=3, num_b=3, scaling=0.5, init="kaiming", targets=targets
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "zeros"

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, LilyLayer]:
        groups = sharing_groups(model, paths, written_targets(self, paths, PEFT_FORMAT))
        seen: dict[tuple, int] = {}
        shared_a: dict[tuple, Projector] = {}
        shared_b: dict[tuple, Projector] = {}
        layers = {}
        for path, group in zip(paths, groups):
            base = model.get_submodule(path)
            index = seen[group] = seen.get(group, -1) + 1
            # drawn for every layer, as PEFT draws before it shares
            a, router, b = initial_values(self, base.weight)
            run = (group, index // self.stride_a)
            if run not in shared_a:
                shared_a[run] = Projector(a)
            if group not in shared_b:
                shared_b[group] = Projector(b)
            layers[path] = LilyLayer(base, shared_a[run], shared_b[group], router, self, index == 0)
        return layers


def sharing_groups(
    model: nn.Module, paths: Sequence[str], written: str | Sequence[str]
) -> list[tuple[str, tuple[int, ...]]]:
    """Each target's group, PEFT's: the entry of ``target_modules`` (as PEFT reads what is
    written, `peft_entries`) that its path ends with, and its weight's shape."""
    entries = peft_entries(model, written)
    groups = []
    for path in paths:
        if isinstance(entries, str):
            entry = entries  # a regex: one entry for every target
        else:
            ends = [e for e in entries if path.endswith(e)]
            if len(ends) > 1:
                raise SpecError(
                    f"Lily.targets: {path} ends with several entries ({', '.join(ends)}); PEFT "
                    f"would share its factors with the layers of whichever it reads last, which "
                    f"varies from run to run. Name the layers so that one entry ends each path"
                )
            entry = ends[0] if ends else path  # PEFT leaves such a layer unshared
        groups.append((entry, tuple(model.get_submodule(path).weight.shape)))
    return groups


CONDENSED_FROM = 20
"""PEFT shortens ``target_modules`` lists of this many entries or more before it groups."""


def peft_entries(model: nn.Module, written: str | Sequence[str]) -> str | list[str]:
    """``target_modules`` as PEFT holds it when it groups the layers: ``all-linear`` expanded
    into the paths of the model's linear layers, then a list of 20 entries or more shortened
    to the fewest name suffixes that still tell the targets from the other modules."""
    if written == "all-linear":
        written = preset_paths(model, "all-linear")
    if isinstance(written, str) or len(set(written)) < CONDENSED_FROM:
        return written
    shorter = fewest_suffixes(written, [name for name, _ in model.named_modules()])
    return shorter if 0 < len(shorter) < len(set(written)) else list(written)


def _suffixes(path: str) -> list[str]:
    """A path's dotted suffixes, shortest first (``c``, ``b.c``, ``a.b.c``)."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def fewest_suffixes(targets: Sequence[str], names: Sequence[str]) -> list[str]:
    """PEFT's condensed ``target_modules``: going through the targets by their suffixes, each
    target not yet covered adds its shortest suffix that no other module ends with."""
    chosen_from = set(targets)
    covered = tuple("." + t for t in chosen_from)
    others = [n for n in names if n not in chosen_from and not n.endswith(covered)]
    taken = {suffix for name in others for suffix in _suffixes(name)}
    chosen: list[str] = []
    for target in sorted(chosen_from, key=_suffixes):
        if any(target.endswith("." + c) for c in chosen):
            continue
        free = next((s for s in _suffixes(target) if s not in taken and s not in chosen), None)
        if free is not None:
            chosen.append(free)
    return chosen


def kaiming_uniform(*shape: int) -> torch.Tensor:
    """nn.Linear's init (kaiming-uniform, a = √5: bound 1/√fan_in) from the global generator."""
    return nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))


def initial_values(
    spec: Lily, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (r x in), the router (num_B x r) and B ((num_B·r) x out) of a fresh layer, in the
    adapter's dtype on the weight's device. Drawn as PEFT draws them: on the CPU in float32,
    first once by the constructors of its three nn.Linear (values it then replaces), then A, the
    router and (kaiming init) B again; rounded through the base dtype."""
    fan_in, fan_out = weight.shape[1], weight.shape[0]
    shapes = ((spec.rank, fan_in), (spec.num_b, spec.rank), (spec.num_b * spec.rank, fan_out))
    if weight.is_meta:
        factory = adapter_tensor_kwargs(weight)
        return tuple(torch.empty(shape, **factory) for shape in shapes)
    for shape in (shapes[0], shapes[2], shapes[1]):  # the constructors' order: A, B, router
        kaiming_uniform(*shape)
    a, router = kaiming_uniform(*shapes[0]), kaiming_uniform(*shapes[1])
    b = kaiming_uniform(*shapes[2]) if spec.init == "kaiming" else torch.zeros(shapes[2])
    return tuple(through_base_dtype(t, weight) for t in (a, router, b))


class Projector(nn.Module):
    """A factor that several layers may share (PEFT's ``lily_A`` or ``lily_B`` module): its
    ``weight`` trains once, whichever layers use it."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def mixed_experts(
    hidden: torch.Tensor, router: torch.Tensor, experts: torch.Tensor, count: int
) -> torch.Tensor:
    """``Σ_e p_e B_e`` (r x out): the experts ((count·r) x out) weighted by the router's
    softmax averaged over every token of ``hidden`` (..., r)."""
    probabilities = F.softmax(F.linear(hidden, router), dim=-1).reshape(-1, count).mean(dim=0)
    return torch.einsum("e,eio->io", probabilities, experts.reshape(count, -1, experts.shape[1]))


class LilyLayer(AdapterLayer):
    """One layer's own router ``lily_router`` (num_B x r) over the `Projector` A and experts B
    it shares with its group."""

    method = "lily"

    def __init__(
        self,
        base: nn.Module,
        lily_a: Projector,
        lily_b: Projector,
        router: torch.Tensor,
        spec: Lily,
        first_of_group: bool,
    ) -> None:
        super().__init__(base)
        self.lily_A = lily_a
        self.lily_B = lily_b
        self.lily_router = nn.Parameter(router)
        self.num_b = spec.num_b
        self.scaling = spec.scaling
        self.first_of_group = first_of_group

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.lily_router.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        hidden = ctx.call(F.linear, h, ctx.attr("lily_A", self.lily_A.weight))
        router = ctx.attr("lily_router", self.lily_router)
        experts = ctx.attr("lily_B", self.lily_B.weight)
        mixed = ctx.call(mixed_experts, hidden, router, experts, self.num_b)
        delta = ctx.call(torch.mul, ctx.call(torch.matmul, hidden, mixed), self.scaling)
        delta = ctx.method("to", delta, self.base.weight.dtype) if cast else delta
        return ctx.call(torch.add, base_out, delta)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "lily_A.weight": self.lily_A.weight,
            "lily_B.weight": self.lily_B.weight,
            "lily_router.weight": self.lily_router,
        }

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """The factors are saved under every layer, as PEFT saves them: copies in all but the
        group's first layer, as a file holds no tensor twice."""
        tensors = self.peft_tensors()
        if self.first_of_group:
            return tensors
        return {
            k: v if k == "lily_router.weight" else v.detach().clone() for k, v in tensors.items()
        }
