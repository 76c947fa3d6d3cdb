"""DyLoRA: LoRA trained for every rank up to r at once (Valipour et al., 2022, arXiv 2210.07558,
§3, eq. 4-6).

``h = W x + b + alpha/k · B[:, :k] A[:k] dropout(x)``: LoRA's factors ``A`` (r x in) and ``B``
(out x r), truncated to their first k rows / columns. While training, k is the rank ``b`` drawn
for the step, uniformly from 1..r (the paper's default distribution); in eval mode k is
``eval_rank`` (None: r), any rank the adapter was trained for, and merging folds in that
truncation.

The paper's default update (eq. 6, its ``frozen`` mode): each step only the b-th row of ``A`` and
the b-th column of ``B`` get gradients; the rows and columns below b still compute the output but
are constants in backward (a zero gradient: an optimizer's momentum or weight decay still moves
them, as for any parameter with a zero gradient). ``frozen=False`` trains every row and column
up to b (the paper's ablation).

Source check (issue #21): the truncations ``W_dw[1:b, :]`` / ``W_up[:, 1:b]``, the ``alpha/b``
scale and the rank ``b`` drawn from a distribution ``p_B`` each step are the paper's §3 (read
through a summary of the paper's text). That the default update touches only the b-th row and
column (``frozen``) and that ``p_B`` defaults to uniform could not be read from the paper here;
they follow the public re-implementations (kohya-ss ``networks/dylora.py``, derived from the
authors' github.com/huawei-noah/KD-NLP/DyLoRA, and LyCORIS: "every step, only update one row/col")
and are not verified against the paper's text.

The rank is drawn once per training step for every layer of the adapter, from a CPU
`torch.Generator` seeded with ``seed``: step t runs at the t-th draw ``randint(1, r + 1)``. The
generator's state is a buffer of the adapter (`RankSampler`), so a training checkpoint keeps it
and a resumed run draws what an uninterrupted one does; the next rank is drawn in the training
hook `DyLoRA.after_backward` (`surgeon.train` calls it after each optimizer step; a custom loop
calls ``cm.update_ranks(step)``). `set_eval_rank` changes the inference rank of a compiled
model in place.

Files: PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) under this
project's own type ``"peft_type": "SURGEON_DYLORA"`` (PEFT has no DyLoRA; its loader refuses
such a file). The config holds LoRA's keys (``r``, ``lora_alpha``, ``lora_dropout``, ``bias``,
the selection) and ``eval_rank``, ``frozen``, ``rank_seed``; per layer the file holds LoRA's
``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r), initialised as LoRA's (A
kaiming-uniform, B zero).

Layers: Linear and transformers' GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_probability,
    check_seed,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

PEFT_TYPE = "SURGEON_DYLORA"
"""This project's own PEFT type: PEFT has no DyLoRA, and must not read the file as LoRA."""

BIAS_MODES = ("none", "all", "dylora_only")

PEFT_FORMAT = PeftFormat(
    PEFT_TYPE,
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("lora_alpha", "alpha", 16, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey("eval_rank", "eval_rank", None, INT.optional()),
        PeftKey("frozen", "frozen", True, BOOL),
        PeftKey("rank_seed", "seed", 0, INT),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type
)


@dataclass(frozen=True)
class DyLoRA(MethodSpec):
    """Dynamic low-rank adaptation: LoRA whose every leading truncation is trained.

    ``rank``: r, the largest rank. ``eval_rank``: the rank used in eval mode and merged (None:
    r). ``frozen``: each step trains only the drawn rank's row of A and column of B (the paper's
    default); False trains every row up to it. ``seed``: seeds the generator of the ranks drawn
    while training. ``bias``: ``all`` or ``dylora_only`` also train the base biases.
    """

    name = "dylora"
    peft_format = PEFT_FORMAT

    rank: int = 8
    alpha: float = 16
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    eval_rank: int | None = None
    frozen: bool = True
    seed: int = 0
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)
        if self.eval_rank is not None:
            check_int(owner, "eval_rank", self.eval_rank)
            if self.eval_rank > self.rank:
                raise SpecError(
                    f"{owner}.eval_rank={self.eval_rank!r}: expected at most rank={self.rank} "
                    f"(the adapter trains ranks 1 to {self.rank})"
                )
        check_bool(owner, "frozen", self.frozen)
        check_seed(owner, "seed", self.seed)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the paper's default (the full rank at inference, frozen lower rows while training),
        # then a truncated inference rank with every row up to the drawn rank trained, dropout
        return {
            "default": cls(rank=4, targets=targets),
            "eval-rank-unfrozen-dropout": cls(
                rank=4, alpha=6, eval_rank=2, frozen=False, dropout=0.1, seed=3, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    @property
    def inference_rank(self) -> int:
        """The rank eval mode runs and merging folds in."""
        return self.rank if self.eval_rank is None else self.eval_rank

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, DyLoRALayer]:
        sampler = RankSampler(self.rank, self.seed)
        return {p: DyLoRALayer(model.get_submodule(p), self, sampler) for p in paths}

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Draw the rank of the next step (one sampler serves every layer of the adapter)."""
        sampler = next((x.sampler for x in layers.values() if isinstance(x, DyLoRALayer)), None)
        if sampler is not None:
            sampler.advance()


class RankSampler(nn.Module):
    """The rank ``b`` of the current training step, for every layer of one adapter.

    ``state`` (a buffer, so checkpoints keep it) is the state of a CPU generator seeded with the
    spec's ``seed`` from which the current rank is drawn: the rank is a function of it, read
    once per state (reading a buffer on an accelerator waits for it) and kept as a number.
    `advance` moves the state one draw on."""

    def __init__(self, rank: int, seed: int) -> None:
        super().__init__()
        self.rank = rank
        state = torch.Generator().manual_seed(seed).get_state()
        self.register_buffer("state", state, persistent=False)
        self._kept: tuple[tuple, int] | None = None

    def _draw(self, generator: torch.Generator) -> int:
        return int(torch.randint(1, self.rank + 1, (), generator=generator))

    def _generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.set_state(self.state.cpu())  # the buffer moves with the model
        return generator

    def current(self) -> int:
        """The rank drawn for this step, from 1 to ``rank``."""
        key = (self.state.data_ptr(), self.state._version, self.state.device)
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, self._draw(self._generator()))
        return self._kept[1]

    def advance(self) -> None:
        """Move on to the next step's rank."""
        generator = self._generator()
        self._draw(generator)
        self.state = generator.get_state().to(self.state.device)


class RankTruncation(nn.Module):
    """``(alpha/k · A[:k], B[:, :k])`` for the rank k of this call: the step's drawn rank while
    training (below it, with ``frozen``, rows and columns are constants in backward), the
    inference rank in eval mode."""

    def __init__(self, sampler: RankSampler, alpha: float, eval_rank: int, frozen: bool) -> None:
        super().__init__()
        self.sampler = sampler
        self.alpha = alpha
        self.eval_rank = eval_rank
        self.frozen = frozen

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return truncated(a, b, self.alpha, self.eval_rank)
        k = self.sampler.current()
        a, b = a[:k], b[:, :k]
        if self.frozen:
            a = torch.cat((a[:-1].detach(), a[-1:]))
            b = torch.cat((b[:, :-1].detach(), b[:, -1:]), dim=1)
        return a * (self.alpha / k), b


def truncated(
    a: torch.Tensor, b: torch.Tensor, alpha: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's factors cut to ``rank``, the scale ``alpha / rank`` on A."""
    return a[:rank] * (alpha / rank), b[:, :rank]


class DyLoRALayer(AdapterLayer):
    """``lora_A`` (r x in) and ``lora_B`` (out x r) of one layer, LoRA's, and the truncation
    that picks the rank of each call."""

    method = "dylora"
    loraplus_b = ("lora_B",)
    peft_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    def __init__(self, base: nn.Module, spec: DyLoRA, sampler: RankSampler) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        fan_in, fan_out = in_out_features(base)
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.lora_A = nn.Parameter(torch.empty(spec.rank, fan_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, spec.rank, **factory))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None
        self.truncation = RankTruncation(sampler, spec.alpha, spec.inference_rank, spec.frozen)

    @property
    def sampler(self) -> RankSampler:
        return self.truncation.sampler

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        factors = ctx.module(
            "truncation",
            self.truncation,
            ctx.attr("lora_A", self.lora_A),
            ctx.attr("lora_B", self.lora_B),
        )
        a = ctx.call(operator.getitem, factors, 0)
        b = ctx.call(operator.getitem, factors, 1)
        cast = self.lora_A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.lora_A.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        delta = ctx.call(F.linear, ctx.call(F.linear, h, a), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        truncation = self.truncation
        a, b = truncated(self.lora_A, self.lora_B, truncation.alpha, truncation.eval_rank)
        delta = b @ a
        return delta.t() if self.kind == "conv1d_gpt2" else delta


def set_eval_rank(cm: nn.Module, rank: int | None, name: str = "default") -> None:
    """Run DyLoRA adapter ``name`` of compiled model ``cm`` at ``rank`` in eval mode from now on
    (None: its full rank); its spec (what a save writes) says so. Refused while it is merged."""
    spec = cm.spec(name)
    if not isinstance(spec, DyLoRA):
        raise SpecError(f"set_eval_rank: adapter {name!r} is {spec.name}, not dylora")
    if name in cm.merged:
        raise SpecError(
            f"set_eval_rank: adapter {name!r} is merged at rank {spec.inference_rank}; unmerge "
            f"it first"
        )
    changed = spec.replace(eval_rank=rank)  # validates the rank
    cm.store.specs[name] = changed
    for _, layer in cm.store.items(name):
        if isinstance(layer, DyLoRALayer):
            layer.truncation.eval_rank = changed.inference_rank
