"""surgeon: a declarative model-surgery compiler for PyTorch."""

import passes.registry  # noqa: F401  (registers every method)
from passes.adalora import AdaLoRA
from passes.dora import DoRA
from passes.ia3 import IA3
from passes.lora import LoRA
from passes.vera import VeRA
from surgeon.compiled import CompiledModel, compile
from surgeon.errors import SpecError
from surgeon.export import ExportError, ExportReport, export_onnx
from surgeon.load import load
from surgeon.spec import MethodSpec, Spec, load_spec

__all__ = [
    "IA3",
    "AdaLoRA",
    "CompiledModel",
    "DoRA",
    "ExportError",
    "ExportReport",
    "LoRA",
    "MethodSpec",
    "Spec",
    "SpecError",
    "VeRA",
    "compile",
    "export_onnx",
    "load",
    "load_spec",
]
__version__ = "0.1.0"
