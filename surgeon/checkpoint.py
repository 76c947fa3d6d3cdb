"""Training checkpoints: ``<output_dir>/checkpoint-<step>/``, without pickles.

A checkpoint directory holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the adapters in PEFT's layout (the
  directory loads with ``surgeon.load`` or PEFT);
* ``trainer_state.safetensors``: every trained parameter in full (also base parameters a method
  or the user made trainable), the adapter store's buffers (method state such as AdaLoRA's
  importance averages) and the optimizer's state tensors, by parameter name;
* ``surgeon_state.json``: step, data position, scheduler and optimizer settings, the loss
  and log history, and the names, shapes and dtypes it was saved with (checked on resume);
* ``trainer_state.json``: the history as transformers' ``Trainer`` writes it (see
  `surgeon.history`), for the tools that read its checkpoints;
* ``rng_state_<rank>.safetensors`` / ``.json``: each process's random generators (torch, CUDA,
  Python, NumPy).

Each file is written atomically into a temporary directory, which is renamed into place, so a
checkpoint directory is either complete or absent; `rotate` deletes old ones the other way round
(renamed to a hidden name first). Reading validates everything before any state is touched: a
corrupt or mismatched checkpoint raises and changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.distributed import Parallel, full, like
from surgeon.errors import SpecError
from surgeon.history import TRAINER_STATE, write_trainer_state
from surgeon.io import atomic_write, read_safetensors

STATE_JSON = "surgeon_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = "surgeon-checkpoint"
VERSION = 1
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
DELETING = re.compile(r"\.checkpoint-\d+\.deleting")
# resuming with other values changes the data order or the batches: allowed, but not exact
DATA_FIELDS = ("batch_size", "gradient_accumulation_steps", "seed", "shuffle")


@dataclass
class Progress:
    """Where training stands: optimizer steps done, the next batch, and the history so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    log_history: list[dict[str, float]] = field(default_factory=list)


# -- writing ----------------------------------------------------------------------------------


def save(
    output_dir: Path,
    cm: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    names: Sequence[str],
    progress: Progress,
    config: Mapping[str, Any],
    parallel: Parallel,
    trainer_state: Mapping[str, Any],
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` (every process calls this; rank 0 writes the
    shared files, ``trainer_state`` among them, each process its random state)."""
    final = output_dir / f"checkpoint-{progress.step}"
    staging = output_dir / f".checkpoint-{progress.step}.tmp"
    params = _optimizer_params(optimizer)
    tensors, state = _state(cm, optimizer, scheduler, names, params, progress, config, parallel)
    if parallel.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash
        staging.mkdir()
    parallel.barrier()
    _write_rng(staging, parallel.rank)
    with parallel.gathered(cm):
        if parallel.main:
            cm.save_adapters(staging)
    if parallel.main:
        _write_tensors(staging / STATE_TENSORS, tensors)
        _write_json(staging / STATE_JSON, state)
        write_trainer_state(staging / TRAINER_STATE, trainer_state)
    parallel.barrier()
    if parallel.main:
        _publish(staging, final)
    parallel.barrier()
    return final


def _state(
    cm: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    progress: Progress,
    config: Mapping[str, Any],
    parallel: Parallel,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON state of a checkpoint (collectives under FSDP: every process)."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    for name, param in zip(names, params):
        value = full(param.detach())
        tensors[f"param/{name}"] = value
        described[name] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
    buffers, empty = {}, []
    for name, value in store_buffers(cm).items():
        if value is None:
            empty.append(name)
        else:
            tensors[f"buffer/{name}"] = value
            buffers[name] = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{names[index]}/{key}"] = full(value)
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
        for g in optimizer_state["param_groups"]
    ]
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": progress.step,
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "world_size": parallel.world,
        "config": dict(config),
        "losses": progress.losses,
        "learning_rates": progress.learning_rates,
        "eval_losses": [list(pair) for pair in progress.eval_losses],
        "log_history": progress.log_history,
        "parameters": described,
        "buffers": buffers,
        "empty_buffers": empty,
        "optimizer": {"param_groups": groups, "scalars": scalars},
        "scheduler": scheduler.state_dict(),
    }
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, state


def _write_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    state: dict[str, Any] = {"python": {"version": version, "gauss_next": gauss_next}}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        state["numpy"] = {"kind": kind, "pos": pos, "has_gauss": has_gauss, "cached": cached}
    _write_tensors(directory / f"rng_state_{rank}.safetensors", tensors)
    _write_json(directory / f"rng_state_{rank}.json", state)


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata={"format": "pt"}))


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _publish(staging: Path, final: Path) -> None:
    """Rename the finished directory into place (an older one of the same step goes first)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    with contextlib.suppress(OSError):  # not every file system (or OS) syncs directories
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rotate(output_dir: Path, limit: int, newest: Path, keep: Path | None = None) -> list[Path]:
    """Delete the ``checkpoint-<step>`` directories of ``output_dir`` beyond the ``limit`` newest
    (by step, ``newest``, the one just written, counting as the newest of all); return those
    deleted. ``keep`` (the best evaluation's) counts as the second newest, as transformers'
    Trainer does: it stays within the limit, which becomes 2 if it is 1 and ``keep`` is not the
    newest. Each is renamed to a hidden name before it is removed, so a crash midway never
    leaves a partial checkpoint that `latest` would pick."""
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()
    )
    order = [p for _, p in found if p not in (newest, keep)]
    if keep is not None and keep != newest and keep.is_dir():
        order.append(keep)
        limit = max(limit, 2)
    order.append(newest)
    doomed = order[: max(0, len(order) - limit)]
    for path in doomed:
        hidden = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(path, hidden)
    for path in output_dir.iterdir():  # these, and any a crash left behind
        if DELETING.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
    return doomed


# -- reading ----------------------------------------------------------------------------------


def latest(path: Path) -> Path:
    """``path`` if it is a checkpoint, else the checkpoint with the highest step inside it."""
    if (path / STATE_JSON).exists():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from: {path} does not exist")
    steps = sorted(
        (int(m.group(1)), p)
        for p in path.iterdir()
        if (m := CHECKPOINT.fullmatch(p.name)) and (p / STATE_JSON).exists()
    )
    if not steps:
        raise SpecError(
            f"resume_from: {path} is neither a checkpoint (no {STATE_JSON}) nor a directory "
            f"holding checkpoint-<step> directories"
        )
    return steps[-1][1]


@dataclass
class Checkpoint:
    """A checkpoint read and checked against the model; nothing applied yet."""

    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None

    @property
    def progress(self) -> Progress:
        s = self.state
        return Progress(
            step=s["step"],
            epoch=s["epoch"],
            batch_in_epoch=s["batch_in_epoch"],
            losses=list(s["losses"]),
            learning_rates=list(s["learning_rates"]),
            eval_losses=[(int(a), float(b)) for a, b in s["eval_losses"]],
            log_history=[dict(e) for e in s["log_history"]],
        )

    @torch.no_grad()
    def restore_model(self, cm: Any, params: Mapping[str, torch.Tensor]) -> None:
        """Trained parameters (whole, or FSDP shards) and the adapter store's buffers, in place."""
        for name, param in params.items():
            param.copy_(like(self.tensors[f"param/{name}"].to(param.device), param))
        device = next(iter(params.values())).device
        buffers = dict.fromkeys(self.state["empty_buffers"])
        for name in self.state["buffers"]:
            buffers[name] = self.tensors[f"buffer/{name}"].to(device)
        set_store_buffers(cm, buffers)

    def restore_optimizer(
        self, optimizer: torch.optim.Optimizer, scheduler: Any, names: Sequence[str]
    ) -> None:
        params = _optimizer_params(optimizer)
        index = {n: i for i, n in enumerate(names)}
        saved = self.state["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for key, value in self.tensors.items():
            if key.startswith("optimizer/"):
                name, _, slot = key[len("optimizer/") :].rpartition("/")
                i = index[name]
                state.setdefault(i, {})[slot] = like(value.to(params[i].device), params[i])
        for name, values in saved["scalars"].items():
            state.setdefault(index[name], {}).update(values)
        groups = [
            {
                **{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()},
                "params": [index[n] for n in g["params"]],
            }
            for g in saved["param_groups"]
        ]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict(dict(self.state["scheduler"]))

    def restore_rng(self) -> None:
        if self.rng is None:
            return
        tensors, state = self.rng
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda/")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        py = state["python"]
        random.setstate((py["version"], tuple(tensors["python"].tolist()), py["gauss_next"]))
        numpy = sys.modules.get("numpy")
        if numpy is not None and "numpy" in state:
            n = state["numpy"]
            keys = tensors["numpy"].numpy().astype("uint32")
            numpy.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))


def read(
    path: Path,
    names: Sequence[str],
    groups: Sequence[Sequence[str]],
    params: Mapping[str, torch.Tensor],
    cm: Any,
    config: Mapping[str, Any],
    parallel: Parallel,
) -> Checkpoint:
    """Read ``path`` and check it fits: the same trained parameters (names, shapes, dtypes),
    the same optimizer groups, buffers the adapter store has. Raises `SpecError` otherwise."""
    path = latest(Path(path))
    state = _read_json(path / STATE_JSON)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SpecError(f"{path / STATE_JSON}: not a surgeon training checkpoint")
    if state.get("version") != VERSION:
        raise SpecError(
            f"{path / STATE_JSON}: checkpoint format version {state.get('version')!r}; this "
            f"surgeon reads version {VERSION}"
        )
    try:
        _check_parameters(path, state, names, params)
        _check_groups(path, state, groups)
        tensors = read_safetensors(path / STATE_TENSORS)
        _check_tensors(path, state, tensors, names, cm)
    except KeyError as err:
        raise SpecError(f"{path}: incomplete checkpoint, {err} is missing") from None
    _warn_on_changed_data(path, state, config, parallel)
    return Checkpoint(path, state, tensors, _read_rng(path, parallel.rank))


def _check_parameters(
    path: Path, state: dict[str, Any], names: Sequence[str], params: Mapping[str, torch.Tensor]
) -> None:
    saved = state["parameters"]
    missing = [n for n in names if n not in saved]
    extra = [n for n in saved if n not in params]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} trained parameter(s) it lacks, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} it has that this model does not train, e.g. {extra[0]}")
        raise SpecError(f"checkpoint {path} does not fit this model: " + "; ".join(parts))
    for name in names:
        want = params[name]
        shape, dtype = tuple(saved[name]["shape"]), saved[name]["dtype"]
        if shape != tuple(want.shape) or dtype != _dtype_name(want.dtype):
            raise SpecError(
                f"checkpoint {path} does not fit this model: {name} was saved as {dtype} "
                f"{list(shape)}, the model has {_dtype_name(want.dtype)} {list(want.shape)}"
            )


def _check_groups(path: Path, state: dict[str, Any], groups: Sequence[Sequence[str]]) -> None:
    saved = [list(g["params"]) for g in state["optimizer"]["param_groups"]]
    if saved != [list(g) for g in groups]:
        raise SpecError(
            f"checkpoint {path}: its optimizer parameter groups differ from this run's (was it "
            f"saved with other weight-decay or loraplus_lr_ratio settings?)"
        )


def _check_tensors(
    path: Path,
    state: dict[str, Any],
    tensors: Mapping[str, torch.Tensor],
    names: Sequence[str],
    cm: Any,
) -> None:
    where = path / STATE_TENSORS
    for name in names:
        value = tensors.get(f"param/{name}")
        if value is None or list(value.shape) != state["parameters"][name]["shape"]:
            raise SpecError(f"{where}: parameter {name} is missing or has the wrong shape")
    known = set(names)
    for key in tensors:
        if (
            key.startswith("optimizer/")
            and key[len("optimizer/") :].rpartition("/")[0] not in known
        ):
            raise SpecError(f"{where}: optimizer state {key} names no trained parameter")
    modules = dict(cm.store.named_modules())
    for name in [*state["buffers"], *state["empty_buffers"]]:
        _buffer_owner(modules, name)
    for name in state["buffers"]:
        if f"buffer/{name}" not in tensors:
            raise SpecError(f"{where}: buffer {name} is missing")


def _warn_on_changed_data(
    path: Path, state: dict[str, Any], config: Mapping[str, Any], parallel: Parallel
) -> None:
    saved = state.get("config", {})
    changed = [f for f in DATA_FIELDS if saved.get(f) != config.get(f)]
    if state.get("world_size") != parallel.world:
        changed.append(f"world size ({state.get('world_size')} -> {parallel.world})")
    if changed:
        warnings.warn(
            f"resuming from {path} with other {', '.join(changed)}: training continues, but "
            f"not exactly as the interrupted run would have",
            stacklevel=4,
        )


def _read_rng(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    tensors_path = path / f"rng_state_{rank}.safetensors"
    if not tensors_path.exists():
        return None  # another world size: the random state starts from the seed
    return read_safetensors(tensors_path), _read_json(path / f"rng_state_{rank}.json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path} is missing: incomplete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: malformed JSON ({err})") from None


# -- helpers ----------------------------------------------------------------------------------


def store_buffers(cm: Any) -> dict[str, torch.Tensor | None]:
    """Buffers of the adapter store by name (``None`` for registered but unset ones)."""
    return {
        f"{prefix}.{name}" if prefix else name: value
        for prefix, module in cm.store.named_modules()
        for name, value in module._buffers.items()
    }


def set_store_buffers(cm: Any, buffers: Mapping[str, torch.Tensor | None]) -> None:
    """Set buffers of the adapter store by name (``None`` unsets one)."""
    modules = dict(cm.store.named_modules())
    for name, value in buffers.items():
        owner, leaf = _buffer_owner(modules, name)
        setattr(owner, leaf, value)


def _buffer_owner(modules: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    owner = modules.get(prefix)
    if owner is None or leaf not in owner._buffers:
        raise SpecError(f"checkpoint buffer {name} does not exist in this model's adapters")
    return owner, leaf


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
