"""FRoD: the adapted weight rebuilt over a basis shared by every layer of one role, with a
trained diagonal and a trained sparse rotation (FRoD, AAAI 2026,
https://doi.org/10.1609/aaai.v40i31.39813).

``W' x + b`` with ``W' = U (Λ + S) Vᵀ``: ``V`` (in x in) is one basis per *category* of
targeted layers (the role a path names: ``q_proj``, ``self_query``, ``body_0``, ...), built
from all of that category's base weights at once (an SVD of their stack, or with more rows than
columns a QR whose per-layer slices are averaged through a ridge, ``regularization_alpha``, and
diagonalised). Per layer, ``W = B Vᵀ`` is solved for ``B``, whose column norms are ``Λ``
(``frod_lambda_l``, trained) and whose unit columns are ``U`` (fixed). ``S`` is sparse and
off-diagonal: ``sparse_rate`` of its entries, their positions drawn per category (in sorted
category order) with one generator seeded by ``seed``; its values (``frod_lambda_s_values``)
start at zero, so a fresh adapter rebuilds ``W`` (to rounding).

PEFT keys: per layer ``frod_lambda_l`` (in,) and ``frod_lambda_s_values`` (nnz,); with
``save_projection`` (PEFT's default) also ``base_model.frod_V.<category>`` (in, in),
``base_model.frod_s_indices.<category>`` (2, nnz) and ``base_model.frod_s_size.<category>``
(2,). Without them both sides rebuild V from the base weights and the positions from the seed,
as PEFT does. As in PEFT, ``U`` comes from the basis built at creation (a file's V replaces the
basis the forward uses, not U), the basis is kept in the base weight's dtype and U in it too,
Λ and the s-values are rounded through it and held in float32 over half precision.

The forward is PEFT's: one adapter (without live dropout) computes ``W' x + b`` itself, the
base layer's output unused; stacked adapters and a dropout add ``W' h - W h`` to what comes
before (``h`` the dropped input). Merging adds ``W' - W`` (W as it was before the merge).

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's FRoD supports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_bool, check_choice, check_number, check_probability, check_seed
from surgeon.layers import adapter_dtype, in_out_features, layer_kind
from surgeon.peft import BOOL, INT, NUMBER, STRING, PeftFormat, PeftKey, choices, selection_keys
from surgeon.spec import MethodSpec

BIAS_MODES = ("none", "all", "frod_only")
INITS = ("default", "random")
"""``default``: Λ from the weight, S zero (PEFT's ``init_weights=True``); ``random``: both
moved by N(0, 0.1) draws (PEFT's ``False``)."""
SHARED = ("frod_V", "frod_s_indices", "frod_s_size")
"""The per-category tensors, under ``base_model.<name>.<category>`` in PEFT's files."""
RANDOM_INIT_STD = 0.1

PEFT_FORMAT = PeftFormat(
    "FROD",
    keys=(
        # PEFT's FRoD has no exclude_modules: a selection that uses it is written out as the
        # chosen module paths
        *selection_keys(exclude=False),
        PeftKey("projection_prng_key", "seed", 0, INT),
        PeftKey("save_projection", "save_projection", True, BOOL),
        PeftKey("frod_dropout", "dropout", 0.0, NUMBER),
        PeftKey("sparse_rate", "sparse_rate", 0.01, NUMBER),
        PeftKey("regularization_alpha", "regularization_alpha", 1e-3, NUMBER),
        PeftKey(
            "init_weights",
            "init",
            True,
            BOOL,
            save=lambda spec, paths: spec.init == "default",
            load=choices({True: "default", False: "random"}, "init_weights"),
        ),
        PeftKey("bias", "bias", "none", STRING),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
    # a progress bar, and where the base weight waits between calls: neither changes a number
    ignored=frozenset({"progressbar", "runtime_offload_base_weight"}),
)


@dataclass(frozen=True)
class FRoD(MethodSpec):
    """The adapted weight ``U (Λ + S) Vᵀ`` over a basis V shared by each role's layers.

    ``seed``: draws the sparse positions (PEFT's ``projection_prng_key``). ``sparse_rate``: the
    fraction of S's entries that train (at least one where above zero). ``regularization_alpha``:
    the ridge of the basis's averaged inverse. ``save_projection``: files also hold V and the
    positions. ``init``: ``default`` or ``random`` (see `INITS`). ``bias``: ``all`` or
    ``frod_only`` also train the base biases (all, or the adapted layers').
    """

    name = "frod"
    peft_format = PEFT_FORMAT

    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    save_projection: bool = True
    dropout: float = 0.0
    init: str = "default"
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_seed(owner, "seed", self.seed)
        check_number(owner, "sparse_rate", self.sparse_rate, 0, 1, True, True)
        check_number(owner, "regularization_alpha", self.regularization_alpha, 0, None, False, True)
        check_bool(owner, "save_projection", self.save_projection)
        check_probability(owner, "dropout", self.dropout)
        check_choice(owner, "init", self.init, INITS)
        check_choice(owner, "bias", self.bias, BIAS_MODES)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(sparse_rate=0.2, targets=targets),
            "regenerated-dropout-random": cls(
                seed=3,
                sparse_rate=0.05,
                save_projection=False,
                dropout=0.1,
                init="random",
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "default"  # W = U Λ Vᵀ, to rounding

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, FRoDLayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        projections = build_projections(
            bases, self.sparse_rate, self.regularization_alpha, self.seed
        )
        return {
            p: FRoDLayer(b, projections[category_of(p)], self.dropout, self.init)
            for p, b in bases.items()
        }

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Every category's basis and positions where the spec saves them."""
        if not self.save_projection:
            return {}
        out = {}
        for layer in layers.values():
            projection = layer.projection
            for name in SHARED:
                out[f"base_model.{name}.{projection.category}"] = getattr(projection, name)
        return out


# -- the shared bases -------------------------------------------------------------------------------


def category_of(path: str) -> str:
    """PEFT's role of a layer: its last path part, with the one before it unless that is a block
    index (``self_attn_q_proj``, ``mlp_down_proj``); BERT's attention output is set apart from
    the MLP's ``output.dense``."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    category = f"{parts[-2]}_{parts[-1]}"
    if category == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return category


def block_index_of(path: str, fallback: int) -> int:
    """PEFT's block of a layer: the index after ``layers``, else the first numeric part, else
    ``fallback`` (the layer's position among the targets)."""
    parts = path.split(".")
    if "layers" in parts:
        after = parts.index("layers") + 1
        if after < len(parts) and parts[after].isdigit():
            return int(parts[after])
    return next((int(part) for part in parts if part.isdigit()), fallback)


def oriented_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) (GPT-2's Conv1D stores it transposed)."""
    weight = base.weight
    return weight.t() if layer_kind(base) == "conv1d_gpt2" else weight


def joint_basis(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """One category's V (in x in) from its layers' float32 weights, as PEFT builds it: the right
    singular vectors of their stack while it is wide; else ``Rᵀ E``, with ``Q R`` the stack's QR
    and ``E`` the eigenvectors of the layers' mean ``(Q_iᵀ Q_i + alpha I)⁻¹`` (the ridge keeps the
    inverse stable where layers correlate)."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    ridge = alpha * torch.eye(dim, dtype=r.dtype)
    mean_inverse = torch.zeros((dim, dim), dtype=r.dtype)
    for block in torch.split(q, [m.shape[0] for m in matrices]):
        mean_inverse += torch.linalg.inv(block.T @ block + ridge)
    mean_inverse /= len(matrices)
    return r.T @ torch.linalg.eigh(mean_inverse)[1]


def sparse_positions(dim: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2, nnz) row/column indices of S: ``rate`` of its off-diagonal entries (at least one when
    the rate is above zero), a prefix of one ``randperm`` drawn as PEFT draws it."""
    rows, cols = torch.meshgrid(torch.arange(dim), torch.arange(dim), indexing="ij")
    pairs = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off_diagonal = pairs[pairs[:, 0] != pairs[:, 1]]
    count = min(int(dim * dim * rate), off_diagonal.shape[0])
    if rate > 0 and off_diagonal.shape[0] > 0:
        count = max(1, count)
    if not count:
        return torch.empty(2, 0, dtype=torch.long)
    chosen = torch.randperm(off_diagonal.shape[0], generator=generator)[:count]
    return off_diagonal[chosen].t().contiguous()


def sparse_count(dim: int, rate: float) -> int:
    """How many positions `sparse_positions` draws (without drawing: the meta device)."""
    off_diagonal = dim * dim - dim
    count = min(int(dim * dim * rate), off_diagonal)
    return max(1, count) if rate > 0 and off_diagonal > 0 else count


class Projection(nn.Module):
    """One category's basis ``frod_V`` (in x in, the base dtype), S's positions
    ``frod_s_indices`` (2, nnz) and S's shape ``frod_s_size``; shared by the category's layers."""

    def __init__(self, category: str, basis: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__()
        self.category = category
        device = basis.device
        self.register_buffer("frod_V", basis)
        self.register_buffer("frod_s_indices", positions.to(device))
        dim = basis.shape[0]
        self.register_buffer("frod_s_size", torch.tensor([dim, dim], device=device))


def build_projections(
    bases: Mapping[str, nn.Module], rate: float, alpha: float, seed: int
) -> dict[str, Projection]:
    """Every category's `Projection`, as PEFT builds them: one weight per (block, category),
    the last target wins where two share both; categories in sorted order, one generator."""
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    for position, (path, base) in enumerate(bases.items()):
        block = by_block.setdefault(block_index_of(path, position), {})
        block[category_of(path)] = oriented_weight(base)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for category in sorted({c for block in by_block.values() for c in block}):
        weights = [block[category] for _, block in sorted(by_block.items()) if category in block]
        first = next(block[category] for block in by_block.values() if category in block)
        dim = first.shape[1]
        if first.is_meta:
            basis = torch.empty(dim, dim, dtype=first.dtype, device="meta")
            positions = torch.empty(2, sparse_count(dim, rate), dtype=torch.long, device="meta")
        else:
            matrices = [w.detach().to(torch.float32).cpu() for w in weights]
            basis = joint_basis(matrices, alpha).to(first.dtype).to(first.device)
            positions = sparse_positions(dim, rate, generator)
        out[category] = Projection(category, basis, positions)
    return out


def factor_weight(weight: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` (out x in, unit columns) and ``Λ`` (in,) with ``W = U diag(Λ) Vᵀ``, in float64 as
    PEFT solves it (a pseudo-inverse where V is singular), returned in float32."""
    w = weight.detach().to(torch.float64).cpu()
    v = basis.detach().to(torch.float64).cpu()
    try:
        coefficients = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        coefficients = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(coefficients, dim=0)
    unit = torch.zeros_like(coefficients)
    kept = norms > 1e-12
    unit[:, kept] = coefficients[:, kept] / norms[kept]
    return unit.float(), norms.float()


# -- the layer ---------------------------------------------------------------------------------------


def rotated(
    h: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    values: torch.Tensor,
    diagonal: torch.Tensor,
) -> torch.Tensor:
    """``U (Λ + S) Vᵀ h`` in ``h``'s dtype, with PEFT's operations: S sparse in float32, dense
    in half precision (and on the meta device)."""
    dtype = h.dtype
    flat = h.reshape(-1, h.shape[-1])
    z = torch.matmul(flat, v.to(dtype))
    values = values.to(dtype)
    dim = v.shape[0]
    if positions.shape[1] == 0:
        z_s = torch.zeros_like(z)
    elif dtype in (torch.float16, torch.bfloat16) or z.is_meta:
        dense = torch.zeros(dim, dim, dtype=dtype, device=z.device)
        dense = dense.index_put((positions[0], positions[1]), values, accumulate=True)
        z_s = z @ dense.t()
    else:
        s = torch.sparse_coo_tensor(positions, values, (dim, dim), check_invariants=False)
        s = s.coalesce()
        z_s = torch.sparse.mm(s, z.t()).t()
    out = F.linear(z_s + z * diagonal.to(dtype), u.to(dtype))
    return out.reshape(*h.shape[:-1], out.shape[-1])


class FRoDLayer(AdapterLayer):
    """One layer's trained ``frod_lambda_l`` (Λ, in) and ``frod_lambda_s_values`` (S's values,
    nnz), its fixed ``frod_U`` (out x in, the base dtype), and its category's `Projection`.

    U is a buffer of the store's state dict although PEFT's files never hold it: U and V only
    rebuild W together, so a state dict carries the U that goes with the basis it carries."""

    method = "frod"

    def __init__(self, base: nn.Module, projection: Projection, dropout: float, init: str) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.projection = projection
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        weight = base.weight
        _, out_features = in_out_features(base)
        dim = projection.frod_V.shape[0]
        nnz = projection.frod_s_indices.shape[1]
        factory = {"device": weight.device, "dtype": weight.dtype}
        if weight.is_meta:
            u, diagonal = torch.empty(out_features, dim, **factory), torch.empty(dim, **factory)
        else:
            u, diagonal = factor_weight(oriented_weight(base), projection.frod_V.to(weight.dtype))
            u, diagonal = u.to(**factory), diagonal.to(**factory)
        values = torch.zeros(nnz, **factory)
        if init == "random" and not weight.is_meta:
            values.normal_(std=RANDOM_INIT_STD)  # PEFT's draws: in the base dtype, S then Λ
            diagonal.add_(torch.randn_like(diagonal) * RANDOM_INIT_STD)
        self.register_buffer("frod_U", u)
        self.frod_lambda_l = nn.Parameter(diagonal.to(adapter_dtype(weight)))
        self.frod_lambda_s_values = nn.Parameter(values.to(adapter_dtype(weight)))
        self._weight_before_merge: torch.Tensor | None = None

    def adapted_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``U (S + Λ) Vᵀ`` (out x in) in ``dtype``, multiplied as PEFT merges it."""
        p = self.projection
        dim = p.frod_V.shape[0]
        values = self.frod_lambda_s_values.to(dtype)
        s = torch.zeros(dim, dim, dtype=dtype, device=values.device)
        s = s.index_put((p.frod_s_indices[0], p.frod_s_indices[1]), values, accumulate=True)
        s_plus_l = s + torch.diag_embed(self.frod_lambda_l.to(dtype))
        return self.frod_U.to(dtype) @ s_plus_l @ p.frod_V.to(dtype).T

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        p = self.projection
        h = ctx.module("dropout", self.dropout, x) if self.dropout is not None else x
        update = ctx.call(
            rotated,
            h,
            ctx.attr("frod_U", self.frod_U),
            ctx.attr("frod_V", p.frod_V),
            ctx.attr("frod_s_indices", p.frod_s_indices),
            ctx.attr("frod_lambda_s_values", self.frod_lambda_s_values),
            ctx.attr("frod_lambda_l", self.frod_lambda_l),
        )
        bias = self.base.bias
        if self.dropout is None and self._runs_alone(ctx, base_out):
            # PEFT's single-adapter forward: the rebuilt weight replaces the base layer's
            return (
                ctx.call(torch.add, update, ctx.attr("bias", bias)) if bias is not None else update
            )
        weight = ctx.attr("weight", self.base.weight)
        if self.kind == "conv1d_gpt2":
            weight = ctx.method("t", weight)
        base_part = ctx.call(F.linear, h, weight)
        return ctx.call(torch.sub, ctx.call(torch.add, base_out, update), base_part)

    @staticmethod
    def _runs_alone(ctx: EmitContext, base_out: fx.Node) -> bool:
        """Whether ``base_out`` is the base layer's own output (or this adapter's rows of it, in
        a mixed batch) rather than the output of another adapter stacked before this one."""
        tag = base_out.meta.get("surgeon")
        return tag is None or "replaces" in tag or tag["adapter"] == ctx.tag["adapter"]

    @torch.no_grad()
    def prepare_merge(self) -> None:
        # PEFT folds every adapter against the weight as it was before any of them merged
        self._weight_before_merge = self.base.weight.detach().clone()

    def delta_weight(self) -> torch.Tensor:
        """``W' - W`` in the base layout and dtype (W: before the merge in progress)."""
        weight = self.base.weight
        before = self._weight_before_merge if self._weight_before_merge is not None else weight
        adapted = self.adapted_weight(weight.dtype)
        adapted = adapted.t() if self.kind == "conv1d_gpt2" else adapted
        return adapted - before

    @torch.no_grad()
    def merge(self) -> None:
        self.base.weight.add_(self.delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base.weight.sub_(self.delta_weight())
        self._weight_before_merge = None

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Λ and S's values; the category's tensors are the adapter's (`FRoD.peft_shared_tensors`)."""
        return {
            "frod_lambda_l": self.frod_lambda_l,
            "frod_lambda_s_values": self.frod_lambda_s_values,
        }
