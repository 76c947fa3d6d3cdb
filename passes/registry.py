"""The method registry: each method class registers itself under its ``name`` on import.

Adding a method is one file in this package plus one import line here.
"""

import surgeon  # noqa: F401  (first: the methods import surgeon's modules)
from passes import adalora, dora, ia3, loha, lokr, lora, qlora, vera  # noqa: F401
from surgeon.spec import METHODS

__all__ = ["METHODS"]
