"""Prefix tuning (Li & Liang, 2021): learned key/value prefixes in every attention layer.

Each layer's attention also attends to ``num_virtual_tokens`` learned keys and values, in front
of the real tokens. With ``projection_dim`` the prefixes are produced by PEFT's reparameterisation
(an embedding through Linear, Tanh, Linear) while training, and folded into plain prefixes for
inference and export; with ``projection_dim=None`` (or 0) the prefixes are the parameters. Files are
PEFT's: ``prompt_embeddings`` holds the (folded) prefixes, so a file loads as plain prefixes.
How prefixes reach attention (the cache or the graph route) is described in `prompt_common`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from passes.prompt_common import PREFIX_PEFT_FIELDS, PrefixMethod, file_sizes
from surgeon.errors import SpecError
from surgeon.spec import check_int


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

    def encoder_size(self) -> tuple[int, int] | None:
        return None if self.projection_dim is None else (self.projection_dim, 2)

    def to_peft_config(self, paths: Sequence[str] = ()) -> dict[str, Any]:
        return self.prefix_peft_config(self.projection_dim)

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], where: str) -> PrefixTuning:
        from surgeon.io import check_peft_fields

        check_peft_fields(config, PREFIX_PEFT_FIELDS, where)
        sizes = file_sizes(config, where)
        projection = config.get("encoder_hidden_size") or config.get("token_dim")
        if config.get("prefix_projection") and not isinstance(projection, int):
            raise SpecError(f"{where}: prefix_projection is set but encoder_hidden_size is missing")
        spec = cls(
            num_virtual_tokens=config.get("num_virtual_tokens"),
            projection_dim=projection if config.get("prefix_projection") else None,
        )
        spec._set("_file_sizes", sizes)
        return spec
