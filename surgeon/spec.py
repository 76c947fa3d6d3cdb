"""Declarative specs: one frozen dataclass per method, a `Spec` of named adapters, spec files.

Every method class registers itself under its ``name``; constructing one validates every
field and raises `SpecError` naming the field, the value and what is allowed. A method's class
is also its contract with the compiler (which layers it adapts, the layers it builds, its PEFT
format, its training hooks): see `MethodSpec`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from surgeon.adapter import AdapterLayer, CallAdapter
from surgeon.checks import ValidatingMeta, check_layers, check_names, check_targets, spec_fields
from surgeon.errors import SpecError, did_you_mean
from surgeon.peft import PeftFormat
from surgeon.quant import is_quantized
from surgeon.targets import check_pattern_keys, select_targets

if TYPE_CHECKING:
    from surgeon.graph import Graph

METHODS: dict[str, type[MethodSpec]] = {}

SELECTION_FIELDS: dict[str, Callable[[str, str, Any], Any]] = {
    "targets": check_targets,
    "exclude": lambda owner, field, value: check_targets(owner, field, value, allow_empty=True),
    "layers": check_layers,
}
"""The fields that choose target layers, checked alike in every method that has them."""


@dataclasses.dataclass(frozen=True)
class Combination:
    """One adapter in a weighted combination (`MethodSpec.combine`)."""

    name: str
    weight: float
    spec: MethodSpec
    layers: Mapping[str, AdapterLayer]


@dataclasses.dataclass(frozen=True)
class MethodSpec(metaclass=ValidatingMeta):
    """Base of every method spec (`surgeon.LoRA`, ...).

    Subclasses are frozen dataclasses with a class-level ``name`` (the registry key and the
    ``method`` value in spec files); ``validate`` checks their own fields. The fields that choose
    target layers (``targets``, ``exclude``, ``layers``) are checked here for every method that
    declares them.

    Every method also takes ``modules_to_save``: modules (name suffixes, as PEFT's field) that
    the adapter trains as a full copy, such as a new classification head. The copy replaces the
    module's output while the adapter runs; the original stays for the base model and for other
    adapters (see `surgeon.copies`).
    """

    name: ClassVar[str]
    modules_to_save: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.peft_type = cls.peft_format.peft_type if cls.peft_format is not None else None
        name = cls.__dict__.get("name")
        if name:
            METHODS[name] = cls

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self._set("modules_to_save", check_names(owner, "modules_to_save", self.modules_to_save))
        for f in spec_fields(type(self)):
            check = SELECTION_FIELDS.get(f.name)
            if f.name == "targets" and getattr(self, "target_parameters", None):
                check = SELECTION_FIELDS["exclude"]  # PEFT's target_modules=[]: parameters only
            if check is not None:
                self._set(f.name, check(owner, f.name, getattr(self, f.name)))
        self.validate()

    def validate(self) -> None:
        """Check and normalise this method's own fields; raise `SpecError` on the first bad one."""

    @classmethod
    def examples(cls, targets: tuple[str, ...]) -> dict[str, MethodSpec]:
        """Representative configurations on ``targets`` (each option that changes the math at
        least once): the conformance suite runs every one of them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return {"default": cls(targets=targets) if "targets" in fields else cls()}

    # -- the layers it adapts -------------------------------------------------------------------

    adapts_quantized: ClassVar[bool] = False
    """Whether this method can adapt layers stored in 4 bits (`surgeon.quant.Linear4bit`)."""

    acts_on_call: ClassVar[bool] = False
    """Whether the method acts on the model call (`create_call_adapter`) instead of on layers."""

    stacks: ClassVar[bool] = True
    """Whether several adapters of this method can run one layer together; where not (LN
    tuning: a norm runs with one adapter's parameters), running so is a `SpecError` (each may
    still serve its own rows of a mixed batch)."""

    merge_refusal: ClassVar[str | None] = None
    """Why the method has no weight update to fold in (a router mixing experts from each
    batch's inputs), or None: merging such an adapter, and exporting it (export merges), is a
    `SpecError` with this reason, before anything changes."""

    merges_into_shared_weights: ClassVar[bool] = False
    """Whether merging may write into a weight other layers share (tied embeddings) when this
    adapter adapts each of them too, alike (trainable tokens: the tied LM head gets the rows the
    embedding gets); otherwise merging into a shared weight is a `SpecError`."""

    shapes_from_weight_values: ClassVar[bool] = False
    """Whether the adapter's parameter shapes come from the base weights' values (AdaMSS's
    clusters of W's singular vectors): such a method cannot be built on the meta device, and
    trying is a `SpecError` naming the layer."""

    pattern_fields: ClassVar[tuple[str, ...]] = ()
    """Fields mapping PEFT-style module patterns to per-layer values (LoRA's rank_pattern):
    every key must match a targeted layer."""

    def supports(self, layer: nn.Module) -> bool:
        """Whether this method can adapt ``layer``."""
        raise NotImplementedError

    def select(self, model: nn.Module) -> list[str]:
        """Paths of the layers this method adapts in ``model``."""
        if self.acts_on_call:
            return []
        owner = type(self).__name__
        paths = select_targets(
            model,
            owner,
            self.targets,
            self.supports,
            layers=getattr(self, "layers", None),
            exclude=getattr(self, "exclude", ()),
        )
        if not self.adapts_quantized:
            _refuse_quantized(owner, model, paths)
        for field_name in self.pattern_fields:
            check_pattern_keys(owner, field_name, getattr(self, field_name), paths)
        return paths

    @property
    def starts_as_base(self) -> bool:
        """Whether a freshly created adapter leaves the model's outputs unchanged."""
        return not self.acts_on_call

    @property
    def file_holds_trained_form(self) -> bool:
        """Whether a saved file holds the parameters training moves (a prefix encoder's file
        holds only the prefixes it produces)."""
        return True

    @property
    def rewrites_base(self) -> bool:
        """Whether creating this adapter rewrites base weights in place (residual inits)."""
        return False

    def conflict_with(self, other: MethodSpec) -> str | None:
        """Why an adapter of this method cannot sit on one model beside an adapter of ``other``
        (None: it can). The compiler asks both ways before adding an adapter."""
        return None

    def snapshot_base(self, model: nn.Module, paths: Sequence[str]) -> Callable[[], None]:
        """A function that puts back what creating this adapter changes in the base model; the
        compiler calls it if creation fails. Residual inits rewrite the targeted weights."""
        if not self.rewrites_base:
            return lambda: None
        saved = [(w, w.detach().clone()) for w in (model.get_submodule(p).weight for p in paths)]

        @torch.no_grad()
        def restore() -> None:
            for weight, copy in saved:
                weight.copy_(copy)

        return restore

    def create_layer(self, layer: nn.Module, path: str) -> AdapterLayer:
        """The adapter parameters for one targeted layer (on the layer's device)."""
        raise NotImplementedError

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        """Adapter layers for every target. Methods with state shared across layers (VeRA's
        projections) override this; the others build each layer on its own."""
        return {p: self.create_layer(model.get_submodule(p), p) for p in paths}

    def create_layers_from_data(
        self, model: nn.Module, paths: Sequence[str], batches: Iterable[Mapping[str, Any]] | None
    ) -> dict[str, AdapterLayer]:
        """Adapter layers for a new adapter (not one a file fills), given the calibration
        batches of ``surgeon.compile(..., calibration=batches)`` (keyword-argument dicts for
        the model's forward; None when none were given). Only methods whose initialisation
        reads data (LoRA's EVA, CorDA, LoRA-GA) use them; the others build as `create_layers`."""
        return self.create_layers(model, paths)

    def create_call_adapter(
        self, model: nn.Module, graph: Graph, from_file: bool
    ) -> CallAdapter | None:
        """The adapter of a method that acts on the model call (prompt methods), or None.
        ``graph``: the model's traced regions; ``from_file``: build the form a saved file holds
        (a load fills it next)."""
        return None

    def trainable_base_parameters(self, model: nn.Module, paths: Sequence[str]) -> list[str]:
        """Names of base-model parameters this method trains too. By default PEFT's ``bias``
        switch, for methods with that field: ``"all"`` trains every bias of the model,
        ``"<method>_only"`` (``lora_only``, ``oft_only``, ...) the biases of the adapted layers."""
        bias = getattr(self, "bias", "none")
        if bias == "all":
            return [n for n, _ in model.named_parameters() if n.endswith("bias")]
        if isinstance(bias, str) and bias.endswith("_only"):
            return [
                f"{p}.bias"
                for p in paths
                if getattr(model.get_submodule(p), "bias", None) is not None
            ]
        return []

    # -- PEFT's format (surgeon.peft) -------------------------------------------------------------

    peft_format: ClassVar[PeftFormat | None] = None
    """How this method reads from and writes to PEFT's adapter_config.json; None for methods
    PEFT does not have."""

    peft_type: ClassVar[str | None] = None
    """``peft_format``'s PEFT type (set from it)."""

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Adapter-wide tensors (not under one layer's path), by their full PEFT key."""
        return {}

    def peft_tensors_from_file(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> Mapping[str, torch.Tensor]:
        """A file's tensors (by full PEFT key) in the form this method's layers hold: a method
        whose files may keep a compact form (VB-LoRA's top-k indices and weights) expands it
        here, before a load matches keys and shapes."""
        return tensors

    def to_peft_config(self, paths: Sequence[str] = ()) -> dict[str, Any]:
        """This spec as PEFT's adapter_config.json fields (``paths``: the layers it adapted)."""
        if self.peft_format is None:
            raise SpecError(f"{type(self).__name__} has no PEFT format")
        return {**self.peft_format.write(self, paths), "modules_to_save": None}

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        """Whether a config of this class's PEFT type is this method (PEFT writes DoRA as LORA
        with ``use_dora``: LoRA and DoRA each claim their half)."""
        return cls.peft_format is not None and cls.peft_format.claims(config)

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], where: str) -> MethodSpec:
        """The spec a PEFT config describes; `SpecError` naming the key for a value of the wrong
        type, a variant this method does not implement, or a field it does not accept."""
        if cls.peft_format is None:
            raise SpecError(f"{where}: {cls.__name__} has no PEFT format")
        fields = cls.peft_format.read(config, where, cls.__name__)
        try:
            return cls(**fields)
        except SpecError as err:
            raise SpecError(f"{where}: {_naming_peft_key(cls, str(err))}") from None

    def peft_config_from_training(self, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """adapter_config.json fields that training decided (AdaLoRA's final rank_pattern)."""
        return {}

    # -- weighted combination (CompiledModel.merge_adapters) -------------------------------------

    combinations: ClassVar[tuple[str, ...]] = ()
    """The ``how`` values `combine` accepts; empty when adapters of this method do not combine."""

    def combine(
        self,
        model: nn.Module,
        sources: Sequence[Combination],
        how: str,
        options: Any,
    ) -> tuple[MethodSpec, dict[str, torch.Tensor]]:
        """The spec and PEFT-keyed tensors (full keys) of the adapter that combines ``sources``
        (all of this method; this spec is the first one's) by ``how``, one of `combinations`,
        with the checked ``options`` (`surgeon.combine.Options`)."""
        raise SpecError(f"{type(self).__name__} adapters cannot be combined")

    # -- memory estimates (surgeon.estimate_memory) ----------------------------------------------

    def on_full_precision_base(self) -> MethodSpec:
        """This adapter on a base kept in full precision (QLoRA's is LoRA)."""
        return self

    @classmethod
    def on_4bit_base(cls, method: MethodSpec) -> MethodSpec | None:
        """``method`` as this class would run it on a base stored in 4 bits, or None if this
        class does not store bases in 4 bits or cannot express ``method``."""
        return None

    # -- training hooks (surgeon.train and custom loops call them through the compiled model) --

    def after_backward(
        self,
        layers: Mapping[str, AdapterLayer],
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Called once per step while gradients exist: after ``optimizer.step()``, before
        ``zero_grad()`` (AdaLoRA allocates ranks here, as PEFT's update_and_allocate). The
        training hooks find a method's `CallAdapter`, if it has one, in ``layers`` under ``""``
        (the whole model's path). ``optimizer`` is the one that just stepped (None from a
        custom loop that does not pass it): schedule methods that restart their factors reset
        or prune its moments (ReLoRA, COLA)."""

    def lr_factor(self, step: int) -> float:
        """What the learning-rate schedule is multiplied by at ``step`` (ReLoRA's re-warm-up
        after each restart); 1 by default."""
        return 1.0

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """A regulariser to add to the training loss (AdaLoRA's orthogonality term), or None."""
        return None

    def on_running(self, model: nn.Module, name: str, running: bool, mixed: bool) -> None:
        """Called each time the compiled model installs what runs (activation, merge, unmerge,
        ``disabled()``, a mixed batch, deletion), for every adapter it holds: whether adapter
        ``name`` of this spec runs now (``mixed``: in a mixed batch). A method that changes the
        model beyond its layers while it runs (LongLoRA's attention function) does it here, and
        undoes it when ``running`` turns False."""

    def call_values(self, name: str, call: Mapping[str, Any]) -> Mapping[str, Any]:
        """Values adapter ``name``'s layers read during a model call (by
        `surgeon.rewrite.call_value`), derived from the call's arguments, which the model still
        gets: aLoRA finds its invocation tokens in ``input_ids``. ``call``: the arguments by
        name; within ``generate``, generate's own arguments, once, and the values hold for
        every step (as PEFT's). An argument of the call under the same name wins. Empty by
        default. Read only while the method's layers declare `AdapterLayer.call_arguments`."""
        return {}

    # -- dicts and copies ----------------------------------------------------------------------

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)

    def replace(self, **changes: Any) -> MethodSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in spec_fields(type(self)):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "spec") -> MethodSpec:
        """Build a method from ``{"method": "lora", ...}`` (``method`` may be left out on a subclass)."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a table of fields, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None if cls is MethodSpec else cls.name)
        if method is None:
            raise SpecError(f"{where}: missing 'method' (one of: {', '.join(sorted(METHODS))})")
        target_cls = method_class(str(method), where)
        try:
            return target_cls(**data)
        except SpecError as err:
            raise SpecError(f"{where}: {err}") from None


def _naming_peft_key(cls: type[MethodSpec], message: str) -> str:
    """A spec error from reading a PEFT config, with the config key of the field it names."""
    match = re.match(rf"{re.escape(cls.__name__)}\.(\w+)", message)
    key = cls.peft_format.field_key(match.group(1)) if match else None
    return f"{message} (adapter_config.json key {key!r})" if key else message


def _refuse_quantized(owner: str, model: nn.Module, paths: Sequence[str]) -> None:
    stored = [p for p in paths if is_quantized(model.get_submodule(p))]
    if stored:
        raise SpecError(
            f"{owner} cannot adapt layers stored in 4 bits ({', '.join(stored[:3])}"
            f"{' ...' if len(stored) > 3 else ''}); use LoRA or QLoRA there, or exclude them"
        )


def method_class(method: str, where: str = "spec") -> type[MethodSpec]:
    key = method.lower().replace("-", "").replace("_", "")
    aliases = {m.replace("_", ""): m for m in METHODS}
    if key not in aliases:
        raise SpecError(
            f"{where}: unknown method {method!r}{did_you_mean(key, aliases)} "
            f"(known: {', '.join(sorted(METHODS))})"
        )
    return METHODS[aliases[key]]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Several named adapters compiled into one model."""

    adapters: Mapping[str, MethodSpec] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, Mapping) or not self.adapters:
            raise SpecError(
                f"Spec.adapters: expected a non-empty mapping of adapter name to method, got {self.adapters!r}"
            )
        for key, method in self.adapters.items():
            check_adapter_name(key)
            if not isinstance(method, MethodSpec):
                raise SpecError(
                    f"Spec.adapters[{key!r}]: expected a method such as surgeon.LoRA(...), "
                    f"got {type(method).__name__}"
                )
        object.__setattr__(self, "adapters", dict(self.adapters))

    def to_dict(self) -> dict[str, Any]:
        return {"adapters": {k: v.to_dict() for k, v in self.adapters.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "spec") -> Spec:
        if not isinstance(data, Mapping):
            raise SpecError(
                f"{where}: expected a table at the top level, got {type(data).__name__}"
            )
        if "adapters" not in data:
            return cls({"default": MethodSpec.from_dict(data, where)})
        extra = sorted(set(data) - {"adapters"})
        if extra:
            raise SpecError(f"{where}: unexpected top-level key(s) {extra}; allowed: 'adapters'")
        adapters = data["adapters"]
        if not isinstance(adapters, Mapping):
            raise SpecError(f"{where}: 'adapters' must be a table of name -> method")
        methods = {
            name: MethodSpec.from_dict(m, f"{where}: adapters.{name}")
            for name, m in adapters.items()
        }
        try:
            return cls(methods)
        except SpecError as err:  # a bad adapter name, or no adapters: name the file
            raise SpecError(f"{where}: {err}") from None


def as_spec(spec_or_method: Spec | MethodSpec | Mapping[str, Any], name: str = "default") -> Spec:
    if isinstance(spec_or_method, Spec):
        return spec_or_method
    if isinstance(spec_or_method, MethodSpec):
        return Spec({name: spec_or_method})
    if isinstance(spec_or_method, Mapping):
        return Spec.from_dict(spec_or_method)
    raise SpecError(
        f"expected a surgeon.Spec, a method such as surgeon.LoRA(...), or a dict; "
        f"got {type(spec_or_method).__name__}"
    )


def load_spec(path: str | Path) -> Spec:
    """Read a spec from a .yaml/.yml, .json or .toml file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"cannot read spec file {path}: {err.strerror or err}") from None
    return Spec.from_dict(_parse(path, text), where=str(path))


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
    except Exception as err:
        raise SpecError(f"{path}: malformed {suffix[1:].upper()}: {err}") from None
    raise SpecError(
        f"{path}: unsupported spec file type {suffix!r}; use .yaml, .yml, .json or .toml"
    )


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise SpecError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' and '-', not starting with a digit"
        )
    return name
