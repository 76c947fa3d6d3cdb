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
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.adapter import merge_layers
from surgeon.errors import SpecError
from surgeon.layers import restore_storage, snapshot_storage
from surgeon.logs import ONNX_EXPORT, expected_noise
from surgeon.trace import training_mode

if TYPE_CHECKING:
    from surgeon.compiled import CompiledModel

log = logging.getLogger(__name__)


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
    static_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    """Axes the defaults would make dynamic but the model fixes: input -> axis -> its reason."""

    def __str__(self) -> str:
        checked = (
            f"max |onnx - torch| = {self.max_abs_diff:.2e} on {self.provider} "
            f"(inputs {', '.join(f'{k}{tuple(v)}' for k, v in self.verified_shapes.items())})"
            if self.max_abs_diff is not None
            else "not verified"
        )
        fixed = "".join(
            f"; {name} axis {axis} static ({reason})"
            for name, spec in self.static_axes.items()
            for axis, reason in spec.items()
        )
        return (
            f"{self.path}: {self.file_bytes / 2**20:.1f} MiB, {self.nodes} nodes, "
            f"inputs {self.inputs}, outputs {self.outputs}; {checked}{fixed}"
        )


# -- lowering ---------------------------------------------------------------------------------


@contextlib.contextmanager
def lowered(cm: CompiledModel) -> Iterator[nn.Module]:
    """The plain model with the active adapters folded in (prompts as constants), for the
    duration of the block."""
    running = [name for name in cm.active if name not in cm.merged]
    cm.refuse_unmergeable(running, "export")
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
    By default the batch and sequence (or spatial) axes of `default_axes` are dynamic where the
    model accepts other sizes on them (tried on the example; the report's ``static_axes`` says
    why the others stay fixed). ``dynamic=False`` fixes every size, and
    ``dynamic={"input_ids": {0: "batch", 1: "sequence"}}`` names the dynamic axes as given.
    """
    inputs = _check_inputs(example_inputs)
    path = Path(path)
    if path.suffix != ".onnx":
        raise SpecError(f"export_onnx: path {str(path)!r} should end in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    requested = _axes(inputs, dynamic)
    with (
        training_mode(cm, False),
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp,
    ):
        staged = Path(tmp) / path.name
        with lowered(cm) as model:
            graph, output_names, axes, static = _export_lowered(
                model, staged, inputs, requested, probe=dynamic is True
            )
        report = _report(staged, graph, inputs, output_names)
        report.static_axes = static
        if verify:
            # against the unmerged model: a wrong lowering shows up here
            call = _KeywordWrapper(cm.model).call
            checks, expected = _verification(call, inputs, axes, _growth(requested))
            provider, diff = _verify(staged, checks, expected, atol, rtol)
            report.provider, report.max_abs_diff = provider, diff
            report.verified_shapes = {k: tuple(v.shape) for k, v in checks.items()}
        _move_into_place(Path(tmp), path)
        report.path = path
        return report


def _export_lowered(
    model: nn.Module, staged: Path, inputs: dict[str, torch.Tensor], requested: Axes, probe: bool
) -> tuple[Any, list[str], Axes, Axes]:
    """Export the lowered model to ``staged``: the ONNX graph, its output names, the dynamic axes
    and the static axes with their reasons. With ``probe`` (the default axes), an axis the model
    or torch.export fixes stays static; otherwise such an axis is an `ExportError`. The checks
    run on the plain lowered model, so they cost a forward each."""
    growth = _growth(requested)
    wrapper = _keyword_wrapper(model, list(inputs))
    output_names = list(_example_outputs(wrapper.call, inputs))
    static = _refused_axes(wrapper.call, inputs, requested, growth)
    if static and not probe:  # fail before the export, which takes far longer
        raise _axis_error(static, requested)
    axes = _without(requested, static)
    _export(wrapper, staged, inputs, output_names, axes)
    graph = _onnx_graph(staged)
    traced = _axes_fixed_by_tracing(graph, axes)
    if traced and not probe:
        refused = _refused_axes(wrapper.call, inputs, _only(axes, traced), growth)
        raise _axis_error(_merged(traced, refused), axes)
    static = _merged(static, traced)
    _log_static_axes(static)
    return graph, output_names, _without(axes, traced), static


def _example_outputs(call: ModelCall, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        try:
            return _flat_outputs(call(inputs))
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(
                f"export_onnx: the model fails on example_inputs: {_first_line(err)}"
            ) from err


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
ModelCall = Callable[[Mapping[str, torch.Tensor]], Any]


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


Axes = dict[str, dict[int, str]]
"""input -> axis -> a label (a dynamic axis's name, or why an axis is static)."""


def _axes(inputs: Mapping[str, torch.Tensor], dynamic: bool | DynamicAxes) -> Axes:
    if dynamic is True:
        return default_axes(inputs)
    if dynamic is False:
        return {name: {} for name in inputs}
    unknown = set(dynamic) - set(inputs)
    if unknown:
        raise SpecError(
            f"export_onnx: dynamic names inputs {sorted(unknown)} that example_inputs lacks"
        )
    for name, spec in dynamic.items():
        for axis in spec:
            if not isinstance(axis, int) or not 0 <= axis < inputs[name].ndim:
                raise SpecError(
                    f"export_onnx: dynamic[{name!r}] names axis {axis!r}, but {name} has "
                    f"{inputs[name].ndim} axes (0 to {inputs[name].ndim - 1})"
                )
    return {name: dict(dynamic.get(name, {})) for name in inputs}


def _growth(axes: Axes) -> dict[str, int]:
    """How much each dynamic axis grows in the probes and the verification: a different amount
    per label, so that axes which must not be equal do not look equal."""
    growth: dict[str, int] = {}
    for spec in axes.values():
        for label in spec.values():
            growth.setdefault(label, len(growth) + 1)
    return growth


def _refused_axes(
    call: ModelCall, inputs: dict[str, torch.Tensor], axes: Axes, growth: dict[str, int]
) -> Axes:
    """The axes the model refuses other sizes on, with its reason. One forward on the example
    grown along every axis; only when the model refuses that, one per label (an input and its
    mask grow together) to find which. CPU kernels pay a set-up cost per new shape, so the
    common case, where every axis is accepted, costs a single forward."""
    if not any(axes.values()) or _refusal(call, _resized(inputs, axes, growth)) is None:
        return {}
    refused: Axes = {}
    for label in growth:
        along = _labelled(axes, label)
        reason = _refusal(call, _resized(inputs, along, growth)) if any(along.values()) else None
        if reason is not None:
            refused = _merged(refused, {n: dict.fromkeys(s, reason) for n, s in along.items()})
    if not refused:
        raise _combination_error(call, inputs, axes, growth)
    return refused


def _refusal(call: ModelCall, inputs: dict[str, torch.Tensor]) -> str | None:
    """Why the model refuses these inputs (the first line of its error), or None."""
    try:
        with torch.no_grad():
            call(inputs)
    except Exception as err:  # any error (a ValueError, a shape mismatch) is a refusal
        return _first_line(err)
    return None


def _combination_error(
    call: ModelCall, inputs: dict[str, torch.Tensor], axes: Axes, growth: dict[str, int]
) -> ExportError:
    grown = _resized(inputs, axes, growth)
    shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in grown.items())
    return ExportError(
        f"export_onnx: the model fails on inputs {shapes} although it takes each dynamic axis "
        f"grown alone: {_refusal(call, grown)}. Pass dynamic with fewer of the axes {axes!r}, "
        f"or dynamic=False"
    )


def _axes_fixed_by_tracing(graph: Any, axes: Axes) -> Axes:
    """Dynamic axes that the exported graph holds at a fixed size: torch.onnx lets torch.export
    specialise an axis the traced code needs at its example size."""
    dims = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
    fixed: Axes = {}
    for name, spec in axes.items():
        for axis in spec:
            if name in dims and axis < len(dims[name]) and dims[name][axis].HasField("dim_value"):
                size = dims[name][axis].dim_value
                fixed.setdefault(name, {})[axis] = f"torch.export fixed it at {size} while tracing"
    return fixed


def _filtered(axes: Axes, keep: Callable[[str, int, str], bool]) -> Axes:
    return {
        name: {axis: label for axis, label in spec.items() if keep(name, axis, label)}
        for name, spec in axes.items()
    }


def _labelled(axes: Axes, label: str) -> Axes:
    return _filtered(axes, lambda name, axis, other: other == label)


def _without(axes: Axes, fixed: Axes) -> Axes:
    return _filtered(axes, lambda name, axis, label: axis not in fixed.get(name, {}))


def _only(axes: Axes, chosen: Axes) -> Axes:
    return _filtered(axes, lambda name, axis, label: axis in chosen.get(name, {}))


def _merged(first: Axes, second: Axes) -> Axes:
    """Both, and the second's entry where both name an axis."""
    out = {name: dict(spec) for name, spec in first.items()}
    for name, spec in second.items():
        if spec:
            out.setdefault(name, {}).update(spec)
    return out


def _axis_error(refused: Axes, axes: Axes) -> ExportError:
    """Names each axis that cannot be dynamic and the ``dynamic`` that keeps them static."""
    kept = {name: spec for name, spec in _without(axes, refused).items() if spec}
    causes = "; ".join(
        f"{name} axis {axis} ({axes[name][axis]!r}) cannot be dynamic: {reason}"
        for name, spec in refused.items()
        for axis, reason in spec.items()
    )
    instead = f"dynamic={kept!r}" if kept else "dynamic=False"
    return ExportError(f"export_onnx: {causes}. Pass {instead} instead")


def _log_static_axes(static: Axes) -> None:
    for name, spec in static.items():
        for axis, reason in spec.items():
            log.debug("export_onnx: %s axis %d stays static: %s", name, axis, reason)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (
        f"{type(err).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(err).__name__
    )


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
        with expected_noise(ONNX_EXPORT, log):
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
        raise _export_failure(err, inputs, _axes(inputs, dynamic)) from err


def _export_failure(err: Exception, inputs: dict[str, torch.Tensor], axes: Axes) -> ExportError:
    """torch.export's reason, and the dynamic axes it names (by their labels, or as
    ``L['x'].size()[1]``) with the ``dynamic`` that keeps them static."""
    text = str(err)
    named = {
        (name, int(axis))
        for name, axis in re.findall(r"L\[(?:'kwargs'\]\[)?'(\w+)'\]\.size\(\)\[(\d+)\]", text)
    }
    suspects = {
        name: spec
        for name, spec in _filtered(
            axes,
            lambda name, axis, label: (
                (name, axis) in named or re.search(rf"\b{re.escape(label)}\b", text) is not None
            ),
        ).items()
        if spec
    }
    pinned = [
        f"{name} axis {axis}"
        for name, spec in axes.items()
        for axis in spec
        if inputs[name].shape[axis] == 1
    ]
    hint = (
        f" ({', '.join(pinned)} has size 1 in the example, which pins it: use sizes >= 2)"
        if pinned
        else ""
    )
    if suspects:
        kept = {name: spec for name, spec in _without(axes, suspects).items() if spec}
        instead = f"dynamic={kept!r}" if kept else "dynamic=False"
        hint += f"; it names the dynamic axes {suspects!r}: pass {instead} to keep them static"
    return ExportError(f"export_onnx: torch.onnx.export failed: {_export_reason(err)}{hint}")


def _export_reason(err: Exception) -> str:
    """torch.onnx wraps torch.export's error in advice on filing issues: its summary line."""
    summary = re.search(r"## Exception summary\s+<class '[\w.]*?(\w+)'>: (.+)", str(err))
    return f"{summary[1]}: {summary[2].strip()}" if summary else _first_line(err)


def _needs_external_data(model: nn.Module) -> bool:
    """ONNX protobufs stop at 2 GiB: larger models keep their weights in a side file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8 * 2**30


def _resized(
    inputs: dict[str, torch.Tensor], axes: Axes, growth: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Inputs grown along the given axes, with values like the example's (masks all ones)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, value in inputs.items():
        shape = list(value.shape)
        for axis, label in axes[name].items():
            shape[axis] += growth[label]
        if value.is_floating_point():
            sample = torch.randn(shape, generator=generator, dtype=torch.float32).to(value.dtype)
        else:
            pool = value.flatten()
            sample = pool[torch.randint(0, pool.numel(), shape, generator=generator)]
            if "mask" in name:
                sample = torch.ones(shape, dtype=value.dtype)
        out[name] = sample.to(value.device)
    return out


def _verification(
    call: ModelCall, inputs: dict[str, torch.Tensor], axes: Axes, growth: dict[str, int]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs grown along every dynamic axis, and PyTorch's outputs on them; when the model
    refuses them, the axes it refuses and what to pass instead."""
    checks = _resized(inputs, axes, growth)
    try:
        with torch.no_grad():
            return checks, _flat_outputs(call(checks))
    except ExportError:
        raise
    except Exception as err:
        raise _axis_error(_refused_axes(call, inputs, axes, growth), axes) from err


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _as_numpy(tensor: torch.Tensor) -> Any:
    """``tensor`` for onnxruntime: numpy has no bfloat16, so those go through ml_dtypes' (onnx
    depends on it), bit for bit."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _verify(
    staged: Path,
    checks: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    atol: float | None,
    rtol: float | None,
) -> tuple[str, float]:
    import onnxruntime as ort

    providers = _providers()
    feeds = {k: _as_numpy(v) for k, v in checks.items()}
    try:
        session = ort.InferenceSession(str(staged), providers=providers)
        results = session.run(None, feeds)
    except Exception as err:
        # a missing kernel, or an op whose schema has no bfloat16 (a convolution)
        if ("NOT_IMPLEMENTED" in str(err) or "tensor(bfloat16)" in str(err)) and any(
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


def _onnx_graph(staged: Path) -> Any:
    import onnx

    return onnx.load(str(staged), load_external_data=False).graph


def _report(
    staged: Path, graph: Any, inputs: Mapping[str, torch.Tensor], outputs: list[str]
) -> ExportReport:
    size = sum(f.stat().st_size for f in staged.parent.iterdir())
    return ExportReport(
        path=staged,
        provider=None,
        max_abs_diff=None,
        file_bytes=size,
        nodes=len(graph.node),
        inputs=list(inputs),
        outputs=outputs,
    )


def _move_into_place(staging: Path, path: Path) -> None:
    """The .onnx file (and its external data, if any) replace what is at ``path``; the file
    names inside the model stay valid because the staged files already carry the final names."""
    for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
        os.replace(item, path.parent / item.name)
