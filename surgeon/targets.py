"""Target selection: which modules of a model a method adapts.

Selectors follow PEFT's semantics so that PEFT configs mean the same thing here:
a list of names matches a module whose path equals the name or ends with ``.name``;
a string is a regex matched against the whole path, or one of the presets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from surgeon.errors import SpecError, closest
from surgeon.layers import gpt2_conv1d_type

PRESETS = ("attention", "mlp", "all-linear")
LAYER_CONTAINERS = ("layers", "h", "block", "blocks", "layer")
# Lazy prefix: the first container index counts, as in PEFT (T5's block.1.layer.0 is layer 1).
_LAYER_INDEX = re.compile(rf"(?:^|.*?\.)(?:{'|'.join(LAYER_CONTAINERS)})\.(\d+)(?:\.|$)")
_ATTENTION_WORDS = ("attn", "attention")
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "feedforward", "intermediate", "output", "fc")


def linear_types() -> tuple[type, ...]:
    """Layer types that count as "linear" for presets (PEFT counts GPT-2's Conv1D too)."""
    types: list[type] = [nn.Linear]
    conv1d = gpt2_conv1d_type()
    if conv1d is not None:
        types.append(conv1d)
    return tuple(types)


def layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.match(path)
    return int(match.group(1)) if match else None


def matches_suffix(path: str, suffix: str) -> bool:
    return path == suffix or path.endswith("." + suffix)


def matches_selector(path: str, selector: str | Sequence[str]) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return any(matches_suffix(path, s) for s in selector)


def _is_attention(path: str) -> bool:
    return any(w in part.lower() for part in path.split(".")[:-1] for w in _ATTENTION_WORDS)


def _is_mlp(path: str) -> bool:
    parts = [p.lower() for p in path.split(".")[:-1]]
    return not _is_attention(path) and any(any(w in p for w in _MLP_WORDS) for p in parts)


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def preset_paths(model: nn.Module, preset: str) -> list[str]:
    linear = linear_types()
    head = output_head(model)
    paths = [p for p, m in model.named_modules() if p and isinstance(m, linear) and m is not head]
    if preset == "attention":
        return [p for p in paths if _is_attention(p)]
    if preset == "mlp":
        return [p for p in paths if _is_mlp(p)]
    return paths


def select_targets(
    model: nn.Module,
    owner: str,
    targets: str | Sequence[str],
    supported: Callable[[nn.Module], bool],
    layers: Sequence[int] | None = None,
    exclude: str | Sequence[str] = (),
) -> list[str]:
    """Module paths that ``targets`` selects, after ``layers`` and ``exclude``.

    Every selector must match something, and every matched module must be one the method
    supports; otherwise `SpecError` names the selector and suggests close module names.
    """
    modules = dict(model.named_modules())
    modules.pop("", None)
    matched = _match_each_selector(model, modules, owner, targets)
    unsupported = [p for p in matched if not supported(modules[p])]
    if unsupported and (not isinstance(targets, str) or targets not in PRESETS):
        shown = ", ".join(f"{p} ({type(modules[p]).__name__})" for p in unsupported[:3])
        raise SpecError(
            f"{owner}.targets={show_selector(targets)} matches {shown}{' ...' if len(unsupported) > 3 else ''}, "
            f"which {owner} cannot adapt; target the layers inside instead"
        )
    selected = [p for p in matched if p not in set(unsupported)]
    if not selected:  # a preset whose every layer the method cannot adapt
        kinds = ", ".join(sorted({type(modules[p]).__name__ for p in unsupported}))
        raise SpecError(
            f"{owner}.targets={show_selector(targets)} selects only layers {owner} cannot adapt "
            f"({kinds}); name the layers to adapt instead"
        )
    if layers is not None:
        selected = [p for p in selected if layer_index(p) in set(layers)]
        if not selected:
            found = sorted({i for p in matched if (i := layer_index(p)) is not None})
            raise SpecError(
                f"{owner}.layers={list(layers)}: no targeted module lies in those layers "
                f"(targeted modules are in layers {found or 'none (no layer index in their paths)'})"
            )
    if exclude:
        dropped = set(preset_paths(model, exclude)) if exclude in PRESETS else None
        kept = [
            p
            for p in selected
            if not (p in dropped if dropped is not None else matches_selector(p, exclude))
        ]
        if len(kept) == len(selected):
            raise SpecError(
                f"{owner}.exclude={show_selector(exclude)} matches none of the targeted modules"
            )
        if not kept:
            raise SpecError(
                f"{owner}.exclude={show_selector(exclude)} excludes every targeted module"
            )
        selected = kept
    return selected


def _match_each_selector(
    model: nn.Module, modules: dict[str, nn.Module], owner: str, targets: str | Sequence[str]
) -> list[str]:
    names = list(modules)
    if isinstance(targets, str):
        if targets in PRESETS:
            hits = preset_paths(model, targets)
        else:
            hits = [p for p in names if re.fullmatch(targets, p)]
        if not hits:
            raise SpecError(f"{owner}.targets={targets!r} matches no module{_hint(targets, names)}")
        return hits
    hits: list[str] = []
    for suffix in targets:
        found = [p for p in names if matches_suffix(p, suffix)]
        if not found:
            raise SpecError(f"{owner}.targets: {suffix!r} matches no module{_hint(suffix, names)}")
        hits.extend(p for p in found if p not in hits)
    return [p for p in names if p in set(hits)]


def _hint(word: str, paths: Sequence[str]) -> str:
    suffixes = {p.split(".")[-1] for p in paths} | {".".join(p.split(".")[-2:]) for p in paths}
    near = closest(word, sorted(suffixes)) or closest(word, paths)
    if near:
        return f"; closest module names: {', '.join(near)}"
    sample = sorted({p.split(".")[-1] for p in paths})[:8]
    return f"; module names include: {', '.join(sample)}"


def show_selector(selector: str | Sequence[str]) -> str:
    """A target selector as error messages show it (a name or pattern, or a list of them)."""
    return repr(selector) if isinstance(selector, str) else repr(list(selector))


def peft_selection(
    spec: Any, paths: Sequence[str]
) -> tuple[str | list[str], str | list[str] | None, list[int] | None]:
    """``target_modules``, ``exclude_modules``, ``layers_to_transform`` for PEFT's adapter_config.json.

    The user's selectors are kept where PEFT reads them the same way; otherwise (presets PEFT
    lacks, a regex together with layers, which PEFT refuses) the chosen module paths are written.
    """
    targets, exclude, layers = spec.targets, spec.exclude, spec.layers
    exact = (
        targets not in ("attention", "mlp")
        and exclude not in PRESETS
        and not (isinstance(targets, str) and layers is not None)
    )
    if not exact:
        return sorted(paths), None, None
    return (
        list(targets) if isinstance(targets, tuple) else targets,
        (list(exclude) if isinstance(exclude, tuple) else exclude) or None,
        list(layers) if layers is not None else None,
    )


def matches_pattern_key(key: str, path: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule: the key, as a regex, matches the end of the path."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def pattern_value(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    """The value of the first pattern key that matches ``path``, else ``default``."""
    for key, value in patterns.items():
        if matches_pattern_key(key, path):
            return value
    return default


def pattern_entry(
    name: str, patterns: Mapping[str, Any], path: str, default: Any
) -> tuple[str, Any]:
    """`pattern_value` with the field it came from, for an error to name: ``name`` or
    ``<name>_pattern[key]``."""
    for key, value in patterns.items():
        if matches_pattern_key(key, path):
            return f"{name}_pattern[{key!r}]", value
    return name, default


def check_pattern_keys(
    owner: str, field: str, patterns: Mapping[str, Any], paths: Sequence[str]
) -> None:
    for key in patterns:
        if not any(matches_pattern_key(key, p) for p in paths):
            raise SpecError(f"{owner}.{field}: key {key!r} matches no targeted module")
