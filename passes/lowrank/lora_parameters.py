"""LoRA on raw parameters (PEFT's ``target_parameters``): ``W + scale * ΔW`` with ``ΔW_e = B_e A_e``.

For a mixture-of-experts module whose experts are 3-D parameters (Mixtral's and Qwen3-MoE's
``gate_up_proj`` / ``down_proj``, stored ``(E, out, in)``; gpt-oss's, stored ``(E, in, out)``),
each expert ``e`` gets its own rank-r update: A is ``(E·r, in)`` expert-major, B is
``(out, r·E)`` rank-major, as PEFT's ``ParamWrapper`` keeps them. A 2-D parameter is one
expert: ``W + scale * B A``.

The adapted layer is the module that OWNS the parameters (``model.layers.0.mlp.experts``): the
graph replaces its call by its own forward run with ``W + ΔW`` in place of ``W`` (one adapter:
``baddbmm(W, lhs, rhs, alpha=scale)`` in W's dtype, as PEFT; several: ``W + Σ ΔW``), and the
module stays a leaf of every trace, so a region that falls back to its own forward still calls
the adapted module. PEFT's keys nest in the module's parameter order: with ``gate_up_proj`` and
``down_proj`` both targeted, ``experts.base_layer.lora_A.weight`` is gate_up_proj's and
``experts.lora_A.weight`` down_proj's. As PEFT: no dropout, no ``lora_bias``, no variants
(DoRA...), default or gaussian init only, no mixed batches; merging adds ΔW into the parameter.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.copies import forward_with
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs
from surgeon.targets import matches_suffix, pattern_value
from surgeon.trace import PARAMETER_OWNER

if TYPE_CHECKING:
    from surgeon.passes.lowrank.lora import LoRA

LOW_PRECISION = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
"""Storage dtypes PEFT adds a delta to in the delta's precision (then clamps and casts back)."""


def check_spec(spec: LoRA, lora: type[LoRA]) -> None:
    """PEFT's ParamWrapper refusals, as `SpecError`s naming the field."""
    owner = type(spec).__name__
    names = spec.target_parameters
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise SpecError(
            f"{owner}.target_parameters={names!r}: expected a list of parameter names "
            f"(suffixes of their paths, e.g. 'mlp.experts.gate_up_proj')"
        )
    if not names:
        return
    refusals = {
        "a LoRA variant": type(spec) is not lora,
        "dropout > 0": spec.dropout > 0,
        "lora_bias=True": spec.lora_bias,
        "init other than 'default' or 'gaussian'": spec.init not in ("default", "gaussian"),
    }
    for what, refused in refusals.items():
        if refused:
            raise SpecError(
                f"{owner}.target_parameters does not work with {what} (PEFT's ParamWrapper "
                f"refuses it: its update cannot be factored out of the module's forward)"
            )


def select(spec: LoRA, model: nn.Module, select_modules: Callable[[], list[str]]) -> list[str]:
    """The targeted modules (none with ``targets=()``), then the modules owning a targeted
    parameter; a module both targeted and owning one is refused, as PEFT refuses it."""
    modules = select_modules() if spec.targets else []
    owners = owner_paths(spec, model)
    both = sorted(set(modules) & set(owners))
    if both:
        raise SpecError(
            f"{type(spec).__name__}: {both[0]!r} is targeted by targets and owns a parameter of "
            f"target_parameters; PEFT refuses the pair (set targets=() to adapt only parameters)"
        )
    return [*modules, *owners]


def owner_paths(spec: LoRA, model: nn.Module) -> list[str]:
    """Paths of the modules holding a parameter named by ``target_parameters`` (each name
    matching a parameter path exactly or as a dotted suffix, PEFT's rule)."""
    if not spec.target_parameters:
        return []
    owners: list[str] = []
    for name in spec.target_parameters:
        found = [p for p, m in model.named_modules() if owned_parameters(spec, m, p, (name,))]
        if not found:
            raise SpecError(
                f"{type(spec).__name__}.target_parameters: {name!r} matches no parameter"
            )
        if "" in found:
            raise SpecError(
                f"{type(spec).__name__}.target_parameters: {name!r} is a parameter of the model "
                f"itself; PEFT refuses parameters of the top-level module"
            )
        owners.extend(p for p in found if p not in owners)
    return [p for p, _ in model.named_modules() if p in set(owners)]


def owned_parameters(
    spec: LoRA, module: nn.Module, path: str, names: Sequence[str] | None = None
) -> list[str]:
    """The module's own parameters (in its order) that ``names`` (default: the spec's
    ``target_parameters``) target."""
    names = spec.target_parameters if names is None else names
    return [
        n
        for n, _ in module.named_parameters(recurse=False)
        if any(matches_suffix(f"{path}.{n}" if path else n, t) for t in names)
    ]


def layout(module: nn.Module, name: str, path: str) -> tuple[int, int, int, bool]:
    """``(experts, in, out, swapped)`` of parameter ``name``: a 3-D one is ``(E, in, out)``
    where the module says ``is_transposed`` (gpt-oss), else ``(E, out, in)`` (``swapped``); a
    2-D one is one expert stored ``(out, in)``."""
    shape = getattr(module, name).shape
    if len(shape) == 3:
        swapped = not getattr(module, "is_transposed", False)
        experts, first, second = shape
        return (experts, second, first, True) if swapped else (experts, first, second, False)
    if len(shape) == 2:
        return 1, shape[1], shape[0], False
    raise SpecError(
        f"LoRA.target_parameters: {path}.{name} has {len(shape)} dimensions; only 2-D and 3-D "
        f"parameters are supported (as PEFT)"
    )


class ParameterLoRALayer(AdapterLayer):
    """LoRA factors for each targeted parameter of one module: ``<name>_lora_A`` (E·r x in) and
    ``<name>_lora_B`` (out x r·E)."""

    method = "lora"

    def __init__(self, spec: LoRA, base: nn.Module, path: str, names: Sequence[str]) -> None:
        super().__init__(base)
        self.path = path
        self.names = tuple(names)
        self.shapes: dict[str, tuple[int, int, int, bool]] = {}
        self.scales: dict[str, float] = {}
        for name in self.names:
            weight = getattr(base, name)
            rank = pattern_value(spec.rank_pattern, f"{path}.{name}", spec.rank)
            alpha = pattern_value(spec.alpha_pattern, f"{path}.{name}", spec.alpha)
            experts, fan_in, fan_out, swapped = layout(base, name, path)
            self.shapes[name] = (experts, fan_in, fan_out, swapped)
            self.scales[name] = alpha / (math.sqrt(rank) if spec.rslora else rank)
            factory = adapter_tensor_kwargs(weight)
            a = nn.Parameter(torch.empty(experts * rank, fan_in, **factory))
            b = nn.Parameter(torch.zeros(fan_out, rank * experts, **factory))
            with torch.no_grad():
                if spec.init == "gaussian":
                    nn.init.normal_(a, std=1 / rank)
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            setattr(self, f"{name}_lora_A", a)
            setattr(self, f"{name}_lora_B", b)
        setattr(base, PARAMETER_OWNER, True)  # traces keep it a call, which emit_base replaces

    @property
    def peft_names(self) -> dict[str, str]:
        """The names a load matches (`from_file` renames PEFT's nested keys to them)."""
        return {
            f"{name}_lora_{f}": nested_name(f, depth)
            for depth, name in enumerate(reversed(self.names))
            for f in "AB"
        }

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: one wrapper per parameter, the module's first parameter innermost."""
        return {
            f"{'base_layer.' * depth}lora_{f}.weight": getattr(self, f"{name}_lora_{f}")
            for depth, name in enumerate(reversed(self.names))
            for f in "AB"
        }

    def loraplus_group(self, name: str, param: nn.Parameter) -> str:
        return "B" if name.endswith("_lora_B") else "A"

    def _factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B")

    def _emit_adapter(self, ctx: EmitContext, name: str) -> tuple[fx.Node, fx.Node, float]:
        a, b = self._factors(name)
        return ctx.attr(f"{name}_lora_A", a), ctx.attr(f"{name}_lora_B", b), self.scales[name]

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        layer = ctx.attr("base_layer", self.base)
        params = {}
        for name in self.names:
            weight = ctx.call(getattr, layer, name)
            experts, _, _, swapped = self.shapes[name]
            adapter = self._emit_adapter(ctx, name)
            params[name] = ctx.call(lora_weight, weight, (experts, swapped), adapter)
        rest, kwargs = _other_inputs(self.base, ctx.layer_call)
        return ctx.call(forward_with, layer, x, params, *rest, **kwargs)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        tag = base_out.meta.get("surgeon", {})
        if not tag.get("replaces"):  # a mixed batch: refused as PEFT refuses it
            raise SpecError(
                f"adapter {ctx.adapter!r} adapts parameters of {self.path} (target_parameters): "
                f"mixed batches (adapter_names) are not supported for it (as in PEFT)"
            )
        if tag["adapter"] == ctx.adapter:
            return base_out  # emit_base ran this adapter
        if base_out.target is not forward_with:
            message = (
                f"adapter {ctx.adapter!r} adapts parameters of {self.path}, whose call adapter "
                f"{tag['adapter']!r} replaced: they cannot run together"
            )
            raise SpecError(message)
        self._stack_onto(ctx, base_out)
        return base_out

    def _stack_onto(self, ctx: EmitContext, call: fx.Node) -> None:
        """A second adapter on the same module adds its deltas to the first one's weights."""
        params = dict(call.args[2])
        for name in self.names:
            if name in params:
                weight_node = params[name]
                with ctx.graph.inserting_before(weight_node):
                    adapter = self._emit_adapter(ctx, name)
                weight_node.args = (*weight_node.args, adapter)
            else:
                with ctx.graph.inserting_before(call):
                    layer = ctx.attr("base_layer", self.base)
                    weight = ctx.call(getattr, layer, name)
                    experts, _, _, swapped = self.shapes[name]
                    adapter = self._emit_adapter(ctx, name)
                    params[name] = ctx.call(lora_weight, weight, (experts, swapped), adapter)
        call.args = (*call.args[:2], params, *call.args[3:])

    def delta_weight(self) -> torch.Tensor:
        raise SpecError(
            f"LoRA with target_parameters on {self.path} adapts parameters, not a layer weight; "
            f"it has no single delta to combine (PEFT's add_weighted_adapter refuses it too)"
        )

    def parameter_delta(self, name: str) -> torch.Tensor:
        """What merging adds to parameter ``name`` (its shape; PEFT's dtype rule)."""
        weight = getattr(self.base, name)
        experts, _, _, swapped = self.shapes[name]
        a, b = self._factors(name)
        delta = delta_of(a, b, self.scales[name], experts, swapped, weight.ndim)
        return delta if weight.dtype in LOW_PRECISION else delta.to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        for name in self.names:
            weight = getattr(self.base, name)
            weight.add_(self.parameter_delta(name).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        for name in self.names:
            weight = getattr(self.base, name)
            weight.sub_(self.parameter_delta(name).to(weight.dtype))


NESTED = re.compile(r"\.((?:base_layer\.)+)lora_([AB])\.weight$")
"""PEFT's key of a parameter's factor under nested wrappers (``experts.base_layer.lora_A.weight``)."""


def nested_name(factor: str, depth: int) -> str:
    """The key a load matches for ``factor`` (A or B) of the parameter ``depth`` wrappers deep:
    PEFT's own for the outermost; loads drop ``base_layer.`` from keys, so the others are
    renamed first (`from_file`)."""
    return f"lora_{factor}.weight" if depth == 0 else f"lora_{factor}_nested{depth}.weight"


def from_file(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT file's tensors with nested factors' keys renamed to `nested_name`s."""
    renamed = {}
    for key, value in tensors.items():
        match = NESTED.search(key)
        if match is not None:
            depth = match.group(1).count("base_layer.")
            key = key[: match.start()] + "." + nested_name(match.group(2), depth)
        renamed[key] = value
    return renamed


def _other_inputs(module: nn.Module, call: fx.Node) -> tuple[tuple, dict[str, Any]]:
    """The inputs of the module's ``call`` after the first (the router's choices), positional
    where its forward's signature allows: a leaf region names them after the class's forward,
    which a wrapper (transformers' experts implementations) may take under other names."""
    args = list(call.args[1:]) if call.args else []
    kwargs = dict(call.kwargs) if call.args else dict(list(call.kwargs.items())[1:])
    names = list(inspect.signature(type(module).forward).parameters)[2 + len(args) :]
    for name in names:
        if name not in kwargs:
            break
        args.append(kwargs.pop(name))
    return tuple(args), kwargs


def delta_of(
    a: torch.Tensor, b: torch.Tensor, scale: float, experts: int, swapped: bool, ndim: int
) -> torch.Tensor:
    """``scale * ΔW`` in the parameter's layout: per expert ``B_e A_e`` (``(E, out, in)``
    when ``swapped``, else ``(E, in, out)``); a 2-D parameter ``B A``."""
    if ndim == 2:
        return (b @ a) * scale
    a3 = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
    b3 = b.reshape(b.shape[0], -1, experts)  # (out, r, E)
    spec = "o r e, e r i -> e o i" if swapped else "o r e, e r i -> e i o"
    return torch.einsum(spec, b3, a3) * scale


def lora_weight(
    weight: torch.Tensor, layout: tuple[int, bool], *adapters: tuple[Any, Any, float]
) -> torch.Tensor:
    """``weight`` with the adapters' deltas added, as PEFT's parametrization computes it: one
    adapter on a stack of experts as ``baddbmm`` in the weight's dtype (no full-size delta);
    otherwise ``W + Σ ΔW`` with each delta cast to the weight's dtype (kept in its own precision
    for float8 weights, the sum clamped and cast back)."""
    experts, swapped = layout
    if len(adapters) == 1 and experts > 1 and weight.dtype not in LOW_PRECISION:
        a, b, scale = adapters[0]
        a3 = a.reshape(experts, -1, a.shape[-1])
        b3 = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
        lhs, rhs = (b3, a3) if swapped else (a3.transpose(-2, -1), b3.transpose(-2, -1))
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs.to(weight.dtype), rhs.to(weight.dtype), alpha=scale)
    deltas = [delta_of(a, b, s, experts, swapped, weight.ndim) for a, b, s in adapters]
    if weight.dtype in LOW_PRECISION:
        total = sum(deltas[1:], deltas[0])
        info = torch.finfo(weight.dtype)
        return (weight.to(total.dtype) + total).clamp(info.min, info.max).to(weight.dtype)
    total = sum((d.to(weight.dtype) for d in deltas[1:]), deltas[0].to(weight.dtype))
    return weight + total
