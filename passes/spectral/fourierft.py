"""FourierFT: a weight update learned as a few 2-D Fourier coefficients (Gao et al., 2024,
"Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", https://arxiv.org/abs/2405.03003).

``W x + b + ΔW x`` with ``ΔW = scaling · Re(IDFT2(F))``: ``F`` is an (out x in) grid of zeros
except ``n_frequency`` trained coefficients (PEFT's ``fourierft_spectrum``) at positions drawn
from ``seed``.

The positions are not saved: they come from a `torch.Generator` seeded with ``seed`` (PEFT's
``random_loc_seed``), the first ``n_frequency`` entries of a random permutation of the grid's
cells, row-major, drawn for each layer exactly as PEFT draws them, so a PEFT file loads with
PEFT's outputs. The coefficients start as standard normal draws (``init="gaussian"``, PEFT's
default) or at zero (``init="zeros"``: a fresh adapter changes nothing). ``ΔW`` is built in
float32 (no half-precision FFT), once per forward in training; in eval it is kept until the
coefficients change.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's FourierFT supports).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import check_choice, check_finite, check_int, check_pattern_map, check_seed
from surgeon.errors import SpecError
from surgeon.layers import in_out_features, layer_kind, through_base_dtype
from surgeon.peft import (
    BOOL,
    INT,
    MAPPING,
    NUMBER,
    STRING,
    PeftFormat,
    PeftKey,
    choices,
    selection_keys,
)
from surgeon.spec import MethodSpec
from surgeon.targets import pattern_entry

INITS = ("gaussian", "zeros")
BIAS_MODES = ("none", "all", "fourier_only")

PEFT_FORMAT = PeftFormat(
    "FOURIERFT",
    keys=(
        PeftKey("n_frequency", "n_frequency", 1000, INT),
        PeftKey("scaling", "scaling", 150.0, NUMBER),
        *selection_keys(),
        PeftKey("random_loc_seed", "seed", 777, INT),
        PeftKey(
            "init_weights",
            "init",
            False,
            BOOL,
            save=lambda spec, paths: spec.init == "zeros",
            load=choices({False: "gaussian", True: "zeros"}, "init_weights"),
        ),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey("n_frequency_pattern", "n_frequency_pattern", {}, MAPPING.optional()),
    ),
    constants={"fan_in_fan_out": False},  # implied by the layer type (PEFT corrects it alike)
)


@dataclass(frozen=True)
class FourierFT(MethodSpec):
    """Fourier-domain fine-tuning: ``n_frequency`` trained spectral coefficients per layer."""

    name = "fourierft"
    peft_format = PEFT_FORMAT
    pattern_fields = ("n_frequency_pattern",)

    n_frequency: int = 1000
    scaling: float = 150.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 777
    init: str = "gaussian"
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    n_frequency_pattern: Mapping[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "n_frequency", self.n_frequency)
        check_finite(owner, "scaling", self.scaling)
        check_seed(owner, "seed", self.seed)
        check_choice(owner, "init", self.init, INITS)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        self._set(
            "n_frequency_pattern",
            check_pattern_map(owner, "n_frequency_pattern", self.n_frequency_pattern, check_int),
        )

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        # sizes fit the smallest layers the suite adapts (5 x 6 = 30 weight entries)
        return {
            "default": cls(n_frequency=24, scaling=10.0, targets=targets),
            "zeros-seed-pattern": cls(
                n_frequency=12,
                scaling=4.0,
                seed=3,
                init="zeros",
                n_frequency_pattern={targets[0]: 30},
                targets=targets,
            ),
        }

    @property
    def starts_as_base(self) -> bool:
        return self.init == "zeros"

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def select(self, model: nn.Module) -> list[str]:
        """The targets; one with fewer weight entries than frequencies is refused here, before
        anything is built."""
        paths = super().select(model)
        for path in paths:
            self.frequencies(model.get_submodule(path), path)
        return paths

    def frequencies(self, layer: nn.Module, path: str) -> int:
        """How many coefficients ``layer`` trains; `SpecError` naming the field that sets more
        than its weight has entries (PEFT's rule)."""
        name, count = pattern_entry("n_frequency", self.n_frequency_pattern, path, self.n_frequency)
        fan_in, fan_out = in_out_features(layer)
        if count > fan_in * fan_out:
            raise SpecError(
                f"{type(self).__name__}.{name}={count} on {path}: its {fan_out} x {fan_in} "
                f"weight has only {fan_in * fan_out} entries to place frequencies at"
            )
        return count

    def create_layer(self, layer: nn.Module, path: str) -> FourierFTLayer:
        count = self.frequencies(layer, path)
        return FourierFTLayer(layer, count, self.scaling, self.seed, self.init)


def spectral_positions(rows: int, cols: int, count: int, seed: int) -> torch.Tensor:
    """The flat (row-major) grid cells of ``count`` coefficients: PEFT's draw, the head of a
    permutation of all ``rows * cols`` cells from a CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    # a copy: a view would keep the whole permutation (every cell of the grid) alive
    return torch.randperm(rows * cols, generator=generator)[:count].clone()


class FourierFTLayer(AdapterLayer):
    """The coefficients ``fourierft_spectrum`` (n_frequency) of one layer and their fixed grid
    positions; float32 over a half-precision base, as PEFT keeps them."""

    method = "fourierft"

    def __init__(
        self, base: nn.Module, n_frequency: int, scaling: float, seed: int, init: str
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.in_features, self.out_features = in_out_features(base)
        self.scaling = scaling
        weight = base.weight
        positions = spectral_positions(self.out_features, self.in_features, n_frequency, seed)
        # derived from the seed: a checkpoint need not carry them
        self.register_buffer("positions", positions.to(weight.device), persistent=False)
        # PEFT draws the normal values whatever the init, then zeroes them: the global
        # generator moves on alike
        drawn = torch.randn(n_frequency)
        if init == "zeros":
            drawn.zero_()
        self.fourierft_spectrum = nn.Parameter(through_base_dtype(drawn, weight))
        # ΔW: built on every training call, kept in eval until the coefficients change
        self.update = Cached(self.update_now, self._update_sources)

    def _update_sources(self) -> tuple[torch.Tensor]:
        return (self.fourierft_spectrum,)

    def update_now(self) -> torch.Tensor:
        """``ΔW`` (out x in), computed now: the coefficients on an otherwise zero grid, through
        the inverse 2-D DFT (real part), scaled; in float32, returned in the coefficients'
        dtype."""
        spectrum = self.fourierft_spectrum
        cells = self.out_features * self.in_features
        grid = torch.zeros(cells, device=spectrum.device, dtype=torch.float32)
        grid = grid.index_put((self.positions,), spectrum.float())
        grid = grid.view(self.out_features, self.in_features)
        return (torch.fft.ifft2(grid).real * self.scaling).to(spectrum.dtype)

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        update = ctx.module("update", self.update)
        dtype = self.fourierft_spectrum.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        out = ctx.call(torch.add, base_out, ctx.call(F.linear, h, update))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        update = self.update()
        return update.t() if self.kind == "conv1d_gpt2" else update

    @torch.no_grad()
    def merge(self) -> None:
        # added in the update's dtype and rounded once into the weight's, as PEFT merges
        self.base.weight.add_(self.delta_weight())

    @torch.no_grad()
    def unmerge(self) -> None:
        self.base.weight.sub_(self.delta_weight())
