"""P-tuning v2 (Liu et al., 2022): deep prompts, a learned key/value prefix in every layer,
produced by an MLP encoder of width ``encoder_hidden_size`` and depth ``encoder_num_layers``
(Linear layers, Tanh between them) from virtual-token embeddings.

It is prefix tuning with a deeper reparameterisation: training runs the encoder, inference and
export use the folded prefixes. With two layers the encoder is exactly PEFT's prefix projection,
so the adapter is saved as PEFT's prefix tuning (``prefix_projection`` with
``encoder_hidden_size``) and loads back as `PrefixTuning`; other depths have no PEFT equivalent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from passes.prompt_common import PrefixMethod
from surgeon.errors import SpecError
from surgeon.spec import check_int


@dataclass(frozen=True)
class PTuningV2(PrefixMethod):
    """Deep prompts from an MLP encoder; ``route``: auto, cache or graph."""

    name = "ptuning_v2"

    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2
    route: str = "auto"

    def validate(self) -> None:
        self.check_common_fields()
        owner = type(self).__name__
        check_int(owner, "encoder_hidden_size", self.encoder_hidden_size)
        check_int(owner, "encoder_num_layers", self.encoder_num_layers)

    def encoder_size(self) -> tuple[int, int] | None:
        return self.encoder_hidden_size, self.encoder_num_layers

    def to_peft_config(self, paths: Sequence[str] = ()) -> dict[str, Any]:
        if self.encoder_num_layers != 2:
            raise SpecError(
                f"PTuningV2.encoder_num_layers={self.encoder_num_layers}: PEFT's format describes "
                f"prefix encoders of exactly 2 layers (prefix tuning's projection: Linear, Tanh, "
                f"Linear), so this adapter has no PEFT equivalent and cannot be saved in its "
                f"layout; use encoder_num_layers=2 for an adapter that saves and loads in PEFT"
            )
        return self.prefix_peft_config(self.encoder_hidden_size)

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return False  # PEFT's files are prefix tuning; they load as PrefixTuning
