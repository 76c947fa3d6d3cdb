"""`surgeon.load`: a model plus an adapter directory (surgeon- or PEFT-saved)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from surgeon.compiled import CompiledModel, compile


def load(model: nn.Module, path: str | Path, name: str = "default") -> CompiledModel:
    """Compile ``model`` and load the adapter saved at ``path`` as ``name`` (active).

    On any error (bad file, adapter that does not fit) the model is left unchanged.
    """
    cm = model if isinstance(model, CompiledModel) else compile(model)
    cm.load_adapters(path, name)
    return cm
