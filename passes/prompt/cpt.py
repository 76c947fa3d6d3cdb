"""CPT, context-aware prompt tuning (Blau et al., 2024, arXiv 2410.17222): the virtual tokens are
the model's embeddings of a context (in-context examples, ``token_ids``) plus a learned delta kept
in an epsilon ball, ``P = E[ids] + Π_ε(δ)``, prepended to the input embeddings of a causal LM.

Each context token has a type (``token_types``, PEFT's ``cpt_tokens_type_mask``), by its value
mod 4: 1 an input template, 2 an input, 3 an output template, 0 (with a value above 0) a label;
types grow by 4 per example. The delta trains on types 1-3 only; its rows are projected after each
optimizer step into a ball of radius ``format_epsilon`` (types 1, 3) or ``epsilon`` (type 2),
times ``sqrt(hidden / 2048)``, other rows to 1e-10 (`project`): ``MethodSpec.after_backward``,
which `surgeon.train` runs (a custom loop calls ``cm.update_ranks(step)`` after its optimizer
step). The forward shows the projected delta too, with the gradient PEFT gives (through the
projection as if it were not there).

The loss (`context_loss`) replaces the model's: next-token cross entropy on the label tokens of
the context and of the input, whose types come from the call's ``input_type_mask`` (default 4,
labels everywhere), shifted past the context's; with ``loss_weighting="decay"`` each example's
labels weigh ``loss_decay_factor`` times less than the next one's. A file holds the prompts
``P`` (PEFT's ``prompt_embeddings``): a loaded adapter starts a new delta at zero, as PEFT's.
The rest of the call rewrite is prompt tuning's. Causal LMs only (PEFT's CAUSAL_LM task).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, CallAdapter, ModelCall
from surgeon.checks import check_choice, check_finite, check_number, is_int
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.passes.prompt.common import (
    IGNORE_INDEX,
    SIZE_KEYS,
    PromptMethod,
    adapter_factory,
    check_file_sizes,
    input_embeddings,
    peft_sizes,
)
from surgeon.passes.prompt.prompt_tuning import PromptAdapter
from surgeon.peft import INT, NUMBER, JsonType, PeftFormat, PeftKey, one_of, task_type
from surgeon.spec import MethodSpec

WEIGHTINGS = ("none", "decay")
MIN_EPSILON = 1e-10
"""The ball of label tokens (and type 0): PEFT's, so their delta stays (nearly) zero."""
REFERENCE_WIDTH = 2048
"""Epsilons are given for a model this wide and scaled by ``sqrt(hidden / 2048)``, as PEFT."""
INPUT_TYPE = 4
"""The type of every input token when a call gives no ``input_type_mask``: a label (PEFT's)."""

TOKEN_LIST = JsonType(
    "a list of non-negative integers",
    lambda v: isinstance(v, (list, tuple)) and all(is_int(i) and i >= 0 for i in v),
)


def _as_tuple(value: Any, config: Mapping[str, Any], where: str) -> tuple[int, ...]:
    return tuple(value)


def _types(value: Any, config: Mapping[str, Any], where: str) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


def _check_mask(value: Any, config: Mapping[str, Any], where: str) -> None:
    """PEFT's ``cpt_mask`` changes nothing it computes; it must still fit the context."""
    ids = config.get("cpt_token_ids") or [0]
    if value is not None and len(value) != len(ids):
        raise SpecError(
            f"{where}: cpt_mask has {len(value)} entries, cpt_token_ids {len(ids)}; PEFT "
            f"refuses such a config"
        )


PEFT_FORMAT = PeftFormat(
    "CPT",
    keys=(
        PeftKey("cpt_token_ids", "token_ids", [0], TOKEN_LIST, load=_as_tuple),
        PeftKey("cpt_tokens_type_mask", "token_types", None, TOKEN_LIST.optional(), load=_types),
        PeftKey("cpt_mask", None, None, TOKEN_LIST.optional(), load=_check_mask),
        PeftKey("opt_weighted_loss_type", "loss_weighting", "none", one_of(*WEIGHTINGS)),
        PeftKey("opt_loss_decay_factor", "loss_decay_factor", 1.0, NUMBER),
        PeftKey("opt_projection_epsilon", "epsilon", 0.1, NUMBER),
        PeftKey("opt_projection_format_epsilon", "format_epsilon", 0.1, NUMBER),
        PeftKey(
            "num_virtual_tokens",
            None,
            None,
            INT.optional(),
            save=lambda spec, paths: len(spec.token_ids),
        ),
        *SIZE_KEYS,
    ),
    # PEFT counts the virtual tokens from cpt_token_ids whatever num_virtual_tokens says, and
    # reads a tokenizer only for other prompt methods' text inits
    ignored=frozenset({"tokenizer_name_or_path"}),
)


@dataclass(frozen=True)
class CPT(PromptMethod):
    """Context tokens' embeddings plus a delta projected into an epsilon ball; CPT's loss."""

    name = "cpt"
    peft_format = PEFT_FORMAT

    token_ids: tuple[int, ...] = (0,)
    """The context's token ids (PEFT's ``cpt_token_ids``): one virtual token each."""
    token_types: tuple[int, ...] | None = None
    """Each context token's type (see the module); None: all 1, as PEFT."""
    loss_weighting: str = "none"
    loss_decay_factor: float = 1.0
    epsilon: float = 0.1
    """The ball of input tokens (type 2), for a model 2048 wide."""
    format_epsilon: float = 0.1
    """The ball of template tokens (types 1 and 3), for a model 2048 wide."""

    def validate(self) -> None:
        owner = type(self).__name__
        self._set("token_ids", _token_list(owner, "token_ids", self.token_ids))
        if not self.token_ids:
            raise SpecError(f"{owner}.token_ids=(): expected at least one context token")
        types = self.token_types
        if types is None:
            types = (1,) * len(self.token_ids)
        self._set("token_types", _token_list(owner, "token_types", types))
        if len(self.token_types) != len(self.token_ids):
            raise SpecError(
                f"{owner}.token_types has {len(self.token_types)} entries, token_ids "
                f"{len(self.token_ids)}: one type per context token"
            )
        check_choice(owner, "loss_weighting", self.loss_weighting, WEIGHTINGS)
        check_finite(owner, "loss_decay_factor", self.loss_decay_factor)
        check_number(owner, "epsilon", self.epsilon, 0, low_inclusive=True)
        check_number(owner, "format_epsilon", self.format_epsilon, 0, low_inclusive=True)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "one-example": cls(
                token_ids=(5, 17, 30, 41), token_types=(1, 2, 3, 4), epsilon=2.0, format_epsilon=1.0
            ),
            "two-examples-decay": cls(
                token_ids=(5, 17, 30, 41, 6, 18, 31, 42),
                token_types=(1, 2, 3, 4, 5, 6, 7, 8),
                loss_weighting="decay",
                loss_decay_factor=0.5,
            ),
        }

    @property
    def file_holds_trained_form(self) -> bool:
        return False  # the file holds the prompts, context embeddings and delta summed

    def create_call_adapter(
        self, model: nn.Module, graph: Graph, from_file: bool
    ) -> ContextPrompts:
        owner = type(self).__name__
        if task_type(model) != "CAUSAL_LM":
            raise SpecError(
                f"{owner}: {type(model).__name__} is not a causal language model; CPT's loss "
                f"predicts the next token (PEFT's CPT takes task_type CAUSAL_LM only)"
            )
        embeddings = input_embeddings(model, owner)
        sizes = peft_sizes(model, owner, embeddings.embedding_dim)
        check_file_sizes(
            getattr(self, "_file_sizes", None), {"token_dim": sizes["token_dim"]}, owner
        )
        too_big = [i for i in self.token_ids if i >= embeddings.num_embeddings]
        if too_big:
            raise SpecError(
                f"{owner}.token_ids: {too_big[:3]} do not fit the model's "
                f"{embeddings.num_embeddings} embeddings"
            )
        adapter = ContextPrompts(
            embeddings, self, {**sizes, "task_type": "CAUSAL_LM"}, **adapter_factory(model)
        )
        if not from_file:
            ids = torch.tensor(self.token_ids, device=embeddings.weight.device)
            with torch.no_grad():
                adapter.embeddings.copy_(embeddings(ids))
        return adapter

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer | CallAdapter],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        layers[""].project_in_place()


def _token_list(owner: str, field: str, value: Any) -> tuple[int, ...]:
    if not TOKEN_LIST.accepts(value):
        raise SpecError(f"{owner}.{field}={value!r}: expected {TOKEN_LIST.description}")
    return tuple(value)


# -- the math -----------------------------------------------------------------------------------


def is_label(types: torch.Tensor) -> torch.Tensor:
    return (types > 0) & (types % 4 == 0)


def token_epsilons(spec: CPT, width: int) -> torch.Tensor:
    """Each context token's ball radius (float32), computed as PEFT computes it."""
    scale = torch.sqrt(torch.tensor([width / REFERENCE_WIDTH], dtype=torch.float32))
    types = torch.tensor(spec.token_types)
    kind = types % 4
    epsilons = torch.full(types.shape, MIN_EPSILON, dtype=torch.float32)
    epsilons[(types > 0) & ((kind == 1) | (kind == 3))] = spec.format_epsilon * scale
    epsilons[(types > 0) & (kind == 2)] = spec.epsilon * scale
    return epsilons


def project(delta: torch.Tensor, epsilons: torch.Tensor) -> torch.Tensor:
    """Each row of ``delta`` scaled back onto its ball if it lies outside (PEFT's projection)."""
    norms = torch.norm(delta, p=2, dim=1)
    scale = epsilons / norms.clamp(min=epsilons)
    return torch.where((norms > 0).unsqueeze(1), delta * scale.unsqueeze(1), delta)


def context_loss(
    logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, spec: CPT
) -> torch.Tensor:
    """Next-token cross entropy over the labels, each weighted by its example's decay (with
    ``loss_weighting="decay"``), averaged over the label tokens: PEFT's ``calculate_loss``."""
    logits, labels, types = logits[:, :-1], labels[:, 1:], types[:, 1:]
    batch, length, vocab = logits.shape
    losses = F.cross_entropy(
        logits.reshape(batch * length, vocab),
        labels.reshape(batch * length),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(batch, length)
    counted = labels != IGNORE_INDEX
    weights = counted.float()
    if spec.loss_weighting == "decay":
        weights = weights * decay_weights(types, spec.loss_decay_factor)
    return (losses[counted] * weights[counted]).mean()


def decay_weights(types: torch.Tensor, factor: float) -> torch.Tensor:
    """1 for the last example's labels of each row, ``factor`` for the one before, ``factor``
    squared before that, ... (examples told apart by their label type); 1 elsewhere."""
    weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
    for row_weights, row_types in zip(weights, types):
        weight = 1.0
        for example in row_types[is_label(row_types)].unique().flip(0).tolist():
            row_weights[row_types == example] = weight
            weight *= factor
    return weights


# -- the adapter --------------------------------------------------------------------------------


class ContextPrompts(PromptAdapter):
    """The context tokens' embeddings (``embeddings``, fixed: PEFT's ``embedding``) and the
    trained ``delta`` (PEFT's ``delta_embedding``), with prompt tuning's call rewrite, CPT's
    labels and CPT's loss."""

    method = "cpt"
    call_arguments = ("input_type_mask",)

    def __init__(
        self, embeddings: nn.Embedding, spec: CPT, peft_config: dict[str, Any], **factory
    ) -> None:
        n, width = len(spec.token_ids), embeddings.embedding_dim
        super().__init__(embeddings, n, peft_config, **factory)
        self.embeddings.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(n, width, **factory))
        self.spec = spec
        device = factory.get("device")
        types = torch.tensor(spec.token_types, device=device)
        self.register_buffer("token_ids", torch.tensor(spec.token_ids, device=device), False)
        self.register_buffer("token_types", types, False)
        self.register_buffer("trains", (types % 4 != 0).unsqueeze(1), False)
        self.register_buffer("epsilons", token_epsilons(spec, width).to(device), False)
        self.target = f"input embeddings (+{n} context tokens)"

    # the prompts ----------------------------------------------------------------------------

    def prompts(self) -> torch.Tensor:
        if self._constants is not None:
            return self._constants
        return self.embeddings + self.projected_delta()

    def projected_delta(self) -> torch.Tensor:
        """The delta's projection; its gradient reaches the delta as if there were no
        projection, on the rows of the token types CPT trains (zero on the others), as PEFT's."""
        with torch.no_grad():
            inside = project(self.delta, self.epsilons)
        trained = torch.where(self.trains, self.delta, self.delta.detach())
        return inside + (trained - trained.detach())  # the value stays exactly `inside`

    @torch.no_grad()
    def project_in_place(self) -> None:
        """After an optimizer step: the delta back into its balls."""
        self.delta.copy_(project(self.delta, self.epsilons))

    # the call -------------------------------------------------------------------------------

    def transform(self, call: ModelCall) -> None:
        labels = call.kwargs.get("labels") if call.prefill else None
        super().transform(call)
        if labels is not None:
            batch, length = call.kwargs["inputs_embeds"].shape[:2]
            if tuple(labels.shape) != (batch, length - self.n):
                raise SpecError(
                    f"CPT: labels have shape {tuple(labels.shape)}, the input "
                    f"{(batch, length - self.n)}: one label per input token"
                )
            types = self.types(call, labels.shape, labels.device)
            context = self.token_ids.to(labels.device).expand(labels.shape[0], -1)
            labels = torch.cat([context, labels], dim=1)
            call.kwargs["labels"] = torch.where(is_label(types), labels, IGNORE_INDEX)

    def types(self, call: ModelCall, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """Every position's token type: the context's, then the input's (``input_type_mask``,
        default 4) moved past the context's highest type, so that examples stay apart."""
        given = call.extras.get("input_type_mask")
        if given is None:
            inputs = torch.full(tuple(shape), INPUT_TYPE, dtype=torch.long, device=device)
        else:
            inputs = torch.as_tensor(given).to(device=device, dtype=torch.long)
            if tuple(inputs.shape) != tuple(shape):
                raise SpecError(
                    f"CPT: input_type_mask has shape {tuple(inputs.shape)}, the labels "
                    f"{tuple(shape)}: one type per input token"
                )
        context = self.token_types.to(device)
        inputs = torch.where(inputs > 0, inputs + context.max(), inputs)
        return torch.cat([context.expand(shape[0], -1), inputs], dim=1)

    def transform_output(self, call: ModelCall, output: Any) -> Any:
        labels = call.kwargs.get("labels") if call.prefill else None
        if labels is None:
            return output
        logits = getattr(output, "logits", None)
        if logits is None:
            raise SpecError(
                f"CPT computes its loss from the model's logits; {type(output).__name__} has "
                f"none (call the model with return_dict=True)"
            )
        batch, length = labels.shape
        types = self.types(call, (batch, length - self.n), logits.device)
        output.loss = context_loss(logits, labels.to(logits.device), types, self.spec)
        return output

    # files and lowering ---------------------------------------------------------------------

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.prompts().detach()}
