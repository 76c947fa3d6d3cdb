"""Arrow: zero-shot routing over a library of trained LoRA experts by their SVD prototypes
(Ostapenko et al., "Towards Modular LLMs by Building and Reusing a Library of LoRAs", ICML 2024,
arXiv 2405.11157, §4), with GenKnowSub (Bagherifard et al., "GenKnowSub: Improving Modularity and
Reusability of LLMs through General Knowledge Subtraction", ACL 2025 short 54), as PEFT 0.21 runs
them (LoraConfig's ``arrow_config``, ``create_arrow_model``).

``W0 x + Σ_i c_i(x) s_i B_i A_i x`` per token, ``c(x) = softmax(top_k(|p_i · x|) / τ)``: the
scores of the experts outside the token's ``top_k`` are -inf (weight 0). ``p_i``, expert ``i``'s
prototype, is the top right-singular vector of ``ΔW_i = B_i A_i`` (the sign does not matter:
the score is an absolute value), found as PEFT finds it: power iteration in float32 on
``v ↦ A_iᵀ (B_iᵀ B_i) A_i v``, 15 steps from a normal draw ``v0`` (normalised by ``‖v‖ + 1e-8``
at each step), cast to the factors' dtype. ``v0`` comes from a generator seeded with ``seed``
(PEFT's ``rng_seed``; a fresh one for every expert on every layer, on the weight's device), or,
without a seed, from torch's global generator, layer after layer and expert after expert, once
when the adapter is built (PEFT draws at its first forward: unseeded runs agree with PEFT's to
the power iteration's convergence only, as two PEFT runs do). ``s_i`` is the expert's own
scale (``alpha/r``, ``alpha/√r`` with rsLoRA, its rank and alpha patterns).

GenKnowSub (when ``general_experts`` are given): before the prototypes are found, every task
expert's ``A`` and ``B`` lose the mean of the general experts' ``A`` and ``B`` (factor by factor,
as PEFT subtracts them; the general experts' scales play no part). The prototypes are found
once, when the adapter is built, as PEFT finds them at its first forward; training the experts
(``train_experts``; PEFT keeps its experts frozen) leaves them as they were.

Experts: ``task_experts`` and ``general_experts`` map names to LoRA adapter folders (PEFT- or
surgeon-saved, read by `surgeon.io`: safetensors only), or list folders (named after them).
Each must be a plain LoRA adapting every targeted layer, all at the same rank on a layer (PEFT
stacks them); anything else is a `SpecError` naming the expert and its folder. `Arrow.from_folders`
is ``create_arrow_model``: the targets are those of the first task expert. An expert named
without a folder (``None``) gets its factors from ``expert_seed`` (examples and tests: one
generator, layer after layer, the task experts then the general ones, ``A`` ~ N(0, 1/in), ``B``
~ N(0, 1/r), scale 1), or, without one, from the adapter's own file.

Files: PEFT saves an Arrow model as one folder per expert plus an ``arrow_router`` folder (type
``LORA`` with ``arrow_config``) that PEFT 0.21 cannot load back (``arrow_config``'s expert names
are not init fields and are dropped on reading, then used); surgeon refuses such a router file
as LoRA. Ours is PEFT's layout under this project's own type ``"peft_type": "SURGEON_ARROW"``
(PEFT refuses it), self-contained: per layer the task experts' factors after GenKnowSub,
stacked and zero-padded to ``expert_rank`` (``arrow_experts_A`` N x r x in, ``arrow_experts_B``
N x out x r), their scales (``arrow_expert_scales``) and the prototypes (``arrow_prototypes``
N x in), so a load routes exactly as the saved adapter did. The config names the experts (never
their folders).

Not mergeable: the experts are weighed per token (`Arrow.merge_refusal`; PEFT refuses too).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (PEFT's Arrow variant is on its Linear
layers, which carry Conv1D); others are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.adapter import EmitContext
from surgeon.checks import check_bool, check_int, check_positive, check_seed
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
)
from surgeon.peft import BOOL, INT, NUMBER, REQUIRED, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_ARROW"
"""This project's own PEFT type: PEFT cannot load its own Arrow router back."""
POWER_STEPS = 15
"""PEFT's power-iteration steps for a prototype."""
POWER_EPS = 1e-8
"""PEFT's guard in the normalisations of the power iteration."""

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey(
            "task_experts",
            "task_experts",
            REQUIRED,
            EXPERT_NAMES,
            save=lambda spec, paths: list(spec.task_experts),
            load=load_expert_names,
            why_required="the task experts' names say how many the file's factors stack",
        ),
        PeftKey(
            "general_experts",
            "general_experts",
            [],
            EXPERT_NAMES,
            save=lambda spec, paths: list(spec.general_experts),
            load=load_expert_names,
        ),
        PeftKey("expert_rank", "expert_rank", REQUIRED, INT),
        *selection_keys(),
        PeftKey("top_k", "top_k", 3, INT),
        PeftKey("router_temperature", "temperature", 1.0, NUMBER),
        PeftKey("rng_seed", "seed", None, INT.optional()),
        PeftKey("train_experts", "train_experts", False, BOOL),
    ),
)


@dataclass(frozen=True)
class Arrow(MethodSpec):
    """Arrow routing: each token mixes the ``top_k`` trained LoRA experts whose prototypes it
    aligns with best; GenKnowSub first when general experts are given."""

    name = "arrow"
    peft_format = PEFT_FORMAT
    merge_refusal = (
        "Arrow routes every token to its own experts, so there is no single weight update to "
        "fold in"
    )

    task_experts: Mapping[str, str | None] | Sequence[str] = field(default_factory=dict)
    general_experts: Mapping[str, str | None] | Sequence[str] = field(default_factory=dict)
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    top_k: int = 3
    temperature: float = 1.0
    seed: int | None = None
    expert_rank: int | None = None
    expert_seed: int | None = None
    train_experts: bool = False
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    @classmethod
    def from_folders(
        cls,
        task_experts: Mapping[str, str] | Sequence[str],
        general_experts: Mapping[str, str] | Sequence[str] = (),
        **options: Any,
    ) -> Arrow:
        """PEFT's ``create_arrow_model``: Arrow over the LoRAs in ``task_experts`` (GenKnowSub
        with ``general_experts``), on the layers the first task expert adapts (its targets,
        exclusions and layers) unless ``options`` name them."""
        task = _named("Arrow", "task_experts", task_experts, 1)
        first_name, first_folder = next(iter(task.items()))
        where = expert_where("Arrow", "task_experts", first_name, first_folder)
        lora = expert_lora("Arrow", where, first_folder)
        chosen = {"targets": lora.targets, "exclude": lora.exclude, "layers": lora.layers}
        return cls(
            task_experts=task_experts, general_experts=general_experts, **{**chosen, **options}
        )

    def validate(self) -> None:
        owner = type(self).__name__
        task = _named(owner, "task_experts", self.task_experts, 1)
        general = _named(owner, "general_experts", self.general_experts, 0)
        shared = sorted(set(task) & set(general))
        if shared:
            raise SpecError(f"{owner}: {shared} name both task and general experts")
        self._set("task_experts", task)
        self._set("general_experts", general)
        check_int(owner, "top_k", self.top_k)
        if self.top_k > len(task):
            raise SpecError(
                f"{owner}.top_k={self.top_k}: there are only {len(task)} task experts to route "
                f"to (PEFT's default top_k is 3)"
            )
        check_positive(owner, "temperature", self.temperature)
        for name in ("seed", "expert_seed"):
            if getattr(self, name) is not None:
                check_seed(owner, name, getattr(self, name))
        check_bool(owner, "train_experts", self.train_experts)
        ranks = [
            largest_rank(expert_lora(owner, where, folder)) for where, _, folder in self._folders()
        ]
        self._set("expert_rank", checked_expert_rank(owner, self.expert_rank, ranks))

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # experts drawn from a seed (the suite has no LoRA folders); the card builds folders
        return {
            "default": cls(
                task_experts=dict.fromkeys(("a", "b", "c")),
                top_k=2,
                seed=0,
                expert_rank=3,
                expert_seed=0,
                train_experts=True,
                targets=targets,
            ),
            "gks-sharp-top1": cls(
                task_experts=dict.fromkeys(("a", "b", "c")),
                general_experts=dict.fromkeys(("g", "h")),
                top_k=1,
                temperature=0.5,
                expert_rank=2,
                expert_seed=1,
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return False  # the experts are trained LoRAs: they change the outputs from the start

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def _folders(self) -> list[tuple[str, str, str]]:
        """(where, name, folder) of every expert with a folder, the task experts first."""
        owner = type(self).__name__
        return [
            (expert_where(owner, field_name, name, folder), name, folder)
            for field_name in ("task_experts", "general_experts")
            for name, folder in getattr(self, field_name).items()
            if folder is not None
        ]

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, ArrowLayer]:
        owner = type(self).__name__
        files = {
            name: read_expert(owner, where, folder, model, paths)
            for where, name, folder in self._folders()
        }
        generator = (
            torch.Generator().manual_seed(self.expert_seed)
            if self.expert_seed is not None
            else None
        )
        layers = {}
        for path in paths:
            base = model.get_submodule(path)
            fan_in, fan_out = in_out_features(base)
            factors = {  # one generator: the task experts' draws, then the general ones'
                kind: layer_factors(
                    experts, files, generator, self.expert_rank, path, fan_in, fan_out
                )
                for kind, experts in (
                    ("task", self.task_experts),
                    ("general", self.general_experts),
                )
            }
            _check_factors(self, path, factors)
            layers[path] = ArrowLayer(base, factors["task"], factors["general"], self)
        return layers


# -- the experts ----------------------------------------------------------------------------------


def _named(owner: str, field_name: str, experts: Any, least: int) -> dict[str, str | None]:
    """``experts`` as a mapping of name to folder or None, at least ``least`` of them."""
    named = named_experts(f"{owner}.{field_name}", experts, "expert_seed")
    if len(named) < least:
        raise SpecError(f"{owner}.{field_name}: expected at least {least} expert(s), got none")
    return named


def _check_factors(spec: Arrow, path: str, factors: Mapping[str, list[Factors | None]]) -> None:
    """Either every expert has factors (a folder or ``expert_seed``) or none has (the adapter's
    file holds what they gave: GenKnowSub is never skipped for want of a general expert), and
    all have one rank on ``path`` (PEFT stacks the task experts and averages the general ones
    factor by factor)."""
    named = {
        name: found
        for kind, experts in (("task", spec.task_experts), ("general", spec.general_experts))
        for name, found in zip(experts, factors[kind])
    }
    missing = [name for name, found in named.items() if found is None]
    if missing and len(missing) < len(named):
        raise SpecError(
            f"Arrow: experts {missing} have neither a folder nor an expert_seed to draw from, "
            f"while the others have factors; give every expert a folder"
        )
    ranks = {name: found[0].shape[0] for name, found in named.items() if found is not None}
    if len(set(ranks.values())) > 1:
        raise SpecError(
            f"Arrow: the experts' ranks on {path} differ ({ranks}); Arrow stacks experts of one "
            f"rank (PEFT refuses a rank mismatch too)"
        )


# -- the prototypes ---------------------------------------------------------------------------


def top_right_singular_vector(a: torch.Tensor, b: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The top right-singular vector of ``B A`` (float32, up to its sign) by PEFT's power
    iteration on ``Aᵀ (Bᵀ B) A``, never forming ``B A``; its start drawn from a generator seeded
    with ``seed`` on ``a``'s device, or from torch's global one."""
    a32, b32 = a.float(), b.float()
    middle = b32.T @ b32
    generator = None
    if seed is not None:
        generator = torch.Generator(device=a32.device.type).manual_seed(seed)
    v = torch.randn(a32.shape[1], dtype=torch.float32, device=a32.device, generator=generator)
    v = v / (v.norm() + POWER_EPS)
    for _ in range(POWER_STEPS):
        w = a32.T @ (middle @ (a32 @ v))
        v = w / (w.norm() + POWER_EPS)
    return v


def _subtracted(task: Sequence[Factors], general: Sequence[Factors]) -> list[Factors]:
    """GenKnowSub: each task expert's ``A`` and ``B`` less the general experts' mean ``A`` and
    ``B`` (no general experts: the task experts as they are)."""
    if not general:
        return list(task)
    mean_a = torch.stack([a for a, _, _ in general]).mean(0)
    mean_b = torch.stack([b for _, b, _ in general]).mean(0)
    return [(a - mean_a, b - mean_b, scale) for a, b, scale in task]


# -- one layer ------------------------------------------------------------------------------------


def route(
    x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float
) -> torch.Tensor:
    """The experts' weights per token ``(..., N)``: ``|p_i · x|`` for each prototype, all but
    the ``top_k`` largest set to -inf, softmax at ``temperature``."""
    scores = (x @ prototypes.T).abs()
    top, chosen = torch.topk(scores, top_k, dim=-1)
    kept = torch.full_like(scores, float("-inf")).scatter(-1, chosen, top)
    return torch.softmax(kept / temperature, dim=-1)


class Router(nn.Module):
    """The layer's router, a node of the graph: its prototypes (N x in) and `route`."""

    def __init__(self, prototypes: torch.Tensor, top_k: int, temperature: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", prototypes)
        self.top_k = top_k
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return route(x, self.prototypes, self.top_k, self.temperature)


class ArrowLayer(StackedExpertsLayer):
    """One layer's task experts (after GenKnowSub), each zero-padded to the spec's
    ``expert_rank``: buffers, or parameters with ``train_experts`` (as PEFT's experts)."""

    method = "arrow"

    def __init__(
        self,
        base: nn.Module,
        task: Sequence[Factors | None],
        general: Sequence[Factors | None],
        spec: Arrow,
    ) -> None:
        factory = adapter_tensor_kwargs(base.weight)
        prototypes = torch.zeros(len(task), in_out_features(base)[0], **factory)
        if all(found is not None for found in task):  # else the adapter's file fills them
            task = [(fa.to(**factory), fb.to(**factory), s) for fa, fb, s in task]
            general = [(fa.to(**factory), fb.to(**factory), s) for fa, fb, s in general]
            task = _subtracted(task, general)
            if not base.weight.is_meta:
                with torch.no_grad():
                    for i, (expert_a, expert_b, _) in enumerate(task):
                        found = top_right_singular_vector(expert_a, expert_b, spec.seed)
                        prototypes[i] = found.to(factory["dtype"])
        super().__init__(base, task, spec.expert_rank, trained=spec.train_experts)
        self.router = Router(prototypes, spec.top_k, spec.temperature)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.expert_tensors(), "arrow_prototypes": self.router.prototypes}

    def emit_weights(self, ctx: EmitContext, h: fx.Node, outputs: fx.Node) -> fx.Node:
        return ctx.module("router", self.router, h)
