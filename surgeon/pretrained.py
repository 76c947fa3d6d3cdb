"""`surgeon.from_pretrained`: a transformers checkpoint (a local folder or a Hugging Face Hub repo
id) straight into 4 bits.

The model is built from its config with every parameter on the meta device (buffers are real:
rotary tables and the like are computed by the modules themselves). Then the safetensors files are
read one tensor at a time; a layer to be stored in 4 bits is quantized as soon as its weight has
been read, and the full-precision copy dropped. Peak memory is therefore about the largest single
tensor (plus its cast to ``dtype``) on top of the 4-bit model. Only safetensors are read.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.compiled import CompiledModel, compile
from surgeon.errors import SpecError
from surgeon.hub import MODEL_WEIGHTS, local_folder
from surgeon.quant import NF4, install_state, quantizable_paths, quantize_linear
from surgeon.spec import MethodSpec, Spec, as_spec

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


def from_pretrained(
    path: str | Path,
    spec: Spec | MethodSpec | NF4 | Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    model_class: type[nn.Module] | None = None,
    name: str = "default",
    revision: str | None = None,
) -> CompiledModel | nn.Module:
    """Load the transformers model saved in folder ``path`` (``config.json`` + safetensors), or
    in Hub repo ``path`` (``"org/name"``, at ``revision``: a branch, tag or commit; only the config
    and safetensors are downloaded, into huggingface_hub's cache). An existing folder always wins.

    ``spec``: a method or `surgeon.Spec` (QLoRA adapters store their layers in 4 bits while
    loading; the spec is compiled in and a `CompiledModel` comes back), an `NF4` (every linear
    layer but the output head in 4 bits, no adapters: the plain model), or None (full precision).
    ``dtype``: for everything read (4-bit layers are quantized from it and dequantize back into
    it); default the compute dtype of the 4-bit storage, else the checkpoint's dtype.
    ``model_class``: default the first of the config's ``architectures``.
    """
    folder = local_folder(path, ["config.json"], weights=MODEL_WEIGHTS, revision=revision)
    config = _read_config(folder)
    files = _weight_files(folder)
    cls = model_class or _model_class(config, folder)
    method_spec = None if spec is None or isinstance(spec, NF4) else as_spec(spec, name)
    with _parameters_on_meta():
        model = cls(config)
    plan = _quantization_plan(model, spec, method_spec)
    dtype = _load_dtype(dtype, plan, config)
    # GPT-2's Conv1D stores [in, out]; as a 4-bit layer it is [out, in]
    transposed = {p for p in plan if not isinstance(model.get_submodule(p), nn.Linear)}
    for layer_path, quant in plan.items():
        quantize_linear(model.get_submodule(layer_path), quant, dtype)  # shapes only, on meta
    _load(model, files, dtype, set(plan), transposed)
    model.eval()
    return compile(model, method_spec) if method_spec is not None else model


# -- the folder -----------------------------------------------------------------------------------


def _read_config(folder: Path):
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if not (folder / "config.json").is_file():
        raise SpecError(
            f"{folder}: no config.json (expected a transformers save_pretrained folder)"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if not names or missing:
            raise SpecError(f"{folder / INDEX}: shard files missing: {missing or 'none listed'}")
        return [folder / n for n in names]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    pickles = [n for n in PICKLES if (folder / n).exists()]
    if pickles:
        raise SpecError(
            f"{folder}: only {pickles[0]} (a pickle) is there; surgeon never unpickles files. "
            f"Save the model with save_pretrained(safe_serialization=True)"
        )
    raise SpecError(f"{folder}: no {WEIGHTS} or {INDEX} found")


def _model_class(config, folder: Path) -> type[nn.Module]:
    import transformers

    names = getattr(config, "architectures", None) or []
    for arch in names:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise SpecError(
        f"{folder}/config.json names no transformers model class ({names or 'no architectures'}); "
        f"pass model_class="
    )


# -- building on the meta device ----------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters go to the meta device as modules register them; buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _quantization_plan(model: nn.Module, spec: Any, method_spec: Spec | None) -> dict[str, NF4]:
    """Which layers are stored in 4 bits, and how."""
    if isinstance(spec, NF4):
        return dict.fromkeys(quantizable_paths(model, "all-linear", "from_pretrained"), spec)
    plan: dict[str, NF4] = {}
    for method in method_spec.adapters.values() if method_spec is not None else ():
        quantized = getattr(method, "quantized_paths", None)
        if quantized is None:
            continue
        for layer_path in quantized(model, method.select(model)):
            if plan.setdefault(layer_path, method.quant) != method.quant:
                raise SpecError(
                    f"{layer_path} would be stored both as {plan[layer_path]} and {method.quant}"
                )
    return plan


def _load_dtype(dtype: Any, plan: Mapping[str, NF4], config) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise SpecError(f"from_pretrained: dtype={dtype!r} is not a floating-point torch dtype")
        return resolved
    if dtype is not None:
        return dtype
    if plan:
        return next(iter(plan.values())).dtype
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = getattr(torch, saved, None) if isinstance(saved, str) else saved
    return saved if isinstance(saved, torch.dtype) else torch.float32


# -- streaming the tensors in -----------------------------------------------------------------------------


def _load(
    model: nn.Module,
    files: list[Path],
    dtype: torch.dtype,
    quantized: set[str],
    transposed: set[str],
) -> None:
    from safetensors import safe_open

    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            keys = list(reader.keys())
        for key in keys:
            target = _resolve(model, key)
            if target is None:
                unexpected.append(key)
                continue
            # one tensor at a time, the file mapped only while reading it; the cast replaces
            # the tensor read, so quantizing works next to the cast copy alone
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                tensor = reader.get_tensor(key)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if target[0] in transposed and target[1] == "weight":
                tensor = tensor.t()
            _assign(model, *target, tensor, quantized, key, file)
            del tensor
    if unexpected:
        warnings.warn(
            f"from_pretrained: {len(unexpected)} checkpoint tensor(s) match nothing in the model "
            f"and were skipped, e.g. {', '.join(unexpected[:3])}",
            stacklevel=3,
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise SpecError(
            f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
            f"{', '.join(missing[:3])}"
        )


def _resolve(model: nn.Module, key: str) -> tuple[str, str] | None:
    """(module path, tensor name) for a checkpoint key, allowing for a missing or extra
    base-model prefix (a LlamaModel checkpoint loaded into LlamaForCausalLM and vice versa)."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [key]
    if prefix:
        candidates += [f"{prefix}.{key}", key.removeprefix(f"{prefix}.")]
    for candidate in candidates:
        owner, _, leaf = candidate.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if leaf in module._parameters or leaf in module._buffers:
            return owner, leaf
    return None


def _assign(
    model: nn.Module,
    owner: str,
    leaf: str,
    tensor: torch.Tensor,
    quantized: set[str],
    key: str,
    file: Path,
) -> None:
    module = model.get_submodule(owner)
    if owner in quantized and leaf == "weight":
        _check_shape(tuple(tensor.shape), (module.out_features, module.in_features), key, file)
        install_state(module, module.quant.quantize(tensor), module.quant)
        return
    current = module._parameters.get(leaf)
    if current is None:
        current = module._buffers[leaf]
    _check_shape(tuple(tensor.shape), tuple(current.shape), key, file)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=current.requires_grad)
    else:
        module._buffers[leaf] = tensor


def _check_shape(shape: tuple, expected: tuple, key: str, file: Path) -> None:
    if shape != expected:
        raise SpecError(f"{file.name}: {key} has shape {shape}, the model needs {expected}")
