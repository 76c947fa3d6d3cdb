"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's (``base_model.model.<module path>.lora_A.weight``), so files go both ways.
Only safetensors are read, never pickles. Saves are atomic per file (write a temporary file,
then rename); a load that does not fit the model raises before anything is changed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.adapter import AdapterLayer, CallAdapter
from surgeon.checks import check_names
from surgeon.copies import LayerCopy
from surgeon.errors import SpecError
from surgeon.hub import local_folder
from surgeon.peft import PREFIX
from surgeon.spec import METHODS, MethodSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def method_from_peft_config(config: Any, where: str) -> MethodSpec:
    """The method a PEFT (or surgeon) adapter_config.json describes, by its ``peft_type`` and the
    switches each method of that type claims (`MethodSpec.accepts_peft_config`)."""
    if not isinstance(config, Mapping):
        raise SpecError(f"{where}: expected a JSON object")
    peft_type = config.get("peft_type")
    candidates = [c for c in METHODS.values() if c.peft_type == peft_type]
    if not candidates:
        known = sorted({c.peft_type for c in METHODS.values() if c.peft_type})
        raise SpecError(
            f"{where}: peft_type={peft_type!r} is not supported (supported: {', '.join(known)})"
        )
    claiming = [c for c in candidates if c.accepts_peft_config(config)]
    # none claims it: the nearest method names the switch it cannot honour
    loading = [c for c in candidates if c.peft_format.claims_files]
    cls = (
        claiming[0]
        if claiming
        else min(loading, key=lambda c: len(c.peft_format.mismatched_switches(config)))
    )
    config = dict(config)
    modules_to_save = config.pop("modules_to_save", None) or ()
    try:
        method = cls.from_peft_config(config, where)
        # set in place: methods keep what they read from the file beside their fields
        method._set(
            "modules_to_save", check_names(cls.__name__, "modules_to_save", modules_to_save)
        )
        return method
    except SpecError as err:
        message = str(err)
        raise SpecError(message if message.startswith(where) else f"{where}: {message}") from None


# -- reading ----------------------------------------------------------------------------------


def adapter_folder(path: str | Path, revision: str | None = None) -> Path:
    """The adapter directory ``path`` names: a local one, or Hub repo ``path`` (``"org/name"``)
    with only its two files downloaded."""
    return local_folder(path, [CONFIG_NAME], weights=[WEIGHTS_NAME], revision=revision)


def read_adapter(path: str | Path) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The method and tensors of an adapter directory (surgeon- or PEFT-saved, local or on the
    Hub)."""
    path = adapter_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if not path.is_dir():
        raise SpecError(
            f"{path}: expected an adapter directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    config_path = path / CONFIG_NAME
    weights_path = path / WEIGHTS_NAME
    if not weights_path.exists():
        pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise SpecError(
                f"{path}: only {pickles[0]} (a pickle) is there; surgeon never unpickles files. "
                f"Convert it to {WEIGHTS_NAME} (e.g. PEFT's save_pretrained(safe_serialization=True))"
            )
        raise SpecError(f"{path}: no {WEIGHTS_NAME} found")
    if not config_path.exists():
        raise SpecError(f"{path}: no {CONFIG_NAME} found")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{config_path}: malformed JSON ({err})") from None
    method = method_from_peft_config(config, str(config_path))
    return method, read_safetensors(weights_path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SpecError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None


def _normalise_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


def fill_adapter(
    model: nn.Module,
    name: str,
    method: MethodSpec,
    layers: Mapping[str, AdapterLayer],
    base_trainable: Sequence[str],
    tensors: Mapping[str, torch.Tensor],
    call: CallAdapter | None = None,
) -> None:
    """Copy file tensors into freshly built adapter layers (and the adapter of a method acting
    on the model call), checking every key and shape first."""
    wanted = _layer_tensors(method, layers)
    if call is not None:
        wanted.update(call.peft_tensors())
    base_params = dict(model.named_parameters())
    for pname in base_trainable:
        wanted[PREFIX + pname] = base_params[pname]
    found = {_normalise_key(k): v for k, v in method.peft_tensors_from_file(tensors).items()}
    missing = sorted(set(wanted) - set(found))
    extra = {k: v for k, v in found.items() if k not in wanted}
    extra_base = {
        k: v for k, v in extra.items() if k.startswith(PREFIX) and k[len(PREFIX) :] in base_params
    }
    unknown = sorted(set(extra) - set(extra_base))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
    if unknown:
        problems.append(
            f"{len(unknown)} key(s) that match nothing in the model, e.g. {', '.join(unknown[:3])}"
        )
    for key, target in [*wanted.items(), *((k, base_params[k[len(PREFIX) :]]) for k in extra_base)]:
        if key in found and tuple(found[key].shape) != tuple(target.shape):
            problems.append(
                f"{key} has shape {tuple(found[key].shape)}, the model needs {tuple(target.shape)}"
            )
    if problems:
        raise SpecError(f"adapter {name!r} does not fit this model: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for key, target in wanted.items():
            target.copy_(found[key].to(target.dtype))
        for key, value in extra_base.items():
            base_params[key[len(PREFIX) :]].copy_(value.to(base_params[key[len(PREFIX) :]].dtype))


# -- writing ----------------------------------------------------------------------------------


def _layer_tensors(
    method: MethodSpec, layers: Mapping[str, AdapterLayer], saving: bool = False
) -> dict[str, torch.Tensor]:
    out = dict(method.peft_shared_tensors(layers))
    for path, layer in layers.items():
        tensors = layer.peft_tensors_to_save() if saving else layer.peft_tensors()
        for suffix, tensor in tensors.items():
            out[f"{PREFIX}{path}.{suffix}"] = tensor
    return out


def adapter_tensors(
    model: nn.Module, spec: MethodSpec, layers: Mapping[str, AdapterLayer], call: CallAdapter | None
) -> dict[str, torch.Tensor]:
    """An adapter's state dict as saved, under PEFT's keys (biases of targeted layers under
    ``base_layer``), on the CPU."""
    out = _layer_tensors(spec, layers, saving=True)
    if call is not None:
        out.update(call.peft_tensors_to_save())
    params = dict(model.named_parameters())
    for pname in spec.trainable_base_parameters(model, list(layers)):
        owner, _, leaf = pname.rpartition(".")
        key = f"{owner}.base_layer.{leaf}" if owner in layers else pname
        out[PREFIX + key] = params[pname]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def adapter_config(
    model: nn.Module, spec: MethodSpec, layers: Mapping[str, AdapterLayer], call: CallAdapter | None
) -> dict[str, Any]:
    """An adapter's adapter_config.json, PEFT's fields."""
    from importlib.metadata import PackageNotFoundError, version

    adapted = [p for p, layer in layers.items() if not isinstance(layer, LayerCopy)]
    config = spec.to_peft_config(adapted)
    config["modules_to_save"] = list(spec.modules_to_save) or None
    config.update(spec.peft_config_from_training(layers))
    if call is not None:
        config.update(call.peft_config())
    try:
        surgeon_version = version("surgeon-peft")
    except PackageNotFoundError:
        surgeon_version = "0+unknown"
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config.update(
        {
            "base_model_name_or_path": name_or_path,
            "task_type": config.get("task_type"),
            "inference_mode": True,
            "revision": None,
            # a method whose PEFT config parses peft_version (OFT's) writes its own
            "peft_version": config.get("peft_version") or f"surgeon-peft {surgeon_version}",
        }
    )
    return dict(sorted(config.items()))


def write_adapter(
    target: Path, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """One adapter directory in PEFT's layout; each file is replaced atomically."""
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    atomic_write(
        target / WEIGHTS_NAME, lambda tmp: save_file(dict(tensors), tmp, metadata={"format": "pt"})
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(target / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write(final: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
