"""LoRA-drop: LoRA kept where its output matters, one shared LoRA elsewhere (Zhou et al., 2024,
"LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation",
https://arxiv.org/abs/2402.07721, §3).

A kept layer ``i`` computes ``base(x) + s · B_i A_i dropout(x)``; every other layer computes
``base(x) + s · B_g A_g dropout(x)`` with one pair ``(A_g, B_g)`` shared by all the non-kept layers
of its shape group ``g`` (``s = alpha / r``, rsLoRA: ``alpha / sqrt(r)``). The paper shares one
LoRA among all the dropped layers; layers of different shapes cannot hold one pair, so here
the dropped layers share one pair per ``(in, out)`` shape (a grouped-query v_proj beside q_proj
gets its own).

Which layers keep their own LoRA comes from a short LoRA training first (the paper's stage 1):

* `lora_output_importance` scores each layer of the trained LoRA by its output on (a sample
  of) the data, ``g_i = Σ_x ‖ΔW_i x_i‖²`` (x_i the layer's input; every token of every batch);
* `kept_layers` normalises them, ``I_i = g_i / Σ_j g_j``, sorts them in decreasing order and
  keeps the fewest most important layers whose ``I`` add up to ``threshold`` (``T``; 0.9, the
  paper's choice); `loradrop_spec` builds the `LoRADrop` spec keeping them;
* training goes on with that spec (stage 2); `init_kept_from_lora` optionally starts the kept
  layers from the trained LoRA's factors (the shared pairs start fresh).

Inits: A kaiming-uniform, B zero (LoRA's), drawn in model order (a shared pair when the first
layer of its group comes), so a fresh adapter leaves the model as it is. Merging adds
``s · B A`` (the layer's pair) to each weight.

Files: PEFT's layout under this project's own type ``"peft_type": "SURGEON_LORADROP"`` (PEFT
has no LoRA-drop; its loader refuses such a file). The config holds LoRA's keys (``r``,
``lora_alpha``, ``lora_dropout``, ``use_rslora``, the selection) and ``keep_modules`` (the kept
layers); a kept layer holds ``lora_A.weight`` and ``lora_B.weight`` under its path, as LoRA's;
the shared pairs are ``base_model.loradrop_A.<in>x<out>`` and ``base_model.loradrop_B.<in>x<out>``.
In half precision the factors are kept in float32, as PEFT keeps LoRA's.

Layers: Linear and transformers' GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_int, check_names, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.passes.lowrank.lora import LoRA, LoRALayer
from surgeon.peft import BOOL, INT, NUMBER, JsonType, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import matches_suffix

SHARED_PREFIX = "base_model.loradrop_"
PAPER_THRESHOLD = 0.9
"""The cumulative importance the paper keeps (its ablation's best ``T``)."""

MODULE_NAMES = JsonType(
    "a list of module names",
    lambda v: isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v),
)

PEFT_FORMAT = PeftFormat(
    "SURGEON_LORADROP",
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("use_rslora", "rslora", False, BOOL),
        PeftKey("keep_modules", "keep", (), MODULE_NAMES, load=lambda v, c, w: tuple(v)),
    ),
    # LoRA's bias switch would train base biases too: not this method
    switches={"bias": "none"},
    constants={"fan_in_fan_out": False},  # implied by the layer type
)


@dataclass(frozen=True)
class LoRADrop(MethodSpec):
    """LoRA on the ``keep`` layers, one LoRA pair per shape shared by the other targets.

    ``keep``: module names (a targeted layer's path or its end, as ``targets`` names them)
    whose layers keep their own LoRA; usually `loradrop_spec` fills it from importances.
    ``rank``, ``alpha``, ``rslora``, ``dropout``: as LoRA's, for the kept and shared pairs alike.
    """

    name = "loradrop"
    peft_format = PEFT_FORMAT

    rank: int = 8
    alpha: float = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    keep: str | tuple[str, ...] = ()
    dropout: float = 0.0
    rslora: bool = False
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        self._set("keep", check_names(owner, "keep", self.keep))
        check_probability(owner, "dropout", self.dropout)
        check_bool(owner, "rslora", self.rslora)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # every layer sharing its shape's pair; then the first target's layers kept (own
        # factors, saved under their paths) beside shared ones, with rsLoRA and dropout
        return {
            "default": cls(rank=2, alpha=4, targets=targets),
            "keep-first-rslora-dropout": cls(
                rank=3, alpha=3, rslora=True, dropout=0.1, keep=(targets[0],), targets=targets
            ),
        }

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def select(self, model: nn.Module) -> list[str]:
        paths = super().select(model)
        for name in self.keep:
            if not any(matches_suffix(p, name) for p in paths):
                raise SpecError(f"LoRADrop.keep: {name!r} matches no targeted module")
        return paths

    def keeps(self, path: str) -> bool:
        """Whether the layer at ``path`` keeps its own LoRA (else it shares its shape's)."""
        return any(matches_suffix(path, name) for name in self.keep)

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, LoRADropLayer]:
        shared: dict[tuple[int, int], LoRAPair] = {}
        layers = {}
        for path in paths:  # model order: a shared pair is drawn as its group's first layer comes
            base = model.get_submodule(path)
            if self.keeps(path):
                pair = LoRAPair(self.rank, *in_out_features(base), base.weight, shared=False)
            else:
                shape = in_out_features(base)
                if shape not in shared:
                    shared[shape] = LoRAPair(self.rank, *shape, base.weight, shared=True)
                pair = shared[shape]
            layers[path] = LoRADropLayer(base, pair, self)
        return layers

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        pairs = {
            layer.pair.shape_key: layer.pair
            for layer in layers.values()
            if isinstance(layer, LoRADropLayer) and layer.pair.shared  # not modules_to_save
        }
        out = {}
        for shape_key, pair in sorted(pairs.items()):
            out[f"{SHARED_PREFIX}A.{shape_key}"] = pair.lora_A
            out[f"{SHARED_PREFIX}B.{shape_key}"] = pair.lora_B
        return out


class LoRAPair(nn.Module):
    """``lora_A`` (r x in) and ``lora_B`` (out x r): one kept layer's own, or the pair that the
    dropped layers of one shape share (``shared``)."""

    def __init__(
        self,
        rank: int,
        in_features: int,
        out_features: int,
        base_weight: torch.Tensor,
        shared: bool,
    ) -> None:
        super().__init__()
        self.shared = shared
        self.shape_key = f"{in_features}x{out_features}"
        factory = adapter_tensor_kwargs(base_weight)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's A
        # B at zero makes a fresh adapter the identity
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))


class LoRADropLayer(AdapterLayer):
    """One layer's view of its `LoRAPair` (its own, or its shape's shared one)."""

    method = "loradrop"

    def __init__(self, base: nn.Module, pair: LoRAPair, spec: LoRADrop) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.pair = pair
        self.rank = spec.rank
        self.scale = spec.scale
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else None

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.pair.lora_A)
        b = ctx.attr("lora_B", self.pair.lora_B)
        cast = self.pair.lora_A.dtype != self.base.weight.dtype
        h = ctx.method("to", x, self.pair.lora_A.dtype) if cast else x
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        h = ctx.call(F.linear, h, a)
        # the scale multiplies the rank-r intermediate: r/out of the work of scaling the output
        delta = ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` in the base weight's layout."""
        delta = (self.pair.lora_B @ self.pair.lora_A) * self.scale
        return delta.t() if self.kind == "conv1d_gpt2" else delta

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """A kept layer's factors under its path, named as LoRA's; a shared pair is the
        adapter's (`LoRADrop.peft_shared_tensors`)."""
        if self.pair.shared:
            return {}
        return {"lora_A.weight": self.pair.lora_A, "lora_B.weight": self.pair.lora_B}


# -- stage 1: importances from a trained LoRA ----------------------------------------------------


@torch.no_grad()
def lora_output_importance(
    cm: Any, batches: Iterable[Any], adapter: str = "default", progress: bool = True
) -> dict[str, float]:
    """Each layer's LoRA-drop importance ``g_i = Σ_x ‖ΔW_i x_i‖²`` (unnormalised), by path.

    ``cm``: a compiled model whose LoRA adapter ``adapter`` was trained a little and is active;
    ``batches``: (a sample of) the training data, batched as `surgeon.train` batches it: a dict
    of the model's keyword arguments, a tuple ``(inputs..., target)`` or a tensor. The model
    runs each batch in eval mode (no dropout) with the adapters active as they are; ``x_i`` is
    what layer ``i`` receives there, and ``ΔW_i x_i = s · B_i A_i x_i`` is summed over every
    token of every batch (padding tokens too: the paper's sum has no mask).
    """
    layers = _scored_lora_layers(cm, adapter)
    scores = dict.fromkeys(layers, 0.0)
    ran: set[str] = set()

    def hook(path: str, layer: LoRALayer) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].to(layer.lora_A.dtype)
            delta = F.linear(F.linear(x, layer.lora_A) * layer.scale, layer.lora_B)
            scores[path] += float(delta.double().square().sum())
            ran.add(path)

        return record

    handles = [layer.base.register_forward_hook(hook(p, layer)) for p, layer in layers.items()]
    training = cm.training
    cm.eval()
    try:
        for batch in _progress(batches, progress):
            _run(cm, batch)
    finally:
        cm.train(training)
        for handle in handles:
            handle.remove()
    silent = [p for p in layers if p not in ran]
    if silent:
        raise SpecError(
            f"lora_output_importance: {silent[0]} never ran on the batches (a merged, fused or "
            f"4-bit layer is not called as a module; or there were no batches)"
        )
    return scores


def _scored_lora_layers(cm: Any, adapter: str) -> dict[str, LoRALayer]:
    if adapter not in cm.adapters:
        raise SpecError(f"lora_output_importance: no adapter {adapter!r} (have {cm.adapters})")
    if type(cm.spec(adapter)) is not LoRA:
        raise SpecError(
            f"lora_output_importance: adapter {adapter!r} is {type(cm.spec(adapter)).__name__}; "
            f"LoRA-drop scores a LoRA adapter"
        )
    if adapter not in cm.active:
        raise SpecError(
            f"lora_output_importance: adapter {adapter!r} is not active; the importances are "
            f"those of the model it trained (cm.set_active({adapter!r}))"
        )
    layers = {}
    for path, layer in cm.store.items(adapter):
        if not isinstance(layer, LoRALayer):
            continue  # a copy of modules_to_save
        if layer.kind not in ("linear", "conv1d_gpt2"):
            raise SpecError(
                f"lora_output_importance: {path} is {type(layer.base).__name__}; LoRA-drop "
                f"adapts Linear and Conv1D layers"
            )
        layers[path] = layer
    return layers


def _progress(batches: Iterable[Any], enabled: bool) -> Iterable[Any]:
    from tqdm.auto import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(
        batches, total=total, disable=not enabled, desc="LoRA-drop importance", unit="batch"
    )


def _run(cm: Any, batch: Any) -> None:
    """Run one batch as `surgeon.train` would (without computing a loss it does not need)."""
    if isinstance(batch, Mapping):
        cm(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)):
        cm(*batch[:-1])
    else:
        cm(batch)


# -- the selection rule and the stage-2 spec -----------------------------------------------------


def kept_layers(importances: Mapping[str, float], threshold: float = PAPER_THRESHOLD) -> list[str]:
    """The paper's rule: normalise the importances to shares of their sum, sort them in
    decreasing order and keep the shortest head whose shares add up to ``threshold`` (up to
    rounding). Equal importances keep their order in ``importances``; ``threshold`` 0 keeps none,
    1 every layer of non-zero importance. Returned in decreasing importance."""
    where = "LoRA-drop"
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        raise SpecError(f"{where}: threshold={threshold!r}: expected a number >= 0 and <= 1")
    if not 0 <= threshold <= 1:
        raise SpecError(f"{where}: threshold={threshold!r}: expected a number >= 0 and <= 1")
    for path, value in importances.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SpecError(f"{where}: importance of {path} is {value!r}; expected a number >= 0")
    total = math.fsum(importances.values())
    if total == 0:
        raise SpecError(
            f"{where}: every importance is zero (an untrained LoRA: B starts at zero); train the "
            f"LoRA a few steps first"
        )
    order = sorted(importances, key=lambda p: -importances[p])  # stable: ties keep their order
    kept, covered = [], 0.0
    for path in order:
        if covered >= threshold * (1 - 1e-12):
            break
        kept.append(path)
        covered = math.fsum(importances[p] for p in kept) / total
    return kept


def loradrop_spec(
    importances: Mapping[str, float],
    threshold: float = PAPER_THRESHOLD,
    lora: LoRA | None = None,
    **fields: Any,
) -> LoRADrop:
    """The `LoRADrop` spec keeping the layers `kept_layers` picks from ``importances``.

    ``lora``: the LoRA spec that was trained; its rank, alpha, rsLoRA, dropout and selection
    carry over (a LoRA with per-layer patterns or B's bias cannot: `SpecError`). Without it the
    targets are the scored layers' paths. ``fields`` override any `LoRADrop` field."""
    base: dict[str, Any] = {"targets": tuple(importances)}
    if lora is not None:
        base = _fields_of(lora)
    return LoRADrop(**{**base, **fields, "keep": tuple(kept_layers(importances, threshold))})


def _fields_of(lora: LoRA) -> dict[str, Any]:
    if type(lora) is not LoRA:
        raise SpecError(f"loradrop_spec: lora is {type(lora).__name__}; expected a LoRA spec")
    for name in ("rank_pattern", "alpha_pattern", "lora_bias"):
        if getattr(lora, name):
            raise SpecError(
                f"loradrop_spec: LoRA.{name}={getattr(lora, name)!r} does not carry over "
                f"(LoRA-drop has one rank and scale, and no bias on B)"
            )
    names = ("rank", "alpha", "rslora", "dropout", "targets", "layers", "exclude")
    return {n: getattr(lora, n) for n in names}


@torch.no_grad()
def init_kept_from_lora(cm: Any, lora: str = "default", loradrop: str = "loradrop") -> None:
    """Start adapter ``loradrop``'s kept layers from adapter ``lora``'s trained factors (the
    same layers, rank and scale); its shared pairs stay as they were."""
    source = dict(cm.store.items(lora))
    for path, layer in cm.store.items(loradrop):
        if not isinstance(layer, LoRADropLayer) or layer.pair.shared:
            continue
        trained = source.get(path)
        if not isinstance(trained, LoRALayer):
            raise SpecError(f"init_kept_from_lora: adapter {lora!r} has no LoRA on {path}")
        if trained.lora_A.shape != layer.pair.lora_A.shape or trained.scale != layer.scale:
            raise SpecError(
                f"init_kept_from_lora: {path}: LoRA rank {trained.rank} and scale "
                f"{trained.scale} vs LoRADrop's {layer.pair.lora_A.shape[0]} and {layer.scale}"
            )
        layer.pair.lora_A.copy_(trained.lora_A)
        layer.pair.lora_B.copy_(trained.lora_B)
