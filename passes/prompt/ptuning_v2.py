"""P-tuning v2 (Liu et al., 2022): deep prompts, a learned key/value prefix in every layer,
produced by an MLP encoder of width ``encoder_hidden_size`` and depth ``encoder_num_layers``
(Linear layers, Tanh between them) from virtual-token embeddings.

It is prefix tuning with a deeper reparameterisation: training runs the encoder, inference and
export use the folded prefixes. With two layers the encoder is exactly PEFT's prefix projection,
so the adapter is saved as PEFT's prefix tuning (``prefix_projection`` with
``encoder_hidden_size``) and loads back as `PrefixTuning`; other depths have no PEFT equivalent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from surgeon.checks import check_int
from surgeon.errors import SpecError
from surgeon.passes.prompt.common import PREFIX_FORMAT, PrefixMethod
from surgeon.spec import MethodSpec


@dataclass(frozen=True)
class PTuningV2(PrefixMethod):
    """Deep prompts from an MLP encoder; ``route``: auto, cache or graph."""

    name = "ptuning_v2"
    peft_format = PREFIX_FORMAT.but(claims_files=False)  # PEFT's files load as PrefixTuning

    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2
    route: str = "auto"

    def validate(self) -> None:
        self.check_common_fields()
        owner = type(self).__name__
        check_int(owner, "encoder_hidden_size", self.encoder_hidden_size)
        check_int(owner, "encoder_num_layers", self.encoder_num_layers)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "two-layers": cls(num_virtual_tokens=3, encoder_hidden_size=8),
            "three-layers": cls(num_virtual_tokens=2, encoder_hidden_size=6, encoder_num_layers=3),
        }

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
        return super().to_peft_config(paths)
