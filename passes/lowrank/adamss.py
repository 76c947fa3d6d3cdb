"""AdaMSS (Adaptive Multi-Subspaces): low-rank updates in clustered subspaces of the weight's
SVD, as PEFT's ``adamss`` tuner implements the paper.

``y = W x + b + S(B_1 A_1 V [x; 1], ..., B_K A_K V [x; 1])``: ``V`` (PEFT's ``adamss_newB``,
``r x (in [+1])``) holds the top right singular vectors of ``[W | b]``; the output rows are
clustered (k-means on the left singular vectors) into K subspaces, subspace ``i`` gets
``A_i`` (``rank_i x r``, initialised from the subspace's own SVD) and ``B_i`` (``rows_i x
rank_i``, zero), and ``S`` scatters each subspace's rows back to their output positions. With a
bias the last column of the update adds to the bias. The subspaces' rows are not saved: they
come from the SVD (seeded by ``seed``) and k-means (scikit-learn's, reproduced here) of W.

ASA (``asa=True``) runs in `AdaMSS.after_backward` (``cm.update_ranks(step)``, inside
`surgeon.train` after each optimizer step, where PEFT's ``AdamssAsaCallback`` calls
``update_and_allocate``): it freezes the least important subspaces across layers on PEFT's
schedule. Its state lives in buffers, so checkpoints resume it exactly.

Layers: Linear (the only type PEFT's AdaMSS supports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, EmitContext
from surgeon.checks import check_int, check_number
from surgeon.errors import SpecError
from surgeon.layers import adapter_dtype, layer_kind, through_base_dtype
from surgeon.peft import BOOL, INT, NUMBER, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec

KMEANS_SEED = 123456789  # PEFT's fixed KMeans random_state
KMEANS_ITERATIONS = 10
KMEANS_TOL = 1e-4  # scikit-learn's default, relative to the mean feature variance
SVD_ITERATIONS = 2  # torch.svd_lowrank's niter in PEFT
IMPORTANCE_STATS = ("importance_A", "importance_B", "uncertainty_A", "uncertainty_B")

PEFT_FORMAT = PeftFormat(
    "ADAMSS",
    keys=(
        PeftKey("r", "rank", 100, INT),
        PeftKey("num_subspaces", "subspaces", 5, INT),
        PeftKey("subspace_rank", "subspace_rank", 1, INT),
        PeftKey("use_dynamic_rank", "dynamic_rank", False, BOOL),
        PeftKey("svd_threshold", "svd_threshold", 0.1, NUMBER),
        PeftKey("random_seed", "seed", 0, INT),
        PeftKey("use_asa", "asa", False, BOOL),
        PeftKey("asa_target_subspaces", "asa_target_subspaces", 50, INT),
        PeftKey("init_warmup", "init_warmup", 50, INT),
        PeftKey("final_warmup", "final_warmup", 1000, INT),
        PeftKey("mask_interval", "mask_interval", 100, INT),
        PeftKey("asa_importance_beta", "importance_beta", 0.85, NUMBER),
        PeftKey("asa_uncertainty_beta", "uncertainty_beta", 0.85, NUMBER),
        PeftKey("asa_schedule_exponent", "schedule_exponent", 3.0, NUMBER),
        # PEFT's AdaMSS has no exclude_modules: a selection with exclusions is written out as
        # the chosen module paths
        *selection_keys(exclude=False),
    ),
    # init_weights=None only draws B values that the file's weights replace
    constants={"init_weights": "orthogonal"},
)


@dataclass(frozen=True)
class AdaMSS(MethodSpec):
    """Adaptive multi-subspace adaptation: K clustered low-rank updates on top of W's SVD."""

    name = "adamss"
    peft_format = PEFT_FORMAT
    shapes_from_weight_values = True

    rank: int = 100
    subspaces: int = 5
    subspace_rank: int = 1
    dynamic_rank: bool = False
    svd_threshold: float = 0.1
    seed: int = 0
    asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    importance_beta: float = 0.85
    uncertainty_beta: float = 0.85
    schedule_exponent: float = 3.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "rank", self.rank)
        check_int(owner, "subspaces", self.subspaces)
        check_int(owner, "subspace_rank", self.subspace_rank)
        if not isinstance(self.dynamic_rank, bool):
            raise SpecError(f"{owner}.dynamic_rank={self.dynamic_rank!r}: expected true or false")
        check_number(owner, "svd_threshold", self.svd_threshold, 0, 1, low_inclusive=True)
        check_int(owner, "seed", self.seed, minimum=0)
        if not isinstance(self.asa, bool):
            raise SpecError(f"{owner}.asa={self.asa!r}: expected true or false")
        check_number(owner, "importance_beta", self.importance_beta, 0, 1)
        check_number(owner, "uncertainty_beta", self.uncertainty_beta, 0, 1)
        if self.asa:  # PEFT checks the schedule only when ASA is on
            check_int(owner, "asa_target_subspaces", self.asa_target_subspaces)
            check_int(owner, "mask_interval", self.mask_interval)
            check_int(owner, "init_warmup", self.init_warmup, minimum=0)
            check_int(owner, "final_warmup", self.final_warmup, minimum=self.init_warmup + 1)
            check_number(owner, "schedule_exponent", self.schedule_exponent, 0)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(rank=6, subspaces=3, subspace_rank=2, targets=targets),
            "dynamic": cls(
                rank=4, subspaces=2, subspace_rank=3, dynamic_rank=True, seed=3, targets=targets
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) == "linear"

    def create_layer(self, layer: nn.Module, path: str) -> AdaMSSLayer:
        return AdaMSSLayer(layer, self)

    # -- adaptive subspace allocation (ASA) ---------------------------------------------------

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """PEFT's ``update_and_allocate(step)``: from ``init_warmup`` to ``final_warmup``, update
        every subspace's importance each step and, every ``mask_interval`` steps, freeze all but
        the most important subspaces across layers (down to the schedule's count), then start
        the averages afresh. A frozen subspace gets no gradient again, so it stays frozen."""
        if not self.asa or not self.init_warmup <= step <= self.final_warmup:
            return
        adapters: list[AdaMSSLayer] = list(layers.values())
        for layer in adapters:
            layer.update_importance(self.importance_beta, self.uncertainty_beta)
        if step % self.mask_interval == 0:
            total = sum(layer.count for layer in adapters)
            keep_active(adapters, self.active_subspaces(step, total))
            for layer in adapters:
                layer.forget_importance()

    def active_subspaces(self, step: int, total: int) -> int:
        """PEFT's schedule: from ``total`` down to ``asa_target_subspaces`` as
        ``(1 - progress) ** schedule_exponent`` over the warmup."""
        left = 1.0 - (step - self.init_warmup) / (self.final_warmup - self.init_warmup)
        left = max(0.0, min(1.0, left))
        target = self.asa_target_subspaces
        return int(target + (total - target) * left**self.schedule_exponent)


@torch.no_grad()
def keep_active(layers: Sequence[AdaMSSLayer], count: int) -> None:
    """Keep the scored subspaces whose score is above the ``count``-th highest (strictly, as
    PEFT compares), freeze the others; unscored (already frozen) subspaces stay as they are."""
    scored = [(layer, i, s) for layer in layers for i, s in layer.subspace_scores()]
    if not scored:
        return
    scores = torch.stack([s for _, _, s in scored])
    if count >= len(scored):
        threshold = float("-inf")
    else:
        threshold = -torch.kthvalue(-scores, count).values.item()
    for layer, i, score in scored:
        layer.set_active(i, float(score) > threshold)


def weight_with_bias(base: nn.Module) -> torch.Tensor:
    """``[W | b]`` in float32: the bias is the weight of a constant input 1."""
    weight = base.weight.detach().float()
    if base.bias is None:
        return weight
    return torch.cat((weight, base.bias.detach().float().unsqueeze(1)), dim=1)


def seeded_svd(matrix: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right singular vectors of ``matrix``'s randomized SVD, the random projection
    drawn from ``seed`` without touching the global generator (as PEFT draws it)."""
    devices = [] if matrix.device.type == "cpu" else [matrix.device]
    kwargs = {} if matrix.device.type == "cpu" else {"device_type": matrix.device.type}
    with torch.random.fork_rng(devices=devices, **kwargs):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(matrix, q=rank, niter=SVD_ITERATIONS)
    return u[:, :rank], v[:, :rank]


def kmeans_labels(rows: torch.Tensor, clusters: int) -> torch.Tensor:
    """scikit-learn's ``KMeans(init="random", n_init=1, max_iter=10, random_state=123456789)``
    labels, reproduced step by step (same seeds, float32, same stopping rules) so the subspaces
    match PEFT's without depending on scikit-learn."""
    x = rows.detach().cpu().numpy().astype(np.float32)
    tol = float(np.mean(np.var(x, axis=0)) * KMEANS_TOL)
    x = x - x.mean(axis=0)
    n = x.shape[0]
    weights = np.ones(n, dtype=np.float32)
    state = np.random.RandomState(KMEANS_SEED)
    centers = x[state.choice(n, size=clusters, replace=False, p=weights / weights.sum())]
    labels = np.full(n, -1, dtype=np.int64)
    converged = False
    for _ in range(KMEANS_ITERATIONS):
        new_labels = _nearest(x, centers)
        new_centers = _cluster_means(x, new_labels, centers)
        shift = float(((new_centers - centers) ** 2).sum())
        centers = new_centers
        if np.array_equal(new_labels, labels):
            converged = True
            labels = new_labels
            break
        labels = new_labels
        if shift <= tol:
            break
    if not converged:
        labels = _nearest(x, centers)
    return torch.from_numpy(labels).long()


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Each row's closest center, by scikit-learn's ``|c|² - 2 x·c`` (the ``|x|²`` term is
    common to all centers)."""
    scores = (centers**2).sum(axis=1)[None, :] - 2 * (x @ centers.T)
    return scores.argmin(axis=1)


def _cluster_means(x: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The mean of each cluster. Each empty cluster takes one of the rows farthest from their
    centers (in scikit-learn's order: ``argpartition``'s tail, reversed), which leaves its old
    cluster's sum; labels stay as they are until the next assignment, as in scikit-learn."""
    sums = np.zeros_like(centers)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=len(centers)).astype(np.float32)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        distances = ((x - centers[labels]) ** 2).sum(axis=1)
        far = np.argpartition(distances, -len(empty))[: -len(empty) - 1 : -1]
        for cluster, row in zip(empty, far):
            sums[labels[row]] -= x[row]
            counts[labels[row]] -= 1
            sums[cluster] = x[row]
            counts[cluster] = 1
    filled = counts > 0
    sums[filled] /= counts[filled, None]
    return sums


class SubspaceGate(nn.Module):
    """Which subspaces ASA left trainable. A frozen subspace's factors are cut from autograd
    (PEFT turns their requires_grad off); the flags are a buffer read at each call, so a
    checkpoint restores them with the rest."""

    def __init__(self, count: int, device: torch.device) -> None:
        super().__init__()
        self.register_buffer(
            "active", torch.ones(count, dtype=torch.bool, device=device), persistent=False
        )

    def forward(self, param: torch.Tensor, subspace: int) -> torch.Tensor:
        return param if bool(self.active[subspace]) else param.detach()


class AdaMSSLayer(AdapterLayer):
    """``A_i``, ``B_i`` per subspace, the projection ``V`` (a frozen buffer, saved as PEFT saves
    it) and the output rows of each subspace. As PEFT keeps them: ``V`` in the base dtype, the
    factors in float32 over a half-precision base (computed in the base dtype all the same)."""

    method = "adamss"

    def __init__(self, base: nn.Module, spec: AdaMSS) -> None:
        super().__init__(base)
        dtype, device = base.weight.dtype, base.weight.device
        full = weight_with_bias(base)
        rank = min(spec.rank, *full.shape)
        left, right = seeded_svd(full, rank, spec.seed)
        labels = kmeans_labels(left, min(spec.subspaces, full.shape[0]))
        groups = [torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)]
        self.count = len(groups)
        self.register_buffer("adamss_newB", right.t().contiguous().to(dtype))
        # the output position of each row of the stacked subspaces, inverted: a gather puts
        # the stacked rows back in output order
        self.register_buffer("order", torch.argsort(torch.cat(groups)).to(device), persistent=False)
        for i, group in enumerate(groups):
            a = self._initial_a(left[group], spec)
            a = through_base_dtype(a, base.weight)
            setattr(self, f"adamss_A_{i}", nn.Parameter(a))
            b = torch.zeros(len(group), a.shape[0], dtype=a.dtype, device=device)
            setattr(self, f"adamss_B_{i}", nn.Parameter(b))
        # ASA's state, not saved in adapter files (PEFT saves none) but kept in checkpoints
        self.gate = SubspaceGate(self.count, device) if spec.asa else None
        for i in range(self.count):
            for stat in IMPORTANCE_STATS:
                self.register_buffer(f"{stat}_{i}", None, persistent=False)

    @staticmethod
    def _initial_a(block: torch.Tensor, spec: AdaMSS) -> torch.Tensor:
        """``Qᵀ`` of the QR of ``blockᵀ U``, ``U`` the top singular vectors of the subspace's
        Gram matrix (PEFT's draws: torch.svd_lowrank on the global generator)."""
        gram = block @ block.t()
        if spec.dynamic_rank:
            _, values, _ = torch.svd_lowrank(gram, q=min(gram.shape), niter=SVD_ITERATIONS)
            significant = int((values > spec.svd_threshold * values[0]).sum())
            rank = max(1, min(significant, spec.subspace_rank, len(values)))
        else:
            rank = max(1, min(len(block), spec.subspace_rank))
        u, _, _ = torch.svd_lowrank(gram, q=min(len(gram), rank), niter=SVD_ITERATIONS)
        q, _ = torch.linalg.qr(block.t() @ u[:, :rank], mode="reduced")
        return q.t().contiguous()

    def factors(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """``(A_i, B_i)`` for each subspace, in PEFT's order."""
        return [
            (getattr(self, f"adamss_A_{i}"), getattr(self, f"adamss_B_{i}"))
            for i in range(self.count)
        ]

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        dtype = self.base.weight.dtype
        h = ctx.method("to", x, dtype)
        if self.base.bias is not None:
            ones = ctx.call(torch.ones_like, ctx.call(torch.narrow, h, -1, 0, 1))
            h = ctx.call(torch.cat, (h, ones), -1)
        projected = ctx.call(F.linear, h, ctx.attr("adamss_newB", self.adamss_newB))
        chunks = []
        cast = adapter_dtype(self.base.weight) != dtype
        for i in range(self.count):
            a = ctx.attr(f"adamss_A_{i}", getattr(self, f"adamss_A_{i}"))
            b = ctx.attr(f"adamss_B_{i}", getattr(self, f"adamss_B_{i}"))
            if self.gate is not None:  # a subspace ASA froze gets no gradient
                a = ctx.module("gate", self.gate, a, i)
                b = ctx.module("gate", self.gate, b, i)
            if cast:  # PEFT multiplies in the base dtype
                a, b = ctx.method("to", a, dtype), ctx.method("to", b, dtype)
            chunks.append(ctx.call(F.linear, ctx.call(F.linear, projected, a), b))
        stacked = ctx.call(torch.cat, tuple(chunks), -1)
        # the subspaces' rows back in output order: a column gather by the inverse permutation
        delta = ctx.call(torch.index_select, stacked, -1, ctx.attr("order", self.order))
        return ctx.call(torch.add, base_out, delta)

    def full_delta(self) -> torch.Tensor:
        """``S(B_i A_i V)``: the update of ``[W | b]``, in float32."""
        v = self.adamss_newB.float()
        blocks = torch.cat([b.float() @ a.float() @ v for a, b in self.factors()])
        return blocks.index_select(0, self.order)

    def delta_weight(self) -> torch.Tensor:
        return self.full_delta()[:, : self.base.in_features]

    @torch.no_grad()
    def merge(self) -> None:
        self._fold(1.0)

    @torch.no_grad()
    def unmerge(self) -> None:
        self._fold(-1.0)

    def _fold(self, sign: float) -> None:
        base, delta = self.base, self.full_delta()
        base.weight.add_((sign * delta[:, : base.in_features]).to(base.weight.dtype))
        if base.bias is not None:
            base.bias.add_((sign * delta[:, -1]).to(base.bias.dtype))

    # -- ASA ------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_importance(self, importance_beta: float, uncertainty_beta: float) -> None:
        """Per entry of each factor with a gradient: the average of ``|θ·∇θ|`` and of its
        deviation from the previous average (updated first, as PEFT does)."""
        for i, factors in enumerate(self.factors()):
            for side, param in zip("AB", factors):
                if param.grad is None:
                    continue
                importance = (param * param.grad).abs()
                mean = getattr(self, f"importance_{side}_{i}")
                spread = getattr(self, f"uncertainty_{side}_{i}")
                if mean is None:
                    mean, spread = torch.zeros_like(param), torch.zeros_like(param)
                spread = (
                    uncertainty_beta * spread + (1 - uncertainty_beta) * (importance - mean).abs()
                )
                mean = importance_beta * mean + (1 - importance_beta) * importance
                setattr(self, f"importance_{side}_{i}", mean)
                setattr(self, f"uncertainty_{side}_{i}", spread)

    def subspace_scores(self) -> list[tuple[int, torch.Tensor]]:
        """(subspace, score) for each subspace with averages of both factors: the mean of
        importance x uncertainty over A's entries plus that over B's."""
        out = []
        for i in range(self.count):
            stats = [getattr(self, f"{stat}_{i}") for stat in IMPORTANCE_STATS]
            if any(s is None for s in stats):
                continue
            mean_a, mean_b, spread_a, spread_b = stats
            out.append((i, (mean_a * spread_a).mean() + (mean_b * spread_b).mean()))
        return out

    def set_active(self, subspace: int, active: bool) -> None:
        self.gate.active[subspace] = active
        if not active:
            for param in self.factors()[subspace]:
                param.grad = None

    def forget_importance(self) -> None:
        for i in range(self.count):
            for stat in IMPORTANCE_STATS:
                setattr(self, f"{stat}_{i}", None)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"adamss_newB": self.adamss_newB}
        for i, (a, b) in enumerate(self.factors()):
            out[f"adamss_A.{i}"] = a
            out[f"adamss_B.{i}"] = b
        return out
