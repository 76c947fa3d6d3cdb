"""What training leaves to read: its history as transformers writes it, curves, TensorBoard.

* ``trainer_state.json``: `transformers.TrainerState`'s fields, so the tools that read a
  Trainer's runs read ours (``TrainerState.load_from_json`` included). Its ``log_history`` holds
  ``{loss, grad_norm, learning_rate, epoch, step}`` every ``logging_steps``, ``{eval_loss, epoch,
  step}`` at each evaluation and a last ``{train_runtime, train_samples_per_second,
  train_steps_per_second, train_loss, epoch, step}``, as the Trainer logs them.
* ``training_curves.svg``: training and eval loss above, learning rate below, against the step;
  written here without a plotting library. ``training_curves.png`` too when matplotlib is
  importable.
* TensorBoard (``report_to="tensorboard"``): each log entry as scalars named as transformers'
  ``TensorBoardCallback`` names them (``train/loss``, ``eval/loss``, ...), in
  ``$TENSORBOARD_LOGGING_DIR`` or ``output_dir/runs/<time>_<host>``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from surgeon.errors import SpecError, did_you_mean
from surgeon.io import atomic_write

TRAINER_STATE = "trainer_state.json"
CURVES_SVG = "training_curves.svg"
CURVES_PNG = "training_curves.png"
REPORTERS = ("none", "tensorboard")
TENSORBOARD_DIR_ENV = "TENSORBOARD_LOGGING_DIR"
TRAINER_STATE_DEFAULT_STEPS = 500
"""What `transformers.TrainerState` holds for logging/eval/save steps a run does not set."""

Entry = dict[str, float]


# -- configuration ----------------------------------------------------------------------------


def check_report_to(owner: str, value: Any, output_dir: str | None) -> tuple[str, ...]:
    """``report_to`` as transformers takes it (a name, or a list of names; ``"none"``: no
    integration), as the tuple of integrations to feed. Raises `SpecError` for a name we do not
    support, for TensorBoard when it is not installed, or when it has nowhere to write."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise SpecError(
            f"{owner}.report_to={value!r}: expected 'none', 'tensorboard' or a list of these"
        )
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise SpecError(
            f"{owner}.report_to={value!r}: {unknown[0]!r} is not supported (surgeon reports to "
            f"'tensorboard' or 'none', and writes trainer_state.json and loss curves to "
            f"output_dir in any case){did_you_mean(unknown[0], REPORTERS)}"
        )
    chosen = tuple(dict.fromkeys(n for n in names if n != "none"))
    if "tensorboard" in chosen:
        _check_tensorboard(owner, value, output_dir)
    return chosen


def _check_tensorboard(owner: str, value: Any, output_dir: str | None) -> None:
    if not installed("tensorboard"):
        raise SpecError(
            f"{owner}.report_to={value!r}: the tensorboard package is not installed; "
            f"pip install tensorboard (or set report_to='none')"
        )
    if output_dir is None and not os.environ.get(TENSORBOARD_DIR_ENV):
        raise SpecError(
            f"{owner}.report_to={value!r}: TensorBoard writes its events under "
            f"output_dir/runs; set output_dir (or the {TENSORBOARD_DIR_ENV} environment variable)"
        )


def installed(package: str) -> bool:
    """Whether an optional package can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


# -- log entries and trainer_state.json --------------------------------------------------------


def train_entry(
    loss: float, grad_norm: float | None, learning_rate: float, epoch: float, step: int
) -> Entry:
    """A logging step's entry: ``loss`` is the mean of the steps' losses since the last one,
    ``grad_norm`` the last step's before clipping (absent when no step of this call has one)."""
    entry = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate}
    return {
        **{k: v for k, v in entry.items() if v is not None},
        "epoch": epoch,
        "step": step,
    }


def eval_entry(loss: float, epoch: float, step: int) -> Entry:
    return {"eval_loss": loss, "epoch": epoch, "step": step}


def summary_entry(
    runtime: float, samples: int, steps: int, losses: Sequence[float], epoch: float, step: int
) -> Entry:
    """The Trainer's closing entry. ``train_loss`` is the mean over every step of the run, those
    before a resume included, so a resumed run reports what an uninterrupted one does; the
    speeds count this call's ``samples`` and ``steps`` only."""
    out: Entry = {"train_runtime": round(runtime, 4)}
    if runtime > 0:
        out["train_samples_per_second"] = round(samples / runtime, 3)
        out["train_steps_per_second"] = round(steps / runtime, 3)
    out["train_loss"] = sum(losses) / max(len(losses), 1)
    return {**out, "epoch": epoch, "step": step}


@dataclass(frozen=True)
class RunShape:
    """What `transformers.TrainerState` records about the run beside its history."""

    max_steps: int
    num_train_epochs: int
    train_batch_size: int
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None


def trainer_state(
    shape: RunShape,
    log_history: Sequence[Entry],
    step: int,
    epoch: float,
    best: tuple[int, float] | None,
    best_checkpoint: str | None,
) -> dict[str, Any]:
    """The fields of `transformers.TrainerState`, as its ``save_to_json`` writes them (only the
    world's process zero writes: it says so). ``best``: the lowest eval loss and its step."""
    default = TRAINER_STATE_DEFAULT_STEPS
    return {
        "best_global_step": best[0] if best else None,
        "best_metric": best[1] if best else None,
        "best_model_checkpoint": best_checkpoint,
        "epoch": epoch,
        "eval_steps": shape.eval_steps or default,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": [dict(e) for e in log_history],
        "logging_steps": shape.logging_steps,
        "max_steps": shape.max_steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": shape.num_train_epochs,
        "save_steps": shape.save_steps or default,
        "stateful_callbacks": {},
        "total_flos": 0,
        "train_batch_size": shape.train_batch_size,
        "trial_name": None,
        "trial_params": None,
    }


def write_trainer_state(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically, formatted as ``TrainerState.save_to_json`` formats it."""
    text = json.dumps(dict(state), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# -- curves -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One curve: its name, colour and (step, value) points (finite values only)."""

    name: str
    color: str
    points: list[tuple[int, float]]


def loss_series(log_history: Sequence[Entry]) -> list[Series]:
    """Training loss at each logging step, eval loss at each evaluation (when there are any)."""
    out = [Series("train loss", "#1f77b4", _points(log_history, "loss"))]
    evals = _points(log_history, "eval_loss")
    if evals:
        out.append(Series("eval loss", "#ff7f0e", evals))
    return out


def learning_rate_series(log_history: Sequence[Entry]) -> list[Series]:
    return [Series("learning rate", "#2ca02c", _points(log_history, "learning_rate"))]


def _points(log_history: Sequence[Entry], key: str) -> list[tuple[int, float]]:
    return [
        (int(e["step"]), float(e[key]))
        for e in log_history
        if key in e and math.isfinite(float(e[key]))
    ]


def write_curves(output_dir: Path, log_history: Sequence[Entry]) -> list[Path]:
    """``training_curves.svg``, and ``training_curves.png`` when matplotlib is importable;
    returns the paths written."""
    svg = output_dir / CURVES_SVG
    text = curves_svg(log_history)
    atomic_write(svg, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    if not installed("matplotlib"):
        return [svg]
    png = output_dir / CURVES_PNG
    try:
        atomic_write(png, lambda tmp: _write_png(tmp, log_history))
    except ImportError as err:  # a broken optional install must not fail a finished training
        warnings.warn(f"{png} not written: matplotlib does not import ({err})", stacklevel=2)
        return [svg]
    return [svg, png]


WIDTH, HEIGHT = 760, 560
LEFT, RIGHT, TOP, BOTTOM, GAP = 84, 28, 48, 52, 56
MARKERS_UP_TO = 40
"""Series with at most this many points also get a dot at each (one point draws no line)."""


@dataclass(frozen=True)
class _Panel:
    """A plotting area in SVG coordinates and the data range it shows."""

    top: float
    height: float
    x_ticks: list[float]
    y_ticks: list[float]

    @property
    def left(self) -> float:
        return LEFT

    @property
    def width(self) -> float:
        return WIDTH - LEFT - RIGHT

    def x(self, value: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (value - lo) / (hi - lo) * self.width

    def y(self, value: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.top + self.height - (value - lo) / (hi - lo) * self.height


def curves_svg(log_history: Sequence[Entry]) -> str:
    """Two panels sharing the step axis: the losses above, the learning rate below."""
    losses, rates = loss_series(log_history), learning_rate_series(log_history)
    steps = [s for series in (*losses, *rates) for s, _ in series.points]
    x_ticks = nice_ticks(0, max(steps, default=1), integer=True)
    height = (HEIGHT - TOP - BOTTOM - GAP) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15">Training</text>',
    ]
    for top, series, label in (
        (TOP, losses, "loss"),
        (TOP + height + GAP, rates, "learning rate"),
    ):
        panel = _Panel(top, height, x_ticks, _value_ticks(series))
        parts += _axes(panel, label, x_label=series is rates)  # the shared axis, named once
        parts += [line for s in series for line in _curve(panel, s)]
        parts += _legend(panel, series)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _value_ticks(series: Sequence[Series]) -> list[float]:
    """Ticks spanning the values with a margin, so that no point sits on the frame (none
    below zero for values that are not: a learning rate is never negative)."""
    values = [v for s in series for _, v in s.points]
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    margin = (hi - lo) * 0.05
    return nice_ticks(lo - margin if lo < 0 else max(0.0, lo - margin), hi + margin)


def _axes(panel: _Panel, y_label: str, x_label: bool) -> list[str]:
    """Frame, grid, ticks and their labels, axis labels."""
    bottom, right = panel.top + panel.height, panel.left + panel.width
    out = [
        f'<rect x="{panel.left}" y="{panel.top:.1f}" width="{panel.width}" '
        f'height="{panel.height:.1f}" fill="none" stroke="#444"/>'
    ]
    for value, text in zip(panel.y_ticks, tick_labels(panel.y_ticks)):
        y = panel.y(value)
        out.append(_grid_line(panel.left, y, right, y))
        out.append(_tick(panel.left - 5, y, panel.left, y))
        out.append(
            f'<text x="{panel.left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(text)}</text>'
        )
    for value, text in zip(panel.x_ticks, tick_labels(panel.x_ticks)):
        x = panel.x(value)
        out.append(_grid_line(x, panel.top, x, bottom))
        out.append(_tick(x, bottom, x, bottom + 5))
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 18:.1f}" text-anchor="middle">{escape(text)}</text>'
        )
    middle = panel.top + panel.height / 2
    out.append(
        f'<text x="18" y="{middle:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 18 {middle:.1f})">{escape(y_label)}</text>'
    )
    if x_label:
        out.append(
            f'<text x="{panel.left + panel.width / 2}" y="{bottom + 36:.1f}" '
            f'text-anchor="middle">step</text>'
        )
    return out


def _grid_line(x1: float, y1: float, x2: float, y2: float) -> str:
    return _line(x1, y1, x2, y2, 'stroke="#ddd" stroke-width="0.5"')


def _tick(x1: float, y1: float, x2: float, y2: float) -> str:
    return _line(x1, y1, x2, y2, 'stroke="#444"')


def _line(x1: float, y1: float, x2: float, y2: float, style: str) -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" {style}/>'


def _curve(panel: _Panel, series: Series) -> list[str]:
    """The series' polyline (``data-series`` names it), and dots when there are few points."""
    xy = [(panel.x(s), panel.y(v)) for s, v in series.points]
    points = " ".join(f"{x:.2f},{y:.2f}" for x, y in xy)
    name = escape(series.name, {'"': "&quot;"})
    out = [
        f'<polyline data-series="{name}" points="{points}" fill="none" '
        f'stroke="{series.color}" stroke-width="1.6" stroke-linejoin="round"/>'
    ]
    if len(xy) <= MARKERS_UP_TO:
        out += [f'<circle cx="{x:.2f}" cy="{y:.2f}" r="2.5" fill="{series.color}"/>' for x, y in xy]
    return out


def _legend(panel: _Panel, series: Sequence[Series]) -> list[str]:
    """Above the panel, left to right: it never hides a curve."""
    out, x, y = [], panel.left, panel.top - 8
    for s in series:
        out.append(_line(x, y - 4, x + 20, y - 4, f'stroke="{s.color}" stroke-width="2"'))
        out.append(f'<text x="{x + 26}" y="{y:.1f}">{escape(s.name)}</text>')
        x += 46 + 7 * len(s.name)
    return out


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering
    ``[lo, hi]``; the first and last bound the axis. An empty range is widened around its value."""
    if hi <= lo:
        half = abs(lo) / 2 or 0.5
        lo, hi = lo - half, hi + half
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    spacing = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        spacing = max(1, math.ceil(spacing))
    first, last = math.floor(lo / spacing), math.ceil(hi / spacing)
    return [k * spacing for k in range(first, last + 1)]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """As few digits as tell the ticks apart; scientific notation for very small or large ones."""
    largest = max(abs(t) for t in ticks)
    if largest and not 1e-3 <= largest < 1e6:
        return [f"{t:.1e}" if t else "0" for t in ticks]
    spacing = ticks[1] - ticks[0]
    decimals = max(0, -math.floor(math.log10(spacing) + 1e-9))
    decimals += _half_step(spacing, decimals)
    return [f"{t:.{decimals}f}" if abs(t) > spacing / 2 else "0" for t in ticks]


def _half_step(spacing: float, decimals: int) -> int:
    """One more decimal when the spacing is 2.5 times a power of ten (0.25 needs two)."""
    scaled = spacing * 10**decimals
    return 0 if abs(scaled - round(scaled)) < 1e-6 else 1


def _write_png(path: str, log_history: Sequence[Entry]) -> None:
    """The same panels through matplotlib, without pyplot (whose global state and backend
    belong to the user)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for axes, series, label in (
        (top, loss_series(log_history), "loss"),
        (bottom, learning_rate_series(log_history), "learning rate"),
    ):
        for s in series:
            steps = [p[0] for p in s.points]
            values = [p[1] for p in s.points]
            marker = "o" if len(steps) <= MARKERS_UP_TO else None
            axes.plot(steps, values, color=s.color, label=s.name, marker=marker, markersize=3)
        axes.set_ylabel(label)
        axes.grid(True, linewidth=0.5, color="#ddd")
        axes.legend(loc="best")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("step")
    top.set_title("Training")
    figure.savefig(path, format="png")


# -- TensorBoard ------------------------------------------------------------------------------


class TensorBoard:
    """Log entries as TensorBoard scalars, named as transformers' ``TensorBoardCallback`` names
    them: ``eval_<x>`` as ``eval/<x>``, everything else as ``train/<x>``."""

    def __init__(self, output_dir: str | None, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(os.environ.get(TENSORBOARD_DIR_ENV) or default_log_dir(output_dir))
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("args", json.dumps(dict(config), indent=2, default=str))

    def add(self, entry: Mapping[str, float]) -> None:
        step = int(entry["step"])
        for key, value in entry.items():
            if key != "step":
                self.writer.add_scalar(tensorboard_tag(key), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def default_log_dir(output_dir: str | None) -> Path:
    """transformers' default: ``output_dir/runs/<Mon DD_HH-MM-SS>_<host>``."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    return Path(output_dir or ".") / "runs" / f"{stamp}_{socket.gethostname()}"


def tensorboard_tag(key: str) -> str:
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
