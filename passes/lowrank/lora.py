"""LoRA: ``base(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).

Layers: Linear, Conv1d/2d/3d, Embedding and transformers' GPT-2 ``Conv1D``, and linear layers
stored in 4 bits (`QLoRALayer`, what QLoRA builds); convolutions with groups, dilation or a
padding_mode and ``nn.MultiheadAttention`` as PEFT adapts them (`lora_layers`).
PEFT keys: ``lora_A.weight``,
``lora_B.weight`` (embeddings: ``lora_embedding_A``, ``lora_embedding_B``). Initialisations
follow PEFT: ``default`` (A kaiming-uniform, B zero; for embeddings A zero, B normal),
``gaussian`` (A normal with std 1/r), ``pissa`` (principal singular vectors, base weight
replaced by the residual), ``pissa_niter_K`` (the same from ``torch.svd_lowrank`` with K
iterations: it draws from torch's generator as PEFT does), ``olora`` (QR of the base weight,
residual likewise) and ``orthogonal`` (A and B from the two halves of a random orthogonal
matrix, so ``B A = 0`` while neither is zero; even ranks only). The inits other than ``default``
and ``gaussian`` adapt Linear and Conv1D layers only. ``loftq``, ``mica``, ``eva``, ``corda`` and
``lora_ga`` (options in ``init_config``; the last three read ``surgeon.compile``'s
``calibration`` data) are in lora_inits.py.

``lora_bias`` (PEFT's option of that name) gives B a trainable bias, PEFT's ``lora_B.bias``
(zeros at first): ``base(x) + scale * (B(A(dropout(x))) + b_B)``. As PEFT: not on embeddings,
only with the default init, not with DoRA; merging folds ``scale * b_B`` into the base layer's
bias and is refused (a `SpecError`) where the layer has none.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_pattern_map,
    check_positive,
    check_probability,
)
from surgeon.errors import SpecError, did_you_mean
from surgeon.layers import (
    adapter_dtype,
    layer_kind,
    restore_storage,
    snapshot_storage,
    through_base_dtype,
)
from surgeon.passes.lowrank import lora_inits, lora_layers, lora_parameters, lora_tokens
from surgeon.passes.lowrank.lora_combine import COMBINATIONS, combine_lora
from surgeon.peft import (
    BOOL,
    BOOL_OR_STRING,
    INT,
    MAPPING,
    NAMES,
    NUMBER,
    STRING,
    PeftFormat,
    PeftKey,
    selection_keys,
)
from surgeon.quant import (
    NF4,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_linear,
    is_quantized,
    linear_4bit,
    quantize_linear,
)
from surgeon.spec import Combination, MethodSpec
from surgeon.targets import pattern_value

INITS = ("default", "gaussian", "pissa", "olora", *lora_inits.INITS, "orthogonal")
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")  # PiSSA by randomized SVD with K iterations
BIAS_MODES = ("none", "all", "lora_only")


def is_init(value: Any) -> bool:
    """Whether ``value`` names one of LoRA's initialisations (``pissa_niter_K`` included)."""
    return isinstance(value, str) and (value in INITS or PISSA_NITER.fullmatch(value) is not None)


def _init_names(inits: Sequence[str]) -> str:
    """``inits`` and the ``pissa_niter_K`` family, as error messages list them."""
    return f"{', '.join(map(repr, inits))} or 'pissa_niter_<K>' (K an integer >= 0)"


def is_residual_init(init: str) -> bool:
    """Whether ``init`` factors the base weight and leaves the base the residual."""
    if init in ("pissa", "olora", *lora_inits.BASE_REWRITING):
        return True
    return PISSA_NITER.fullmatch(init) is not None


def _load_init(value: Any, config: Mapping[str, Any], where: str) -> str:
    """PEFT's ``init_lora_weights`` as ``init``: true and false are the default init (the
    weights come from the file); the names stay, as residual inits rewrite the base on load."""
    if isinstance(value, bool):
        return "default"
    if is_init(value) and value != "default":
        return value
    raise SpecError(
        f"{where}: init_lora_weights={value!r} is not supported (supported: true, false, "
        f"{_init_names(INITS[1:])})"
    )


PEFT_FORMAT = PeftFormat(
    "LORA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        PeftKey("lora_alpha", "alpha", 8, NUMBER),
        *selection_keys(),
        PeftKey("lora_dropout", "dropout", 0.0, NUMBER),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey("use_rslora", "rslora", False, BOOL),
        PeftKey(
            "init_lora_weights",
            "init",
            True,
            BOOL_OR_STRING,
            save=lambda spec, paths: True if spec.init == "default" else spec.init,
            load=_load_init,
            lossy=True,
        ),
        PeftKey("rank_pattern", "rank_pattern", {}, MAPPING.optional()),
        PeftKey("alpha_pattern", "alpha_pattern", {}, MAPPING.optional()),
        PeftKey("lora_bias", "lora_bias", False, BOOL),
        *lora_inits.init_config_keys(),
        PeftKey(
            "target_parameters",
            "target_parameters",
            (),
            NAMES.optional(),
            save=lambda spec, paths: list(spec.target_parameters) or None,
            load=lambda value, config, where: value if isinstance(value, str) else tuple(value),
        ),
        lora_tokens.PEFT_KEY,  # trainable_token_indices
    ),
    switches={"use_dora": False, "alora_invocation_tokens": None},  # aLoRA: passes/lowrank/alora.py
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class LoRA(MethodSpec):
    """Low-rank adaptation (Hu et al., 2021)."""

    name = "lora"
    peft_format = PEFT_FORMAT
    pattern_fields = ("rank_pattern", "alpha_pattern")
    adapts_quantized = True  # on 4-bit layers it builds `QLoRALayer`
    combinations = COMBINATIONS

    rank: int = 8
    alpha: float = 16
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.0
    bias: str = "none"
    rslora: bool = False
    init: str = "default"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    lora_bias: bool = False
    init_config: Mapping[str, Any] = field(default_factory=dict)
    target_parameters: tuple[str, ...] = ()  # raw parameters (MoE experts): lora_parameters
    trainable_tokens: tuple[int, ...] | Mapping[str, tuple[int, ...]] = ()  # lora_tokens

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_positive(owner, "alpha", self.alpha)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        check_bool(owner, "rslora", self.rslora)
        if not is_init(self.init):
            hint = did_you_mean(str(self.init), INITS)
            raise SpecError(
                f"{owner}.init={self.init!r}: expected one of {_init_names(INITS)}{hint}"
            )
        self._set(
            "rank_pattern", check_pattern_map(owner, "rank_pattern", self.rank_pattern, check_int)
        )
        self._set(
            "alpha_pattern",
            check_pattern_map(owner, "alpha_pattern", self.alpha_pattern, check_positive),
        )
        check_bool(owner, "lora_bias", self.lora_bias)
        self._set("init_config", lora_inits.check_init_config(owner, self.init, self.init_config))
        builds_own = type(self).create_layers is not LoRA.create_layers
        if self.init in lora_inits.INITS and (
            builds_own or type(self).create_layer is not LoRA.create_layer
        ):  # lora_inits runs on LoRA's own layers only
            own = [i for i in INITS if i not in lora_inits.INITS]
            raise SpecError(
                f"{owner}.init={self.init!r}: expected one of {_init_names(own)} (LoRA takes "
                f"{self.init!r}; {owner} builds its own layers)"
            )
        if self.lora_bias:
            self._check_lora_bias(owner)
        lora_parameters.check_spec(self, LoRA)
        self._set("target_parameters", tuple(self.target_parameters))
        lora_tokens.check_spec(self, LoRA)

    def _check_lora_bias(self, owner: str) -> None:
        """PEFT's rules: B's bias only with the default init (PEFT's ``init_lora_weights`` True
        or False), and not for variants whose format pins ``lora_bias`` off (DoRA)."""
        if not type(self).has_lora_bias():
            raise SpecError(f"{owner}.lora_bias=True is not supported: PEFT has no bias on B here")
        if self.init != "default":
            raise SpecError(
                f"{owner}.lora_bias=True needs init='default' (as PEFT, whose lora_bias takes "
                f"init_lora_weights true or false only), not init={self.init!r}"
            )

    @classmethod
    def has_lora_bias(cls) -> bool:
        """Whether this method can give B a bias: DoRA inherits LoRA's fields, but its format
        pins PEFT's ``lora_bias`` off, as PEFT refuses the pair."""
        return cls.peft_format.switches.get("lora_bias", True) is not False

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # lora_bias is not an example: the zoo's targets include embeddings (which refuse it)
        # and bias-less layers (which cannot merge it); its card tests PEFT parity both ways
        return {
            "default": cls(rank=4, targets=targets),
            "rslora-dropout-gaussian": cls(
                rank=2, alpha=3, rslora=True, dropout=0.1, init="gaussian", targets=targets
            ),
            "patterns": cls(
                rank=3, targets=targets, rank_pattern={targets[0]: 5}, alpha_pattern={targets[0]: 2}
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        if isinstance(layer, nn.MultiheadAttention):  # LoRA's own layers only (not DoRA's...)
            # residual inits rewrite a `weight`, which it lacks (PEFT's fail there too)
            return type(self).create_layer is LoRA.create_layer and not self.rewrites_base
        kind = layer_kind(layer)
        # PEFT's embedding adapter has no B layer to carry a bias, and refuses lora_bias
        return kind is not None and not (self.lora_bias and kind == "embedding")

    @property
    def rewrites_base(self) -> bool:
        return is_residual_init(self.init)

    @property
    def merges_into_shared_weights(self) -> bool:  # a tied LM head gets the embedding's rows
        return bool(self.trainable_tokens)

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        return lora_parameters.from_file(tensors) if self.target_parameters else tensors

    def select(self, model: nn.Module) -> list[str]:
        paths = lora_parameters.select(self, model, lambda: super(LoRA, self).select(model))
        return lora_tokens.select(self, model, paths)

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        rank = pattern_value(self.rank_pattern, path, self.rank)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        return rank, alpha / (math.sqrt(rank) if self.rslora else rank)

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, LoRALayer]:
        """The layers a file fills: PEFT's load reruns the data-free inits (LoftQ)."""
        return lora_tokens.with_token_layers(
            self,
            model,
            paths,
            lambda rest: lora_inits.initialise_layers(
                self, model, rest, self._builder(model), None, True
            ),
        )

    def create_layers_from_data(
        self, model: nn.Module, paths: Sequence[str], batches: lora_inits.Batches
    ) -> dict[str, LoRALayer]:
        """New layers of an init that reads data (EVA, CorDA, LoRA-GA) run it on ``batches``."""
        if self.init not in lora_inits.DATA_INITS:
            return self.create_layers(model, paths)
        builder = self._builder(model)
        return lora_tokens.with_token_layers(
            self,
            model,
            paths,
            lambda rest: lora_inits.initialise_layers(self, model, rest, builder, batches, False),
        )

    def _builder(self, model: nn.Module) -> Callable[[str], LoRALayer]:
        """Builds the layer of one path (the inits in lora_inits decide when, as PEFT's order
        of draws does)."""
        return lambda path: self.create_layer(model.get_submodule(path), path)

    def create_layer(self, layer: nn.Module, path: str) -> LoRALayer:
        if owned := lora_parameters.owned_parameters(self, layer, path):
            return lora_parameters.ParameterLoRALayer(self, layer, path, owned)
        rank, scale = self.rank_and_scale(path)
        bias = self.lora_bias
        if isinstance(layer, nn.MultiheadAttention):
            lora_layers.check_mha(layer, path, self.init, bias, self.bias)
            return lora_layers.LoRAMultiheadAttentionLayer(layer, path, rank, scale, self.init)
        if is_quantized(layer):
            return QLoRALayer(
                layer, path, rank, scale, self.dropout, self.init, layer.quant, lora_bias=bias
            )
        return LoRALayer(layer, path, rank, scale, self.dropout, self.init, lora_bias=bias)

    def on_full_precision_base(self) -> MethodSpec:
        """Memory does not depend on the init (and those reading data have none there)."""
        if self.init in lora_inits.INITS:
            return self.replace(init="default", init_config={})
        return self

    def peft_config_from_training(self, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """EVA chose each layer's rank (and alpha) while building it: PEFT's config says so."""
        return lora_inits.eva_patterns(self, layers) if self.init == "eva" else {}

    def combine(
        self, model: nn.Module, sources: Sequence[Combination], how: str, options: Any
    ) -> tuple[LoRA, dict[str, torch.Tensor]]:
        biased = [c.name for c in sources if getattr(c.spec, "lora_bias", False)]
        if biased:
            raise SpecError(
                f"merge_adapters: adapter {biased[0]!r} has lora_bias=True; combinations fold "
                f"the A and B factors only and would drop B's bias (PEFT's add_weighted_adapter "
                f"leaves it at zero)"
            )
        lora_layers.refuse_combining(sources)
        lora_tokens.refuse_combining(sources)
        return combine_lora(self, model, sources, how, options)


PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_bias": "lora_B.bias"}
PEFT_EMBEDDING_NAMES = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}


class LoRALayer(AdapterLayer):
    """``lora_A`` (r x in) and ``lora_B`` (out x r) for one layer; convolutions keep kernel dims.
    With ``lora_bias``, ``lora_bias`` (out) is B's bias (None without)."""

    method = "lora"
    fuses_as = "lora"
    loraplus_b = ("lora_B",)
    adapts_conv_options: ClassVar[bool] = True
    """Whether convolutions with groups, dilation or a padding_mode are adapted (see
    `lora_layers`); a subclass opts in by setting it in its own body."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.adapts_conv_options = cls.__dict__.get("adapts_conv_options", False)

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        dtype: torch.dtype | None = None,
        lora_bias: bool = False,
    ) -> None:
        super().__init__(base)
        self.path = path
        self.kind = layer_kind(base)
        self.rank = rank
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        factory = {"device": weight.device, "dtype": dtype or adapter_dtype(weight)}
        if self.kind == "conv" and not self.adapts_conv_options:
            lora_layers.refuse_conv_options(base, path, type(self).__name__)
        a_shape, b_shape = self._shapes(base, path, rank)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **factory))
        self._initialise(init, path)
        bias = nn.Parameter(torch.zeros(b_shape[0], **factory)) if lora_bias else None
        self.register_parameter("lora_bias", bias)
        if lora_bias and base.bias is None:
            warnings.warn(
                f"LoRA.lora_bias=True on {path}, a layer without bias: the adapter runs, but "
                f"cannot be merged (as in PEFT)",
                stacklevel=2,
            )

    @staticmethod
    def _shapes(base: nn.Module, path: str, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kind = layer_kind(base)
        if kind == "linear":
            return (rank, base.in_features), (base.out_features, rank)
        if kind == "conv1d_gpt2":
            fan_in, fan_out = base.weight.shape
            return (rank, fan_in), (fan_out, rank)
        if kind == "embedding":
            return (rank, base.num_embeddings), (base.embedding_dim, rank)
        return lora_layers.conv_factor_shapes(base, path, rank)

    def _initialise(self, init: str, path: str) -> None:
        if init in lora_inits.INITS:  # PEFT's factor layers as built; lora_inits runs the init
            lora_inits.constructed_factors(self)
            return
        if init not in ("default", "gaussian"):
            if self.kind not in ("linear", "conv1d_gpt2"):
                raise SpecError(
                    f"LoRA.init={init!r} supports Linear and Conv1D layers; {path} is "
                    f"{type(self.base).__name__}"
                )
            if init == "orthogonal":
                self._initialise_orthogonal(path)
            else:
                self._initialise_residual(init)
            return
        with torch.no_grad():
            if self.kind == "embedding":
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
                return
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def _initialise_residual(self, init: str) -> None:
        """PiSSA / OLoRA: A, B from a factorisation of W; the base keeps W - scale * B @ A (in
        place). A and B pass through the base dtype, as PEFT moves them there before upcasting."""
        weight = self.base.weight
        w = self._out_in(weight.float())
        if init == "olora":
            q, r = torch.linalg.qr(w)
            a, b = r[: self.rank], q[:, : self.rank]
        else:
            u, s, v = self._principal_triplets(w, init)
            s = s / self.scale
            a = torch.diag(s.sqrt()) @ v.t()
            b = u @ torch.diag(s.sqrt())
        self.lora_A.copy_(through_base_dtype(a, weight))
        self.lora_B.copy_(through_base_dtype(b, weight))
        weight.copy_(self._out_in(w - self.scale * b @ a).to(weight.dtype))

    def _principal_triplets(
        self, w: torch.Tensor, init: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W's top ``rank`` singular vectors and values ``(U_r, S_r, V_r)``: exact for
        ``pissa``; for ``pissa_niter_K`` by ``torch.svd_lowrank`` on W's device, after PEFT's
        draws, so its random start is PEFT's."""
        niter = PISSA_NITER.fullmatch(init)
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            return u[:, : self.rank], s[: self.rank], vh[: self.rank].t()
        self._draw_as_peft_factor_layers()
        return torch.svd_lowrank(w, q=self.rank, niter=int(niter.group(1)))

    def _draw_as_peft_factor_layers(self) -> None:
        """Take from the CPU generator what PEFT's construction of its ``lora_A`` and ``lora_B``
        (``nn.Linear`` layers, default-initialised) takes, before its init draws its own."""
        for shape in (self.lora_A.shape, self.lora_B.shape):
            nn.init.kaiming_uniform_(torch.empty(shape), a=math.sqrt(5))

    @torch.no_grad()
    def _initialise_orthogonal(self, path: str) -> None:
        """PEFT's orthogonal init: a random orthogonal r x r matrix Q; A = (G_A Q_odd)^T / 10 and
        B = G_B^T Q_even / 10 with Gaussian G_A (in x r/2), G_B (r/2 x out), drawn on the CPU
        in PEFT's order. Q's odd and even rows are orthogonal, so B A = 0 at first."""
        if self.rank % 2:
            raise SpecError(
                f"LoRA.init='orthogonal' on {path}: needs an even rank (PEFT's rule), got "
                f"{self.rank}"
            )
        self._draw_as_peft_factor_layers()
        q, _ = torch.linalg.qr(torch.randn(self.rank, self.rank))
        fan_in, fan_out = self.lora_A.shape[1], self.lora_B.shape[0]
        a = (torch.randn(fan_in, self.rank // 2) @ q[0::2]).t() / 10.0
        b = torch.randn(self.rank // 2, fan_out).t() @ q[1::2] / 10.0
        self.lora_A.copy_(through_base_dtype(a, self.base.weight))
        self.lora_B.copy_(through_base_dtype(b, self.base.weight))

    def _out_in(self, w: torch.Tensor) -> torch.Tensor:
        """GPT-2's Conv1D stores (in, out); everything here works in (out, in)."""
        return w.t() if self.kind == "conv1d_gpt2" else w

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.lora_A)
        b = ctx.attr("lora_B", self.lora_B)
        cast = self.lora_A.dtype != self.base.weight.dtype
        # the scale multiplies the rank-r intermediate: r/out of the work of scaling the output
        if self.kind == "embedding":
            hidden = self.emit_lookup(ctx, x, a)
            delta = ctx.call(
                torch.matmul, ctx.call(torch.mul, hidden, self.scale), ctx.method("t", b)
            )
        else:
            h = ctx.method("to", x, self.lora_A.dtype) if cast else x
            if self.dropout is not None:
                h = ctx.module("dropout", self.dropout, h)
            delta = self.emit_update(ctx, h, a, b)
        out = ctx.call(torch.add, base_out, delta)
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def emit_update(self, ctx: EmitContext, h: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        """The scaled update ``scale · B A h`` of the input ``h`` (already in the factors' dtype
        and dropped out) on a layer that is no embedding: the one part of the branch a LoRA
        variant with other factors (block-diagonal, a diagonal between them) changes."""
        if self.kind == "conv":
            conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
            h = ctx.call(conv, h, a, None, self.base.stride, self.base.padding)
            grouped = self._grouped_b_arguments(ctx)
            return ctx.call(conv, ctx.call(torch.mul, h, self.scale), b, *grouped)
        h = ctx.call(F.linear, h, a)
        return ctx.call(F.linear, ctx.call(torch.mul, h, self.scale), b, *self._emit_bias(ctx))

    def _grouped_b_arguments(self, ctx: EmitContext) -> tuple[Any, ...]:
        """The arguments of B's 1x1 convolution after its weight: B's bias, and for a grouped
        base the base's groups (B is grouped as PEFT's)."""
        if self.base.groups == 1:
            return self._emit_bias(ctx)
        return (*(self._emit_bias(ctx) or (None,)), 1, 0, 1, self.base.groups)

    def _emit_bias(self, ctx: EmitContext) -> tuple[fx.Node, ...]:
        """B's scaled bias as the extra argument of B's call, or nothing without ``lora_bias``:
        the scale multiplies B's output, bias included (as PEFT)."""
        if self.lora_bias is None:
            return ()
        return (ctx.call(torch.mul, ctx.attr("lora_bias", self.lora_bias), self.scale),)

    def emit_lookup(self, ctx: EmitContext, ids: fx.Node, a: fx.Node) -> fx.Node:
        """``A`` (r x num_embeddings) looked up for token ``ids`` with the base embedding's
        options: an embedding's LoRA runs its A as a table."""
        emb = self.base
        return ctx.call(
            F.embedding,
            ids,
            ctx.method("t", a),
            emb.padding_idx,
            emb.max_norm,
            emb.norm_type,
            emb.scale_grad_by_freq,
            emb.sparse,
        )

    def delta_weight(self) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        if self.kind == "conv":
            if all(k == 1 for k in self.base.kernel_size):
                ones = (1,) * len(self.base.kernel_size)
                delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], a.shape[1], *ones)
            else:
                conv = getattr(F, f"conv{len(self.base.kernel_size)}d")
                delta = conv(a.transpose(0, 1), b).transpose(0, 1)
        elif self.kind == "embedding":
            delta = (b @ a).t()
        else:
            delta = self._out_in(b @ a)
        return delta * self.scale

    def prepare_merge(self) -> None:
        """Refuse before any layer changes: B's bias has no base bias to fold into (PEFT
        raises then too; adding one would give the model a parameter its config lacks)."""
        if self.lora_bias is not None and self.base.bias is None:
            raise SpecError(
                f"cannot merge LoRA with lora_bias=True into {self.path}: the layer has no bias "
                f"to take B's bias (PEFT refuses this merge too); run the adapter unmerged"
            )
        if (refusal := lora_layers.conv_merge_refusal(self.base, self.path)) is not None:
            raise SpecError(refusal)

    @torch.no_grad()
    def merge(self) -> None:
        super().merge()
        self._fold_bias(1)

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self._fold_bias(-1)

    def _fold_bias(self, sign: int) -> None:
        """Add (``sign`` 1) or take back (-1) ``scale * b_B`` on the base layer's bias."""
        if self.lora_bias is not None:
            bias = self.base.bias
            bias.add_((self.lora_bias * (sign * self.scale)).to(bias.dtype))

    @property
    def peft_names(self) -> dict[str, str]:
        return PEFT_EMBEDDING_NAMES if self.kind == "embedding" else PEFT_NAMES

    def loraplus_group(self, name: str, param: nn.Parameter) -> str:
        """LoRA+ trains the factors of embedding adapters at their own rate."""
        if self.kind == "embedding" and name in PEFT_EMBEDDING_NAMES:
            return "embedding"
        return super().loraplus_group(name, param)


class QLoRALayer(LoRALayer):
    """LoRA's ``lora_A``, ``lora_B`` in the compute dtype, on a base stored in 4 bits (QLoRA).

    The graph spells the base out (dequantize into the compute dtype, matmul); merging
    dequantizes it and folds LoRA in, in float32, leaving a plain layer in the dtype the weight
    had before quantization; unmerge restores the exact 4-bit storage."""

    method = "qlora"
    fuses_as = "qlora"

    def __init__(
        self,
        base: nn.Module,
        path: str,
        rank: int,
        scale: float,
        dropout: float,
        init: str,
        quant: NF4,
        lora_bias: bool = False,
    ) -> None:
        if is_residual_init(init) and is_quantized(base):
            raise SpecError(
                f"init={init!r} on {path}: the layer is already stored in 4 bits; residual inits "
                f"need its full-precision weight (QLoRA on a full-precision model quantizes the residual)"
            )
        if init == "orthogonal" and is_quantized(base):
            raise SpecError(
                f"init='orthogonal' on {path}: the layer is stored in 4 bits; PEFT casts the "
                f"orthogonal A and B to the weight's storage dtype and fails there"
            )
        super().__init__(
            base, path, rank, scale, dropout, init, dtype=quant.dtype, lora_bias=lora_bias
        )
        self.kind = "linear"  # 4-bit storage is [out, in], GPT-2's Conv1D included
        self._stored: tuple[tuple, NF4] | None = None  # the 4-bit storage while merged

    def emit_base(self, ctx: EmitContext, x: fx.Node) -> fx.Node | None:
        base = self.base
        if not is_quantized(base):
            return None
        q = base.quant
        # read through the layer, so the graph always sees its current tensors
        layer = ctx.attr("base_layer", base)
        absmax = ctx.call(getattr, layer, "absmax")
        if q.double_quant:
            nested = ctx.call(getattr, layer, "nested_absmax")
            absmax = ctx.call(
                dequantize_absmax, absmax, nested, ctx.call(getattr, layer, "absmax_offset")
            )
        weight = ctx.call(
            dequantize_4bit,
            ctx.call(getattr, layer, "weight"),
            absmax,
            (base.out_features, base.in_features),
            q.block_size,
            q.quant_type,
            q.dtype,
        )
        bias = ctx.call(getattr, layer, "bias") if base.bias is not None else None
        return ctx.call(linear_4bit, x, weight, bias)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        a = ctx.attr("lora_A", self.lora_A)
        b = ctx.attr("lora_B", self.lora_B)
        h = ctx.method("to", x, self.lora_A.dtype)
        if self.dropout is not None:
            h = ctx.module("dropout", self.dropout, h)
        delta = self.emit_update(ctx, h, a, b)
        return ctx.call(torch.add, base_out, ctx.method("type_as", delta, base_out))

    @torch.no_grad()
    def merge(self) -> None:
        base = self.base
        if not is_quantized(base):  # another adapter's merge dequantized it already
            super().merge()
            return
        self._stored = (snapshot_storage(base), base.quant)
        dtype = base.weight_dtype
        dequantize_linear(base, torch.float32)
        merged = base.weight + self.delta_weight().float()
        base.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
        self._fold_bias(1)  # the bias stays in full precision; PEFT's 4-bit merge forgets the scale

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._stored is None:
            super().unmerge()
            return
        restore_storage(self.base, self._stored[0])  # the weight; the bias is the same tensor
        self._fold_bias(-1)
        self._stored = None

    def unload(self, requantize: bool = False) -> None:
        if self._stored is not None and requantize:
            quantize_linear(self.base, self._stored[1])
        self._stored = None
