"""Errors raised by surgeon."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpecError(ValueError):
    """An invalid spec, spec file, target selection or adapter file.

    The message names the offending field or path, the value, and what is allowed.
    """


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates that look most like ``word`` (for "did you mean" hints)."""
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    hits = closest(word, candidates)
    return f"; did you mean {' or '.join(repr(h) for h in hits)}?" if hits else ""
