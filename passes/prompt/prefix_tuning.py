"""Prefix tuning (Li & Liang, 2021): learned key/value prefixes in every attention layer.

Each layer's attention also attends to ``num_virtual_tokens`` learned keys and values, in front
of the real tokens. With ``projection_dim`` the prefixes are produced by PEFT's reparameterisation
(an embedding through Linear, Tanh, Linear) while training, and folded into plain prefixes for
inference and export; with ``projection_dim=None`` (or 0) the prefixes are the parameters. Files are
PEFT's: ``prompt_embeddings`` holds the (folded) prefixes, so a file loads as plain prefixes.
How prefixes reach attention (the cache or the graph route) is described in `prompt_common`.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgeon.checks import check_int
from surgeon.passes.prompt.common import PrefixMethod
from surgeon.spec import MethodSpec


@dataclass(frozen=True)
class PrefixTuning(PrefixMethod):
    """Key/value prefixes in every attention layer; ``route``: auto, cache or graph."""

    name = "prefix_tuning"

    num_virtual_tokens: int = 20
    projection_dim: int | None = 256
    route: str = "auto"

    def validate(self) -> None:
        self.check_common_fields()
        if self.projection_dim == 0:  # spec files without a null (TOML) write 0 for "none"
            self._set("projection_dim", None)
        if self.projection_dim is not None:
            check_int(type(self).__name__, "projection_dim", self.projection_dim)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "plain": cls(num_virtual_tokens=3, projection_dim=None),
            "projection": cls(num_virtual_tokens=2, projection_dim=8),
        }

    def encoder_size(self) -> tuple[int, int] | None:
        return None if self.projection_dim is None else (self.projection_dim, 2)
