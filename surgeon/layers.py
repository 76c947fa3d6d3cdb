"""Layer types that live outside torch."""

from __future__ import annotations

import sys


def gpt2_conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D`` (a Linear with its weight stored in, out), if transformers is loaded.

    A model can only contain one if transformers is already imported, so this never imports it.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    if module is None and "transformers" in sys.modules:
        import transformers.pytorch_utils as module
    return getattr(module, "Conv1D", None) if module is not None else None
