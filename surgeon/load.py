"""`surgeon.load`: a model plus an adapter directory (surgeon- or PEFT-saved, local or on the Hub)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from surgeon.compiled import CompiledModel, compile
from surgeon.io import adapter_folder


def load(
    model: nn.Module, path: str | Path, name: str = "default", *, revision: str | None = None
) -> CompiledModel:
    """Compile ``model`` and load the adapter saved at ``path`` as ``name`` (active).

    ``path``: a local adapter directory, or a Hugging Face Hub repo id (``"org/name"``, at
    ``revision``) fetched through huggingface_hub's cache; an existing directory always wins.
    On any error (bad file, adapter that does not fit, repo not reachable) the model is left
    unchanged.
    """
    folder = adapter_folder(path, revision)
    cm = model if isinstance(model, CompiledModel) else compile(model)
    cm.load_adapters(folder, name)
    return cm
