"""LoRA's initialisations beyond the base weight alone, as PEFT 0.21 computes them. Their
options are LoRA's ``init_config`` (PEFT's ``<init>_config`` key, PEFT's defaults).

Without data:

* ``loftq`` (Li et al., 2023, arXiv:2310.08659): alternate NF4 quantisation of ``W - B A`` and
  a rank-r SVD of ``W - Q``; the base becomes the dequantised ``Q`` (full precision, exactly on
  the NF4 grid, so storing it in 4 bits later loses nothing), ``B A`` the SVD's factors, unscaled
  as PEFT's. ``loftq_config``: ``loftq_bits`` (4 only: 8-bit is refused), ``loftq_iter``. The
  quantiser is `surgeon.NF4` (blocks of 64, fp32 absmax: bitsandbytes' ``Params4bit`` as PEFT
  builds it), so no bitsandbytes and no GPU are needed. Linear layers only.
* ``mica`` (arXiv:2604.01694): B the minor left singular vectors of W, frozen; A zero.

From the calibration batches of ``surgeon.compile(model, spec, calibration=batches)`` (dicts of
the model's keyword arguments), each with a progress bar:

* ``eva`` (Paischer et al., 2024, arXiv:2410.07170): A from the principal directions of each
  layer's inputs (incremental PCA until they converge), ranks moved between layers by explained
  variance; B zero, base untouched. ``eva_config``: ``rho``, ``tau``, ``use_label_mask``,
  ``label_mask_value``, ``whiten``, ``adjust_scaling_factors``.
* ``corda``: A, B from the SVD of W times the inputs' covariance; the base keeps the residual.
  ``corda_config``: ``corda_method`` (``ipm``/``kpm``), ``use_float16_for_covariance``;
  ``cache_file``/``covariance_file`` are refused.
* ``lora_ga``: A, B from the SVD of the loss gradient of W; the base keeps the residual.
  ``lora_ga_config``: ``direction``, ``scale``, ``stable_gamma``.

Each runs on LoRA's layers built as PEFT builds its factor layers (`constructed_factors`), in
PEFT's order of random draws. A file's load does what PEFT's load does: LoftQ and MiCA rerun,
EVA and LoRA-GA take the file's factors on the base as it is, and CorDA is refused (its
residual base comes from data the file does not hold; PEFT cannot load it either).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgeon.checks import is_int
from surgeon.errors import SpecError
from surgeon.layers import through_base_dtype
from surgeon.peft import MAPPING, PeftKey
from surgeon.quant import NF4

if TYPE_CHECKING:
    from surgeon.passes.lowrank.lora import LoRA, LoRALayer

Batches = Iterable[Mapping[str, Any]] | None

LOFTQ_QUANT = NF4(block_size=64, double_quant=False, compute_dtype="float32")
"""What PEFT's LoftQ quantises with: bitsandbytes' NF4 in blocks of 64, plain fp32 absmax."""

CONFIG_KEYS = {
    "loftq": "loftq_config",
    "eva": "eva_config",
    "corda": "corda_config",
    "lora_ga": "lora_ga_config",
}
"""PEFT's config key holding each init's options (``init_config`` here)."""

EMPTY_CONFIG = {
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
}
"""What PEFT writes for each options key while its init is not chosen."""


def _check_loftq(owner: str, options: Mapping[str, Any]) -> None:
    if options["loftq_bits"] != 4:
        raise SpecError(
            f"{owner}.init_config: loftq_config.loftq_bits={options['loftq_bits']!r} is not "
            f"supported (supported: 4, NF4 through surgeon.NF4)"
        )
    if not is_int(options["loftq_iter"]) or options["loftq_iter"] < 1:
        raise SpecError(
            f"{owner}.init_config: loftq_config.loftq_iter={options['loftq_iter']!r}: expected "
            f"an integer >= 1"
        )


def check_init_config(owner: str, init: str, config: Any) -> dict[str, Any]:
    """``config`` (LoRA's ``init_config``: the options set, `init_options` adds PEFT's defaults)
    checked against ``init``'s options. Options for an init that takes none are dropped with a
    warning, as PEFT drops them (a QLoRA memory estimate of a LoRA with a data init does too)."""
    if not isinstance(config, Mapping):
        raise SpecError(f"{owner}.init_config: expected a mapping, got {config!r}")
    if init not in OPTIONS:
        if config:
            warnings.warn(
                f"{owner}.init_config={dict(config)!r} is ignored: init={init!r} takes no "
                f"options (as PEFT ignores an <init>_config of another init)",
                stacklevel=4,
            )
        return {}
    defaults, check = OPTIONS[init]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise SpecError(
            f"{owner}.init_config: {CONFIG_KEYS[init]} has no option {unknown[0]!r} "
            f"(options: {', '.join(defaults)})"
        )
    check(owner, {**defaults, **config})
    return dict(config)


def init_options(spec: LoRA) -> dict[str, Any]:
    """``spec.init``'s options: those ``init_config`` sets over PEFT's defaults."""
    defaults = OPTIONS[spec.init][0] if spec.init in OPTIONS else {}
    return {**defaults, **spec.init_config}


def init_config_keys() -> tuple[PeftKey, ...]:
    """PEFT's ``<init>_config`` keys: the chosen init's options are written under its key (the
    others as PEFT leaves them); on reading, the key of the file's init fills ``init_config``."""

    def writer(key: str) -> Callable[[Any, Sequence[str]], Any]:
        return lambda spec, paths: (
            init_options(spec) if CONFIG_KEYS.get(spec.init) == key else EMPTY_CONFIG[key]
        )

    def load(value: Any, config: Mapping[str, Any], where: str) -> dict[str, Any]:
        init = config.get("init_lora_weights")
        key = CONFIG_KEYS.get(init)
        if key is None:  # PEFT ignores the options of inits not chosen
            return {}
        try:
            return check_init_config("LoRA", init, config.get(key) or {})
        except SpecError as err:
            raise SpecError(f"{where}: {err} (adapter_config.json key {key!r})") from None

    keys = [
        PeftKey(key, None, EMPTY_CONFIG[key], MAPPING.optional(), writer(key))
        for key in EMPTY_CONFIG
    ]
    first = keys[0]
    keys[0] = PeftKey(first.key, "init_config", first.default, first.type, first.save, load)
    return tuple(keys)


# -- building the layers -------------------------------------------------------------------------


@torch.no_grad()
def constructed_factors(layer: LoRALayer) -> None:
    """A and B as PEFT's freshly built factor layers hold them (``nn.Linear``'s default
    kaiming-uniform, drawn on the CPU in PEFT's order): what its inits start from and what a
    file load overwrites."""
    for factor in (layer.lora_A, layer.lora_B):
        drawn = nn.init.kaiming_uniform_(torch.empty(factor.shape), a=math.sqrt(5))
        factor.copy_(drawn)


def initialise_layers(
    spec: LoRA,
    model: nn.Module,
    paths: Sequence[str],
    build: Callable[[str], LoRALayer],
    batches: Batches,
    from_file: bool,
) -> dict[str, LoRALayer]:
    """LoRA's layers on ``paths`` (``build`` makes one) with ``spec.init`` run on them.
    ``from_file``: the adapter a file fills next, built as PEFT's load builds it (LoftQ reruns:
    the file's factors go with the quantised base)."""
    if spec.init == "lora_ga" and not from_file:
        return _lora_ga_layers(spec, model, paths, build, batches)
    layers = {path: build(path) for path in paths}
    if spec.init not in INITS:
        return layers
    kinds = {"loftq": ("linear",), "mica": ("linear", "conv1d_gpt2", "embedding")}.get(
        spec.init, ("linear", "conv1d_gpt2")
    )
    for path, layer in layers.items():
        _check_kind(spec.init, path, layer, kinds)
    if spec.init == "loftq":
        for layer in layers.values():
            _loftq(layer, init_options(spec)["loftq_iter"])
    elif spec.init == "mica":
        for layer in layers.values():
            _mica(layer)
    elif spec.init == "eva":
        for layer in layers.values():
            nn.init.zeros_(layer.lora_B)
        if not from_file:
            return _eva_layers(spec, model, layers, batches)
    elif spec.init == "corda":
        if from_file:
            raise SpecError(
                "init_lora_weights='corda': the file's factors belong to a base that CorDA's "
                "calibration data rewrote, which the file does not hold (PEFT cannot load it "
                "either); compile on the data instead"
            )
        _corda(spec, model, layers, batches)
    return layers


def _eva_layers(
    spec: LoRA, model: nn.Module, layers: Mapping[str, LoRALayer], batches: Batches
) -> dict[str, LoRALayer]:
    """EVA's layers: A from the principal directions of each layer's inputs on ``batches``, B
    zero, each at the rank EVA gave it (with ``adjust_scaling_factors``, alpha scaled alike, so
    the scale stays ``alpha / r``)."""
    from surgeon.targets import pattern_value

    data = _calibration_batches("eva", batches, model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            factors = _eva_state(spec, model, list(layers), data)
    finally:
        model.train(training)
    built = {}
    for path, old in layers.items():
        a = factors[path]
        rank = a.shape[0]
        if rank == 0:
            raise SpecError(
                f"LoRA.init='eva' gave {path} rank 0 (PEFT drops such layers; surgeon does not): "
                f"exclude it, or raise its rank or eva_config.rho"
            )
        alpha = pattern_value(spec.alpha_pattern, path, spec.alpha)
        if rank != old.rank and init_options(spec)["adjust_scaling_factors"]:
            alpha *= rank / old.rank
        scale = alpha / (math.sqrt(rank) if spec.rslora else rank)
        layer = old
        if rank != old.rank:
            dropout = 0.0 if old.dropout is None else old.dropout.p
            layer = type(old)(old.base, path, rank, scale, dropout, "eva")
        with torch.no_grad():
            layer.lora_A.copy_(a)
            nn.init.zeros_(layer.lora_B)
        built[path] = layer
    return built


def eva_patterns(spec: LoRA, layers: Mapping[str, Any]) -> dict[str, Any]:
    """``rank_pattern`` and ``alpha_pattern`` as EVA leaves them in PEFT's config: every layer
    whose rank (or alpha) is not the spec's, by its full path."""
    ranks, alphas = {}, {}
    for path, layer in layers.items():
        rank = getattr(layer, "rank", None)
        if rank is None:
            continue
        alpha = layer.scale * (math.sqrt(rank) if spec.rslora else rank)
        if rank != spec.rank:
            ranks[path] = rank
        if not math.isclose(alpha, spec.alpha, rel_tol=1e-12):
            alphas[path] = alpha
    return {"rank_pattern": ranks, "alpha_pattern": alphas}


def _check_kind(init: str, path: str, layer: LoRALayer, kinds: tuple[str, ...]) -> None:
    if getattr(layer, "kind", None) not in kinds:
        names = [
            {"linear": "Linear", "conv1d_gpt2": "Conv1D", "embedding": "Embedding"}[k]
            for k in kinds
        ]
        listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise SpecError(
            f"LoRA.init={init!r} supports {listed} layers; {path} is {type(layer.base).__name__}"
        )


# -- LoftQ ---------------------------------------------------------------------------------------


@torch.no_grad()
def _loftq(layer: LoRALayer, iterations: int) -> None:
    weight = layer.base.weight
    if weight.is_meta:  # nothing to factor: a memory estimate, or a file fills it later
        return
    a, b, quantised = loftq_factors(weight.float(), layer.rank, iterations)
    layer.lora_A.copy_(through_base_dtype(a, weight))
    layer.lora_B.copy_(through_base_dtype(b, weight))
    weight.copy_(quantised.to(weight.dtype))


def loftq_factors(
    weight: torch.Tensor, rank: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's ``(A, B, Q)`` for an (out, in) float32 ``weight``: each round quantises what the
    factors leave (``W`` at first), then takes A, B as the split rank-``rank`` SVD of ``W - Q``
    (``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``)."""
    left = weight
    for _ in range(iterations):
        quantised = LOFTQ_QUANT.quantize(left).dequantize(torch.float32)
        u, s, vh = torch.linalg.svd(weight - quantised, full_matrices=False)
        root = s[:rank].sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        left = weight - b @ a
    return a, b, quantised


# -- EVA -----------------------------------------------------------------------------------------


class IncrementalPCA:
    """Principal components of a stream of batches, updated batch by batch (Ross et al. 2008,
    as scikit-learn and PEFT's port of it): each update takes a seeded randomized SVD (seed 42,
    ``2 n`` columns, 4 iterations) of the old components scaled by their singular values, the
    new centred batch and a row correcting the mean. Signs follow the largest entry of each
    component, so components compare across updates."""

    def __init__(self, components: int) -> None:
        self.n = components
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_ratio: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.seen = torch.tensor([0])

    def update(self, x: torch.Tensor) -> None:
        x = x.clone()
        count = torch.tensor([x.shape[0]], device=x.device)
        mean, var, total = self._moments(x, count)
        if self.components is None:
            x -= mean
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            shift = torch.sqrt((self.seen.double() / total) * x.shape[0])
            x = torch.vstack(
                (
                    self.singular_values.view(-1, 1) * self.components,
                    x,
                    shift * (self.mean - batch_mean),
                )
            )
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(42)
            _, s, v = torch.svd_lowrank(x, q=2 * self.n, niter=4)
        vt = v.mH
        pivots = torch.argmax(vt.abs(), dim=1)
        vt = vt * torch.sign(vt[range(vt.shape[0]), pivots]).view(-1, 1)
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vt[: self.n], s[: self.n]
        self.explained_ratio = (s**2 / torch.sum(var * total))[: self.n]

    def _moments(
        self, x: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Column means and variances of everything seen, ``x`` included (float64 sums)."""
        total = self.seen + count
        old_sum = (
            torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            if self.mean is None
            else self.mean * self.seen
        )
        new_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - new_sum / count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        spread = centred.square().sum(dim=0, dtype=torch.float64) - correction / count
        if self.var is None:
            return (old_sum + new_sum) / total, spread / total, total
        ratio = self.seen.double() / count
        spread = (
            self.var * self.seen + spread + ratio / total * (old_sum / ratio - new_sum).square()
        )
        return (old_sum + new_sum) / total, spread / total, total


MAX_EVA_PASSES = 100
"""Passes over the calibration data before EVA gives up on converging (PEFT cycles forever)."""


def _check_eva(owner: str, options: Mapping[str, Any]) -> None:
    rho, tau = options["rho"], options["tau"]
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or rho < 1:
        raise SpecError(f"{owner}.init_config: eva_config.rho={rho!r}: expected a number >= 1")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 < tau <= 1:
        raise SpecError(f"{owner}.init_config: eva_config.tau={tau!r}: expected a number in (0, 1]")
    for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        if not isinstance(options[name], bool):
            raise SpecError(
                f"{owner}.init_config: eva_config.{name}={options[name]!r}: expected true or false"
            )
    if not is_int(options["label_mask_value"]):
        raise SpecError(
            f"{owner}.init_config: eva_config.label_mask_value={options['label_mask_value']!r}: "
            f"expected an integer"
        )


class _Inputs:
    """What each watched layer received in one forward, as EVA's rows: the tokens the batch's
    mask keeps (attention mask, and labels other than ``label_mask_value``) where the batch
    holds token ids, every position otherwise."""

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.keep: torch.Tensor | None = None
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
            if self.keep is not None:
                self.seen[path] = x[self.keep.T.unbind()]
            else:
                self.seen[path] = x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _token_rows(batch: Mapping[str, Any], options: Mapping[str, Any]) -> torch.Tensor | None:
    """(batch, position) indices of the tokens EVA learns from, or None for every row."""
    if "input_ids" not in batch and "attention_mask" not in batch:
        return None
    mask = batch.get("attention_mask")
    mask = (torch.ones_like(batch["input_ids"]) if mask is None else mask).bool()
    labels = batch.get("labels")
    if options["use_label_mask"] and labels is not None:
        mask = mask & (labels != options["label_mask_value"])
    return mask.nonzero()


def _calibration_batches(init: str, batches: Batches, model: nn.Module) -> list[dict[str, Any]]:
    """The calibration batches as a list, on the model's device; `SpecError` naming ``init``
    when there are none or one is not a dict of the model's keyword arguments."""
    if batches is None:
        raise SpecError(
            f"LoRA.init={init!r} reads data: pass batches as surgeon.compile(model, spec, "
            f"calibration=batches) (an iterable of dicts of the model's keyword arguments)"
        )
    if isinstance(batches, (Mapping, torch.Tensor, str)):
        raise SpecError(
            f"LoRA.init={init!r}: calibration must be an iterable of batches (dicts of the "
            f"model's keyword arguments), got one {type(batches).__name__}"
        )
    listed = list(batches)
    if not listed:
        raise SpecError(f"LoRA.init={init!r}: the calibration data holds no batch")
    device = next((p.device for p in model.parameters() if not p.is_meta), None)
    moved = []
    for i, batch in enumerate(listed):
        if not isinstance(batch, Mapping):
            raise SpecError(
                f"LoRA.init={init!r}: calibration batch {i} is a {type(batch).__name__}, "
                f"expected a dict of the model's keyword arguments"
            )
        moved.append({k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()})
    return moved


def _run(init: str, model: nn.Module, batch: Mapping[str, Any], index: int) -> Any:
    """The model on one calibration batch; a batch it does not take is a `SpecError`."""
    try:
        return model(**batch)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        raise SpecError(
            f"LoRA.init={init!r}: calibration batch {index} does not fit the model "
            f"({type(err).__name__}: {err})"
        ) from None


def _equal_inputs(seen: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Layers that received the same input as an earlier one, mapped to the first of them:
    EVA decomposes each distinct input once (q, k and v projections share theirs)."""
    firsts: list[str] = []
    same = {}
    for path, x in seen.items():
        match = next(
            (f for f in firsts if seen[f].shape == x.shape and torch.equal(seen[f], x)), None
        )
        if match is None:
            firsts.append(path)
        else:
            same[path] = match
    return same


def _eva_state(
    spec: LoRA, model: nn.Module, paths: Sequence[str], batches: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """EVA's A per layer (rows: the principal directions of its inputs, as many as its new
    rank), after the components of every layer's inputs converged (cosine similarity between
    updates >= tau on the components its rank needs) and the rank budget (the sum of the
    ranks) went to the directions explaining the most variance, layer for layer."""
    from tqdm.auto import tqdm

    from surgeon.targets import pattern_value

    options = init_options(spec)
    rho = options["rho"]
    if rho > 1000:  # PEFT's ceiling for very large rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // spec.rank)
    ranks = {p: pattern_value(spec.rank_pattern, p, spec.rank) for p in paths}
    budget = sum(ranks.values())
    most = {p: round(r * rho) for p, r in ranks.items()}

    watch = _Inputs(model, paths)
    try:
        watch.keep = _token_rows(batches[0], options)
        _run("eva", model, batches[0], 0)
        same = _equal_inputs({p: watch.seen[p] for p in paths})
    finally:
        watch.remove()
    for path, first in same.items():
        most[first] = most[path] = max(most[first], most[path])
    for path in paths:
        features = model.get_submodule(path).weight.shape
        fan_in = features[0] if _is_gpt2(model.get_submodule(path)) else features[1]
        if most[path] > fan_in:
            raise SpecError(
                f"LoRA.init='eva' on {path}: rank x rho = {most[path]} components, more than its "
                f"{fan_in} input features; lower rank or eva_config.rho"
            )
    own = [p for p in paths if p not in same]
    pcas = {p: IncrementalPCA(most[p]) for p in own}
    converged = {p: torch.zeros(most[p], dtype=torch.bool) for p in own}
    owner = {**{p: p for p in own}, **same}
    settled = dict.fromkeys(own, False)
    ranks_now = dict(most)
    bar = tqdm(total=len(owner), desc="EVA: layers converged", unit="layer", leave=False)
    try:
        for step in range(MAX_EVA_PASSES * len(batches)):
            for path in own:
                settled[path] = bool(torch.all(converged[path][: ranks_now[path]]))
            bar.n = sum(settled.values()) + sum(settled[f] for f in same.values())
            bar.refresh()
            if all(settled.values()):
                break
            running = [p for p in own if not settled[p]]
            watch = _Inputs(model, running)
            try:
                watch.keep = _token_rows(batches[step % len(batches)], options)
                _run("eva", model, batches[step % len(batches)], step % len(batches))
            finally:
                watch.remove()
            for path in running:
                _eva_update(pcas[path], watch.seen[path], converged, path, options["tau"])
            if all(pca.components is not None for pca in pcas.values()):
                ranks_now = _distribute(pcas, owner, same, budget, most)
        else:
            raise SpecError(
                f"LoRA.init='eva': the components did not converge in {MAX_EVA_PASSES} passes over "
                f"the calibration data (eva_config.tau={options['tau']}); give more data or "
                f"lower tau"
            )
    finally:
        bar.close()
    factors = {}
    for path, rank in ranks_now.items():
        pca = pcas[owner[path]]
        rows = pca.components[:rank]
        if options["whiten"]:  # in place, on the shared components, as PEFT
            rows /= pca.singular_values[:rank].sqrt().reshape(-1, 1)
        factors[path] = rows
    return {p: factors[p].clone() for p in paths}


def _eva_update(
    pca: IncrementalPCA,
    rows: torch.Tensor,
    converged: dict[str, torch.Tensor],
    path: str,
    tau: float,
) -> None:
    """One batch into a layer's components; the components that moved less than ``tau``
    (cosine similarity to the previous ones) count as converged. A batch with fewer rows than
    components is skipped."""
    if rows.shape[0] < pca.n:
        return
    previous = None if pca.components is None else pca.components.clone()
    pca.update(rows.to(torch.float32))
    if previous is not None:
        converged[path] = torch.nn.functional.cosine_similarity(pca.components, previous) >= tau


def _distribute(
    pcas: Mapping[str, IncrementalPCA],
    owner: Mapping[str, str],
    same: Mapping[str, str],
    budget: int,
    most: Mapping[str, int],
) -> dict[str, int]:
    """Ranks per layer: the ``budget`` largest explained-variance ratios over all layers'
    components go one rank each to their layer; of layers sharing an input, the decomposed
    one keeps the larger rank."""
    keys, values = [], []
    for path, first in owner.items():
        for ratio in pcas[first].explained_ratio[: most[path]]:
            keys.append(path)
            values.append(ratio)
    order = torch.stack(values).argsort(descending=True)
    counts = dict.fromkeys(owner, 0)
    for i in order[:budget]:
        counts[keys[i]] += 1
    for path, first in same.items():
        if counts[first] < counts[path]:
            counts[first], counts[path] = counts[path], counts[first]
    return counts


def _is_gpt2(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"


# -- CorDA ---------------------------------------------------------------------------------------


def _check_corda(owner: str, options: Mapping[str, Any]) -> None:
    if options["corda_method"] not in ("ipm", "kpm"):
        raise SpecError(
            f"{owner}.init_config: corda_config.corda_method={options['corda_method']!r}: "
            f"expected 'ipm' or 'kpm'"
        )
    for name in ("cache_file", "covariance_file"):
        if options[name] is not None:
            raise SpecError(
                f"{owner}.init_config: corda_config.{name}={options[name]!r} is not supported "
                f"(surgeon computes CorDA from the calibration data each time; supported: null)"
            )
    for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
        if not isinstance(options[name], bool):
            raise SpecError(
                f"{owner}.init_config: corda_config.{name}={options[name]!r}: expected true or "
                f"false"
            )


def _corda(spec: LoRA, model: nn.Module, layers: Mapping[str, LoRALayer], batches: Batches) -> None:
    """CorDA (Yang et al., 2024, arXiv:2406.05223): the SVD of ``W C`` (C: the covariance of
    the layer's inputs on the data, damped until it inverts well) gives ``W C = U S V^T``;
    ``ipm`` adapts the r largest directions, ``kpm`` the r smallest, with ``B = U_r sqrt(S_r /
    scale)``, ``A = sqrt(S_r / scale) (C^-1 V)_r^T``, and the base keeps ``W - scale B A``."""
    data = _calibration_batches("corda", batches, model)
    options = init_options(spec)
    covariances = _input_covariances(model, list(layers), data, options)
    for path, layer in layers.items():
        weight = layer.base.weight
        w = layer._out_in(weight.float())
        u, s, v = _corda_eigens(w, covariances[path], layer.rank, options["corda_method"])
        s = s / layer.scale
        a = v.t() * s.sqrt().view(-1, 1)
        b = u * s.sqrt()
        with torch.no_grad():
            layer.lora_A.copy_(through_base_dtype(a, weight))
            layer.lora_B.copy_(through_base_dtype(b, weight))
            weight.copy_(layer._out_in(w - layer.scale * b @ a).to(weight.dtype))


def _input_covariances(
    model: nn.Module, paths: list[str], batches: list[dict[str, Any]], options: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Each layer's ``X^T X`` averaged over the batches, every batch's X (one sample: tokens x
    features) scaled by its largest entry first, as PEFT's hook does."""
    from tqdm.auto import tqdm

    sums: dict[str, Any] = dict.fromkeys(paths, 0)

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().squeeze(0)
            if x.dim() != 2:
                raise SpecError(
                    f"LoRA.init='corda': {path} received a {tuple(args[0].shape)} input; CorDA "
                    f"takes one sample per calibration batch (tokens x features), as PEFT's"
                )
            if not options["use_float16_for_covariance"]:
                x = x.float()
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise SpecError(f"LoRA.init='corda': {path} received non-finite inputs")
            sums[path] = sums[path] + x.t() @ x

        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p)) for p in paths]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(batches, desc="CorDA: covariances", leave=False)):
                _run("corda", model, batch, i)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return {p: sums[p] / len(batches) for p in paths}


def _corda_eigens(
    w: torch.Tensor, covariance: torch.Tensor, rank: int, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, V_r)`` of ``W C`` with ``V = (V^T C^-1)^T``; C is damped by a multiple of its
    mean diagonal (1%, doubled until ``C C^-1`` is within 0.05 of the identity)."""
    covariance = covariance.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:
        fixed = covariance + eye * torch.mean(torch.diag(covariance)) * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inverse).t()
    chosen = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return u[:, chosen], s[chosen], v[:, chosen]


# -- LoRA-GA -------------------------------------------------------------------------------------


def _check_lora_ga(owner: str, options: Mapping[str, Any]) -> None:
    choices = {"direction": DIRECTIONS, "scale": ("stable", "weight_svd", "gd_scale", "unit")}
    for name, allowed in choices.items():
        if options[name] not in allowed:
            raise SpecError(
                f"{owner}.init_config: lora_ga_config.{name}={options[name]!r}: expected one of "
                f"{', '.join(map(repr, allowed))}"
            )
    gamma = options["stable_gamma"]
    if not is_int(gamma) or gamma <= 0:
        raise SpecError(
            f"{owner}.init_config: lora_ga_config.stable_gamma={gamma!r}: expected an integer > 0"
        )


DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")


def _lora_ga_layers(
    spec: LoRA,
    model: nn.Module,
    paths: Sequence[str],
    build: Callable[[str], LoRALayer],
    batches: Batches,
) -> dict[str, LoRALayer]:
    """LoRA-GA (Wang et al., 2024, arXiv:2407.05000): the weights' gradients of the training
    loss, averaged over the batches, then layer after layer (PEFT's order of draws) its factors
    from the gradient's randomized SVD, and the base keeps ``W - scale B A``."""
    data = _calibration_batches("lora_ga", batches, model)
    gradients = _weight_gradients(model, paths, data)
    layers = {}
    for path in paths:
        layer = layers[path] = build(path)
        _check_kind("lora_ga", path, layer, ("linear", "conv1d_gpt2"))
        _lora_ga(layer, layer._out_in(gradients[path].float()), init_options(spec))
    return layers


def _weight_gradients(
    model: nn.Module, paths: Sequence[str], batches: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    """The gradient of the model's loss with respect to each target weight, summed over the
    batches (in training mode, only those weights requiring gradients) and divided by the
    number of backward passes through the layer."""
    from tqdm.auto import tqdm

    layers = [model.get_submodule(p) for p in paths]
    counts = dict.fromkeys(paths, 0)

    def counter(path: str) -> Callable[..., None]:
        """Counts the backward passes through the layer's output (PEFT's backward hook)."""

        def watch(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: counts.__setitem__(path, counts[path] + 1))

        return watch

    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = [layer.weight.grad for layer in layers]
    training = model.training
    handles = [layer.register_forward_hook(counter(p)) for p, layer in zip(paths, layers)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for layer in layers:
            layer.weight.grad = None
            layer.weight.requires_grad_(True)
        model.train()
        with torch.enable_grad():
            for i, batch in enumerate(tqdm(batches, desc="LoRA-GA: gradients", leave=False)):
                out = _run("lora_ga", model, batch, i)
                loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
                if loss is None:
                    raise SpecError(
                        f"LoRA.init='lora_ga': calibration batch {i} gives the model no loss; "
                        f"LoRA-GA needs batches it computes a training loss for (e.g. with labels)"
                    )
                loss.backward()
        return {p: layer.weight.grad / max(counts[p], 1) for p, layer in zip(paths, layers)}
    finally:
        for handle in handles:
            handle.remove()
        for layer, grad in zip(layers, saved):
            layer.weight.grad = grad
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


@torch.no_grad()
def _lora_ga(layer: LoRALayer, grad: torch.Tensor, options: Mapping[str, Any]) -> None:
    """A and B from the (out, in) gradient's top ``2r`` singular triplets split by
    ``direction`` (A right vectors, B left vectors times their singular values), scaled by
    ``scale``; passed through the base dtype before the residual is taken, as PEFT."""
    r = layer.rank
    if 2 * r > min(grad.shape):
        raise SpecError(
            f"LoRA.init='lora_ga' on {layer.path}: needs 2 x rank = {2 * r} singular directions, "
            f"the layer has {min(grad.shape)}"
        )
    u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    u, s, vh = u[:, : 2 * r], s[: 2 * r], v.t()[: 2 * r]
    direction = options["direction"]
    if direction == "random":
        picks_a = picks_b = torch.randperm(2 * r)[:r]
    else:
        halves = {
            "ArBr": (slice(1, 2 * r, 2), slice(0, 2 * r, 2)),
            "A2rBr": (slice(r, 2 * r), slice(0, r)),
            "ArB2r": (slice(0, r), slice(r, 2 * r)),
        }
        picks_a, picks_b = halves[direction]
    a, s_b = vh[picks_a], s[picks_b]
    b = u[:, picks_b] @ torch.diag(s_b)
    weight = layer.base.weight
    if options["scale"] == "stable":
        # PEFT takes the stored weight's first dimension (GPT-2's Conv1D: its input features)
        b = b * (weight.shape[0] ** 0.25) / (options["stable_gamma"] ** 0.5)
    elif options["scale"] == "weight_svd":
        _, weight_s, _ = torch.svd_lowrank(layer._out_in(weight.float()), q=r, niter=4)
        if s_b[0] > 0:
            b = b * (weight_s[0] / s_b[0])
    elif options["scale"] == "gd_scale":
        a, b = a / layer.scale, b / layer.scale
    a, b = a.to(weight.dtype), b.to(weight.dtype)
    layer.lora_A.copy_(through_base_dtype(a, weight))
    layer.lora_B.copy_(through_base_dtype(b, weight))
    residual = layer._out_in(weight.float()) - layer.scale * (b.float() @ a.float())
    weight.copy_(layer._out_in(residual.to(weight.dtype)))


# -- MiCA ----------------------------------------------------------------------------------------


@torch.no_grad()
def _mica(layer: LoRALayer) -> None:
    """MiCA (arXiv:2604.01694): B holds W's r left singular vectors of the smallest singular
    values and stays frozen; A starts at zero and is all that trains (so ``B A = 0`` at first
    and the base is untouched). On an embedding, W is its (dim, vocab) transpose, as PEFT."""
    weight = layer.base.weight
    layer.lora_B.requires_grad_(False)
    if weight.is_meta:  # a file fills it (PEFT skips the SVD there too)
        return
    w = weight.float().t() if layer.kind == "embedding" else layer._out_in(weight.float())
    if layer.rank > min(w.shape):
        raise SpecError(
            f"LoRA.init='mica' on {layer.path}: rank {layer.rank} is more than the "
            f"{min(w.shape)} singular vectors of its {tuple(weight.shape)} weight"
        )
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    layer.lora_B.copy_(through_base_dtype(u[:, -layer.rank :], weight))
    layer.lora_A.zero_()


# -- the registry --------------------------------------------------------------------------------

OPTIONS: dict[str, tuple[dict[str, Any], Callable[[str, Mapping[str, Any]], None]]] = {
    "loftq": ({"loftq_bits": 4, "loftq_iter": 1}, _check_loftq),
    "eva": (
        {
            "rho": 2.0,
            "tau": 0.99,
            "use_label_mask": True,
            "label_mask_value": -100,
            "whiten": False,
            "adjust_scaling_factors": True,
        },
        _check_eva,
    ),
    "corda": (
        {
            "cache_file": None,
            "covariance_file": None,
            "corda_method": "ipm",
            "verbose": False,
            "use_float16_for_covariance": False,
            "prune_temporary_fields": True,
        },
        _check_corda,
    ),
    "lora_ga": ({"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}, _check_lora_ga),
}
"""Each init's options with PEFT's defaults, and their check."""

INITS = (*OPTIONS, "mica")
"""The inits this module implements (names of PEFT's ``init_lora_weights``)."""

DATA_INITS = ("eva", "corda", "lora_ga")
"""Inits that read calibration data (``surgeon.compile(..., calibration=batches)``)."""

BASE_REWRITING = ("loftq", "corda", "lora_ga")
"""Inits that leave a new base weight behind (the residual, or LoftQ's quantised one)."""
