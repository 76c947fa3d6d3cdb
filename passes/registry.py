"""The method registry: each method class registers itself under its ``name`` on import.

Adding a method is one file in this package plus one import line here.
"""

import surgeon  # noqa: F401  (first: the methods import surgeon's modules)
from passes import (  # noqa: F401
    adalora,
    dora,
    ia3,
    loha,
    lokr,
    lora,
    prefix_tuning,
    prompt_tuning,
    ptuning_v2,
    qlora,
    vera,
)
from surgeon.spec import METHODS

__all__ = ["METHODS"]
