"""X-LoRA: a mixture of trained LoRA experts, gated per token and per layer by a classifier on
the model's hidden states (Buehler & Buehler, 2024, "X-LoRA: Mixture of Low-Rank Adapter
Experts", https://arxiv.org/abs/2402.07148; PEFT's XLORA).

``y = W x + g · Σ_i B_i A_i (s_{l,i} ⊙ x) · scale_i``, where ``s = c(h)``: every call runs the
model twice, as PEFT does. The scaling pass runs it with every ``s`` equal to
``scaling_pass_value`` (no gradients) and keeps the last hidden state ``h``; the classifier ``c``
(``depth`` linear layers, ReLU and dropout between them) turns ``h`` into scalings of shape
(batch, tokens, layers, experts): one set broadcast to every adapted layer, or one per layer
(``layerwise``), softmaxed over the experts at ``temperature`` (``softmax``). Each layer may
keep its ``top_k`` experts only, renormalised by a softmax over them (``softmax_topk``). The real
pass then applies the experts with the classifier's scalings, times ``global_weight``.

The experts are PEFT LoRA folders (read with surgeon's own readers: safetensors only), frozen
unless ``train_experts``; only the classifier trains. Layers: Linear, GPT-2's Conv1D and
Embedding (the layers PEFT's X-LoRA gates; its convolution path broadcasts per-token scalings
over channels and is refused here). The update depends on each call's inputs, so X-LoRA does
not merge or export, one X-LoRA adapter runs at a time, and mixed batches refuse it (the core
refuses adapters that act on the model call there).

Files: ``adapter_config.json`` names the expert folders (``adapters``: ``{"0": path, ...}``,
the names PEFT gives its experts), which give the experts' layers and LoRA settings. The file
holds the classifier (``base_model.internal_xlora_classifier.layers.<i>.weight``/``bias``) and,
unlike PEFT's own saves, every expert's A and B under the keys of PEFT's X-LoRA model
(``base_model.lora_model.model.<path>.lora_A.<i>.weight``): PEFT's load puts them over the
folders' values, so a file saved after the experts changed (trained, perturbed) loads with the
same numbers in both. A file without them (PEFT's) takes the experts from their folders.
"""

from __future__ import annotations

import contextvars
import operator
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import CACHE_ARGUMENTS, AdapterLayer, CallAdapter, EmitContext, ModelCall
from surgeon.checks import check_bool, check_finite, check_int, check_positive, check_probability
from surgeon.errors import SpecError
from surgeon.graph import Graph
from surgeon.io import read_adapter, write_adapter
from surgeon.layers import layer_kind
from surgeon.passes.lowrank.lora import LoRA, LoRALayer
from surgeon.passes.routed.experts import expert_where, require_lora
from surgeon.peft import BOOL, INT, MAPPING, NUMBER, PREFIX, REQUIRED, PeftFormat, PeftKey
from surgeon.rewrite import batch_rows, in_mixed_batch
from surgeon.spec import MethodSpec

CLASSIFIER = "base_model.internal_xlora_classifier."
"""Where PEFT's file keeps the classifier's tensors."""
LORA_MODEL = "base_model.lora_model.model."
"""Where PEFT's X-LoRA model keeps the experts' LoRA layers (its state-dict prefix)."""
GATED_KINDS = ("linear", "conv1d_gpt2", "embedding")
EXPERT_KEYS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
)
"""What an expert's file may hold under each layer it adapts."""


def _load_experts(value: Any, config: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """PEFT's ``adapters`` (expert name -> folder) as the folders in order. PEFT loads expert
    ``i`` under the name ``str(i)`` and then activates the config's names, so only the names
    ``"0"``, ``"1"``, ... in that order describe a model PEFT can run."""
    names = list(value)
    if names != [str(i) for i in range(len(names))]:
        raise SpecError(
            f"{where}: adapters={dict(value)!r}: expected the experts named '0', '1', ... in "
            f"order (PEFT 0.21 loads expert i as str(i) and activates the names given, so other "
            f"names leave its experts unknown)"
        )
    if not all(isinstance(path, str) for path in value.values()):
        raise SpecError(f"{where}: adapters={dict(value)!r}: expected a folder (string) per expert")
    return tuple(value.values())


def _save_experts(spec: XLoRA, paths: Sequence[str]) -> dict[str, str]:
    return {str(i): folder for i, folder in enumerate(spec.experts)}


PEFT_FORMAT = PeftFormat(
    "XLORA",
    keys=(
        PeftKey(
            "adapters",
            "experts",
            REQUIRED,
            MAPPING,
            _save_experts,
            _load_experts,
            why_required="X-LoRA needs its LoRA experts' folders",
        ),
        PeftKey("xlora_depth", "depth", 1, INT),
        PeftKey("xlora_size", "size", 2048, INT),
        PeftKey("xlora_dropout_p", "dropout", 0.2, NUMBER),
        PeftKey("layerwise_scalings", "layerwise", False, BOOL),
        PeftKey("enable_softmax", "softmax", True, BOOL),
        PeftKey("enable_softmax_topk", "softmax_topk", False, BOOL),
        PeftKey("top_k_lora", "top_k", None, INT.optional()),
        PeftKey("softmax_temperature", "temperature", 1.0, NUMBER),
        PeftKey("scaling_pass_value", "scaling_pass_value", 0.0, NUMBER),
        PeftKey("global_scaling_weight", "global_weight", 1.0, NUMBER),
        PeftKey("use_trainable_adapters", "train_experts", False, BOOL),
    ),
    # the classifier's input width is the model's hidden size: written from the model, and on
    # loading the classifier's shapes are checked against the model instead
    ignored=frozenset({"hidden_size"}),
)


@dataclass(frozen=True)
class XLoRA(MethodSpec):
    """X-LoRA: trained LoRA experts mixed per token and per layer by a learned classifier."""

    name = "xlora"
    peft_format = PEFT_FORMAT
    acts_on_call = True
    merge_refusal = "X-LoRA mixes its experts with scalings computed from each call's inputs"

    experts: tuple[str, ...] = ()
    depth: int = 1
    size: int = 2048
    dropout: float = 0.2
    layerwise: bool = False
    softmax: bool = True
    softmax_topk: bool = False
    top_k: int | None = None
    temperature: float = 1.0
    scaling_pass_value: float = 0.0
    global_weight: float = 1.0
    train_experts: bool = False

    def validate(self) -> None:
        owner = type(self).__name__
        experts = (self.experts,) if isinstance(self.experts, str) else self.experts
        if not isinstance(experts, (tuple, list)) or not experts:
            raise SpecError(f"{owner}.experts={self.experts!r}: expected one LoRA folder or more")
        if not all(isinstance(folder, str) and folder for folder in experts):
            raise SpecError(f"{owner}.experts={self.experts!r}: expected folder paths (strings)")
        self._set("experts", tuple(experts))
        check_int(owner, "depth", self.depth)
        check_int(owner, "size", self.size)
        check_probability(owner, "dropout", self.dropout)
        for flag in ("layerwise", "softmax", "softmax_topk", "train_experts"):
            check_bool(owner, flag, getattr(self, flag))
        if self.top_k is not None:
            check_int(owner, "top_k", self.top_k)
            if self.top_k > len(self.experts):
                raise SpecError(
                    f"{owner}.top_k={self.top_k}: there are only {len(self.experts)} experts"
                )
        check_positive(owner, "temperature", self.temperature)
        check_finite(owner, "scaling_pass_value", self.scaling_pass_value)
        check_finite(owner, "global_weight", self.global_weight)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        experts = example_experts()
        return {
            "default": cls(experts=experts),
            "deep-layerwise-topk": cls(
                experts=experts,
                depth=2,
                size=8,
                dropout=0.1,
                layerwise=True,
                softmax=False,
                softmax_topk=True,
                top_k=2,
                scaling_pass_value=0.5,
                global_weight=0.7,
            ),
        }

    # -- the experts' tensors in the file --------------------------------------------------------

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Every expert's A and B under PEFT's X-LoRA model keys: the file carries the experts'
        current values, so a load (ours or PEFT's) does not fall back on the folders'."""
        return {
            _expert_key(path, suffix, index): tensor
            for path, layer in layers.items()
            for index, expert in layer.experts.items()
            for suffix, tensor in expert.peft_tensors().items()
        }

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """A file without the experts (PEFT saves the classifier only) takes them from their
        folders, as PEFT's load does."""
        if any(key.startswith(LORA_MODEL) for key in tensors):
            return tensors
        experts = {
            _expert_key(*_split_expert_key(key), str(index)): value
            for index, (_, expert_tensors) in enumerate(self.expert_specs())
            for key, value in expert_tensors.items()
        }
        return {**experts, **tensors}

    # -- the layers: the union of the experts' --------------------------------------------------

    def expert_specs(self) -> list[tuple[LoRA, dict[str, torch.Tensor]]]:
        """Each expert folder's LoRA spec and tensors; anything but plain LoRA is refused, as
        PEFT's X-LoRA gates LoRA's A and B only."""
        out = []
        for i, folder in enumerate(self.experts):
            method, tensors = read_adapter(folder)
            out.append((require_lora(expert_where("XLoRA", "experts", i, folder), method), tensors))
        return out

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in GATED_KINDS

    def select(self, model: nn.Module) -> list[str]:
        """Every layer some expert adapts, in the model's module order: PEFT numbers the gated
        layers so (the classifier's per-layer outputs follow it)."""
        chosen: set[str] = set()
        for i, (expert, tensors) in enumerate(self.expert_specs()):
            adapted = expert.select(model)
            _refuse_unused_keys(i, tensors, adapted)
            for path in adapted:
                if not self.supports(model.get_submodule(path)):
                    kind = type(model.get_submodule(path)).__name__
                    raise SpecError(
                        f"XLoRA.experts[{i}] adapts {path} ({kind}): X-LoRA gates Linear, "
                        f"Conv1D and Embedding layers only"
                    )
                chosen.add(path)
        return [path for path, _ in model.named_modules() if path in chosen]

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        experts = self.expert_specs()
        layers = {}
        for number, path in enumerate(paths):
            base = model.get_submodule(path)
            gated = XLoRALayer(base, number, self)
            for i, (expert, tensors) in enumerate(experts):
                if path in expert.select(model):
                    gated.experts[str(i)] = _filled_expert(expert, base, path, tensors)
            gated.requires_grad_(self.train_experts)
            layers[path] = gated
        return layers

    def create_call_adapter(
        self, model: nn.Module, graph: Graph, from_file: bool
    ) -> CallAdapter | None:
        return ScalingPass(model, self, len(self.select(model)))


def _refuse_unused_keys(
    index: int, tensors: Mapping[str, torch.Tensor], paths: Sequence[str]
) -> None:
    """An expert file's keys must all be its LoRA factors on the layers it adapts: PEFT's
    X-LoRA refuses any other key (a saved base layer, a layer of another model)."""
    wanted = {f"base_model.model.{path}.{name}" for path in paths for name in EXPERT_KEYS}
    unused = sorted(set(tensors) - wanted)
    if unused:
        raise SpecError(
            f"XLoRA.experts[{index}]: {len(unused)} key(s) are no LoRA factor of a layer it "
            f"adapts, e.g. {', '.join(unused[:3])} (PEFT's X-LoRA refuses them too)"
        )


def _expert_key(path: str, suffix: str, index: str) -> str:
    """PEFT's X-LoRA model key of expert ``index``'s tensor ``suffix`` (as its LoRA file names
    it) on ``path``: ``lora_A.weight`` is ``lora_A.<index>.weight`` there."""
    module, dot, leaf = suffix.rpartition(".")
    return f"{LORA_MODEL}{path}." + (f"{module}.{index}.{leaf}" if dot else f"{suffix}.{index}")


def _split_expert_key(key: str) -> tuple[str, str]:
    """(layer path, tensor suffix) of a key in an expert's LoRA file (`_refuse_unused_keys`
    checked that every key is one of `EXPERT_KEYS` under a layer)."""
    suffix = next(name for name in EXPERT_KEYS if key.endswith("." + name))
    return key[len(PREFIX) : -len(suffix) - 1], suffix


def _filled_expert(
    expert: LoRA, base: nn.Module, path: str, tensors: Mapping[str, torch.Tensor]
) -> LoRALayer:
    """Expert ``expert``'s LoRA layer on ``path`` with its file's A and B."""
    layer = expert.create_layer(base, path)
    prefix = f"base_model.model.{path}."
    with torch.no_grad():
        for suffix, target in layer.peft_tensors().items():
            value = tensors.get(prefix + suffix)
            if value is None or tuple(value.shape) != tuple(target.shape):
                raise SpecError(
                    f"XLoRA expert on {path}: its file has no {prefix + suffix} of shape "
                    f"{tuple(target.shape)}"
                )
            if not target.is_meta:
                target.copy_(value.to(target.dtype))
    return layer


def write_seeded_expert(
    folder: Path, shapes: Mapping[str, tuple[int, int]], rank: int, alpha: float, seed: int
) -> None:
    """A LoRA expert in PEFT's layout: A and B on each layer of ``shapes`` (path -> (in, out)
    features), drawn in that order from a generator seeded with ``seed``, times 0.3 (B is not
    zero: the expert changes the output)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (fan_in, fan_out) in shapes.items():
        key = f"{PREFIX}{path}."
        tensors[key + "lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
        tensors[key + "lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.3
    config = LoRA(rank=rank, alpha=alpha, targets=tuple(shapes)).to_peft_config(list(shapes))
    write_adapter(folder, {**config, "peft_type": "LORA"}, tensors)


EXAMPLE_EXPERTS = ((2, 4.0, 100), (3, 3.0, 101))
"""(rank, alpha, seed) of the examples' experts; change the folder's version with them."""


def example_experts() -> tuple[str, ...]:
    """Two LoRA experts on ``lm_head`` (32 -> 96, the zoo's Llama and GPT-2 alike), seeded, in
    PEFT folders under the temporary directory: the examples need experts on disk, and lm_head
    is the one layer both zoo models share. Written once, atomically (a whole temporary folder
    renamed into place), so parallel test workers never read a half-written expert."""
    root = Path(tempfile.gettempdir()) / "surgeon-xlora-examples-v2"
    folders = tuple(str(root / f"expert{i}") for i in range(len(EXAMPLE_EXPERTS)))
    if not root.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the shared folder from other users
        for folder, (rank, alpha, seed) in zip(folders, EXAMPLE_EXPERTS):
            write_seeded_expert(
                staging / Path(folder).name, {"lm_head": (32, 96)}, rank, alpha, seed
            )
        try:
            os.rename(staging, root)
        except OSError:  # another process put its (identical) folder there first
            if not root.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folders


# -- the scalings of the running call -------------------------------------------------------------

_SCALINGS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "surgeon_xlora_scalings", default=None
)


def layer_scalings(
    number: int, top_k: int | None, softmax_topk: bool, adapter: str, like: torch.Tensor
) -> torch.Tensor:
    """Layer ``number``'s expert scalings (batch, tokens, experts) for the running call: kept to
    the ``top_k`` largest per token, and softmaxed over those (``softmax_topk``), as PEFT's
    layers do. In a mixed batch, ``adapter``'s rows of them."""
    scalings = _SCALINGS.get()
    if scalings is None:
        raise SpecError("an X-LoRA layer ran outside a call of the compiled model")
    if in_mixed_batch():
        scalings = scalings.index_select(0, batch_rows(adapter, scalings))
    if scalings.shape[:2] != like.shape[:2]:
        raise SpecError(
            f"X-LoRA's scalings are for {tuple(scalings.shape[:2])} (batch, tokens), the layer "
            f"got {tuple(like.shape[:2])}: X-LoRA gates layers that run on the call's tokens"
        )
    scalings = scalings[:, :, number, :]
    if top_k is not None:
        keep = torch.zeros_like(scalings, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(scalings, k=top_k, dim=-1).indices, True)
        scalings = scalings * keep.to(scalings.dtype)
    if softmax_topk:
        kept = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~kept, float("-inf")), dim=-1)
        scalings = scalings.masked_fill(~kept, 0.0)
    return scalings


class XLoRALayer(AdapterLayer):
    """The experts on one layer (``experts["<i>"]``: expert i's LoRA, where it adapts this
    layer), each fed the input scaled by its scalings for this layer (``number``)."""

    method = "xlora"

    def __init__(self, base: nn.Module, number: int, spec: XLoRA) -> None:
        super().__init__(base)
        self.number = number
        self.kind = layer_kind(base)
        self.top_k = spec.top_k
        self.softmax_topk = spec.softmax_topk
        self.global_weight = spec.global_weight
        self.experts = nn.ModuleDict()

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        scalings = ctx.call(
            layer_scalings, self.number, self.top_k, self.softmax_topk, ctx.adapter, x
        )
        out_dtype = self.base.weight.dtype
        out = base_out
        for index, expert in self.experts.items():
            i = int(index)
            scaling = ctx.call(operator.getitem, scalings, (Ellipsis, slice(i, i + 1)))
            delta = self._emit_expert(ctx, index, expert, x, scaling)
            out = ctx.call(torch.add, out, delta)
            if expert.lora_A.dtype != out_dtype:  # PEFT adds each expert into the base's dtype
                out = ctx.method("to", out, out_dtype)
        return out

    def _emit_expert(
        self, ctx: EmitContext, index: str, expert: LoRALayer, x: fx.Node, scaling: fx.Node
    ) -> fx.Node:
        """``B(A(dropout(x ⊙ s))) · scale · g`` (embeddings: A looked up, then scaled)."""
        a = ctx.attr(f"experts.{index}.lora_A", expert.lora_A)
        b = ctx.attr(f"experts.{index}.lora_B", expert.lora_B)
        if self.kind == "embedding":
            hidden = ctx.call(torch.mul, expert.emit_lookup(ctx, x, a), scaling)
            delta = ctx.call(torch.matmul, hidden, ctx.method("t", b))
        else:
            h = ctx.method("to", x, expert.lora_A.dtype)
            h = ctx.call(torch.mul, h, scaling)
            if expert.dropout is not None:
                h = ctx.module(f"experts.{index}.dropout", expert.dropout, h)
            bias = (
                ()
                if expert.lora_bias is None
                else (ctx.attr(f"experts.{index}.lora_bias", expert.lora_bias),)
            )
            delta = ctx.call(F.linear, ctx.call(F.linear, h, a), b, *bias)
        delta = ctx.call(torch.mul, delta, expert.scale)
        return ctx.call(torch.mul, delta, self.global_weight)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """None under the layer's path: the experts go to the file under PEFT's X-LoRA model
        keys (`XLoRA.peft_shared_tensors`)."""
        return {}


# -- the classifier and the scaling pass -----------------------------------------------------------


class Classifier(nn.Module):
    """PEFT's X-LoRA classifier: ``layers`` is Linear (ReLU, dropout, Linear)* in PEFT's order,
    so its state-dict keys are PEFT's."""

    def __init__(self, hidden: int, outputs: int, spec: XLoRA, **factory: Any) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = hidden
        for _ in range(spec.depth - 1):
            blocks += [nn.Linear(width, spec.size, **factory), nn.ReLU()]
            if spec.dropout > 0:
                blocks.append(nn.Dropout(spec.dropout))
            width = spec.size
        self.layers = nn.Sequential(*blocks, nn.Linear(width, outputs, **factory))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


class ScalingPass(CallAdapter):
    """Runs the scaling pass inside each model call, then the classifier, and hands the
    scalings to the gated layers of the real pass (a context variable their graphs read). In a
    mixed batch both passes run on the whole batch and X-LoRA's layers act on its rows only: a
    row's scalings depend on that row alone."""

    method = "xlora"
    serves_mixed_batches = True
    target = "model call (scaling pass + classifier)"
    where = "hidden states"

    def __init__(self, model: nn.Module, spec: XLoRA, n_layers: int) -> None:
        super().__init__()
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise SpecError(
                f"XLoRA needs a transformers model (its config's hidden_size sizes the "
                f"classifier); {type(model).__name__} has none"
            )
        weight = next(model.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.n_layers = n_layers
        self.n_experts = len(spec.experts)
        self.spec = spec
        outputs = self.n_experts * (n_layers if spec.layerwise else 1)
        self.classifier = Classifier(hidden, outputs, spec, **factory)
        self.hidden_size = hidden
        self._in_scaling_pass = False

    def transform(self, call: ModelCall) -> None:
        if self._in_scaling_pass:  # the scaling pass itself: its dummy scalings are set
            return
        if not call.prefill:
            raise SpecError(
                "XLoRA runs the whole sequence twice per call and cannot continue from a "
                "key/value cache: generate with use_cache=False (PEFT forces it too)"
            )
        tokens = call.kwargs.get("input_ids")
        if tokens is None:
            tokens = call.kwargs.get("inputs_embeds")
        if tokens is None:
            raise SpecError("XLoRA needs input_ids or inputs_embeds in the model call")
        batch, length = tokens.shape[:2]
        dtype = self.classifier.layers[-1].weight.dtype
        dummy = torch.full(
            (batch, length, self.n_layers, self.n_experts),
            self.spec.scaling_pass_value,
            dtype=dtype,
            device=tokens.device,
        )
        hidden = self._scaling_pass(call, dummy)
        _SCALINGS.set(self.scalings(hidden, batch, length))

    def _scaling_pass(self, call: ModelCall, dummy: torch.Tensor) -> torch.Tensor:
        """The last hidden state of the model run with ``dummy`` scalings (no gradients)."""
        kwargs = {k: v for k, v in call.kwargs.items() if k not in (*CACHE_ARGUMENTS, "labels")}
        kwargs.update(output_hidden_states=True, return_dict=True)
        token = _SCALINGS.set(dummy)
        self._in_scaling_pass = True
        try:
            with torch.no_grad():
                return call.model(**kwargs).hidden_states[-1]
        finally:
            self._in_scaling_pass = False
            _SCALINGS.reset(token)

    def scalings(self, hidden: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """The classifier's scalings (batch, tokens, layers, experts) from the last hidden
        state of the scaling pass."""
        logits = self.classifier(hidden)
        if not self.spec.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, length, self.n_layers, self.n_experts)
        if self.spec.softmax:
            scalings = torch.softmax(scalings / self.spec.temperature, dim=-1)
        return scalings

    def transform_output(self, call: ModelCall, output: Any) -> Any:
        if not self._in_scaling_pass:  # the call is over: no later graph reads its scalings
            _SCALINGS.set(None)
        return output

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {CLASSIFIER + name: p for name, p in self.classifier.named_parameters()}

    def peft_config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "task_type": "CAUSAL_LM"}
