"""surgeon: a declarative model-surgery compiler for PyTorch.

Every method class (``surgeon.LoRA``, ``surgeon.DoRA``, ...) is exported under its class name
from the registry in ``passes/registry.py``: adding a method adds no line here.
"""

import passes.registry  # noqa: F401  (registers every method)
from surgeon.compiled import CompiledModel, compile
from surgeon.errors import SpecError
from surgeon.export import ExportError, ExportReport, export_onnx
from surgeon.load import load
from surgeon.memory import MemoryReport, estimate_memory
from surgeon.pretrained import from_pretrained
from surgeon.quant import FP4, NF4
from surgeon.spec import METHODS, MethodSpec, Spec, load_spec
from surgeon.train import TrainingConfig, TrainResult, train

globals().update({cls.__name__: cls for cls in METHODS.values()})


def __getattr__(name: str):
    if name == "kernels":  # imported on first use: importing it registers the torch.library ops
        import surgeon.kernels

        return surgeon.kernels
    # `import passes.registry` before `import surgeon` runs this module before every method
    # has registered; look them up when asked.
    for cls in METHODS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


__all__ = [
    "CompiledModel",
    "ExportError",
    "ExportReport",
    "FP4",
    "MemoryReport",
    "MethodSpec",
    "NF4",
    "Spec",
    "SpecError",
    "TrainResult",
    "TrainingConfig",
    "compile",
    "estimate_memory",
    "export_onnx",
    "from_pretrained",
    "load",
    "load_spec",
    "train",
    *sorted(cls.__name__ for cls in METHODS.values()),
]
__version__ = "0.1.0"
