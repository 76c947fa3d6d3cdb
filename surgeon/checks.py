"""Field checks for declarative specs: each returns the value (normalised) or raises `SpecError`
naming the owner, the field, the value and what is allowed.

`ValidatingMeta` turns unknown or surplus constructor arguments of a spec dataclass into
`SpecError` as well, so every way of building a spec fails the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from surgeon.errors import SpecError, did_you_mean
from surgeon.targets import PRESETS


def spec_fields(cls: type) -> list[dataclasses.Field]:
    """A spec's own fields first, then the ones every method shares (keyword-only)."""
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    return [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]


class ValidatingMeta(type):
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


def is_int(value: Any) -> bool:
    """An integer, not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(owner: str, field: str, value: Any, minimum: int = 1) -> int:
    if not is_int(value) or value < minimum:
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


def check_finite(owner: str, field: str, value: Any) -> float:
    """Any finite number, zero and negative ones included (a scale PEFT takes as it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{owner}.{field}={value!r}: expected a finite number")
    return value


SEEDS = (-(2**63), 2**64 - 1)
"""The seeds `torch.Generator.manual_seed` takes."""


def check_seed(owner: str, field: str, value: Any) -> int:
    low, high = SEEDS
    if not is_int(value) or not low <= value <= high:
        raise SpecError(f"{owner}.{field}={value!r}: expected an integer from {low} to {high}")
    return value


def check_probability(owner: str, field: str, value: Any) -> float:
    """A dropout probability: in [0, 1)."""
    return check_number(owner, field, value, 0, 1, low_inclusive=True)


def check_positive(owner: str, field: str, value: Any) -> float:
    return check_number(owner, field, value, 0)


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


def check_pattern_map(
    owner: str, field: str, value: Any, check_value: Callable[[str, str, Any], Any]
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{owner}.{field}={value!r}: expected a mapping of module pattern -> value")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise SpecError(f"{owner}.{field}: key {key!r} must be a non-empty module pattern")
        check_regex(owner, f"{field}[{key!r}]", key)
        out[key] = check_value(owner, f"{field}[{key!r}]", item)
    return out
