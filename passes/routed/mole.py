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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_finite, check_positive, check_seed
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.passes.routed.experts import (
    EXPERT_NAMES,
    Factors,
    StackedExpertsLayer,
    checked_expert_rank,
    expert_lora,
    expert_where,
    largest_rank,
    layer_factors,
    load_expert_names,
    named_experts,
    read_expert,
    with_folders,
)
from surgeon.peft import INT, NUMBER, REQUIRED, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_MOLE"
"""This project's own PEFT type: PEFT has no MoLE."""

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey(
            "experts",
            "experts",
            REQUIRED,
            EXPERT_NAMES,
            save=lambda spec, paths: list(spec.experts),
            load=load_expert_names,
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
        experts = named_experts(f"{owner}.experts", self.experts, "the seed")
        if len(experts) < 2:
            raise SpecError(
                f"{owner}.experts: got {len(experts)} expert(s), a gate mixes at least 2 (one "
                f"alone is a LoRA)"
            )
        self._set("experts", experts)
        ranks = [
            largest_rank(expert_lora(owner, expert_where(owner, "experts", name, folder), folder))
            for name, folder in with_folders(experts)
        ]
        self._set("expert_rank", checked_expert_rank(owner, self.expert_rank, ranks))
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
        owner = type(self).__name__
        files = {
            name: read_expert(
                owner, expert_where(owner, "experts", name, folder), folder, model, paths
            )
            for name, folder in with_folders(self.experts)
        }
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        layers = {}
        for path in paths:
            base = model.get_submodule(path)
            fan_in, fan_out = in_out_features(base)
            factors = layer_factors(
                self.experts, files, generator, self.expert_rank, path, fan_in, fan_out
            )
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


class MoLELayer(StackedExpertsLayer):
    """One layer's gate (trained) and its experts' factors (frozen buffers), each expert
    zero-padded to rank r."""

    method = "mole"

    def __init__(
        self,
        base: nn.Module,
        factors: Sequence[Factors | None],
        rank: int,
        temperature: float,
    ) -> None:
        super().__init__(base, factors, rank, trained=False)
        fan_out = in_out_features(base)[1]
        self.gate = Gate(len(factors), fan_out, temperature, **adapter_tensor_kwargs(base.weight))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"mole_gate.weight": self.gate.weight, **self.expert_tensors()}

    def emit_weights(self, ctx: EmitContext, h: fx.Node, outputs: fx.Node) -> fx.Node:
        return ctx.module("gate", self.gate, outputs)
