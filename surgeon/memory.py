"""`surgeon.estimate_memory`: training memory of full fine-tuning vs an adapter vs QLoRA.

Everything is computed from the model's real modules, built on the meta device (no memory, no
compute): weights, gradients and optimizer states from the parameters each setup trains or
stores; quantization statistics from the 4-bit layers QLoRA creates; activations by running one
training forward on meta tensors and adding up every tensor autograd saves for backward, plus
the gradient buffers alive when backward starts (twice the largest saved tensor). With gradient
checkpointing, only each decoder layer's input is kept and one layer's activations come back at
a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.checks import check_choice, check_int
from surgeon.compiled import compile
from surgeon.errors import SpecError
from surgeon.quant import Linear4bit
from surgeon.spec import METHODS, MethodSpec, Spec, as_spec, method_class

DEFAULT_METHOD = "lora"
"""The adapter estimated when none is given: LoRA with its defaults."""

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0}
"""Optimizer state tensors per trainable parameter (Adam: two moments, in the parameter's dtype)."""
GB = 1e9


@dataclass
class MemoryRow:
    """One training setup's memory, in bytes."""

    setup: str
    weights: int
    gradients: int
    optimizer_states: int
    quantization_statistics: int
    activations: int
    trainable: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_states
            + self.quantization_statistics
            + self.activations
        )


@dataclass
class MemoryReport:
    """Rows for full fine-tuning, the adapter and QLoRA; ``str()`` is a table in GB (10^9 bytes;
    MB below a GB)."""

    rows: list[MemoryRow]
    parameters: int
    batch_size: int
    seq_len: int
    optimizer: str
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)

    def row(self, setup: str) -> MemoryRow:
        for row in self.rows:
            if row.setup.lower() == setup.lower():
                return row
        raise KeyError(f"no row {setup!r}; rows: {', '.join(r.setup for r in self.rows)}")

    def __str__(self) -> str:
        scale, unit = (GB, "GB") if max(r.total for r in self.rows) >= GB else (1e6, "MB")
        header = (
            "setup",
            "weights",
            "gradients",
            "optimizer",
            "quant stats",
            "activations",
            "total",
        )
        body = [
            (
                r.setup,
                *(
                    f"{v / scale:.2f}"
                    for v in (
                        r.weights,
                        r.gradients,
                        r.optimizer_states,
                        r.quantization_statistics,
                        r.activations,
                        r.total,
                    )
                ),
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        title = (
            f"training memory ({unit}) for {self.parameters / 1e9:.2f}B parameters, batch "
            f"{self.batch_size} x {self.seq_len} tokens, {self.optimizer}{checkpointing}"
        )
        out = [title, line(header), line(tuple("-" * w for w in widths))]
        out.extend(line(row) for row in body)
        return "\n".join(out + self.notes)


def estimate_memory(
    model_or_config: Any,
    spec: Spec | MethodSpec | Mapping[str, Any] | None = None,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    optimizer: str = "adamw",
    dtype: torch.dtype | str | None = None,
    gradient_checkpointing: bool = False,
    inputs: Mapping[str, torch.Tensor] | None = None,
) -> MemoryReport:
    """Training memory of full fine-tuning, ``spec``'s adapter (default ``LoRA()``) and QLoRA.

    ``model_or_config``: a model (left untouched; transformers models are rebuilt from their
    config), a transformers config, or a checkpoint folder. ``dtype``: the weights' dtype for
    full fine-tuning and the adapter (default the model's); QLoRA keeps what it does not
    quantize in its compute dtype, as `surgeon.from_pretrained` loads it. QLoRA's row uses
    ``spec`` itself when it is a QLoRA, else the same LoRA fields with ``NF4()``. ``inputs``:
    example forward arguments for models that do not take ``input_ids``.
    """
    check_int("estimate_memory", "batch_size", batch_size)
    check_int("estimate_memory", "seq_len", seq_len)
    check_choice("estimate_memory", "optimizer", optimizer, OPTIMIZER_STATES)
    method = _single_method(spec)
    if isinstance(model_or_config, (str, Path)):
        from transformers import AutoConfig

        model_or_config = AutoConfig.from_pretrained(model_or_config)
    build = _meta_builder(model_or_config)
    dtype = _dtype(dtype, model_or_config)
    adapter = method.on_full_precision_base()
    qlora = next(
        (q for cls in METHODS.values() if (q := cls.on_4bit_base(method)) is not None), None
    )
    setups: list[tuple[str, torch.dtype, MethodSpec | None]] = [
        ("full fine-tune", dtype, None),
        (type(adapter).__name__, dtype, adapter),
    ]
    notes = []
    if qlora is not None:
        setups.append(("QLoRA", qlora.quant.dtype, qlora))
    else:
        notes.append(f"(no QLoRA row: {type(method).__name__} cannot run on a 4-bit base)")
    rows = []
    for name, row_dtype, row_method in setups:
        model = build(row_dtype)
        rows.append(
            _row(
                name,
                model,
                row_method,
                batch_size,
                seq_len,
                optimizer,
                gradient_checkpointing,
                inputs,
            )
        )
    parameters = rows[0].trainable  # full fine-tuning trains every parameter
    return MemoryReport(
        rows, parameters, batch_size, seq_len, optimizer, gradient_checkpointing, notes
    )


# -- the model on the meta device --------------------------------------------------------------------


def _meta_builder(source: Any) -> Callable[[torch.dtype], nn.Module]:
    """A function building a fresh meta-device copy of the model in a given dtype."""
    config = getattr(source, "config", None) if isinstance(source, nn.Module) else source
    if _is_hf_config(config):
        cls = type(source) if isinstance(source, nn.Module) else None
        return lambda dtype: _hf_on_meta(config, cls, dtype)
    if isinstance(source, nn.Module):
        return lambda dtype: _copy_on_meta(source, dtype)
    raise SpecError(
        f"estimate_memory: expected a model, a transformers config or a checkpoint folder, "
        f"got {type(source).__name__}"
    )


def _is_hf_config(config: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(config, PretrainedConfig)


def _hf_on_meta(config, cls: type | None, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = cls(config) if cls is not None else AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def _copy_on_meta(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A deep copy whose tensors are empty meta tensors (nothing of the original is copied)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta", dtype=dtype if t.is_floating_point() else t.dtype)
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _dtype(dtype: Any, source: Any) -> torch.dtype:
    """``dtype`` resolved; by default a model's own, a config's ``dtype``, else float32."""
    if dtype is None and isinstance(source, nn.Module):
        dtype = next((p.dtype for p in source.parameters() if p.is_floating_point()), None)
    elif dtype is None:
        dtype = getattr(source, "dtype", None) or getattr(source, "torch_dtype", None)
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise SpecError(f"estimate_memory: dtype={dtype!r} is not a floating-point torch dtype")
    return resolved


def _single_method(spec: Any) -> MethodSpec:
    if spec is None:
        return method_class(DEFAULT_METHOD)()
    adapters = as_spec(spec).adapters
    if len(adapters) != 1:
        raise SpecError("estimate_memory: give one adapter method (a Spec with one adapter)")
    return next(iter(adapters.values()))


# -- one row --------------------------------------------------------------------------------------


def _row(
    name: str,
    model: nn.Module,
    method: MethodSpec | None,
    batch_size: int,
    seq_len: int,
    optimizer: str,
    checkpointing: bool,
    inputs: Mapping[str, torch.Tensor] | None,
) -> MemoryRow:
    if method is None:
        for p in model.parameters():
            p.requires_grad_(True)
        runner: nn.Module = model
    else:
        runner = compile(model, method)
    trainable = [p for p in runner.parameters() if p.requires_grad]
    stats = sum(_statistics_bytes(m) for m in model.modules() if isinstance(m, Linear4bit))
    stored = sum(_nbytes(t) for t in [*runner.parameters(), *runner.buffers()])
    trained = sum(_nbytes(p) for p in trainable)
    activations = _activation_bytes(runner, model, batch_size, seq_len, checkpointing, inputs)
    return MemoryRow(
        setup=name,
        weights=stored - stats,
        gradients=trained,
        optimizer_states=OPTIMIZER_STATES[optimizer] * trained,
        quantization_statistics=stats,
        activations=activations,
        trainable=sum(p.numel() for p in trainable),
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _statistics_bytes(layer: Linear4bit) -> int:
    return sum(_nbytes(t) for n, t in layer.named_buffers(recurse=False) if n in layer.STATISTICS)


def _activation_bytes(
    runner: nn.Module,
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    inputs: Mapping[str, torch.Tensor] | None,
) -> int:
    """Bytes autograd saves in one training forward (meta tensors), and the backward workspace."""
    kept = {t.untyped_storage()._cdata for t in [*runner.parameters(), *runner.buffers()]}
    layers = _decoder_layers(model)
    current: list[int | None] = [None]
    per_layer: dict[int | None, int] = {}
    layer_inputs: dict[int, int] = {}
    seen: set[int] = set()
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in kept and key not in seen:
            seen.add(key)
            per_layer[current[0]] = per_layer.get(current[0], 0) + storage.nbytes()
            largest[0] = max(largest[0], storage.nbytes())
        return t

    hooks = []
    for index, layer in enumerate(layers):

        def enter(module, args, kwargs, index=index):
            current[0] = index
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, torch.Tensor):
                layer_inputs[index] = _nbytes(first)

        def leave(module, args, output):
            current[0] = None

        hooks.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(layer.register_forward_hook(leave))
    runner.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _training_forward(runner, model, batch_size, seq_len, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    outside = per_layer.pop(None, 0)
    if checkpointing and per_layer:
        saved = outside + sum(layer_inputs.values()) + max(per_layer.values())
    else:
        saved = outside + sum(per_layer.values())
    return saved + 2 * largest[0]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (the longest ModuleList), which gradient checkpointing wraps."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _training_forward(
    runner: nn.Module,
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    inputs: Mapping[str, torch.Tensor] | None,
) -> None:
    if inputs is None:
        config = getattr(model, "config", None)
        if config is None:
            raise SpecError(
                "estimate_memory: this model takes no input_ids that could be made up; "
                "pass inputs={...} (example forward arguments, any device)"
            )
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
        out = runner(input_ids=ids, labels=ids)
    else:
        meta = {k: torch.empty_like(v, device="meta") for k, v in inputs.items()}
        out = runner(**meta)
    loss = getattr(out, "loss", None)
    if loss is None:
        main = out if isinstance(out, torch.Tensor) else out[0]
        loss = main.float().sum()
    del loss
