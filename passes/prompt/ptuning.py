"""P-tuning (Liu et al., 2021, "GPT Understands, Too"): virtual-token embeddings produced by a
prompt encoder, prepended to the input embeddings: ``P = head(E)``, the model on ``[P; embed(x)]``.

The encoder is PEFT's: an MLP (Linear, ReLU, Linear, ReLU, Linear of width
``encoder_hidden_size``) or a bidirectional LSTM of ``encoder_num_layers`` layers followed by a
two-layer ReLU MLP. It runs while training; without gradients its output is kept until a
parameter changes. A file holds only the prompts the encoder produces (PEFT's
``prompt_embeddings``), so a loaded adapter is plain prompts, as PEFT's inference mode. The call
rewrite (masks, positions, labels, generate) is prompt tuning's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.adapter import Cached
from surgeon.checks import check_choice, check_int, check_probability
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.passes.prompt.common import (
    SIZE_KEYS,
    PromptMethod,
    adapter_factory,
    check_file_sizes,
    input_embeddings,
    peft_sizes,
)
from surgeon.passes.prompt.prompt_tuning import PromptAdapter
from surgeon.peft import INT, NUMBER, REQUIRED, Loader, PeftFormat, PeftKey, one_of, task_type
from surgeon.spec import MethodSpec

ENCODERS = ("mlp", "lstm")
MLP_LAYERS = 2
"""PEFT's MLP encoder always has two hidden layers (it ignores ``encoder_num_layers``)."""


def _encoder_type(value: Any, config: Mapping[str, Any], where: str) -> str:
    return str(value).lower()


def _lstm_only(neutral: Any) -> Loader:
    """An LSTM-only setting in a file of an MLP encoder: PEFT ignores it, and the file holds the
    prompts, not the encoder, so it changes nothing here either."""

    def load(value: Any, config: Mapping[str, Any], where: str) -> Any:
        is_lstm = str(config.get("encoder_reparameterization_type")).upper() == "LSTM"
        return value if is_lstm else neutral

    return load


PEFT_FORMAT = PeftFormat(
    "P_TUNING",
    keys=(
        PeftKey("num_virtual_tokens", "num_virtual_tokens", REQUIRED, INT),
        PeftKey(
            "encoder_reparameterization_type",
            "encoder_type",
            "MLP",
            one_of("MLP", "LSTM"),
            save=lambda spec, paths: spec.encoder_type.upper(),
            load=_encoder_type,
        ),
        PeftKey("encoder_hidden_size", "encoder_hidden_size", None, INT.optional()),
        PeftKey(
            "encoder_num_layers",
            "encoder_num_layers",
            MLP_LAYERS,
            INT,
            load=_lstm_only(MLP_LAYERS),
        ),
        PeftKey("encoder_dropout", "encoder_dropout", 0.0, NUMBER, load=_lstm_only(0.0)),
        *SIZE_KEYS,
    ),
)


@dataclass(frozen=True)
class PTuning(PromptMethod):
    """Virtual-token embeddings from an MLP or LSTM prompt encoder (P-tuning v1)."""

    name = "ptuning"
    peft_format = PEFT_FORMAT

    num_virtual_tokens: int = 20
    encoder_type: str = "mlp"
    encoder_hidden_size: int | None = None
    """None: the model's hidden size (PEFT's default)."""
    encoder_num_layers: int = MLP_LAYERS
    """LSTM layers; the MLP has two hidden layers whatever this says, as in PEFT."""
    encoder_dropout: float = 0.0
    """Between LSTM layers (PEFT's MLP has no dropout)."""

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        check_choice(owner, "encoder_type", self.encoder_type, ENCODERS)
        if self.encoder_hidden_size is not None:
            check_int(owner, "encoder_hidden_size", self.encoder_hidden_size)
        check_int(owner, "encoder_num_layers", self.encoder_num_layers)
        check_probability(owner, "encoder_dropout", self.encoder_dropout)
        if self.encoder_type == "mlp":
            self._refuse_lstm_settings(owner)

    def _refuse_lstm_settings(self, owner: str) -> None:
        """PEFT ignores these for its MLP (with a warning at most); a spec that sets them would
        not train what it says."""
        if self.encoder_num_layers != MLP_LAYERS:
            raise SpecError(
                f"{owner}.encoder_num_layers={self.encoder_num_layers}: the MLP encoder always has "
                f"{MLP_LAYERS} hidden layers (as PEFT's); the setting is for encoder_type='lstm'"
            )
        if self.encoder_dropout:
            raise SpecError(
                f"{owner}.encoder_dropout={self.encoder_dropout}: the MLP encoder has no dropout "
                f"(as PEFT's); the setting is for encoder_type='lstm'"
            )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "mlp": cls(num_virtual_tokens=3, encoder_hidden_size=8),
            "lstm": cls(
                num_virtual_tokens=2,
                encoder_type="lstm",
                encoder_hidden_size=6,
                encoder_num_layers=2,
                encoder_dropout=0.1,
            ),
        }

    @property
    def file_holds_trained_form(self) -> bool:
        return False  # the file holds the encoder's output

    def create_call_adapter(
        self, model: nn.Module, graph: Graph, from_file: bool
    ) -> PromptEncoderAdapter:
        owner = type(self).__name__
        embeddings = input_embeddings(model, owner)
        width = embeddings.embedding_dim
        sizes = peft_sizes(model, owner, width)
        check_file_sizes(getattr(self, "_file_sizes", None), {"token_dim": width}, owner)
        hidden = self.encoder_hidden_size or width
        factory = adapter_factory(model)
        head = None if from_file else self._head(width, hidden, factory)
        config = {**sizes, "task_type": task_type(model), "encoder_hidden_size": hidden}
        adapter = PromptEncoderAdapter(embeddings, self.num_virtual_tokens, config, head, **factory)
        with torch.no_grad():
            nn.init.normal_(adapter.embeddings)  # PEFT's: nn.Embedding's default init
        return adapter

    def _head(self, width: int, hidden: int, factory: dict[str, Any]) -> nn.Module:
        if self.encoder_type == "mlp":
            return MlpHead(width, hidden, hidden, width, **factory)
        return LstmHead(width, hidden, self.encoder_num_layers, self.encoder_dropout, **factory)


class MlpHead(nn.Sequential):
    """Linear, ReLU, Linear, ReLU, Linear: PEFT's ``mlp_head`` (the same indices)."""

    def __init__(self, width: int, first: int, second: int, out: int, **factory) -> None:
        super().__init__(
            nn.Linear(width, first, **factory),
            nn.ReLU(),
            nn.Linear(first, second, **factory),
            nn.ReLU(),
            nn.Linear(second, out, **factory),
        )


class LstmHead(nn.Module):
    """A bidirectional LSTM, then Linear, ReLU, Linear: PEFT's ``lstm_head`` and ``mlp_head``."""

    def __init__(self, width: int, hidden: int, layers: int, dropout: float, **factory) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(
            width,
            hidden,
            num_layers=layers,
            dropout=dropout,
            bidirectional=True,
            batch_first=True,
            **factory,
        )
        self.mlp_head = nn.Sequential(
            nn.Linear(2 * hidden, 2 * hidden, **factory),
            nn.ReLU(),
            nn.Linear(2 * hidden, width, **factory),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # one sequence of all virtual tokens: the LSTM reads them in order, both ways
        states, _ = self.lstm_head(embeddings.unsqueeze(0))
        return self.mlp_head(states[0])


class PromptEncoderAdapter(PromptAdapter):
    """Prompt tuning's call rewrite with prompts from an encoder head over the virtual-token
    embeddings (PEFT's ``prompt_encoder.embedding``); without a head (loaded from a file) the
    embeddings are the prompts."""

    method = "ptuning"

    def __init__(
        self,
        embeddings: nn.Embedding,
        n: int,
        peft_config: dict[str, Any],
        head: nn.Module | None,
        **factory,
    ) -> None:
        super().__init__(embeddings, n, peft_config, **factory)
        self.head = head
        self.encoded = Cached(self._encode, self._encoder_parameters) if head is not None else None
        encoder = "plain prompts" if head is None else f"{type(head).__name__} encoder"
        self.target = f"input embeddings (+{n} virtual tokens, {encoder})"

    def _encode(self) -> torch.Tensor:
        return self.head(self.embeddings)

    def _encoder_parameters(self) -> list[torch.Tensor]:
        return [self.embeddings, *self.head.parameters()]

    def prompts(self) -> torch.Tensor:
        if self._constants is not None or self.encoded is None:
            return super().prompts()
        return self.encoded()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        if self.head is not None:
            raise SpecError(
                "this ptuning adapter trains a prompt encoder; a saved file holds only the "
                "prompts it produces, which cannot be loaded back into an encoder. Load the file "
                "as a new adapter (load_adapters) instead"
            )
        return super().peft_tensors()

    def peft_tensors_to_save(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"prompt_embeddings": self.prompts().detach()}
