"""GLoRA: generalised LoRA (Chavan et al., 2023, "One-for-All: Generalized LoRA for
Parameter-Efficient Fine-tuning", https://arxiv.org/abs/2306.07967).

``W' = W + W ⊙ A + B`` and ``b' = b + b ⊙ D + E + W C``: the weight is scaled (A) and shifted
(B) element-wise, the bias scaled (D), shifted (E) and given a prompt through the weight (C).
Each term takes one of PEFT's forms: ``lora`` (a rank-r product ``Xd Xu``, A and B: out x in,
C: in x 1), ``vector`` (one value per row, broadcast), ``constant`` (one scalar) or ``none``
(no term). A, B share ``weight_terms``; C is ``prompt_term``; D, E share ``bias_terms``. C, D
and E exist only on layers with a bias (as in PEFT). Every term starts at zero (the rank-r
products through ``Xd = 0``), so a fresh adapter leaves the model unchanged.

The layer's output is ``base(x) + x (W ⊙ A + B)ᵀ + (b ⊙ D + E + W C)``: the update ``ΔW``,
``Δb`` is built in the base weight's dtype as PEFT builds ``W'`` (its terms cast to that dtype)
and, where no gradient needs it (generation), kept until W, b or a term changes. It reads the
base weight, so merging adds the update computed before any adapter of the merge changes W
(PEFT merges every adapter against the original W too), and unmerging subtracts that same
update.

Layers: ``torch.nn.Linear`` itself (not its subclasses), the only layer PEFT's GLoRA adapts.
PEFT keys: ``glora_A.Xd``, ``glora_A.Xu`` (lora), ``glora_A.X`` (vector, constant), likewise B
to E; PEFT also saves a term it leaves out as a buffer of zeros (``glora_C.zeros``), which
surgeon writes and reads the same way.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_choice, check_int
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs
from surgeon.peft import INT, STRING, PeftFormat, PeftKey, one_of, selection_keys
from surgeon.spec import MethodSpec

WEIGHT_FORMS = ("lora", "vector", "constant", "none")
"""The forms of A and B (PEFT's ``config_A_B``)."""
PROMPT_FORMS = ("lora", "vector", "none")
"""The forms of C (PEFT's ``config_C``)."""
BIAS_FORMS = ("vector", "constant", "none")
"""The forms of D and E (PEFT's ``config_D_E``)."""
BIAS_MODES = ("none", "all", "glora_only")

PEFT_FORMAT = PeftFormat(
    "GLORA",
    keys=(
        PeftKey("r", "rank", 8, INT),
        # GloraConfig has neither exclude_modules nor layers_to_transform: a selection using
        # them is written out as the chosen module paths
        *selection_keys(exclude=False, layers=False),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey("config_A_B", "weight_terms", "lora", one_of(*WEIGHT_FORMS)),
        PeftKey("config_C", "prompt_term", "lora", one_of(*PROMPT_FORMS)),
        PeftKey("config_D_E", "bias_terms", "constant", one_of(*BIAS_FORMS)),
    ),
    # init_weights=False draws random starting values that the file's weights replace
    constants={"init_weights": True},
)


@dataclass(frozen=True)
class GLoRA(MethodSpec):
    """Generalised LoRA: learned scale and shift of each targeted weight and bias."""

    name = "glora"
    peft_format = PEFT_FORMAT

    rank: int = 8
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    weight_terms: str = "lora"
    prompt_term: str = "lora"
    bias_terms: str = "constant"
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_choice(owner, "weight_terms", self.weight_terms, WEIGHT_FORMS)
        check_choice(owner, "prompt_term", self.prompt_term, PROMPT_FORMS)
        check_choice(owner, "bias_terms", self.bias_terms, BIAS_FORMS)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # the rank-r and the vector forms (the constant and none forms are the card's); the
        # zoo's MLP has biases (C, D, E), Llama's projections have none
        return {
            "default": cls(rank=2, targets=targets),
            "vectors": cls(
                targets=targets, weight_terms="vector", prompt_term="vector", bias_terms="vector"
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return type(layer) is nn.Linear

    def create_layer(self, layer: nn.Module, path: str) -> GLoRALayer:
        return GLoRALayer(layer, self)

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """The file's tensors, refused where a term's ``zeros`` buffer is not zero: PEFT's
        forward would add those values, where a term left out here adds nothing."""
        for key, value in tensors.items():
            if key.endswith(".zeros") and torch.count_nonzero(value):
                raise SpecError(
                    f"GLoRA file tensor {key} is not zero: it stands for a term this config "
                    f"leaves out (PEFT writes zeros there); edit the file or its config_* keys"
                )
        return tensors


# -- one layer's terms ---------------------------------------------------------------------------


TERMS = "ABCDE"

Update = tuple[torch.Tensor | None, torch.Tensor | None]
"""``(ΔW, Δb)``, None for a part no term reaches."""


class GLoRALayer(AdapterLayer):
    """The terms A to E of one Linear layer, each as PEFT stores it: ``glora_<T>_Xd``,
    ``glora_<T>_Xu`` for a rank-r term, ``glora_<T>_X`` for a vector or scalar; float32 over a
    half-precision base, as PEFT keeps them."""

    method = "glora"
    # PEFT's LoRA+ raises the rate of every parameter whose name holds "lora_B": glora_B's
    loraplus_b = ("glora_B_Xd", "glora_B_Xu", "glora_B_X")

    def __init__(self, base: nn.Linear, spec: GLoRA) -> None:
        super().__init__(base)
        weight = base.weight
        out_features, in_features = base.out_features, base.in_features
        self.rank = spec.rank if "lora" in (spec.weight_terms, spec.prompt_term) else None
        biased = base.bias is not None
        self.forms = {
            "A": spec.weight_terms,
            "B": spec.weight_terms,
            "C": spec.prompt_term if biased else "none",
            "D": spec.bias_terms if biased else "none",
            "E": spec.bias_terms if biased else "none",
        }
        self.shapes = {
            "A": (out_features, in_features),
            "B": (out_features, in_features),
            "C": (in_features, 1),
            "D": (out_features,),
            "E": (out_features,),
        }
        factory = adapter_tensor_kwargs(weight)
        for term in TERMS:  # PEFT's order, so a seed draws PEFT's starting values
            for name, shape in self._parameter_shapes(term, spec.rank).items():
                self.register_parameter(name, nn.Parameter(torch.zeros(shape, **factory)))
            if self.forms[term] == "lora":
                with torch.no_grad():
                    nn.init.kaiming_uniform_(getattr(self, f"glora_{term}_Xu"), a=math.sqrt(5))
        # (ΔW, Δb): computed on every call that needs its gradient, else kept until W, b or a
        # term changes (a full-size ΔW per layer while kept)
        self.update = Cached(self.update_now, self._update_sources)
        self._pending: Update | None = None  # taken by prepare_merge
        self._merged: Update | None = None  # what unmerge subtracts

    def _parameter_shapes(self, term: str, rank: int) -> dict[str, tuple[int, ...]]:
        form, shape = self.forms[term], self.shapes[term]
        if form == "lora":
            rows, columns = shape
            return {f"glora_{term}_Xd": (rows, rank), f"glora_{term}_Xu": (rank, columns)}
        if form == "vector":  # one value per row: a column for A, B, C, flat for D, E
            return {f"glora_{term}_X": shape[:1] + (1,) * (len(shape) - 1)}
        if form == "constant":
            return {f"glora_{term}_X": (1,)}
        return {}

    def term(self, name: str) -> torch.Tensor | None:
        """Term ``name`` in the adapter's dtype, shaped to broadcast against its full shape;
        None where it has the form ``none``."""
        form = self.forms[name]
        if form == "none":
            return None
        if form == "lora":
            return getattr(self, f"glora_{name}_Xd") @ getattr(self, f"glora_{name}_Xu")
        return getattr(self, f"glora_{name}_X")

    # -- the update -------------------------------------------------------------------------

    def update_now(self) -> Update:
        """``ΔW = W ⊙ A + B`` and ``Δb = b ⊙ D + E + W C`` in the base weight's dtype, as PEFT
        computes them (its terms cast to that dtype first); None for a part no term reaches."""
        weight, bias = self.base.weight, self.base.bias
        terms = {name: self.term(name) for name in TERMS}
        terms = {n: t.to(weight.dtype) if t is not None else None for n, t in terms.items()}
        delta_weight = None
        if terms["A"] is not None:  # A and B share their form
            delta_weight = weight * terms["A"] + terms["B"]
        delta_bias = None
        if terms["D"] is not None:  # D and E share theirs
            delta_bias = bias * terms["D"] + terms["E"]
        if terms["C"] is not None:
            prompt = torch.matmul(weight, terms["C"]).squeeze(-1)
            delta_bias = prompt if delta_bias is None else delta_bias + prompt
        return delta_weight, delta_bias

    def _update_sources(self) -> tuple:
        return (self.base.weight, self.base.bias, *self.parameters(recurse=False))

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        reaches_weight = self.forms["A"] != "none"
        reaches_bias = any(self.forms[t] != "none" for t in "CDE")
        if not (reaches_weight or reaches_bias):
            return base_out
        update = ctx.module("update", self.update)
        delta_bias = ctx.call(operator.getitem, update, 1) if reaches_bias else None
        if reaches_weight:
            delta_weight = ctx.call(operator.getitem, update, 0)
            delta = ctx.call(F.linear, x, delta_weight, delta_bias)
        else:
            delta = delta_bias
        return ctx.call(torch.add, base_out, delta)

    # -- merging -------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_merge(self) -> None:
        # the update reads W (and b): take it before other adapters of this merge change them
        self._pending = self.update_now()

    @torch.no_grad()
    def merge(self) -> None:
        update = self._pending if self._pending is not None else self.update_now()
        self._pending, self._merged = None, update
        self._fold(torch.Tensor.add_, update)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            raise RuntimeError("GLoRALayer unmerge() without a merge() before it")
        self._fold(torch.Tensor.sub_, self._merged)
        self._merged = None

    def _fold(self, op, update: Update) -> None:
        delta_weight, delta_bias = update
        if delta_weight is not None:
            op(self.base.weight, delta_weight)
        if delta_bias is not None:
            op(self.base.bias, delta_bias)

    # -- PEFT's file ---------------------------------------------------------------------------

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Each term's parameters as ``glora_<T>.<name>``; a term without parameters as PEFT's
        zeros buffer (in the base dtype), which a load reads into a throwaway tensor."""
        weight = self.base.weight
        out = {}
        for term in TERMS:
            owned = {
                n.removeprefix(f"glora_{term}_"): p
                for n, p in self.named_parameters(recurse=False)
                if n.startswith(f"glora_{term}_")
            }
            if not owned:
                owned = {
                    "zeros": torch.zeros(
                        self.shapes[term], device=weight.device, dtype=weight.dtype
                    )
                }
            out.update({f"glora_{term}.{n}": t for n, t in owned.items()})
        return out
