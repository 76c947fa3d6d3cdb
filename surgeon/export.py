"""Lowering and verified ONNX export.

Lowering folds every active adapter into the base weights and removes the rewritten forwards, so
the exported graph holds only the base model's ops; adapters acting on the model call (prompt
methods) stay, with their prompts and prefixes turned into constants. It never touches the user's
weights: each targeted layer gets merged copies for the duration, and the original parameters come
back after.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.adapter import merge_layers
from surgeon.errors import SpecError
from surgeon.layers import restore_storage, snapshot_storage
from surgeon.trace import training_mode

if TYPE_CHECKING:
    from surgeon.compiled import CompiledModel


class ExportError(RuntimeError):
    """The export, or its verification against PyTorch, failed; nothing was left at the path."""


@dataclass
class ExportReport:
    path: Path
    provider: str | None
    max_abs_diff: float | None
    file_bytes: int
    nodes: int
    inputs: list[str]
    outputs: list[str]
    verified_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __str__(self) -> str:
        checked = (
            f"max |onnx - torch| = {self.max_abs_diff:.2e} on {self.provider} "
            f"(inputs {', '.join(f'{k}{tuple(v)}' for k, v in self.verified_shapes.items())})"
            if self.max_abs_diff is not None
            else "not verified"
        )
        return (
            f"{self.path}: {self.file_bytes / 2**20:.1f} MiB, {self.nodes} nodes, "
            f"inputs {self.inputs}, outputs {self.outputs}; {checked}"
        )


# -- lowering ---------------------------------------------------------------------------------


@contextlib.contextmanager
def lowered(cm: CompiledModel) -> Iterator[nn.Module]:
    """The plain model with the active adapters folded in (prompts as constants), for the
    duration of the block."""
    running = [name for name in cm.active if name not in cm.merged]
    layers = [layer for name in running for _, layer in cm.store.items(name)]
    calls = tuple(name for name in running if name in cm.store.calls)
    originals = _swap_in_copies([layer.base for layer in layers])
    try:
        merge_layers(layers)
        with contextlib.ExitStack() as constants:
            for name in calls:
                constants.enter_context(cm.store.calls[name].as_constants())
            cm._install(calls)  # only the call adapters' rewrites remain (none: the base forwards)
            yield cm.model
    finally:
        for module, snapshot in originals:
            restore_storage(module, snapshot)
        cm._recompile()


def _swap_in_copies(modules: list[nn.Module]) -> list[tuple[nn.Module, tuple]]:
    """Give each module copies of its parameters to merge into; the snapshots put back the
    originals (and the storage a merge may change: a 4-bit layer is dequantized)."""
    saved = []
    for module in {id(m): m for m in modules}.values():
        saved.append((module, snapshot_storage(module)))
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=False))
    return saved


# -- export -----------------------------------------------------------------------------------


def export_onnx(
    cm: CompiledModel,
    path: str | Path,
    example_inputs: Mapping[str, torch.Tensor],
    verify: bool = True,
    dynamic: bool | DynamicAxes = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> ExportReport:
    """Export the lowered model to ONNX; with ``verify``, check onnxruntime against PyTorch on
    inputs of other sizes than the example. Returns an `ExportReport`.

    ``example_inputs`` are the forward's keyword arguments; the ONNX inputs carry their names.
    Batch and sequence (or spatial) axes are dynamic (see `default_axes`); ``dynamic=False``
    fixes every size, and ``dynamic={"input_ids": {0: "batch", 1: "sequence"}}`` names them.
    """
    inputs = _check_inputs(example_inputs)
    path = Path(path)
    if path.suffix != ".onnx":
        raise SpecError(f"export_onnx: path {str(path)!r} should end in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    with training_mode(cm, False):
        with torch.no_grad():
            checks = _verification_inputs(inputs, dynamic) if verify else {}
            expected = _flat_outputs(cm.model(**checks)) if verify else {}
        with (
            lowered(cm) as model,
            tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp,
        ):
            staged = Path(tmp) / path.name
            wrapper = _keyword_wrapper(model, list(inputs))
            output_names = list(_flat_outputs(wrapper.call(inputs)))
            _export(wrapper, staged, inputs, output_names, dynamic)
            report = _report(staged, inputs, output_names)
            if verify:
                provider, diff = _verify(staged, checks, expected, atol, rtol)
                report.provider, report.max_abs_diff = provider, diff
                report.verified_shapes = {k: tuple(v.shape) for k, v in checks.items()}
            _move_into_place(Path(tmp), path)
            report.path = path
            return report


def _check_inputs(example_inputs: Any) -> dict[str, torch.Tensor]:
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise SpecError(
            "export_onnx: example_inputs must be a dict of the forward's keyword arguments"
        )
    for name, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise SpecError(
                f"export_onnx: example_inputs[{name!r}] is {type(value).__name__}, expected a tensor"
            )
    return dict(example_inputs)


class _KeywordWrapper(nn.Module):
    """Calls the model with keyword inputs (no cache) and returns a flat tuple of tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if _accepts(model, "use_cache") else {}

    def call(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        return self.model(**inputs, **self.extra)

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flat_outputs(self.call(inputs)).values())


def _keyword_wrapper(model: nn.Module, names: list[str]) -> _KeywordWrapper:
    """A wrapper whose forward's signature names the inputs (torch.export binds by signature)."""

    def forward(self: _KeywordWrapper, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _KeywordWrapper.forward(self, **inputs)

    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.KEYWORD_ONLY) for n in names]
    )
    cls = type("SurgeonExport", (_KeywordWrapper,), {"forward": forward})
    return cls(model).eval()


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _flat_outputs(out: Any) -> dict[str, torch.Tensor]:
    """Named tensor outputs: a ModelOutput's fields, a tuple's items, or one tensor."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise ExportError(f"export_onnx: the model returned {type(out).__name__}, not tensors")


DynamicAxes = Mapping[str, Mapping[int, str]]


def default_axes(inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch on axis 0; sequence on axis 1 of integer (token) inputs; for float inputs, the axes
    after the channel axis (length, or height/width/depth). Inputs whose example sizes differ on
    such an axis (an encoder-decoder's two sequences) get axes of their own. Pass ``dynamic={...}``
    to choose otherwise."""
    axes: dict[str, dict[int, str]] = {}
    labels_by_size: dict[tuple[str, int], str] = {}
    for name, value in inputs.items():
        dims = {0: "batch"} if value.ndim >= 1 else {}
        if not value.is_floating_point() and value.ndim >= 2:
            roles = {1: "sequence"}
        elif value.is_floating_point() and value.ndim == 3:
            roles = {2: "length"}
        elif value.is_floating_point() and value.ndim > 3:
            roles = dict(zip(range(2, value.ndim), ("height", "width", "depth")))
        else:
            roles = {}
        for axis, role in roles.items():
            taken = {label for (r, _), label in labels_by_size.items() if r == role}
            label = labels_by_size.setdefault(
                (role, value.shape[axis]), role if not taken else f"{name}_{role}"
            )
            dims[axis] = label
        axes[name] = dims
    return axes


def _axes(inputs: Mapping[str, torch.Tensor], dynamic: bool | DynamicAxes) -> DynamicAxes:
    if dynamic is True:
        return default_axes(inputs)
    if dynamic is False:
        return {name: {} for name in inputs}
    unknown = set(dynamic) - set(inputs)
    if unknown:
        raise SpecError(
            f"export_onnx: dynamic names inputs {sorted(unknown)} that example_inputs lacks"
        )
    return {name: dict(dynamic.get(name, {})) for name in inputs}


def _dynamic_shapes(inputs: Mapping[str, torch.Tensor], dynamic: bool | DynamicAxes) -> dict | None:
    axes = _axes(inputs, dynamic)
    if not any(axes.values()):
        return None
    dims: dict[str, Any] = {}
    return {
        name: {
            axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in spec.items()
        }
        for name, spec in axes.items()
    }


def _export(
    wrapper: nn.Module,
    staged: Path,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    dynamic: bool | DynamicAxes,
) -> None:
    try:
        torch.onnx.export(
            wrapper,
            (),
            str(staged),
            kwargs=inputs,
            input_names=list(inputs),
            output_names=output_names,
            dynamic_shapes=_dynamic_shapes(inputs, dynamic),
            dynamo=True,
            verbose=False,
            external_data=_needs_external_data(wrapper),
            report=False,
        )
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ""
        if dynamic is not False and any(s == 1 for v in inputs.values() for s in v.shape):
            hint = (
                " (example inputs with a size of 1 on a dynamic axis pin that axis: use sizes >= 2)"
            )
        raise ExportError(f"export_onnx: torch.onnx.export failed: {first}{hint}") from err


def _needs_external_data(model: nn.Module) -> bool:
    """ONNX protobufs stop at 2 GiB: larger models keep their weights in a side file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30


def _verification_inputs(
    inputs: dict[str, torch.Tensor], dynamic: bool | DynamicAxes
) -> dict[str, torch.Tensor]:
    """Inputs of other sizes than the example on every dynamic axis, with values like the example's."""
    generator = torch.Generator().manual_seed(0)
    axes = _axes(inputs, dynamic)
    grow: dict[str, int] = {}
    out = {}
    for name, value in inputs.items():
        shape = list(value.shape)
        for axis, label in axes[name].items():
            shape[axis] += grow.setdefault(label, len(grow) + 1)
        if value.is_floating_point():
            sample = torch.randn(shape, generator=generator, dtype=torch.float32).to(value.dtype)
        else:
            pool = value.flatten()
            sample = pool[torch.randint(0, pool.numel(), shape, generator=generator)]
            if "mask" in name:
                sample = torch.ones(shape, dtype=value.dtype)
        out[name] = sample.to(value.device)
    return out


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _verify(
    staged: Path,
    checks: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    atol: float | None,
    rtol: float | None,
) -> tuple[str, float]:
    import onnxruntime as ort

    providers = _providers()
    feeds = {k: v.detach().cpu().numpy() for k, v in checks.items()}
    try:
        session = ort.InferenceSession(str(staged), providers=providers)
        results = session.run(None, feeds)
    except Exception as err:
        if "NOT_IMPLEMENTED" in str(err) and any(
            v.dtype == torch.bfloat16 for v in expected.values()
        ):
            raise ExportError(
                f"export_onnx: onnxruntime's {providers[0]} has no bfloat16 kernel for "
                f"an op in this model ({str(err).split(':')[-1].strip()}); export with verify=False, or "
                f"verify where onnxruntime-gpu's CUDA provider is available"
            ) from err
        raise ExportError(
            f"export_onnx: onnxruntime failed on inputs of new sizes "
            f"({', '.join(f'{k}{tuple(v.shape)}' for k, v in checks.items())}): {err}"
        ) from err
    names = [o.name for o in session.get_outputs()]
    if not set(names) & set(expected):
        raise ExportError(
            f"export_onnx: none of the ONNX outputs {names} is an output of the model"
        )
    worst = 0.0
    for name, got in zip(names, results):
        want = expected.get(name)
        if want is None:
            continue
        want = want.detach().float().cpu()
        got_t = torch.from_numpy(got).float()
        if got_t.shape != want.shape:
            raise ExportError(
                f"export_onnx: output {name!r} has shape {tuple(got_t.shape)} in ONNX "
                f"but {tuple(want.shape)} in PyTorch"
            )
        tol_a, tol_r = _tolerances(expected[name].dtype, atol, rtol)
        diff = (got_t - want).abs()
        worst = max(worst, diff.max().item())
        allowed = tol_a + tol_r * want.abs()
        if (diff > allowed).any():
            raise ExportError(
                f"export_onnx: output {name!r} differs from PyTorch by up to "
                f"{diff.max().item():.3e} (allowed {tol_a:.1e} + {tol_r:.1e}*|x|)"
            )
    return session.get_providers()[0], worst


def _tolerances(dtype: torch.dtype, atol: float | None, rtol: float | None) -> tuple[float, float]:
    default = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}.get(dtype, (1e-4, 1e-3))
    return (atol if atol is not None else default[0], rtol if rtol is not None else default[1])


def _report(staged: Path, inputs: Mapping[str, torch.Tensor], outputs: list[str]) -> ExportReport:
    import onnx

    proto = onnx.load(str(staged), load_external_data=False)
    size = sum(f.stat().st_size for f in staged.parent.iterdir())
    return ExportReport(
        path=staged,
        provider=None,
        max_abs_diff=None,
        file_bytes=size,
        nodes=len(proto.graph.node),
        inputs=list(inputs),
        outputs=outputs,
    )


def _move_into_place(staging: Path, path: Path) -> None:
    """The .onnx file (and its external data, if any) replace what is at ``path``; the file
    names inside the model stay valid because the staged files already carry the final names."""
    for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
        os.replace(item, path.parent / item.name)
