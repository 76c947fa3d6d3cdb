"""Declarative specs: one frozen dataclass per method, a `Spec` of named adapters, spec files.

Every method class registers itself under its ``name``; constructing one validates every
field and raises `SpecError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from surgeon.errors import SpecError, did_you_mean

if TYPE_CHECKING:
    from surgeon.adapter import AdapterLayer, CallAdapter
    from surgeon.graph import Graph

METHODS: dict[str, type[MethodSpec]] = {}
PRESETS = ("attention", "mlp", "all-linear")


def spec_fields(cls: type) -> list[dataclasses.Field]:
    """A method's own fields first, then the ones every method shares (keyword-only)."""
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    return [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]


class _ValidatingMeta(type):
    """Turns unknown or surplus constructor arguments into `SpecError` instead of `TypeError`."""

    def __call__(cls, *args: Any, **kwargs: Any):
        fields = spec_fields(cls)
        names = [f.name for f in fields]
        positional = [f for f in fields if not f.kw_only]
        if len(args) > len(positional):
            raise SpecError(
                f"{cls.__name__} takes at most {len(positional)} positional arguments, got {len(args)}"
            )
        for key in kwargs:
            if key not in names:
                raise SpecError(
                    f"{cls.__name__} has no field {key!r}{did_you_mean(key, names)} "
                    f"(fields: {', '.join(names)})"
                )
        return super().__call__(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class MethodSpec(metaclass=_ValidatingMeta):
    """Base of every method spec (`surgeon.LoRA`, ...).

    Subclasses are frozen dataclasses with a class-level ``name`` (the registry key and the
    ``method`` value in spec files) and implement `validate`.

    Every method also takes ``modules_to_save``: modules (name suffixes, as PEFT's field) that
    the adapter trains as a full copy, such as a new classification head. The copy replaces the
    module's output while the adapter runs; the original stays for the base model and for other
    adapters (see `surgeon.copies`).
    """

    name: ClassVar[str]
    modules_to_save: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name:
            METHODS[name] = cls

    def __post_init__(self) -> None:
        self._set(
            "modules_to_save",
            check_names(type(self).__name__, "modules_to_save", self.modules_to_save),
        )
        self.validate()

    def validate(self) -> None:
        """Check and normalise fields; raise `SpecError` on the first bad one."""

    # -- what a method supplies to the compiler (see surgeon.adapter) --------------------------

    peft_type: ClassVar[str | None] = None

    @property
    def rewrites_base(self) -> bool:
        """Whether creating this adapter rewrites base weights in place (residual inits)."""
        return False

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

    adapts_quantized: ClassVar[bool] = False
    """Whether this method can adapt layers stored in 4 bits (`surgeon.quant.Linear4bit`)."""

    def supports(self, layer: nn.Module) -> bool:
        """Whether this method can adapt ``layer``."""
        raise NotImplementedError

    def create_layer(self, layer: nn.Module, path: str) -> AdapterLayer:
        """The adapter parameters for one targeted layer (on the layer's device)."""
        raise NotImplementedError

    def create_layers(self, model: nn.Module, paths: Sequence[str]) -> dict[str, AdapterLayer]:
        """Adapter layers for every target. Methods with state shared across layers (VeRA's
        projections) override this; the others build each layer on its own."""
        return {p: self.create_layer(model.get_submodule(p), p) for p in paths}

    acts_on_call: ClassVar[bool] = False
    """Whether the method acts on the model call (`create_call_adapter`) instead of on layers."""

    def create_call_adapter(
        self, model: nn.Module, graph: Graph, from_file: bool
    ) -> CallAdapter | None:
        """The adapter of a method that acts on the model call (prompt methods), or None.
        ``graph``: the model's traced regions; ``from_file``: build the form a saved file holds
        (a load fills it next)."""
        return None

    def peft_shared_tensors(self, layers: Mapping[str, AdapterLayer]) -> dict[str, torch.Tensor]:
        """Adapter-wide tensors (not under one layer's path), by their full PEFT key."""
        return {}

    pattern_fields: ClassVar[tuple[str, ...]] = ()
    """Fields mapping PEFT-style module patterns to per-layer values (LoRA's rank_pattern):
    every key must match a targeted layer."""

    def select(self, model: nn.Module) -> list[str]:
        """Paths of the layers this method adapts in ``model``."""
        from surgeon.targets import check_pattern_keys

        paths = self._select_targets(model)
        if not self.adapts_quantized:
            _refuse_quantized(type(self).__name__, model, paths)
        for field_name in self.pattern_fields:
            check_pattern_keys(type(self).__name__, field_name, getattr(self, field_name), paths)
        return paths

    def _select_targets(self, model: nn.Module) -> list[str]:
        from surgeon.targets import select_targets

        return select_targets(
            model,
            type(self).__name__,
            self.targets,
            self.supports,
            layers=getattr(self, "layers", None),
            exclude=getattr(self, "exclude", ()),
        )

    def trainable_base_parameters(self, model: nn.Module, paths: Sequence[str]) -> list[str]:
        """Names of base-model parameters this method trains too (e.g. LoRA's ``bias="all"``)."""
        return []

    def to_peft_config(self, paths: Sequence[str]) -> dict[str, Any]:
        """This spec as PEFT's adapter_config.json fields (``paths``: the layers it adapted)."""
        raise SpecError(f"{type(self).__name__} cannot be saved in PEFT's format yet")

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], where: str) -> MethodSpec:
        raise SpecError(f"{where}: {cls.__name__} cannot be read from PEFT's format yet")

    def peft_config_from_training(self, layers: Mapping[str, AdapterLayer]) -> dict[str, Any]:
        """adapter_config.json fields that training decided (AdaLoRA's final rank_pattern)."""
        return {}

    @classmethod
    def accepts_peft_config(cls, config: Mapping[str, Any]) -> bool:
        """Whether a config of this class's ``peft_type`` is this method (PEFT writes DoRA as
        LORA with ``use_dora``: LoRA and DoRA each claim their half)."""
        return True

    # -- training hooks (surgeon.train and custom loops call them through the compiled model) --

    def after_backward(self, layers: Mapping[str, AdapterLayer], step: int) -> None:
        """Called once per step while gradients exist: after ``optimizer.step()``, before
        ``zero_grad()`` (AdaLoRA allocates ranks here, as PEFT's update_and_allocate)."""

    def loss_term(self, layers: Mapping[str, AdapterLayer]) -> torch.Tensor | None:
        """A regulariser to add to the training loss (AdaLoRA's orthogonality term), or None."""
        return None

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)

    def replace(self, **changes: Any) -> MethodSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in spec_fields(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, MethodSpec):
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


def _refuse_quantized(owner: str, model: nn.Module, paths: Sequence[str]) -> None:
    from surgeon.quant import is_quantized

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


# -- field checks shared by the method specs -------------------------------------------------


def check_int(owner: str, field: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{owner}.{field}={value!r}: expected an integer >= {minimum}")
    return value


def check_number(
    owner: str,
    field: str,
    value: Any,
    low: float,
    high: float | None = None,
    high_inclusive: bool = False,
    low_inclusive: bool = False,
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if not ok:
        lo = f"{'>=' if low_inclusive else '>'} {low}"
        hi = f" and {'<=' if high_inclusive else '<'} {high}" if high is not None else ""
        raise SpecError(f"{owner}.{field}={value!r}: expected a number {lo}{hi}")
    return value


def check_bool(owner: str, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{owner}.{field}={value!r}: expected true or false")
    return value


def check_choice(owner: str, field: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        hint = did_you_mean(str(value), allowed)
        raise SpecError(
            f"{owner}.{field}={value!r}: expected one of {', '.join(map(repr, allowed))}{hint}"
        )
    return value


def check_regex(owner: str, field: str, value: str) -> str:
    try:
        re.compile(value)
    except re.error as err:
        raise SpecError(
            f"{owner}.{field}={value!r}: not a valid regular expression ({err})"
        ) from None
    return value


def check_targets(
    owner: str, field: str, value: Any, allow_empty: bool = False
) -> str | tuple[str, ...]:
    """A preset name or regex (a string), or name suffixes (a list of strings)."""
    if isinstance(value, str):
        if not value:
            raise SpecError(
                f"{owner}.{field}='': expected a regex, a preset ({', '.join(PRESETS)}) or a list of names"
            )
        return value if value in PRESETS else check_regex(owner, field, value)
    if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
        if not value and not allow_empty:
            raise SpecError(f"{owner}.{field}=[]: expected at least one target")
        return tuple(value)
    raise SpecError(
        f"{owner}.{field}={value!r}: expected a list of module-name suffixes, a regex, "
        f"or a preset ({', '.join(PRESETS)})"
    )


def check_names(owner: str, field: str, value: Any) -> tuple[str, ...]:
    """Module-name suffixes: a name or a list of names (possibly empty)."""
    if isinstance(value, str) and value:
        return (value,)
    listed = isinstance(value, Sequence) and not isinstance(value, str)
    if listed and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise SpecError(f"{owner}.{field}={value!r}: expected a list of module names (suffixes)")


def check_layers(owner: str, field: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    given = value  # the error names what the user wrote, not the tuple made of it
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (
        isinstance(value, Sequence)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return tuple(value)
    raise SpecError(
        f"{owner}.{field}={given!r}: expected a layer index or a non-empty list of indices >= 0"
    )


def check_pattern_map(owner: str, field: str, value: Any, check_value) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{owner}.{field}={value!r}: expected a mapping of module pattern -> value")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"{owner}.{field}: key {key!r} must be a non-empty module pattern")
        check_regex(owner, f"{field}[{key!r}]", key)
        out[key] = check_value(owner, f"{field}[{key!r}]", item)
    return out
