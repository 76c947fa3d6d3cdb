"""Layer types that live outside torch."""

from __future__ import annotations

import sys

from torch import nn


def gpt2_conv1d_type() -> type | None:
    """transformers' GPT-2 ``Conv1D`` (a Linear with its weight stored in, out), if transformers is loaded.

    A model can only contain one if transformers is already imported, so this never imports it.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    if module is None and "transformers" in sys.modules:
        import transformers.pytorch_utils as module
    return getattr(module, "Conv1D", None) if module is not None else None


def snapshot_storage(module: nn.Module) -> tuple:
    """What `restore_storage` needs to put back how ``module`` stores its weights: its class, its
    own parameters and buffers, and its plain attributes (references, no copies)."""
    plain = {k: v for k, v in vars(module).items() if _is_plain(k)}
    return type(module), dict(module._parameters), dict(module._buffers), plain


def restore_storage(module: nn.Module, snapshot: tuple) -> None:
    """Undo storage changes made since `snapshot_storage` (a layer turned into 4 bits and back)."""
    cls, parameters, buffers, plain = snapshot
    module.__class__ = cls
    module._parameters.clear()
    module._parameters.update(parameters)
    module._buffers.clear()
    module._buffers.update(buffers)
    for key in [k for k in vars(module) if _is_plain(k)]:
        del module.__dict__[key]
    module.__dict__.update(plain)


def _is_plain(key: str) -> bool:
    # "forward" may be a rewritten forward that surgeon installs and removes on its own
    return not key.startswith("_") and key not in ("training", "forward")
