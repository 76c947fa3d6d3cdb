"""MoLE: a learned gate per layer over trained, frozen LoRA experts (Wu, Huang, Wei, "Mixture
of LoRA Experts", ICLR 2024, arXiv 2404.13628, §3).

``W0 x + Σ_i ε_i(x) E_i(x)`` with ``E_i(x) = s_i B_i A_i x`` the output of expert ``i`` (a LoRA
trained before, its scale ``s_i = alpha/r``, or ``alpha/√r`` with rsLoRA) and ``ε(x)`` the
layer's gate: the experts' outputs concatenated (``N·out`` features), normalised (a layer norm
without affine parameters: the projection that follows learns any scale), projected to ``N``
logits by the gate's weight ``e`` (``N x N·out``) and turned into weights by a softmax at
temperature ``τ``: ``ε(x) = softmax(e · norm(E_1(x) ⊕ ... ⊕ E_N(x)) / τ)``. Each token (each
position of a sequence) gets its own weights: the paper flattens the concatenation over the
sequence too (``ξ = N·L·d``: one set of weights per sequence, its length ``L`` fixed by ``e``'s
shape); gating per token keeps any length usable, with the same gate at every position. The gate's weight starts at zero, so a fresh MoLE
mixes its experts evenly (``ε_i = 1/N``); only the gates train, the experts' factors are frozen.

The paper's gate-balancing loss (``L_balance = -log Π_i q_i``, ``q_i`` expert ``i``'s mean
weight over the gated layers) is `MoLE.loss_term`, scaled by ``balance_weight`` (0: off): the
mean runs over every token of the last training forward and then over the layers.

Experts: ``experts`` maps a name to a LoRA adapter folder (PEFT- or surgeon-saved, read by
`surgeon.io`: safetensors only, never pickles), or lists folders (named after them). A folder
that is not a plain LoRA (DoRA, a trained base bias, B's bias, modules to save, PiSSA/OLoRA
factors that pair with a rewritten base), or that does not adapt a targeted layer, or whose
factors do not fit its shape, is a `SpecError` naming the expert and its folder. An expert's
dropout is not applied (it is frozen here). An expert named without a folder (``None``) gets
its factors from ``seed`` (normal draws, for examples and tests: one generator, layer after
layer, expert after expert, ``A`` ~ N(0, 1/in) then ``B`` ~ N(0, 1/r), scale 1), or, without a
seed, from the adapter's own file on loading.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_MOLE"`` (PEFT refuses
it). The file is self-contained: per layer it holds the gate ``mole_gate.weight`` and the
experts' frozen factors, stacked and zero-padded to ``expert_rank`` (the largest expert rank;
zero rows add nothing): ``mole_experts_A`` (N x r x in), ``mole_experts_B`` (N x out x r) and
``mole_expert_scales`` (N). The config holds the experts' names (``experts``), never their
folders, ``expert_rank``, ``temperature``, ``balance_loss_weight`` and the target selection.

Not mergeable: the gates weigh the experts per token (`MoLE.merge_refusal`).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (the paper gates the LoRAs of transformer
projections); others are refused.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_finite, check_int, check_positive, check_seed
from surgeon.errors import SpecError
from surgeon.io import CONFIG_NAME, method_from_peft_config, read_adapter
from surgeon.layers import adapter_dtype, in_out_features, layer_kind
from surgeon.passes.lowrank.lora import LoRA, is_residual_init
from surgeon.peft import (
    INT,
    NUMBER,
    PREFIX,
    REQUIRED,
    JsonType,
    PeftFormat,
    PeftKey,
    selection_keys,
)
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_MOLE"
"""This project's own PEFT type: PEFT has no MoLE."""

EXPERT_NAMES = JsonType(
    "a list of expert names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)
)


def _load_expert_names(value: list[str], config: Mapping[str, Any], where: str) -> dict:
    """The file's expert names, each without a folder: its factors are in the file."""
    if len(set(value)) != len(value):
        raise SpecError(f"{where}: experts={value!r}: the names repeat")
    return dict.fromkeys(value)


PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey(
            "experts",
            "experts",
            REQUIRED,
            EXPERT_NAMES,
            save=lambda spec, paths: list(spec.experts),
            load=_load_expert_names,
            why_required="the experts' names say how many the file's factors stack",
        ),
        PeftKey("expert_rank", "expert_rank", REQUIRED, INT),
        *selection_keys(),
        PeftKey("temperature", "temperature", 1.0, NUMBER),
        PeftKey("balance_loss_weight", "balance_weight", 0.0, NUMBER),
    ),
)


@dataclass(frozen=True)
class MoLE(MethodSpec):
    """Mixture of LoRA Experts: a trained gate per layer over frozen, trained LoRAs."""

    name = "mole"
    peft_format = PEFT_FORMAT
    merge_refusal = (
        "MoLE's gates weigh its experts anew for every token, so there is no single weight "
        "update to fold in"
    )

    experts: Mapping[str, str | None] | Sequence[str] = field(default_factory=dict)
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    expert_rank: int | None = None
    temperature: float = 1.0
    balance_weight: float = 0.0
    seed: int | None = None
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        experts = _named_experts(owner, self.experts)
        self._set("experts", experts)
        ranks = [_largest_rank(expert_lora(name, folder)) for name, folder in _folders(experts)]
        if self.expert_rank is None:
            if not ranks:
                raise SpecError(
                    f"{owner}.expert_rank: needed when no expert has a folder (the rank the "
                    f"experts' factors are stored at)"
                )
            self._set("expert_rank", max(ranks))
        check_int(owner, "expert_rank", self.expert_rank)
        if ranks and self.expert_rank < max(ranks):
            raise SpecError(
                f"{owner}.expert_rank={self.expert_rank}: the experts' largest rank is "
                f"{max(ranks)}; leave it out to take that"
            )
        check_positive(owner, "temperature", self.temperature)
        check_finite(owner, "balance_weight", self.balance_weight)
        if self.balance_weight < 0:
            raise SpecError(f"{owner}.balance_weight={self.balance_weight!r}: expected >= 0")
        if self.seed is not None:
            check_seed(owner, "seed", self.seed)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # experts drawn from a seed (the suite has no LoRA folders); the card builds folders
        return {
            "default": cls(
                experts=dict.fromkeys(("a", "b", "c")), expert_rank=4, seed=0, targets=targets
            ),
            "sharp-balanced": cls(
                experts=dict.fromkeys(("a", "b")),
                expert_rank=2,
                seed=1,
                temperature=0.5,
                balance_weight=0.1,
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return False  # the experts are trained: even evenly mixed they change the outputs

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, MoLELayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        files = {
            name: _expert_file(name, folder, model, paths)
            for name, folder in _folders(self.experts)
        }
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        layers = {}
        for path, base in bases.items():
            fan_in, fan_out = in_out_features(base)
            factors = []
            for name, folder in self.experts.items():
                if folder is not None:
                    factors.append(_file_factors(name, folder, files[name], path, fan_in, fan_out))
                elif generator is not None:
                    factors.append(_drawn_factors(generator, self.expert_rank, fan_in, fan_out))
                else:
                    factors.append(None)  # the adapter's file fills it
            layers[path] = MoLELayer(base, factors, self.expert_rank, self.temperature)
        return layers

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """``balance_weight · -Σ_i log q_i``: ``q_i`` expert ``i``'s weight averaged over the
        tokens of the last training forward, then over the layers (the paper's ``-log Π q_i``,
        smallest when the gates use every expert alike)."""
        if self.balance_weight == 0:
            return None
        shares = [
            weights.reshape(-1, weights.shape[-1]).float().mean(0)
            for layer in layers.values()
            if isinstance(layer, MoLELayer) and (weights := layer.gate.take_weights()) is not None
        ]
        if not shares:
            return None  # no training forward since the last term
        mean_share = torch.stack(shares).mean(0)
        return -self.balance_weight * mean_share.log().sum()


# -- the experts ----------------------------------------------------------------------------------


def _named_experts(owner: str, experts: Any) -> dict[str, str | None]:
    """``experts`` as a mapping of name to folder (or None); listed folders take their names."""
    if isinstance(experts, (str, PathLike)) or not isinstance(experts, (Mapping, Sequence)):
        raise SpecError(
            f"{owner}.experts={experts!r}: expected a mapping of expert name to LoRA folder, or "
            f"a list of LoRA folders"
        )
    if not isinstance(experts, Mapping):
        names = [Path(folder).name for folder in experts]
        if len(set(names)) != len(names):
            raise SpecError(
                f"{owner}.experts: folders {names} share a name; give a mapping of name to folder"
            )
        experts = dict(zip(names, experts))
    named = {}
    for name, folder in experts.items():
        if not isinstance(name, str) or not name:
            raise SpecError(f"{owner}.experts: expert name {name!r} is not a non-empty string")
        if folder is not None and not isinstance(folder, (str, PathLike)):
            raise SpecError(
                f"{owner}.experts[{name!r}]={folder!r}: expected a LoRA folder (or None: factors "
                f"from the seed or the adapter's file)"
            )
        named[name] = None if folder is None else str(folder)
    if len(named) < 2:
        raise SpecError(
            f"{owner}.experts: got {len(named)} expert(s), a gate mixes at least 2 (one alone "
            f"is a LoRA)"
        )
    return named


def _folders(experts: Mapping[str, str | None]) -> list[tuple[str, str]]:
    return [(name, folder) for name, folder in experts.items() if folder is not None]


def expert_lora(name: str, folder: str) -> LoRA:
    """Expert ``name``'s LoRA spec, read from its folder's config; `SpecError` naming both for
    anything that is not a plain LoRA whose factors MoLE can run alone."""
    where = f"MoLE.experts[{name!r}] ({folder})"
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
        lora = method_from_peft_config(config, str(config_path))
    except SpecError as err:
        raise SpecError(f"{where}: {err}") from None
    if type(lora) is not LoRA:
        raise SpecError(f"{where}: holds a {lora.name} adapter, not a LoRA")
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
            raise SpecError(f"{where}: the LoRA has {what}, which MoLE's experts cannot carry")
    return lora


def _largest_rank(lora: LoRA) -> int:
    return max([lora.rank, *lora.rank_pattern.values()])


@dataclass(frozen=True)
class ExpertFile:
    """An expert's LoRA spec and its file's tensors (by PEFT key)."""

    lora: LoRA
    tensors: Mapping[str, torch.Tensor]


def _expert_file(name: str, folder: str, model: nn.Module, paths: Sequence[str]) -> ExpertFile:
    """Expert ``name``'s spec and tensors, checked to adapt every layer of ``paths``; layers it
    adapts besides them are left out, with a warning."""
    where = f"MoLE.experts[{name!r}] ({folder})"
    lora = expert_lora(name, folder)
    try:
        _, tensors = read_adapter(Path(folder))
        adapted = lora.select(model)
    except (SpecError, FileNotFoundError) as err:
        raise SpecError(f"{where}: {err}") from None
    missing = [p for p in paths if p not in adapted]
    if missing:
        raise SpecError(
            f"{where}: does not adapt {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            f", which MoLE targets; every expert must adapt every targeted layer"
        )
    unused = [p for p in adapted if p not in paths]
    if unused:
        warnings.warn(
            f"{where}: its layers {', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''} "
            f"are not among MoLE's targets and are left out",
            stacklevel=4,
        )
    return ExpertFile(lora, tensors)


Factors = tuple[torch.Tensor, torch.Tensor, float]
"""One expert on one layer: ``A`` (r x in), ``B`` (out x r) and its scale."""


def _file_factors(
    name: str, folder: str, expert: ExpertFile, path: str, fan_in: int, fan_out: int
) -> Factors:
    rank, scale = expert.lora.rank_and_scale(path)
    found = {}
    for factor, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
        key = f"{PREFIX}{path}.{factor}.weight"
        tensor = expert.tensors.get(key)
        if tensor is None:
            raise SpecError(f"MoLE.experts[{name!r}] ({folder}): no {key} in its file")
        if tuple(tensor.shape) != shape:
            raise SpecError(
                f"MoLE.experts[{name!r}] ({folder}): {key} has shape {tuple(tensor.shape)}, "
                f"{path} needs {shape} (was the LoRA trained on another model?)"
            )
        found[factor] = tensor
    return found["lora_A"], found["lora_B"], scale


def _drawn_factors(generator: torch.Generator, rank: int, fan_in: int, fan_out: int) -> Factors:
    """A random expert for examples and tests: ``A`` ~ N(0, 1/in), ``B`` ~ N(0, 1/r), scale 1."""
    a = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
    b = torch.randn(fan_out, rank, generator=generator) / math.sqrt(rank)
    return a, b, 1.0


# -- one layer ------------------------------------------------------------------------------------


class Gate(nn.Module):
    """The layer's gate: ``softmax(e · layer_norm(E_1 ⊕ ... ⊕ E_N) / τ)`` per token, from the
    experts' outputs ``(..., N, out)`` to their weights ``(..., N)``. While training it keeps
    its last weights (with their graph) for the balancing loss."""

    def __init__(self, experts: int, fan_out: int, temperature: float, **factory: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, experts * fan_out, **factory))
        self.temperature = temperature
        self._weights: torch.Tensor | None = None

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        joined = outputs.flatten(-2)
        normed = F.layer_norm(joined, joined.shape[-1:])
        weights = torch.softmax(F.linear(normed, self.weight) / self.temperature, dim=-1)
        if self.training and torch.is_grad_enabled():
            self._weights = weights
        return weights

    def take_weights(self) -> torch.Tensor | None:
        """The weights of the last training forward, forgotten here (each counts once)."""
        weights, self._weights = self._weights, None
        return weights


class MoLELayer(AdapterLayer):
    """One layer's gate (trained) and its experts' factors (frozen buffers), stacked: ``A``
    (N x r x in), ``B`` (N x out x r), scales (N), each expert zero-padded to rank r. Float32
    over a half-precision base."""

    method = "mole"

    def __init__(
        self,
        base: nn.Module,
        factors: Sequence[Factors | None],
        rank: int,
        temperature: float,
    ) -> None:
        super().__init__(base)
        weight = base.weight
        factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
        fan_in, fan_out = in_out_features(base)
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
        self.register_buffer("mole_experts_A", a)
        self.register_buffer("mole_experts_B", b)
        self.register_buffer("mole_expert_scales", scales)
        self.gate = Gate(experts, fan_out, temperature, **factory)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mole_gate.weight": self.gate.weight,
            "mole_experts_A": self.mole_experts_A,
            "mole_experts_B": self.mole_experts_B,
            "mole_expert_scales": self.mole_expert_scales,
        }

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.gate.weight.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        outputs = ctx.call(
            expert_outputs,
            h,
            ctx.attr("mole_experts_A", self.mole_experts_A),
            ctx.attr("mole_experts_B", self.mole_experts_B),
            ctx.attr("mole_expert_scales", self.mole_expert_scales),
        )
        weights = ctx.module("gate", self.gate, outputs)
        out = ctx.call(torch.add, base_out, ctx.call(mix, outputs, weights))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out


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
