"""WaveFT: wavelet fine-tuning (Bilican et al., 2025, "Exploring Sparsity for Parameter Efficient
Fine Tuning Using Wavelets", https://arxiv.org/abs/2505.12532).

``W x + b + scaling · IDWT₂(S) x``: the update of each targeted weight is the one-level inverse
2-D discrete wavelet transform of a coefficient matrix ``S`` that is zero except for
``n_frequency`` trained coefficients (PEFT's ``waveft_spectrum``, zero at first, so a fresh
adapter is the base layer). Their positions are not trained and not saved: they are the first
``n_frequency`` entries of ``torch.randperm(out · in)`` drawn from a generator seeded with
``seed`` (one fresh generator per layer), exactly as PEFT draws them, so PEFT's files load with
PEFT's outputs and ours load in PEFT.

The transform is PEFT's. For a filter of ``L`` taps, ``S`` is the (out x in) grid of positions
padded by ``L/2 - 1`` on every side (and by one more row or column at the end of an odd
dimension), split into four quadrants, each upsampled by two and filtered in 2-D with an outer
product of the low-pass and high-pass synthesis filters; without periodic extension, the
``L - 2`` rows and columns at each border are dropped, and the first out rows and in columns of
what is left are the update. PEFT's quadrants pair the filters so: top-left low-pass both ways,
top-right high-pass down the rows (the output features) and low-pass along the columns (the
input features), bottom-left the other way round, bottom-right high-pass both ways.

Wavelets: PEFT's 23 working families, with PEFT's filters to the last bit (PyWavelets' tables,
coiflets scaled by √2 as PEFT scales them): ``db1``-``db10``, ``sym2``-``sym10``,
``coif1``-``coif4``. PEFT's config also accepts ``db11``-``db38``, ``sym11``-``sym20`` and
``coif5``-``coif17``, but PEFT 0.21 holds no filter for them, or (``coif5``) a filter of 48 taps
where its padding expects 30, so its update does not fit the layer: surgeon refuses them.
``idwt=False`` skips the transform: ``S`` itself (unpadded) is the update.

In eval the update is kept until the coefficients change (`surgeon.adapter.Cached`): no
transform per forward. ``proportional=True`` shares ``n_frequency x (number of layers)``
coefficients among the layers in proportion to their sizes (at least one each), as PEFT's
``proportional_parameters``.

Layers: Linear and transformers' GPT-2 ``Conv1D`` (those PEFT's WaveFT supports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.adapter import AdapterLayer, Cached, EmitContext
from surgeon.checks import (
    check_bool,
    check_choice,
    check_int,
    check_pattern_map,
    check_positive,
)
from surgeon.errors import SpecError
from surgeon.layers import adapter_tensor_kwargs, in_out_features, layer_kind
from surgeon.peft import BOOL, INT, MAPPING, NUMBER, STRING, PeftFormat, PeftKey, selection_keys
from surgeon.spec import MethodSpec
from surgeon.targets import pattern_value

# -- the wavelets ---------------------------------------------------------------------------------

_LOW_PASS_TEXT = {
    "db1": "0.7071067811865476 0.7071067811865476",
    "db2": "0.48296291314453416 0.8365163037378079 0.2241438680420134 -0.12940952255126037",
    "db3": """
        0.33267055295008263 0.8068915093133388 0.4598775021193313 -0.13501102001039084
        -0.08544127388224149 0.035226291882100656
    """,
    "db4": """
        0.2303778133088965 0.7148465705529157 0.6308807679298589 -0.027983769416859854
        -0.18703481171909309 0.030841381835560764 0.0328830116668852 -0.010597401785069032
    """,
    "db5": """
        0.16010239797419293 0.6038292697971896 0.7243085284377729 0.13842814590132074
        -0.24229488706638203 -0.032244869584638375 0.07757149384004572 -0.006241490212798274
        -0.012580751999081999 0.0033357252854737712
    """,
    "db6": """
        0.11154074335010947 0.49462389039845306 0.7511339080210954 0.31525035170919763
        -0.22626469396543983 -0.12976686756726194 0.09750160558732304 0.027522865530305727
        -0.03158203931748603 0.0005538422011614961 0.004777257510945511
        -0.0010773010853084796
    """,
    "db7": """
        0.07785205408500918 0.3965393194819173 0.7291320908462351 0.4697822874051931
        -0.14390600392856498 -0.22403618499387498 0.07130921926683026 0.08061260915108308
        -0.03802993693501441 -0.01657454163066688 0.01255099855609984 0.0004295779729213665
        -0.0018016407040474908 0.00035371379997452024
    """,
    "db8": """
        0.05441584224310401 0.31287159091429995 0.6756307362972898 0.5853546836542067
        -0.015829105256349306 -0.2840155429615469 0.0004724845739132828 0.12874742662047847
        -0.017369301001807547 -0.044088253930794755 0.013981027917398282
        0.008746094047405777 -0.004870352993451574 -0.00039174037337694705
        0.0006754494064505693 -0.00011747678412476953
    """,
    "db9": """
        0.038077947363878345 0.24383467461259034 0.6048231236901112 0.6572880780513005
        0.13319738582500756 -0.2932737832791749 -0.09684078322297646 0.14854074933810638
        0.03072568147933338 -0.06763282906132997 0.00025094711483145197 0.022361662123679096
        -0.004723204757751397 -0.00428150368246343 0.0018476468830562265
        0.00023038576352319597 -0.0002519631889427101 3.93473203162716e-05
    """,
    "db10": """
        0.026670057900555554 0.1881768000776915 0.5272011889317256 0.6884590394536035
        0.2811723436605775 -0.24984642432731538 -0.19594627437737705 0.12736934033579325
        0.09305736460357235 -0.07139414716639708 -0.029457536821875813 0.033212674059341
        0.0036065535669561697 -0.010733175483330575 0.001395351747052901
        0.001992405295185056 -0.0006858566949597116 -0.00011646685512928545
        9.358867032006959e-05 -1.3264202894521244e-05
    """,
    "sym2": "0.48296291314469025 0.836516303737469 0.22414386804185735 -0.12940952255092145",
    "sym3": """
        0.3326705529509569 0.8068915093133388 0.4598775021193313 -0.13501102001039084
        -0.08544127388224149 0.035226291882100656
    """,
    "sym4": """
        0.0322231006040427 -0.012603967262037833 -0.09921954357684722 0.29785779560527736
        0.8037387518059161 0.49761866763201545 -0.02963552764599851 -0.07576571478927333
    """,
    "sym5": """
        0.019538882735286728 -0.021101834024758855 -0.17532808990845047 0.01660210576452232
        0.6339789634582119 0.7234076904024206 0.1993975339773936 -0.039134249302383094
        0.029519490925774643 0.027333068345077982
    """,
    "sym6": """
        -0.007800708325034148 0.0017677118642428036 0.04472490177066578
        -0.021060292512300564 -0.07263752278646252 0.3379294217276218 0.787641141030194
        0.4910559419267466 -0.048311742585633 -0.11799011114819057 0.0034907120842174702
        0.015404109327027373
    """,
    "sym7": """
        0.010268176708511255 0.004010244871533663 -0.10780823770381774 -0.14004724044296152
        0.2886296317515146 0.767764317003164 0.5361019170917628 0.017441255086855827
        -0.049552834937127255 0.0678926935013727 0.03051551316596357 -0.01263630340325193
        -0.0010473848886829163 0.002681814568257878
    """,
    "sym8": """
        0.0018899503327594609 -0.0003029205147213668 -0.01495225833704823
        0.003808752013890615 0.049137179673607506 -0.027219029917056003 -0.05194583810770904
        0.3644418948353314 0.7771857517005235 0.4813596512583722 -0.061273359067658524
        -0.1432942383508097 0.007607487324917605 0.03169508781149298 -0.0005421323317911481
        -0.0033824159510061256
    """,
    "sym9": """
        0.0010694900329086053 -0.0004731544986800831 -0.010264064027633142
        0.008859267493400484 0.06207778930288603 -0.018233770779395985 -0.19155083129728512
        0.035272488035271894 0.6173384491409358 0.717897082764412 0.238760914607303
        -0.05456895843083407 0.0005834627461258068 0.03022487885827568 -0.01152821020767923
        -0.013271967781817119 0.0006197808889855868 0.0014009155259146807
    """,
    "sym10": """
        -0.0004593294210046588 5.7036083618494284e-05 0.004593173585311828
        -0.0008043589320165449 -0.02035493981231129 0.005764912033581909 0.04999497207737669
        -0.0319900568824278 -0.03553674047381755 0.38382676106708546 0.7695100370211071
        0.47169066693843925 -0.07088053578324385 -0.15949427888491757 0.011609893903711381
        0.0459272392310922 -0.0014653825813050513 -0.008641299277022422
        9.563267072289475e-05 0.0007701598091144901
    """,
    "coif1": """
        -0.07273261951252645 0.3378976624574818 0.8525720202116004 0.3848648468648578
        -0.07273261951252645 -0.015655728135791993
    """,
    "coif2": """
        0.01638733646320364 -0.04146493678687178 -0.0673725547237256 0.3861100668227629
        0.8127236354494135 0.4170051844232391 -0.07648859907828076 -0.05943441864643109
        0.02368017194684777 0.005611434819368834 -0.0018232088709110323
        -0.000720549445520347
    """,
    "coif3": """
        -0.003793512864380802 0.007782596425672746 0.023452696142077168 -0.06577191128146936
        -0.06112339000297255 0.40517690240911824 0.7937772226260872 0.42848347637737
        -0.07179982161915484 -0.08230192710629983 0.03455502757329774 0.015880544863669452
        -0.009007976136730624 -0.0025745176881367972 0.0011175187708306303
        0.0004662169598204029 -7.0983302506379e-05 -3.459977319727278e-05
    """,
    "coif4": """
        0.000892313902537003 -0.001629492425226786 -0.007346167936268051
        0.016066782559655206 0.026792362270697267 -0.07314290441258073 -0.04877076756791383
        0.42747788393337943 0.7842491699914577 0.4354613422154989 -0.0615536584279808
        -0.09176542029839818 0.02811565972369683 0.024945239305530328 -0.010417174666056649
        -0.0032702731315608483 0.0020166775120449105 0.0006600112966963782
        -0.00017960623150243602 -0.0001598819866911797 4.3110389559021745e-05
        1.791447688858775e-05 -2.2414246658720156e-06 -1.5895026298510706e-06
    """,
}
"""Each wavelet's reconstruction low-pass filter as PEFT 0.21 uses it, as the shortest decimal
text of each float64 value (so the numbers are PEFT's exactly)."""

LOW_PASS: dict[str, tuple[float, ...]] = {
    name: tuple(float(v) for v in text.split()) for name, text in _LOW_PASS_TEXT.items()
}
"""The wavelets surgeon runs, by PEFT's name, with their reconstruction low-pass filters."""

PEFT_WITHOUT_FILTERS = frozenset(
    [f"db{n}" for n in range(11, 39)]
    + [f"sym{n}" for n in range(11, 21)]
    + [f"coif{n}" for n in range(6, 18)]
)
"""Names PEFT 0.21's config accepts for which it has no filter (its forward fails)."""

PEFT_MISFIT = {
    "coif5": "PEFT's coif5 filter has 48 taps where its padding expects coif5's 30, so its "
    "update does not fit the layer (its forward fails)"
}
"""Names PEFT accepts whose update PEFT cannot build, and why."""


def check_wavelet(owner: str, field: str, value: Any) -> str:
    """A wavelet surgeon has PEFT's filters for; PEFT's other names are refused with the reason."""
    if value in PEFT_MISFIT or value in PEFT_WITHOUT_FILTERS:
        why = PEFT_MISFIT.get(value, "PEFT 0.21 holds no filter for it (its forward fails)")
        raise SpecError(
            f"{owner}.{field}={value!r}: PEFT's config accepts it but {why}; supported: "
            f"{', '.join(LOW_PASS)}"
        )
    return check_choice(owner, field, value, tuple(LOW_PASS))


def synthesis_filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The reconstruction low-pass and high-pass filters: the high-pass is the low-pass reversed
    with every other sign flipped (the quadrature mirror filter, PyWavelets' convention)."""
    low = LOW_PASS[wavelet]
    high = tuple(v if i % 2 == 0 else -v for i, v in enumerate(reversed(low)))
    return low, high


def synthesis_kernels(wavelet: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 2-D synthesis kernels (4, 1, L, L) of the grid's quadrants, in the order top-left,
    top-right, bottom-left, bottom-right: the outer products (filter down the rows x filter
    along the columns) low x low, high x low, low x high, high x high, taken in ``dtype``."""
    low, high = (torch.tensor(f, dtype=dtype, device=device) for f in synthesis_filters(wavelet))
    pairs = ((low, low), (high, low), (low, high), (high, high))
    return torch.stack([torch.outer(down, along) for down, along in pairs]).unsqueeze(1)


def inverse_dwt_2d(grid: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """PEFT's one-level inverse 2-D wavelet transform of an (H, W) coefficient grid, H and W
    even: each quadrant is upsampled by two and filtered with its kernel (`synthesis_kernels`),
    the four are summed, and the ``L - 2`` rows and columns at each border (which see the zeros
    beyond the grid) are dropped: (H - L + 2, W - L + 2) comes back."""
    rows, cols = grid.shape[0] // 2, grid.shape[1] // 2
    quadrants = grid.view(2, rows, 2, cols).transpose(1, 2).reshape(1, 4, rows, cols)
    full = F.conv_transpose2d(quadrants, kernels, stride=2)[0, 0]
    border = kernels.shape[-1] - 2
    return full[border : full.shape[0] - border, border : full.shape[1] - border]


def spectral_positions(seed: int, fan_out: int, fan_in: int, count: int) -> torch.Tensor:
    """Row and column (2, count) of the trained coefficients: PEFT's draw, the first ``count``
    of a permutation of the out x in positions from a CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(fan_out * fan_in, generator=generator)[:count]
    return torch.stack((flat // fan_in, flat % fan_in))


# -- the spec -------------------------------------------------------------------------------------

BIAS_MODES = ("none", "all", "waveft_only")


def _pattern_unless_proportional(value: Any, config: Mapping[str, Any], where: str) -> Any:
    """PEFT ignores ``n_frequency_pattern`` when ``proportional_parameters`` is on: so does a
    load (a spec refuses the two together)."""
    return {} if config.get("proportional_parameters") else value


PEFT_FORMAT = PeftFormat(
    "WAVEFT",
    keys=(
        PeftKey("n_frequency", "n_frequency", 2592, INT),
        PeftKey("scaling", "scaling", 25.0, NUMBER),
        PeftKey("wavelet_family", "wavelet", "db1", STRING),
        PeftKey("use_idwt", "idwt", True, BOOL),
        PeftKey("random_loc_seed", "seed", 777, INT),
        *selection_keys(),
        PeftKey("bias", "bias", "none", STRING),
        PeftKey(
            "n_frequency_pattern",
            "n_frequency_pattern",
            {},
            MAPPING.optional(),
            load=_pattern_unless_proportional,
        ),
        PeftKey("proportional_parameters", "proportional", False, BOOL),
    ),
    # fan_in_fan_out is implied by the layer type (PEFT corrects it alike); init_weights=False
    # only draws starting coefficients that the file's replace
    constants={"fan_in_fan_out": False, "init_weights": True},
)


@dataclass(frozen=True)
class WaveFT(MethodSpec):
    """Wavelet fine-tuning: sparse trained coefficients of a 2-D inverse wavelet transform."""

    name = "waveft"
    peft_format = PEFT_FORMAT
    pattern_fields = ("n_frequency_pattern",)

    n_frequency: int = 2592
    """Trained coefficients per layer (at most in x out)."""
    scaling: float = 25.0
    """What the transformed coefficients are multiplied by."""
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    wavelet: str = "db1"
    """The wavelet family (PEFT's ``wavelet_family``); ``db1`` is the Haar wavelet."""
    idwt: bool = True
    """Whether the coefficients go through the inverse transform; False: they are the update."""
    seed: int = 777
    """What the coefficients' positions are drawn from (PEFT's ``random_loc_seed``)."""
    proportional: bool = False
    """Share ``n_frequency`` per layer among the layers in proportion to their sizes."""
    bias: str = "none"
    layers: int | tuple[int, ...] | None = None
    exclude: str | tuple[str, ...] = ()
    n_frequency_pattern: Mapping[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        check_int(owner, "n_frequency", self.n_frequency)
        check_positive(owner, "scaling", self.scaling)
        check_wavelet(owner, "wavelet", self.wavelet)
        check_bool(owner, "idwt", self.idwt)
        check_int(owner, "seed", self.seed, minimum=0)
        check_bool(owner, "proportional", self.proportional)
        check_choice(owner, "bias", self.bias, BIAS_MODES)
        pattern = check_pattern_map(
            owner, "n_frequency_pattern", self.n_frequency_pattern, check_int
        )
        if pattern and self.proportional:
            raise SpecError(
                f"{owner}.n_frequency_pattern={pattern!r}: proportional=True decides every "
                f"layer's n_frequency (PEFT then ignores the pattern); use one or the other"
            )
        self._set("n_frequency_pattern", pattern)

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        return {
            "default": cls(n_frequency=20, scaling=2.0, targets=targets),
            "coif2-proportional": cls(
                n_frequency=16,
                scaling=3.0,
                wavelet="coif2",
                seed=5,
                proportional=True,
                targets=targets,
            ),
            "no-idwt-pattern": cls(
                n_frequency=12,
                scaling=1.5,
                idwt=False,
                targets=targets,
                n_frequency_pattern={targets[0]: 7},
            ),
        }

    def supports(self, layer: nn.Module) -> bool:
        return layer_kind(layer) in ("linear", "conv1d_gpt2")

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, WaveFTLayer]:
        bases = {p: model.get_submodule(p) for p in paths}
        counts = self.n_frequencies({p: in_out_features(b) for p, b in bases.items()})
        return {p: self._layer(b, p, counts[p]) for p, b in bases.items()}

    def n_frequencies(self, sizes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
        """Each layer's number of coefficients, given every targeted layer's (in, out): the
        pattern's or ``n_frequency``; with ``proportional``, PEFT's share of the whole budget
        (rounded half to even, as Python's ``round``; at least one)."""
        if not self.proportional:
            return {p: pattern_value(self.n_frequency_pattern, p, self.n_frequency) for p in sizes}
        total = sum(i * o for i, o in sizes.values())
        budget = self.n_frequency * len(sizes)
        return {p: max(1, round(i * o / total * budget)) for p, (i, o) in sizes.items()}

    def _layer(self, base: nn.Module, path: str, count: int) -> WaveFTLayer:
        fan_in, fan_out = in_out_features(base)
        if count > fan_in * fan_out:
            raise SpecError(
                f"WaveFT.n_frequency: {path} gets {count} coefficients, more than its "
                f"{fan_out} x {fan_in} = {fan_in * fan_out} weights"
            )
        wavelet = self.wavelet if self.idwt else None
        return WaveFTLayer(base, count, self.scaling, wavelet, self.seed)


# -- one layer ------------------------------------------------------------------------------------


class WaveFTLayer(AdapterLayer):
    """``waveft_spectrum`` (n) of one layer, the fixed positions of its coefficients in the
    padded grid, and the update they make, kept in eval until the coefficients change."""

    method = "waveft"

    def __init__(
        self, base: nn.Module, count: int, scaling: float, wavelet: str | None, seed: int
    ) -> None:
        super().__init__(base)
        self.kind = layer_kind(base)
        self.fan_in, self.fan_out = in_out_features(base)
        self.scaling = scaling
        weight = base.weight
        factory = adapter_tensor_kwargs(weight)
        self.waveft_spectrum = nn.Parameter(torch.zeros(count, **factory))
        rows, cols = spectral_positions(seed, self.fan_out, self.fan_in, count)
        if wavelet is None:
            margin, self.grid = 0, (self.fan_out, self.fan_in)
            kernels = None
        else:
            taps = len(LOW_PASS[wavelet])
            margin = taps // 2 - 1
            self.grid = tuple(n + taps - 2 + n % 2 for n in (self.fan_out, self.fan_in))
            kernels = synthesis_kernels(wavelet, **factory)
        flat = (rows + margin) * self.grid[1] + cols + margin
        # derived from the seed and the wavelet: never saved
        self.register_buffer("positions", flat.to(weight.device), persistent=False)
        self.register_buffer("kernels", kernels, persistent=False)
        self.update = Cached(self.update_now, self._update_sources)

    def _update_sources(self) -> tuple[torch.Tensor]:
        return (self.waveft_spectrum,)

    def update_now(self) -> torch.Tensor:
        """``scaling · IDWT₂(S)`` cut to (out, in), computed now."""
        spectrum = self.waveft_spectrum
        height, width = self.grid
        grid = spectrum.new_zeros(height * width).index_put((self.positions,), spectrum)
        grid = grid.view(height, width)
        if self.kernels is not None:
            grid = inverse_dwt_2d(grid, self.kernels)[: self.fan_out, : self.fan_in]
        return grid * self.scaling

    def emit(self, ctx: EmitContext, x: fx.Node, base_out: fx.Node) -> fx.Node:
        update = ctx.module("update", self.update)
        dtype = self.waveft_spectrum.dtype
        cast = dtype != self.base.weight.dtype
        h = ctx.method("to", x, dtype) if cast else x
        out = ctx.call(torch.add, base_out, ctx.call(F.linear, h, update))
        return ctx.method("to", out, self.base.weight.dtype) if cast else out

    def delta_weight(self) -> torch.Tensor:
        update = self.update_now()
        return update.t() if self.kind == "conv1d_gpt2" else update
