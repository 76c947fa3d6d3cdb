"""PEFT's ``adapter_config.json``, declared per method as data.

A method's `PeftFormat` names its PEFT type and lists the config keys it reads and writes:

* `PeftKey`: a key that carries a spec field (PEFT's name, PEFT's default, the JSON type it must
  hold, converters where the two sides differ), or a key that is only checked on reading;
* ``switches``: keys that turn a PEFT variant on or off (``use_dora``), written with this
  method's value; a file with another value is not this method;
* ``constants``: keys that do not change the math here (``fan_in_fan_out`` is implied by the
  layer type), written with the given value and accepted with any;
* ``ignored``: keys PEFT has but does not use for this method, accepted and never written.

`PeftFormat.write` gives a spec's config; `PeftFormat.read` gives the fields of a config after
checking every key's type, so a malformed file fails with a `SpecError` naming the key. Keys
that no method declares are judged alike for every method (`check_other_keys`): bookkeeping is
ignored, a variant switch that is on is refused, anything else is ignored with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from surgeon.checks import is_int
from surgeon.errors import SpecError
from surgeon.targets import LAYER_CONTAINERS, peft_selection

if TYPE_CHECKING:
    from torch import nn

PREFIX = "base_model.model."
"""What PEFT's state-dict keys start with, before the module path."""

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
"""A `PeftKey.default` for keys a config must hold."""

NEUTRAL_KEYS = frozenset(
    {
        "peft_type",
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "peft_version",
        "auto_mapping",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",
        "ensure_weight_tying",
        "runtime_config",
        "modules_to_save",
    }
)
"""Keys that never change the math: bookkeeping, or inits whose result the saved weights replace
(``modules_to_save`` is read by `surgeon.io` for every method)."""

VARIANT_KEYS: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "megatron_config": None,
}
"""PEFT keys that switch on a variant, with the value that means "off" (PEFT's default)."""

SWITCH_DEFAULTS: dict[str, Any] = {**VARIANT_KEYS, "bias": "none"}
"""PEFT's value of a switch a config leaves out."""


def is_off(value: Any, off: Any = None) -> bool:
    return value == off or value in (None, False, [], {}, ())


def variant_on(key: str, value: Any) -> bool:
    """Whether variant key ``key`` of `VARIANT_KEYS` is on: a sub-config mapping is, even empty
    (PEFT builds it with its defaults), as is any value but its off value."""
    return isinstance(value, Mapping) or not is_off(value, VARIANT_KEYS[key])


# -- JSON types ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JsonType:
    """What a config value must be: a test, and how an error describes it."""

    description: str
    test: Callable[[Any], bool]

    def accepts(self, value: Any) -> bool:
        return self.test(value)

    def optional(self) -> JsonType:
        """The same type, or null."""
        return JsonType(f"{self.description}, or null", lambda v: v is None or self.test(v))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    """A JSON array (or the tuple a Python caller passes for one)."""
    return isinstance(value, (list, tuple))


def _is_names(value: Any) -> bool:
    return isinstance(value, str) or (_is_list(value) and all(isinstance(v, str) for v in value))


ANY = JsonType("any value", lambda v: True)
INT = JsonType("an integer", is_int)
NUMBER = JsonType("a number", _is_number)
BOOL = JsonType("true or false", lambda v: isinstance(v, bool))
STRING = JsonType("a string", lambda v: isinstance(v, str))
NAMES = JsonType("a module name, a list of module names or a regex", _is_names)
INDICES = JsonType(
    "a layer index or a list of layer indices",
    lambda v: is_int(v) or (_is_list(v) and all(is_int(i) for i in v)),
)
MAPPING = JsonType("a mapping", lambda v: isinstance(v, Mapping))
BOOL_OR_STRING = JsonType("true, false or a string", lambda v: isinstance(v, (bool, str)))


def one_of(*values: Any) -> JsonType:
    return JsonType(f"one of {', '.join(map(repr, values))}", lambda v: v in values)


# -- keys -----------------------------------------------------------------------------------------


def as_json(value: Any) -> Any:
    """A spec field's value as JSON writes it (tuples as lists, mappings as dicts)."""
    if isinstance(value, tuple):
        return [as_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: as_json(v) for k, v in value.items()}
    return value


Saver = Callable[[Any, Sequence[str]], Any]
"""(spec, adapted paths) -> the value written."""
Loader = Callable[[Any, Mapping[str, Any], str], Any]
"""(value in the file, the whole config, where) -> the field's value; may raise `SpecError`."""


@dataclass(frozen=True)
class PeftKey:
    """One ``adapter_config.json`` key: PEFT's ``key``, the spec ``field`` it carries (None for a
    key that is only checked), PEFT's ``default`` when the key is absent or null, the JSON
    ``type`` it must hold, and converters where the file and the field differ."""

    key: str
    field: str | None = None
    default: Any = None
    type: JsonType = ANY
    save: Saver | None = None
    load: Loader | None = None
    why_required: str = "surgeon needs it written out"
    lossy: bool = False
    """Reading keeps less than writing wrote: an init whose result the file's weights replace."""

    def write(self, spec: Any, paths: Sequence[str]) -> Any:
        if self.save is not None:
            return self.save(spec, paths)
        if self.field is None:
            return None if self.default is REQUIRED else self.default
        return as_json(getattr(spec, self.field))

    def read(self, config: Mapping[str, Any], where: str) -> Any:
        value = config.get(self.key)
        if value is None and self.default is REQUIRED:  # PEFT writes null for "fill in later"
            raise SpecError(f"{where}: {self.key} is missing; {self.why_required}")
        if self.key not in config:
            value = self.default
        elif not self.type.accepts(value):
            raise SpecError(f"{where}: {self.key}={value!r}: expected {self.type.description}")
        elif value is None:
            value = self.default
        return self.load(value, config, where) if self.load is not None else value


# -- the target selection, shared by every method that adapts layers -----------------------------


def _selection(spec: Any, paths: Sequence[str], exclude: bool, layers: bool) -> tuple:
    """``target_modules``, ``exclude_modules``, ``layers_to_transform`` to write; a PEFT type
    without exclusions or layer indices gets the chosen module paths instead."""
    chosen = peft_selection(spec, paths)
    if (chosen[1] is not None and not exclude) or (chosen[2] is not None and not layers):
        return sorted(paths), None, None
    return chosen


def written_targets(spec: Any, paths: Sequence[str], fmt: PeftFormat) -> str | list[str]:
    """What ``target_modules`` holds when ``spec`` is saved in ``fmt`` (IA³ names its
    feed-forward modules the same way)."""
    keys = fmt.key_names()
    return _selection(spec, paths, "exclude_modules" in keys, "layers_to_transform" in keys)[0]


def _as_selector(value: Any, config: Mapping[str, Any], where: str) -> Any:
    return tuple(value) if _is_list(value) else value


def _check_layers_pattern(value: Any, config: Mapping[str, Any], where: str) -> None:
    """PEFT counts layer indices under ``layers_pattern``; surgeon under the containers it knows."""
    if value and config.get("layers_to_transform") is not None:
        patterns = [value] if isinstance(value, str) else list(value)
        if any(p not in LAYER_CONTAINERS for p in patterns):
            raise SpecError(
                f"{where}: layers_pattern={value!r} is not supported "
                f"(supported: {', '.join(LAYER_CONTAINERS)})"
            )


def selection_keys(exclude: bool = True, layers: bool = True) -> tuple[PeftKey, ...]:
    """The keys of the ``targets``/``exclude``/``layers`` fields, for a PEFT type that has
    ``exclude_modules`` and ``layers_to_transform`` (or not)."""

    def pick(index: int) -> Saver:
        return lambda spec, paths: _selection(spec, paths, exclude, layers)[index]

    keys = [
        PeftKey(
            "target_modules",
            "targets",
            REQUIRED,
            NAMES,
            pick(0),
            _as_selector,
            why_required="surgeon needs the targeted modules named (PEFT fills them in from the "
            "model type)",
        )
    ]
    if exclude:
        keys.append(
            PeftKey(
                "exclude_modules",
                "exclude",
                None,
                NAMES.optional(),
                pick(1),
                lambda v, c, w: () if v is None else _as_selector(v, c, w),
            )
        )
    if layers:
        keys += [
            PeftKey("layers_to_transform", "layers", None, INDICES.optional(), pick(2)),
            PeftKey("layers_pattern", None, None, NAMES.optional(), load=_check_layers_pattern),
        ]
    return tuple(keys)


# -- a method's format ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftFormat:
    """How a method's spec reads from and writes to PEFT's ``adapter_config.json``."""

    peft_type: str
    keys: tuple[PeftKey, ...] = ()
    switches: Mapping[str, Any] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)
    ignored: frozenset[str] = frozenset()
    claims_files: bool = True
    """Whether a PEFT file of ``peft_type`` may load as this method (QLoRA's files are LoRA's)."""

    def but(self, **changes: Any) -> PeftFormat:
        """This format with some parts changed (DoRA: LoRA's with ``use_dora`` on)."""
        return dataclasses.replace(self, **changes)

    def key_names(self) -> set[str]:
        return {k.key for k in self.keys}

    def write(self, spec: Any, paths: Sequence[str]) -> dict[str, Any]:
        config: dict[str, Any] = {"peft_type": self.peft_type}
        config.update(self.constants)
        config.update(self.switches)
        for key in self.keys:
            config[key.key] = key.write(spec, paths)
        return config

    def mismatched_switches(self, config: Mapping[str, Any]) -> list[str]:
        """The switches ``config`` sets otherwise than this method does."""
        return [
            key
            for key, value in self.switches.items()
            if not _switch_matches(config.get(key, SWITCH_DEFAULTS.get(key)), value)
        ]

    def claims(self, config: Mapping[str, Any]) -> bool:
        """Whether ``config`` (of this PEFT type) is this method: every switch as it sets it, and
        no variant on that it does not declare (a variant carried by a key, such as BD-LoRA's
        ``use_bdlora`` mapping, is its own method's; LoRA does not claim it). A sub-config
        mapping turns its variant on even empty, as PEFT builds it with its defaults."""
        declared = self.key_names() | set(self.switches)
        undeclared_on = any(
            variant_on(key, config.get(key)) for key in VARIANT_KEYS if key not in declared
        )
        return self.claims_files and not self.mismatched_switches(config) and not undeclared_on

    def read(self, config: Mapping[str, Any], where: str, owner: str) -> dict[str, Any]:
        """The spec fields ``config`` holds; `SpecError` naming the key for anything this
        method cannot honour or that has the wrong type."""
        for key in self.mismatched_switches(config):
            found = config.get(key, SWITCH_DEFAULTS.get(key))
            raise SpecError(
                f"{where}: {key}={found!r} selects a variant surgeon's {owner} does not support "
                f"(it needs {self.switches[key]!r}); loading it anyway would give different outputs"
            )
        declared = self.key_names() | set(self.switches) | set(self.constants) | self.ignored
        check_other_keys(config, declared, where)
        fields = {}
        for key in self.keys:
            value = key.read(config, where)
            if key.field is not None:
                fields[key.field] = value
        return fields

    def field_key(self, name: str) -> str | None:
        """The config key that carries spec field ``name``."""
        return next((k.key for k in self.keys if k.field == name), None)


def _switch_matches(found: Any, expected: Any) -> bool:
    return is_off(found) if is_off(expected) else found == expected


def check_other_keys(config: Mapping[str, Any], declared: set[str], where: str) -> None:
    """Keys a method does not declare: ignored when neutral or off, refused when they switch on
    a variant (loading it as something else would give other outputs), else ignored with a
    warning."""
    for key, value in config.items():
        if key in declared or key in NEUTRAL_KEYS:
            continue
        if key in VARIANT_KEYS:
            if variant_on(key, value):
                raise SpecError(
                    f"{where}: {key}={value!r} selects a variant surgeon does not support yet; "
                    f"loading it as plain {config.get('peft_type')} would give different outputs"
                )
            continue
        if is_off(value):
            continue
        if key.startswith("use_") or key.endswith("_config"):
            raise SpecError(
                f"{where}: unknown field {key}={value!r} looks like a variant switch; "
                f"refusing to load it as something else"
            )
        warnings.warn(
            f"{where}: ignoring unknown adapter_config.json field {key}={value!r}", stacklevel=4
        )


# -- converters several methods use --------------------------------------------------------------


def choices(mapping: Mapping[Any, Any], what: str) -> Loader:
    """A loader that maps PEFT's values to the field's through ``mapping`` and refuses others."""

    def load(value: Any, config: Mapping[str, Any], where: str) -> Any:
        for peft_value, ours in mapping.items():
            if value == peft_value and type(value) is type(peft_value):
                return ours
        supported = ", ".join(_json_repr(v) for v in mapping)
        raise SpecError(f"{where}: {what}={value!r} is not supported (supported: {supported})")

    return load


def _json_repr(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type: it picks the PEFT model class that prepends the prompts (a prompt
    adapter saved without one does nothing in PEFT). Causal LMs get CAUSAL_LM (labels and
    generate handled); every other model FEATURE_EXTRACTION, the class that prepends prompts to
    any call: PEFT's SEQ_CLS and TOKEN_CLS would also expect the model's classification head in
    the file (``modules_to_save``), which a surgeon adapter does not own."""
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION" if hasattr(model, "get_input_embeddings") else None
