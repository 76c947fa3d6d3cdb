"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's (``base_model.model.<module path>.lora_A.weight``), so files go both ways.
Only safetensors are read, never pickles. Saves are atomic per file (write a temporary file,
then rename); a load that does not fit the model raises before anything is changed.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.copies import LayerCopy
from surgeon.errors import SpecError
from surgeon.spec import METHODS, MethodSpec, check_names

if TYPE_CHECKING:
    from surgeon.adapter import AdapterLayer, CallAdapter
    from surgeon.compiled import CompiledModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
PREFIX = "base_model.model."

# adapter_config.json fields that never change the math (bookkeeping, or inits whose result the
# saved weights replace).
NEUTRAL_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",
        "ensure_weight_tying",
        "runtime_config",
    }
)
# Fields that switch on a variant surgeon does not implement, with the value meaning "off".
VARIANT_FIELDS: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "megatron_config": None,
}


def _is_off(value: Any, off: Any) -> bool:
    return value == off or value in (None, False, [], {}, ())


def check_peft_fields(config: Mapping[str, Any], handled: set[str], where: str) -> None:
    """Refuse configs that would load as something else; ignore fields that do not change the math."""
    for key, value in config.items():
        if key in handled or key in NEUTRAL_FIELDS:
            continue
        if key in VARIANT_FIELDS:
            if not _is_off(value, VARIANT_FIELDS[key]):
                raise SpecError(
                    f"{where}: {key}={value!r} selects a variant surgeon does not support yet; "
                    f"loading it as plain {config.get('peft_type')} would give different outputs"
                )
            continue
        if _is_off(value, None):
            continue
        if key.startswith("use_") or key.endswith("_config"):
            raise SpecError(
                f"{where}: unknown field {key}={value!r} looks like a variant switch; "
                f"refusing to load it as something else"
            )
        warnings.warn(
            f"{where}: ignoring unknown adapter_config.json field {key}={value!r}", stacklevel=3
        )


def refuse_peft_bias(config: Mapping[str, Any], method: str, where: str) -> None:
    """For methods that do not train base biases: PEFT's ``bias`` must be ``"none"``."""
    if config.get("bias", "none") != "none":
        raise SpecError(
            f"{where}: bias={config['bias']!r} (training base biases) is not supported for "
            f"{method} yet; supported: 'none'"
        )


def peft_targets(config: Mapping[str, Any], where: str) -> str | tuple[str, ...]:
    """``target_modules`` of a PEFT config, after checking the selection fields surgeon reads
    the way PEFT does (``layers_pattern`` must be one of the layer containers it knows)."""
    from surgeon.targets import LAYER_CONTAINERS

    layers_pattern = config.get("layers_pattern")
    if layers_pattern and config.get("layers_to_transform") is not None:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        if any(p not in LAYER_CONTAINERS for p in patterns):
            raise SpecError(
                f"{where}: layers_pattern={layers_pattern!r} is not supported "
                f"(supported: {', '.join(LAYER_CONTAINERS)})"
            )
    targets = config.get("target_modules")
    if targets is None:
        raise SpecError(
            f"{where}: target_modules is missing; surgeon needs the targeted modules named"
        )
    return targets if isinstance(targets, str) else tuple(targets)


def method_from_peft_config(config: Any, where: str) -> MethodSpec:
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
    cls = claiming[0] if claiming else candidates[0]
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


def read_adapter(path: Path) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
    """The method and tensors of an adapter directory (surgeon- or PEFT-saved)."""
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
    found = {_normalise_key(k): v for k, v in tensors.items()}
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


def adapter_tensors(cm: CompiledModel, name: str) -> dict[str, torch.Tensor]:
    """The adapter's state dict under PEFT's keys (biases of targeted layers under ``base_layer``)."""
    paths = cm.store.paths[name]
    out = _layer_tensors(cm.spec(name), dict(cm.store.items(name)), saving=True)
    if (call := cm.store.call(name)) is not None:
        out.update(call.peft_tensors_to_save())
    targeted = set(paths)
    params = dict(cm.model.named_parameters())
    for pname in cm.spec(name).trainable_base_parameters(cm.model, paths):
        owner, _, leaf = pname.rpartition(".")
        key = f"{owner}.base_layer.{leaf}" if owner in targeted else pname
        out[PREFIX + key] = params[pname]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def adapter_config(cm: CompiledModel, name: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    spec = cm.spec(name)
    adapted = [p for p, layer in cm.store.items(name) if not isinstance(layer, LayerCopy)]
    config = spec.to_peft_config(adapted)
    config["modules_to_save"] = list(spec.modules_to_save) or None
    config.update(spec.peft_config_from_training(dict(cm.store.items(name))))
    if (call := cm.store.call(name)) is not None:
        config.update(call.peft_config())
    try:
        surgeon_version = version("surgeon-peft")
    except PackageNotFoundError:
        surgeon_version = "0+unknown"
    name_or_path = getattr(getattr(cm.model, "config", None), "_name_or_path", None) or None
    config.update(
        {
            "base_model_name_or_path": name_or_path,
            "task_type": config.get("task_type"),
            "inference_mode": True,
            "revision": None,
            "peft_version": f"surgeon-peft {surgeon_version}",
        }
    )
    return dict(sorted(config.items()))


def save_adapters(cm: CompiledModel, path: Path, names: Sequence[str] | None = None) -> None:
    """PEFT layout: the adapter named "default" at ``path``, every other one in ``path/<name>``."""
    from safetensors.torch import save_file

    chosen = list(cm.adapters if names is None else names)
    if not chosen:
        raise SpecError("save_adapters: the model has no adapters to save")
    for n in chosen:
        cm._require(n)
    if any(n in cm.merged for n in chosen):
        warnings.warn(
            "saving adapters that are merged into the weights: the saved adapter is the "
            "adapter itself, not the merged model",
            stacklevel=3,
        )
    prepared = []
    for n in chosen:
        target = path if n == "default" else path / n
        prepared.append((target, adapter_config(cm, n), adapter_tensors(cm, n)))
    for target, config, tensors in prepared:
        target.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            target / WEIGHTS_NAME,
            lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}),
        )
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        _atomic_write(
            target / CONFIG_NAME, lambda tmp, s=text: Path(tmp).write_text(s, encoding="utf-8")
        )


def _atomic_write(final: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
