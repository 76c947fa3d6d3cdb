"""What torch's machinery says during surgeon's calls into it, sorted: expected, or for the user.

surgeon traces modules on fake tensors, where a refused trace is an answer rather than a failure,
and exports through torch.onnx, which reports on packages it can do without and on axis names
it merges. Those messages help whoever debugs surgeon, not its users: `expected_noise` sends
them to surgeon's loggers (``surgeon.*``) at DEBUG. Anything else said meanwhile (a warning
surgeon does not know to be expected, a record of another logger) reaches the user as before.

To read them::

    logging.basicConfig()
    logging.getLogger("surgeon").setLevel(logging.DEBUG)
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["ONNX_EXPORT", "TRACING", "Expected", "expected_noise"]


@dataclass(frozen=True)
class Expected:
    """What one kind of call into torch is known to say.

    ``records``: (logger name, message regex) for records of that very logger (`re.search`;
    an empty pattern takes all of them); ``warnings``: (category, regex the message starts with).
    """

    records: tuple[tuple[str, str], ...] = ()
    warnings: tuple[tuple[type[Warning], str], ...] = ()


TRACING = Expected(
    records=(
        # an op that fails on fake tensors (a trace surgeon then refuses) logs its traceback
        ("torch._subclasses.fake_tensor", ""),
        # a guard it failed to evaluate (a refused trace too); its symbols and guards when
        # torch's logging is turned up (TORCH_LOGS=dynamic)
        ("torch.fx.experimental.symbolic_shapes", ""),
    ),
)

ONNX_EXPORT = Expected(
    records=(("torch.onnx._internal.exporter._registration", r"^torchvision is not installed"),),
    warnings=(
        # torch.export copies its own tree specs, which torch itself deprecates
        (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
        # every input names its batch and sequence axes alike: one name is kept per axis
        (UserWarning, r"# The axis name: .* will not be used, since it shares"),
    ),
)


@contextlib.contextmanager
def expected_noise(expected: Expected, logger: logging.Logger) -> Iterator[None]:
    """Within the block, ``expected``'s records and warnings go to ``logger`` at DEBUG.

    Warnings are caught for the block only (the user's filters apply again outside it, and
    inside it to every warning not expected); the others are passed on as they came once the
    block ends. Expected warnings are caught even where the user's filters turn warnings into
    errors: torch's own deprecations must not fail an export."""
    caught: list[warnings.WarningMessage] = []
    try:
        with _records_diverted(expected, logger), _warnings_caught(expected, caught):
            yield
    finally:
        _pass_on(caught, expected, logger)


class _ToDebug(logging.Filter):
    """On one of torch's loggers: the records it expects go to surgeon's logger instead."""

    def __init__(self, pattern: str, logger: logging.Logger) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.logger = logger

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not self.pattern.search(message):
            return True
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("%s: %s", record.name, message, exc_info=record.exc_info)
        return False


@contextlib.contextmanager
def _records_diverted(expected: Expected, logger: logging.Logger) -> Iterator[None]:
    filters = [(logging.getLogger(name), _ToDebug(p, logger)) for name, p in expected.records]
    for source, diverting in filters:
        source.addFilter(diverting)
    try:
        yield
    finally:
        for source, diverting in filters:
            source.removeFilter(diverting)


@contextlib.contextmanager
def _warnings_caught(expected: Expected, caught: list[warnings.WarningMessage]) -> Iterator[None]:
    with warnings.catch_warnings(record=True) as log:
        for category, pattern in expected.warnings:
            warnings.filterwarnings("always", message=pattern, category=category)
        try:
            yield
        finally:
            caught.extend(log)


def _pass_on(
    caught: list[warnings.WarningMessage], expected: Expected, logger: logging.Logger
) -> None:
    for w in caught:
        if _is_expected(w, expected):
            logger.debug("%s:%s: %s: %s", w.filename, w.lineno, w.category.__name__, w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _is_expected(w: warnings.WarningMessage, expected: Expected) -> bool:
    return any(
        # as the filters `warnings.filterwarnings` makes match them
        issubclass(w.category, category) and re.match(pattern, str(w.message), re.IGNORECASE)
        for category, pattern in expected.warnings
    )
