"""surgeon: a declarative model-surgery compiler for PyTorch.

Every method class (``surgeon.LoRA``, ``surgeon.DoRA``, ...) is exported under its class name
from the registry that `surgeon.passes` fills as it imports the method modules: adding a method
adds no line here. ``import surgeon.kernels`` for the fused ops themselves.
"""

import surgeon.passes  # noqa: F401  (registers every method)
from surgeon.compiled import CompiledModel, compile
from surgeon.errors import SpecError
from surgeon.export import ExportError, ExportReport, export_onnx
from surgeon.load import load
from surgeon.memory import MemoryReport, estimate_memory
from surgeon.pretrained import from_pretrained
from surgeon.quant import FP4, NF4
from surgeon.spec import METHODS, MethodSpec, Spec, load_spec
from surgeon.textdata import sft_samples
from surgeon.train import TrainingConfig, TrainResult, train

globals().update({cls.__name__: cls for cls in METHODS.values()})

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
    "sft_samples",
    "train",
    *sorted(cls.__name__ for cls in METHODS.values()),
]
__version__ = "0.1.0"
