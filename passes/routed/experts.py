"""The trained LoRA experts that routed methods mix (MoLE, Arrow; X-LoRA's type check): named
folders, each read and checked to be a plain LoRA that adapts every targeted layer, its factors
per layer, zero-padded and stacked into one tensor per factor, the batched math that runs them
and the layer that holds them (`StackedExpertsLayer`). Every refusal is a `SpecError` that
names the method, the expert and its folder. No method lives here: the methods pass their own
names and fields."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_int
from surgeon.errors import SpecError
from surgeon.io import CONFIG_NAME, method_from_peft_config, read_adapter
from surgeon.layers import adapter_tensor_kwargs, in_out_features
from surgeon.passes.lowrank.lora import LoRA, is_residual_init
from surgeon.peft import PREFIX, JsonType
from surgeon.spec import MethodSpec

Factors = tuple[torch.Tensor, torch.Tensor, float]
"""One expert on one layer: ``A`` (r x in), ``B`` (out x r) and its scale."""

EXPERT_NAMES = JsonType(
    "a list of expert names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)
)
"""How a file names its experts: their folders are never written."""


def load_expert_names(value: list[str], config: Mapping[str, Any], where: str) -> dict:
    """The file's expert names, each without a folder: the file holds what they gave."""
    if len(set(value)) != len(value):
        raise SpecError(f"{where}: {value!r}: the names repeat")
    return dict.fromkeys(value)


# -- naming the experts ---------------------------------------------------------------------------


def named_experts(where: str, experts: Any, seed_field: str) -> dict[str, str | None]:
    """``experts`` (the field ``where`` names) as a mapping of name to folder or None; listed
    folders take their names. ``seed_field`` is the field an expert without a folder draws from."""
    if isinstance(experts, (str, PathLike)) or not isinstance(experts, (Mapping, Sequence)):
        raise SpecError(
            f"{where}={experts!r}: expected a mapping of expert name to LoRA folder, or a list "
            f"of LoRA folders"
        )
    if not isinstance(experts, Mapping):
        names = [Path(folder).name for folder in experts]
        if len(set(names)) != len(names):
            raise SpecError(
                f"{where}: folders {names} share a name; give a mapping of name to folder"
            )
        experts = dict(zip(names, experts))
    named = {}
    for name, folder in experts.items():
        if not isinstance(name, str) or not name:
            raise SpecError(f"{where}: expert name {name!r} is not a non-empty string")
        if folder is not None and not isinstance(folder, (str, PathLike)):
            raise SpecError(
                f"{where}[{name!r}]={folder!r}: expected a LoRA folder (or None: factors from "
                f"{seed_field} or the adapter's file)"
            )
        named[name] = None if folder is None else str(folder)
    return named


def with_folders(experts: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """The (name, folder) of the experts that have a folder."""
    return [(name, folder) for name, folder in experts.items() if folder is not None]


def expert_where(owner: str, field_name: str, name: str | int, folder: str) -> str:
    """How messages name an expert: ``MoLE.experts['a'] (path/to/a)``."""
    return f"{owner}.{field_name}[{name!r}] ({folder})"


# -- reading a folder -----------------------------------------------------------------------------


def require_lora(where: str, method: MethodSpec) -> LoRA:
    """``method`` if it is plain LoRA (no variant of it): the experts' A and B are LoRA's."""
    if type(method) is not LoRA:
        raise SpecError(f"{where}: holds a {method.name} adapter, not a LoRA")
    return method


def expert_lora(owner: str, where: str, folder: str) -> LoRA:
    """The LoRA spec of the expert in ``folder``, from its config alone; `SpecError` (prefixed
    ``where``) for anything that is not a plain LoRA whose factors ``owner`` can run alone."""
    config_path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise SpecError(f"{where}: no such folder (expected a LoRA adapter folder)")
    if not config_path.is_file():
        raise SpecError(f"{where}: no {CONFIG_NAME} there; is it a LoRA adapter folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{where}: malformed {CONFIG_NAME} ({err})") from None
    try:
        method = method_from_peft_config(config, str(config_path))
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None
    lora = require_lora(where, method)
    refused = {
        "a trained base bias (bias)": lora.bias != "none",
        "a bias on B (lora_bias)": lora.lora_bias,
        "modules to save": bool(lora.modules_to_save),
        f"init={lora.init!r}, whose factors pair with a rewritten base weight": is_residual_init(
            lora.init
        ),
    }
    for what, present in refused.items():
        if present:
            raise SpecError(f"{where}: the LoRA has {what}, which {owner}'s experts cannot carry")
    return lora


def largest_rank(lora: LoRA) -> int:
    """The largest rank the LoRA has on any layer (its rank pattern included)."""
    return max([lora.rank, *lora.rank_pattern.values()])


def checked_expert_rank(owner: str, expert_rank: int | None, ranks: Sequence[int]) -> int:
    """The rank the experts are stacked at: ``expert_rank``, or the folders' largest when it
    is None; never below it (a file without folders needs it given)."""
    if expert_rank is None:
        if not ranks:
            raise SpecError(
                f"{owner}.expert_rank: needed when no expert has a folder (the rank the experts' "
                f"factors are stored at)"
            )
        expert_rank = max(ranks)
    check_int(owner, "expert_rank", expert_rank)
    if ranks and expert_rank < max(ranks):
        raise SpecError(
            f"{owner}.expert_rank={expert_rank}: the experts' largest rank is {max(ranks)}; leave "
            f"it out to take that"
        )
    return expert_rank


@dataclass(frozen=True)
class ExpertFile:
    """An expert's LoRA spec and its file's tensors (by PEFT key); ``where`` names it."""

    where: str
    lora: LoRA
    tensors: Mapping[str, torch.Tensor]

    def factors(self, path: str, fan_in: int, fan_out: int) -> Factors:
        """The expert's ``A``, ``B`` and scale on ``path``, checked to fit its shape."""
        rank, scale = self.lora.rank_and_scale(path)
        found = {}
        for factor, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
            key = f"{PREFIX}{path}.{factor}.weight"
            tensor = self.tensors.get(key)
            if tensor is None:
                raise SpecError(f"{self.where}: no {key} in its file")
            if tuple(tensor.shape) != shape:
                raise SpecError(
                    f"{self.where}: {key} has shape {tuple(tensor.shape)}, {path} needs {shape} "
                    f"(was the LoRA trained on another model?)"
                )
            found[factor] = tensor
        return found["lora_A"], found["lora_B"], scale


def _listed(paths: Sequence[str]) -> str:
    return f"{', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}"


def read_expert(
    owner: str, where: str, folder: str, model: nn.Module, paths: Sequence[str]
) -> ExpertFile:
    """The expert's spec and tensors, checked to adapt every layer of ``paths``; layers it adapts
    besides them are left out, with a warning."""
    lora = expert_lora(owner, where, folder)
    try:
        _, tensors = read_adapter(Path(folder))
        adapted = lora.select(model)
    except (SpecError, FileNotFoundError) as err:
        raise SpecError(f"{where}: {err}") from None
    missing = [p for p in paths if p not in adapted]
    if missing:
        raise SpecError(
            f"{where}: does not adapt {_listed(missing)}, which {owner} targets; every expert "
            f"must adapt every targeted layer"
        )
    unused = [p for p in adapted if p not in paths]
    if unused:
        warnings.warn(
            f"{where}: its layers {_listed(unused)} are not among {owner}'s targets and are left "
            f"out",
            stacklevel=4,
        )
    return ExpertFile(where, lora, tensors)


# -- factors per layer ----------------------------------------------------------------------------


def drawn_factors(generator: torch.Generator, rank: int, fan_in: int, fan_out: int) -> Factors:
    """A random expert for examples and tests: ``A`` ~ N(0, 1/in), ``B`` ~ N(0, 1/r), scale 1."""
    a = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
    b = torch.randn(fan_out, rank, generator=generator) / math.sqrt(rank)
    return a, b, 1.0


def layer_factors(
    experts: Mapping[str, str | None],
    files: Mapping[str, ExpertFile],
    generator: torch.Generator | None,
    rank: int,
    path: str,
    fan_in: int,
    fan_out: int,
) -> list[Factors | None]:
    """Each expert's factors on ``path``, in order: from its file (``files``, by name) when it
    has a folder, else drawn from ``generator`` at ``rank``, else None (the adapter's file
    fills it)."""
    factors: list[Factors | None] = []
    for name, folder in experts.items():
        if folder is not None:
            factors.append(files[name].factors(path, fan_in, fan_out))
        elif generator is not None:
            factors.append(drawn_factors(generator, rank, fan_in, fan_out))
        else:
            factors.append(None)
    return factors


def stacked(
    factors: Sequence[Factors | None], rank: int, fan_in: int, fan_out: int, **factory: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' ``A`` (N x rank x in), ``B`` (N x out x rank) and scales (N), each expert
    zero-padded to ``rank`` (zero rows add nothing); an expert without factors stays zero."""
    experts = len(factors)
    a = torch.zeros(experts, rank, fan_in, **factory)
    b = torch.zeros(experts, fan_out, rank, **factory)
    scales = torch.zeros(experts, **factory)
    with torch.no_grad():
        for i, expert in enumerate(factors):
            if expert is not None:
                expert_a, expert_b, scale = expert
                a[i, : expert_a.shape[0]] = expert_a.to(**factory)
                b[i, :, : expert_b.shape[1]] = expert_b.to(**factory)
                scales[i] = scale
    return a, b, scales


# -- the math, as plain functions the graphs call ---------------------------------------------


def expert_outputs(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Every expert's ``s_i B_i A_i x``, ``(..., N, out)``: one matmul through all the A
    factors, the scale on the rank-sized middle, one batched product through the B factors."""
    experts, rank, fan_in = a.shape
    middle = F.linear(x, a.reshape(experts * rank, fan_in)).unflatten(-1, (experts, rank))
    return torch.einsum("...nr,nor->...no", middle * scales[:, None], b)


def mix(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i ε_i E_i``: the experts' outputs ``(..., N, out)`` weighed by ``(..., N)``."""
    return torch.einsum("...no,...n->...o", outputs, weights)


class StackedExpertsLayer(AdapterLayer):
    """One layer's experts, stacked as `stacked` lays them out: ``<method>_experts_A`` (N x r x
    in), ``<method>_experts_B`` (N x out x r) and ``<method>_expert_scales`` (N), in float32 over
    a half-precision base. The update ``Σ_i w_i s_i B_i A_i x`` mixes them with the weights
    `emit_weights` gives (a router on the input, a gate on the experts' outputs)."""

    def __init__(
        self, base: nn.Module, factors: Sequence[Factors | None], rank: int, trained: bool
    ) -> None:
        super().__init__(base)
        fan_in, fan_out = in_out_features(base)
        a, b, scales = stacked(factors, rank, fan_in, fan_out, **adapter_tensor_kwargs(base.weight))
        for name, value in (("experts_A", a), ("experts_B", b)):
            if trained:
                setattr(self, f"{self.method}_{name}", nn.Parameter(value))
            else:
                self.register_buffer(f"{self.method}_{name}", value)
        self.register_buffer(f"{self.method}_expert_scales", scales)

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        names = ("experts_A", "experts_B", "expert_scales")
        return {f"{self.method}_{n}": getattr(self, f"{self.method}_{n}") for n in names}

    def emit_weights(self, ctx: EmitContext, h: fx.Node, outputs: fx.Node) -> fx.Node:
        """Each token's weights ``(..., N)`` over the experts, from the input ``h`` (in the
        experts' dtype) or their ``outputs`` ``(..., N, out)``."""
        raise NotImplementedError

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        tensors = self.expert_tensors()
        dtype = next(iter(tensors.values())).dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        outputs = ctx.call(
            expert_outputs, h, *(ctx.attr(name, value) for name, value in tensors.items())
        )
        weights = self.emit_weights(ctx, h, outputs)
        out = ctx.call(torch.add, base_out, ctx.call(mix, outputs, weights))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out
