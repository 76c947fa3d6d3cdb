"""`surgeon.train`: fine-tune a compiled model's adapters.

AdamW over the parameters the compiled model trains (its active adapters, plus base parameters
a method or the user made trainable), or LoRA-FA / Riemannian-preconditioned AdamW on LoRA's
factors (`surgeon.optimizers`), with warmup and a linear, cosine or constant schedule
(transformers' definitions), gradient clipping, and gradient accumulation that is exactly the
large batch: every micro-batch's mean loss is weighted by its share of the step's items (label
tokens that are not -100, after the shift a causal LM applies; samples otherwise), counted over
all micro-batches of the step and all processes. Method hooks (``cm.regularization_loss()`` and
``cm.update_ranks(step)``, AdaLoRA's) run every step. Checkpoints resume exactly and rotate;
the best evaluation's weights can be loaded at the end, and training can stop early (as
transformers' Trainer); DDP and FSDP2 run through ``torchrun``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon import checkpoint, distributed, history, optimizers
from surgeon.adapter import loraplus_group_by_shape
from surgeon.best import Snapshot, best_evaluation, evaluations_without_improvement
from surgeon.checkpoint import Progress
from surgeon.checks import ValidatingMeta, check_bool, check_choice, check_int, check_number
from surgeon.compiled import CompiledModel
from surgeon.data import (
    Batch,
    Source,
    check_dataset,
    collate,
    count_items,
    pad_token_id,
    rows,
    to_device,
)
from surgeon.distributed import Parallel, full
from surgeon.errors import SpecError
from surgeon.spec import MethodSpec

logger = logging.getLogger("surgeon.train")

SCHEDULES = ("linear", "cosine", "constant")
LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss_fn(outputs, labels)``: the mean loss over the micro-batch's samples."""


@dataclass(frozen=True)
class TrainingConfig(metaclass=ValidatingMeta):
    """How `train` trains. Invalid values raise `SpecError` when the config is built.

    ``epochs`` may be fractional; ``max_steps`` (optimizer steps) overrides it. A step is
    ``batch_size x gradient_accumulation_steps`` samples per process. ``lr_scheduler`` decays
    after ``warmup_steps`` of linear warmup (``constant`` keeps the rate after warmup).
    ``max_grad_norm`` None or 0 turns clipping off. With ``output_dir``, checkpoints go to
    ``output_dir/checkpoint-<step>`` every ``save_steps`` and at the end; ``save_total_limit``
    keeps the newest that many ``checkpoint-<step>`` directories of ``output_dir`` (those of an
    earlier run too); with ``load_best_at_end`` the best evaluation's is one of them (as in
    transformers: two are kept when the limit is 1). ``eval_steps``: how
    often to evaluate ``eval_data`` (it is also evaluated at the end). ``load_best_at_end``:
    end with the weights of the evaluation with the lowest loss (the final checkpoint still holds
    the last step's). ``early_stopping_patience``: stop once that many evaluations in a row did
    not lower the best eval loss by more than ``early_stopping_threshold``. ``loraplus_lr_ratio``
    (LoRA+): B matrices and vectors learn at ``learning_rate x ratio``, embedding adapters at
    ``loraplus_lr_embedding``, grouped as PEFT's ``create_loraplus_optimizer``. ``optimizer``:
    ``adamw``; ``lorafa`` (LoRA-FA, PEFT's ``create_lorafa_optimizer``: the A factors stay frozen
    during training, B's gradient is projected through A, transformers' legacy AdamW with eps
    1e-6); ``riemannian`` (PEFT's ``create_riemannian_optimizer`` over AdamW: A's and B's
    gradients preconditioned by ``(BᵀB + riemannian_reg I)⁻¹`` and ``(AAᵀ + riemannian_reg I)⁻¹``).
    Both need LoRA adapters (LoRA-FA: not DoRA, on Linear and Conv1D layers), and neither
    combines with ``loraplus_lr_ratio`` (PEFT builds them apart); ``flora`` (Flora,
    arXiv:2402.03293, `surgeon.optimizers.Flora`: Adafactor whose first moment of every trained
    matrix with both sides above ``flora_rank`` is kept as a ``min(n, m) x flora_rank``
    projection through a seeded Gaussian matrix, redrawn every ``flora_kappa`` steps with the
    state moved onto it; any method, LoRA+ groups kept; ``learning_rate`` is the step size, as
    with AdamW). ``bf16``:
    autocast to bfloat16 (CPU too). ``distributed``: ``auto`` uses DDP when a process group
    with more than one process exists (or ``torchrun`` started this one), ``fsdp`` shards with
    FSDP2, ``none`` trains in this process alone. With ``output_dir``, training also writes its
    history there (``trainer_state.json`` as transformers' ``Trainer`` does, and loss and
    learning-rate curves, see `surgeon.history`). ``report_to``: ``"tensorboard"`` (or a list
    holding it) also logs the history to TensorBoard, under ``output_dir/runs``.
    """

    learning_rate: float = 1e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    epochs: float = 3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    lr_scheduler: str = "linear"
    max_steps: int | None = None
    seed: int = 42
    shuffle: bool = True
    output_dir: str | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    eval_steps: int | None = None
    load_best_at_end: bool = False
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6
    optimizer: str = "adamw"
    riemannian_reg: float = 1e-2
    bf16: bool = False
    distributed: str = "auto"
    progress: bool = True
    report_to: str | Sequence[str] = "none"
    flora_rank: int = 256
    flora_kappa: int = 1000

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_number(o, "learning_rate", self.learning_rate, 0)
        check_int(o, "batch_size", self.batch_size)
        check_int(o, "gradient_accumulation_steps", self.gradient_accumulation_steps)
        check_number(o, "epochs", self.epochs, 0)
        check_int(o, "warmup_steps", self.warmup_steps, minimum=0)
        check_number(o, "weight_decay", self.weight_decay, 0, low_inclusive=True)
        if self.max_grad_norm is not None:
            check_number(o, "max_grad_norm", self.max_grad_norm, 0, low_inclusive=True)
        check_choice(o, "lr_scheduler", self.lr_scheduler, SCHEDULES)
        for name in (
            "max_steps",
            "save_steps",
            "save_total_limit",
            "eval_steps",
            "early_stopping_patience",
        ):
            if getattr(self, name) is not None:
                check_int(o, name, getattr(self, name))
        threshold = self.early_stopping_threshold
        check_number(o, "early_stopping_threshold", threshold, 0, low_inclusive=True)
        check_int(o, "seed", self.seed, minimum=0)
        check_int(o, "logging_steps", self.logging_steps)
        for name in ("shuffle", "gradient_checkpointing", "bf16", "progress", "load_best_at_end"):
            check_bool(o, name, getattr(self, name))
        if self.loraplus_lr_ratio is not None:
            check_number(o, "loraplus_lr_ratio", self.loraplus_lr_ratio, 0)
        check_number(o, "loraplus_lr_embedding", self.loraplus_lr_embedding, 0)
        check_choice(o, "optimizer", self.optimizer, optimizers.OPTIMIZERS)
        check_number(o, "riemannian_reg", self.riemannian_reg, 0, low_inclusive=True)
        check_int(o, "flora_rank", self.flora_rank)
        check_int(o, "flora_kappa", self.flora_kappa)
        if self.optimizer in optimizers.FACTOR_OPTIMIZERS and self.loraplus_lr_ratio is not None:
            raise SpecError(
                f"{o}.optimizer={self.optimizer!r}: does not combine with loraplus_lr_ratio="
                f"{self.loraplus_lr_ratio} (PEFT builds LoRA+ and this optimizer apart); set one"
            )
        check_choice(o, "distributed", self.distributed, distributed.KINDS)
        self._check_output_dir(o)
        if isinstance(self.report_to, list):  # a frozen config holds no mutable value
            object.__setattr__(self, "report_to", tuple(self.report_to))
        history.check_report_to(o, self.report_to, self.output_dir)
        for name, value in self._selecting_by_eval_loss().items():
            if self.eval_steps is None:
                raise SpecError(
                    f"{o}.{name}={value!r}: needs evaluations during training; set eval_steps "
                    f"(and pass eval_data to train)"
                )

    def _check_output_dir(self, owner: str) -> None:
        if self.output_dir is not None:
            if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
                raise SpecError(
                    f"{owner}.output_dir={self.output_dir!r}: expected a directory path or None"
                )
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
            return
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) is not None:
                raise SpecError(
                    f"{owner}.{name}={getattr(self, name)}: checkpoints need output_dir; set "
                    f"output_dir or leave {name} None"
                )

    def _selecting_by_eval_loss(self) -> dict[str, Any]:
        """The fields set that act on the eval losses (and so need evaluations), by name."""
        fields = {
            "load_best_at_end": self.load_best_at_end,
            "early_stopping_patience": self.early_stopping_patience,
        }
        return {name: value for name, value in fields.items() if value not in (None, False)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def reporters(self) -> tuple[str, ...]:
        """The integrations ``report_to`` names (``"none"`` names none)."""
        return history.check_report_to(type(self).__name__, self.report_to, self.output_dir)

    def replace(self, **changes: Any) -> TrainingConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class TrainResult:
    """``losses`` and ``learning_rates``: one per optimizer step (the step's mean loss over
    all processes, and the base learning rate it used); ``eval_losses``: ``(step, mean loss)``
    pairs; ``checkpoint``: the last checkpoint written, if any. A resumed run's lists start with
    the interrupted run's. ``best_step`` / ``best_eval_loss``: the evaluation with the lowest
    loss (the earliest on ties), None without evaluations; ``stopped_early``: early stopping
    ended the run before its last step. ``log_history``: the log entries as transformers'
    ``TrainerState.log_history`` holds them; ``trainer_state`` and ``plots`` (the SVG curves,
    then the PNG when matplotlib is installed): the files written to ``output_dir``."""

    steps: int
    losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False
    log_history: list[dict[str, float]] = field(default_factory=list)
    trainer_state: Path | None = None
    plots: list[Path] = field(default_factory=list)


def train(
    cm: Any,
    train_data: Any,
    config: TrainingConfig | None = None,
    eval_data: Any = None,
    resume_from: str | os.PathLike | bool | None = None,
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train ``cm``'s active adapters on ``train_data``.

    ``train_data`` / ``eval_data``: a list of samples, a map-style ``Dataset`` (batched,
    padded and ordered here, deterministically from ``config.seed``) or a ``DataLoader`` (used
    as it is). Samples are dicts of forward arguments; with ``labels`` the model's own ``loss``
    is used (transformers models). Otherwise pass ``loss_fn(outputs, labels)`` returning the
    micro-batch's mean loss: the model is then called without ``labels`` (dict samples) or with
    all but the last element (tuple samples, the last being the target).

    ``resume_from``: a checkpoint directory, or an output directory (its latest checkpoint), or
    True (the latest checkpoint in ``config.output_dir``); training continues exactly where that
    run stopped.
    """
    config = _check_config(config)
    resume_from = _resume_path(resume_from, config)
    _check_evaluation_data(config, eval_data)
    _check_model(cm)
    parallel = distributed.context(config.distributed)
    _check_methods(cm, parallel)
    _check_optimizer(config, parallel)
    pad = pad_token_id(cm.model)
    source = Source(
        train_data,
        config.batch_size,
        config.seed,
        config.shuffle,
        parallel.rank,
        parallel.world,
        pad,
    )
    _warn_unsharded_loader(train_data, parallel)
    if eval_data is not None and not isinstance(eval_data, torch.utils.data.DataLoader):
        check_dataset(eval_data, "eval_data")  # before training, not at the first evaluation
    total = total_steps(config, source)
    trained = optimized_parameters(cm, config)
    groups = parameter_groups(cm, trained, config)
    with optimizers.frozen(frozen_factors(cm, config)):
        return _train(
            cm, config, source, parallel, trained, groups, total, resume_from, eval_data, loss_fn
        )


def _train(
    cm: Any,
    config: TrainingConfig,
    source: Source,
    parallel: Parallel,
    trained: dict[str, nn.Parameter],
    groups: list[Group],
    total: int,
    resume_from: Path | None,
    eval_data: Any,
    loss_fn: LossFn | None,
) -> TrainResult:
    names = [n for g in groups for n in g.names]
    saved = None
    if resume_from is not None:
        saved = checkpoint.read(
            resume_from,
            names,
            [g.names for g in groups],
            trained,
            cm,
            config.to_dict(),
            parallel,
        )
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(cm)
    seed_everything(config.seed)
    if saved is not None:
        saved.restore_model(cm, trained)
    elif parallel.kind == "fsdp":  # DDP broadcasts rank 0's values itself
        parallel.broadcast_(list(trained.values()))
    model = parallel.wrap(cm, idle_parameter_names(cm))
    optimizer = build_optimizer(cm, groups, config)  # after wrapping: FSDP replaces the parameters
    factor = with_method_factors(schedule(config.lr_scheduler, config.warmup_steps, total), cm)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    progress = Progress()
    if saved is not None:
        saved.restore_optimizer(optimizer, scheduler, names)
        saved.restore_rng()
        progress = saved.progress
    loop = _Loop(cm, model, source, config, optimizer, scheduler, names, progress, parallel)
    loop.plan(total, factor, loss_fn, shifts_labels(cm.model), eval_data)
    return loop.run()


def build_optimizer(
    cm: Any, groups: Sequence[Group], config: TrainingConfig
) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``groups``; LoRA-FA's and the Riemannian optimizer's factor
    groups carry ``"pairs"`` (and LoRA-FA's ``"scales"``), see `surgeon.optimizers`."""
    params = dict(cm.named_parameters())
    dicts = []
    for g in groups:
        d = {"params": [params[n] for n in g.names], "lr": g.lr, "weight_decay": g.weight_decay}
        if config.optimizer in optimizers.FACTOR_OPTIMIZERS:
            d["pairs"] = g.pairs
        if config.optimizer == "lorafa":
            d["scales"] = g.scales
        dicts.append(d)
    return optimizers.build(
        config.optimizer,
        dicts,
        config.learning_rate,
        config.riemannian_reg,
        config.flora_rank,
        config.flora_kappa,
        config.seed,
    )


# -- the loop ---------------------------------------------------------------------------------


class _Loop:
    """One training run: steps, logging, evaluation and checkpoints."""

    total: int
    factor: Callable[[int], float]
    loss_fn: LossFn | None
    shifts: bool
    eval_data: Any

    def __init__(
        self,
        cm: Any,
        model: nn.Module,
        source: Source,
        config: TrainingConfig,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        names: Sequence[str],
        progress: Progress,
        parallel: Parallel,
    ) -> None:
        self.cm, self.model, self.source, self.config = cm, model, source, config
        self.optimizer, self.scheduler, self.names = optimizer, scheduler, names
        self.progress, self.parallel = progress, parallel
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.hooks = MethodHooks.of(cm)
        self.device = self.params[0].device
        self.pending: list[torch.Tensor] = []  # step losses not read from the device yet
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping
        self.logged_from = last_logged_step(progress.log_history)
        self.checkpoint: Path | None = None
        self.saved_at = self.evaluated_at = -1
        self.no_cache = no_cache_arguments(cm.model)
        self.best: Snapshot | None = None  # the best evaluation's weights (load_best_at_end)
        self.stopped = False  # by early stopping
        self.to_tensorboard = "tensorboard" in config.reporters()
        self.tensorboard: history.TensorBoard | None = None  # opened at the first log entry
        self.started, self.first_step = time.time(), progress.step

    def plan(
        self,
        total: int,
        factor: Callable[[int], float],
        loss_fn: LossFn | None,
        shifts: bool,
        eval_data: Any,
    ) -> None:
        """Steps to reach, the schedule, how to compute the loss, what to evaluate."""
        self.total, self.factor, self.loss_fn = total, factor, loss_fn
        self.shifts, self.eval_data = shifts, eval_data

    def run(self) -> TrainResult:
        p, config = self.progress, self.config
        bar = _progress_bar(self.total, p.step, config.progress and self.parallel.main)
        was_training = self.cm.training
        self.cm.train()
        self._start_from_history()
        try:
            # else a resumed run that had finished, or stopped early: nothing to do
            if p.step < self.total and not self.stopped:
                for micro_batches, epoch, index in self._steps():
                    self._step(micro_batches)
                    p.step, p.epoch, p.batch_in_epoch = p.step + 1, epoch, index
                    bar.update(1)
                    self._after_step(bar)
                    if p.step >= self.total or self.stopped:
                        break
                self._finish(bar)
        finally:
            bar.close()
            self.cm.train(was_training)
            if self.tensorboard is not None:
                self.tensorboard.close()
        if config.load_best_at_end:
            self._load_best()
        with self.parallel.gathered(self.cm, keep=True):  # FSDP: leave the adapters whole
            pass
        best_step, best_loss = best_evaluation(p.eval_losses) or (None, None)
        out = Path(config.output_dir) if config.output_dir is not None else None
        written = [] if out is None else [out / history.CURVES_SVG, out / history.CURVES_PNG]
        return TrainResult(
            steps=p.step,
            losses=list(p.losses),
            eval_losses=list(p.eval_losses),
            learning_rates=list(p.learning_rates),
            checkpoint=self.checkpoint,
            best_step=best_step,
            best_eval_loss=best_loss,
            stopped_early=self.stopped,
            log_history=[dict(e) for e in p.log_history],
            trainer_state=_existing(out / history.TRAINER_STATE) if out else None,
            plots=[path for path in written if path.exists()],
        )

    def _steps(self) -> Iterator[tuple[list[Batch], int, int]]:
        """Groups of micro-batches, one per optimizer step, with the position after each; the
        last group of an epoch may be shorter (as in transformers' Trainer)."""
        accum = self.config.gradient_accumulation_steps
        per_epoch = self.source.batches_per_epoch()
        epoch, start = self.progress.epoch, self.progress.batch_in_epoch
        while True:
            group: list[Batch] = []
            index = start
            for batch in self.source.epoch(epoch, start):
                group.append(batch)
                index += 1
                if len(group) == accum:
                    yield group, *((epoch + 1, 0) if index == per_epoch else (epoch, index))
                    group = []
            if group:
                yield group, epoch + 1, 0
            elif index == 0:
                raise SpecError("train_data: the data yielded no batches")
            epoch, start = epoch + 1, 0

    def _step(self, micro_batches: list[Batch]) -> None:
        """One optimizer step over the micro-batches, weighted by their share of the items."""
        counts = [self._items(b) for b in micro_batches]
        total = self._total(counts)
        step_loss = None
        for i, (batch, count) in enumerate(zip(micro_batches, counts)):
            with self.parallel.sync(self.model, last=i == len(micro_batches) - 1):
                mean = self._loss(self.model, to_device(batch, self.device))
                share = _share(mean, count, total, self.parallel.world, self.device)
                loss = share
                if i == 0 and self.hooks.loss_term:
                    term = self.cm.regularization_loss()
                    if term is not None:
                        loss = loss + term  # once per step: a regulariser of the weights
                loss.backward()
            step_loss = share.detach() if step_loss is None else step_loss + share.detach()
        self.pending.append(step_loss)
        self.progress.learning_rates.append(
            self.config.learning_rate * self.factor(self.progress.step)
        )
        self.grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        if self.hooks.after_backward:
            self.cm.update_ranks(self.progress.step, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to ``max_grad_norm`` when it is set; the total norm before clipping (which
        transformers logs), left on the device until a log entry reads it."""
        if self.config.max_grad_norm:
            return torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm).detach()
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def _total(self, counts: list[torch.Tensor]) -> int | torch.Tensor:
        """The step's items over all micro-batches and processes (a Python number when it is
        known without a device synchronisation)."""
        if not self.parallel.active and all(c.device.type == "cpu" for c in counts):
            return sum(int(c) for c in counts)
        return self.parallel.sum(torch.stack(counts).to(self.device).sum())

    def _items(self, batch: Batch) -> torch.Tensor:
        """What the micro-batch's mean loss divides by (see `count_items`)."""
        if isinstance(batch, Mapping) and self.loss_fn is None:
            return count_items(batch.get("labels"), rows(batch), self.shifts)
        return torch.tensor(rows(batch))

    def _loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with _autocast(self.device, self.config.bf16):
            if isinstance(batch, Mapping):
                if self.loss_fn is None:
                    return output_loss(model(**{**self.no_cache, **batch}))
                inputs = {k: v for k, v in {**self.no_cache, **batch}.items() if k != "labels"}
                return self.loss_fn(model(**inputs), batch.get("labels"))
            if self.loss_fn is None:
                return output_loss(model(*batch))
            return self.loss_fn(model(*batch[:-1]), batch[-1])

    # -- between steps ------------------------------------------------------------------------

    def _after_step(self, bar: Any) -> None:
        p, config = self.progress, self.config
        if p.step % config.logging_steps == 0:
            self._log(bar)
        if config.eval_steps and self.eval_data is not None and p.step % config.eval_steps == 0:
            self._evaluate()
            self._check_patience()
        if config.save_steps and p.step % config.save_steps == 0:
            self._save()

    def _finish(self, bar: Any) -> None:
        p = self.progress
        self._log(bar)
        if self.eval_data is not None and self.evaluated_at != p.step:
            self._evaluate()
        if self.config.output_dir is not None and self.saved_at != p.step:
            self._save()
        self._record(self._summary())
        if self.config.output_dir is not None and self.parallel.main:
            out = Path(self.config.output_dir)
            history.write_trainer_state(out / history.TRAINER_STATE, self._trainer_state())
            history.write_curves(out, p.log_history)

    def _read_losses(self) -> None:
        """Turn the pending step losses into numbers: one synchronisation for all of them."""
        if not self.pending:
            return
        sums = self.parallel.sum(torch.stack(self.pending)) / self.parallel.world
        self.progress.losses.extend(sums.tolist())
        self.pending.clear()

    def _log(self, bar: Any) -> None:
        self._read_losses()
        p = self.progress
        recent = p.losses[self.logged_from :]
        if not recent:
            return
        loss, lr = sum(recent) / len(recent), p.learning_rates[-1]
        self.logged_from = p.step
        norm = None if self.grad_norm is None else full(self.grad_norm).item()
        self._record(history.train_entry(loss, norm, lr, self._epoch(), p.step))
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if self.parallel.main:
            logger.info("step %d/%d: loss %.4f, learning rate %.3e", p.step, self.total, loss, lr)

    def _record(self, entry: dict[str, float]) -> None:
        """Append to the log history (every process keeps it: checkpoints carry it), and send it
        to TensorBoard from the main process."""
        self.progress.log_history.append(entry)
        if not self.parallel.main or not self.to_tensorboard:
            return
        if self.tensorboard is None:
            self.tensorboard = history.TensorBoard(self.config.output_dir, self.config.to_dict())
        self.tensorboard.add(entry)

    def _epoch(self) -> float:
        """Epochs done, with the fraction of the current one (as transformers logs it)."""
        p, per_epoch = self.progress, self.source.batches_per_epoch()
        return p.epoch + p.batch_in_epoch / per_epoch if per_epoch else float(p.epoch)

    def _summary(self) -> dict[str, float]:
        p, config = self.progress, self.config
        steps = p.step - self.first_step
        samples = steps * config.batch_size * config.gradient_accumulation_steps
        runtime = time.time() - self.started
        return history.summary_entry(
            runtime, samples * self.parallel.world, steps, p.losses, self._epoch(), p.step
        )

    def _trainer_state(self, saving: bool = False) -> dict[str, Any]:
        """transformers' ``TrainerState`` of the run now; ``saving``: for the checkpoint of
        this step, being written."""
        p, config = self.progress, self.config
        best = best_evaluation(p.eval_losses)
        best_checkpoint = None
        if best is not None and config.output_dir is not None:
            path = Path(config.output_dir) / f"checkpoint-{best[0]}"
            if path.is_dir() or (saving and best[0] == p.step):
                best_checkpoint = str(path)
        return history.trainer_state(
            self._run_shape(), p.log_history, p.step, self._epoch(), best, best_checkpoint
        )

    def _run_shape(self) -> history.RunShape:
        config, per_epoch = self.config, self.source.batches_per_epoch()
        if per_epoch:
            steps_per_epoch = math.ceil(per_epoch / config.gradient_accumulation_steps)
            epochs = math.ceil(self.total / steps_per_epoch)
        else:
            epochs = sys.maxsize  # transformers' value when the data has no length
        return history.RunShape(
            max_steps=self.total,
            num_train_epochs=epochs,
            train_batch_size=config.batch_size,
            logging_steps=config.logging_steps,
            eval_steps=config.eval_steps,
            save_steps=config.save_steps,
        )

    @torch.no_grad()
    def _evaluate(self) -> None:
        """The mean loss over every item of ``eval_data`` (all processes' shares together)."""
        self.cm.eval()
        sums = torch.zeros(2, device=self.device)
        try:
            for batch, weight in _eval_batches(self.eval_data, self.config, self.parallel, self.cm):
                count = self._items(batch) * weight
                mean = self._loss(self.cm, to_device(batch, self.device))
                sums[0] += _weighted(mean, count, self.device)
                sums[1] += count.to(self.device)
        finally:
            self.cm.train()
        total = self.parallel.sum(sums)
        loss = (total[0] / total[1].clamp(min=1)).item()
        self.progress.eval_losses.append((self.progress.step, loss))
        self.evaluated_at = self.progress.step
        self._record(history.eval_entry(loss, self._epoch(), self.progress.step))
        if self.parallel.main:
            logger.info("step %d/%d: eval loss %.4f", self.progress.step, self.total, loss)
        self._remember_if_best()

    def _save(self) -> None:
        self._read_losses()
        self.checkpoint = checkpoint.save(
            Path(self.config.output_dir),
            self.cm,
            self.optimizer,
            self.scheduler,
            self.names,
            self.progress,
            self.config.to_dict(),
            self.parallel,
            self._trainer_state(saving=True),
        )
        self.saved_at = self.progress.step
        if self.parallel.main:  # the curves so far, to look at while training goes on
            history.write_curves(Path(self.config.output_dir), self.progress.log_history)
        if self.config.save_total_limit is not None and self.parallel.main:
            checkpoint.rotate(
                Path(self.config.output_dir),
                self.config.save_total_limit,
                self.checkpoint,
                keep=self._best_checkpoint(),
            )

    # -- the best evaluation, early stopping ---------------------------------------------------

    def _start_from_history(self) -> None:
        """A resumed run: whether its history already ran out of patience, and a copy of the
        weights if they are the best evaluation's."""
        self._remember_if_best()
        self._check_patience()

    def _remember_if_best(self) -> None:
        """With load_best_at_end, copy the weights when the latest evaluation is the best."""
        best = best_evaluation(self.progress.eval_losses)
        if self.config.load_best_at_end and best is not None and best[0] == self.progress.step:
            self.best = Snapshot.take(self.progress.step, self.params, self.cm)

    def _check_patience(self) -> None:
        """Stop when the last ``early_stopping_patience`` evaluations did not improve enough."""
        p, patience = self.progress, self.config.early_stopping_patience
        if patience is None or p.step >= self.total:
            return
        stale = evaluations_without_improvement(p.eval_losses, self.config.early_stopping_threshold)
        if stale < patience:
            return
        self.stopped = True
        if self.parallel.main:
            _, loss = best_evaluation(p.eval_losses) or (None, math.nan)
            logger.info(
                "early stopping at step %d: no improvement over %.4f for %d evaluations",
                p.step,
                loss,
                stale,
            )

    def _best_checkpoint(self) -> Path | None:
        """``checkpoint-<step>`` of the best evaluation, which rotation keeps (load_best_at_end)."""
        best = best_evaluation(self.progress.eval_losses)
        if not self.config.load_best_at_end or best is None or self.config.output_dir is None:
            return None
        return Path(self.config.output_dir) / f"checkpoint-{best[0]}"

    def _load_best(self) -> None:
        """Put the best evaluation's weights into the model: the copy taken when it happened,
        or, when it happened before this run resumed, its checkpoint."""
        best = best_evaluation(self.progress.eval_losses)
        if best is None or best[0] == self.progress.step:
            return  # nothing evaluated, or the weights are the best's already
        self.parallel.reshard(self.cm)  # FSDP: write into the shards, then gather them anew
        if self.best is not None and self.best.step == best[0]:
            self.best.restore(self.params, self.cm)
            return
        path = self._best_checkpoint()
        if path is None or not (path / checkpoint.STATE_JSON).exists():
            missing = f"{path} does not exist" if path else "there is no output_dir to hold it"
            warnings.warn(
                f"TrainingConfig.load_best_at_end: the best evaluation (step {best[0]}, eval loss "
                f"{best[1]:.4f}) came before this run resumed, and its checkpoint is gone "
                f"({missing}); the model keeps the weights of the last step, "
                f"{self.progress.step}",
                stacklevel=4,
            )
            return
        params = dict(zip(self.names, self.params, strict=True))
        saved = checkpoint.read(
            path,
            self.names,
            _group_names(self.optimizer, self.names),
            params,
            self.cm,
            self.config.to_dict(),
            self.parallel,
        )
        saved.restore_model(self.cm, params)


def last_logged_step(log_history: Sequence[Mapping[str, float]]) -> int:
    """The step of the last training log entry: a resumed run's next entry averages the losses
    since then, as the uninterrupted run's does."""
    return max((int(e["step"]) for e in log_history if "loss" in e), default=0)


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def _group_names(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> list[list[str]]:
    """The parameter names of each optimizer group (``names`` lists them group after group)."""
    out, start = [], 0
    for group in optimizer.param_groups:
        out.append(list(names[start : start + len(group["params"])]))
        start += len(group["params"])
    return out


def _share(
    mean: torch.Tensor,
    count: torch.Tensor,
    total: int | torch.Tensor,
    world: int,
    device: torch.device,
) -> torch.Tensor:
    """The micro-batch's part of the step's loss, ``mean x count / total``, times ``world``
    (DDP and FSDP average the processes' gradients). Zero, with zero gradients, when nothing
    was counted: a mean over no label is NaN."""
    if count.device.type == "cpu" and count.item() > 0:  # known without a device sync
        scale = world * count.item()
        if isinstance(total, int):
            return mean.float() * (scale / max(total, 1))
        return mean.float() * (scale / total.clamp(min=1))
    count = count.to(device, non_blocking=True)
    total = total.clamp(min=1) if isinstance(total, torch.Tensor) else max(total, 1)
    return torch.where(count > 0, mean.float(), 0.0) * (count * world / total)


def _weighted(mean: torch.Tensor, count: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``mean x count``, and 0 (gradients too) when nothing was counted: a mean over no label
    is NaN, yet the micro-batch still joins the step (DDP expects every process's backward)."""
    if count.device.type == "cpu" and count.item() > 0:  # known without a device sync
        return mean.float() * count.item()
    count = count.to(device, non_blocking=True)
    return torch.where(count > 0, mean.float(), 0.0) * count


@dataclass(frozen=True)
class MethodHooks:
    """Which training hooks the active methods implement (the loop skips the others' calls)."""

    loss_term: bool
    after_backward: bool

    @classmethod
    def of(cls, cm: Any) -> MethodHooks:
        specs = [type(cm.spec(name)) for name in cm.active]
        return cls(
            loss_term=any(s.loss_term is not MethodSpec.loss_term for s in specs),
            after_backward=any(s.after_backward is not MethodSpec.after_backward for s in specs),
        )


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", unit="step")


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _eval_batches(
    data: Any, config: TrainingConfig, parallel: Parallel, cm: Any
) -> Iterator[tuple[Batch, int]]:
    """Batches of this process's share, with weight 1; a process whose share ran out runs a
    batch of weight 0 so that all run the same number of forwards (FSDP gathers inside them)."""
    if isinstance(data, torch.utils.data.DataLoader):
        for batch in data:
            yield batch, 1
        return
    pad, size, step = pad_token_id(cm.model), len(data), config.batch_size * parallel.world
    for start in range(0, size, step):
        mine = list(range(start, min(start + step, size)))[parallel.rank :: parallel.world]
        weight = 1 if mine else 0
        yield collate([data[i] for i in mine or [0]], pad), weight


# -- pieces -----------------------------------------------------------------------------------


def total_steps(config: TrainingConfig, source: Source) -> int:
    """``max_steps``, or ``epochs`` x optimizer steps per epoch (rounded up, as transformers)."""
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = source.batches_per_epoch()
    if per_epoch is None:
        raise SpecError(
            "TrainingConfig.max_steps=None: train_data has no length (an iterable DataLoader), "
            "so epochs cannot be counted; set max_steps"
        )
    steps_per_epoch = math.ceil(per_epoch / config.gradient_accumulation_steps)
    return max(1, math.ceil(config.epochs * steps_per_epoch))


def with_method_factors(factor: Callable[[int], float], cm: Any) -> Callable[[int], float]:
    """``factor`` times the active methods' own (`CompiledModel.lr_factor`), where any method
    has one."""
    specs = [type(cm.spec(name)) for name in cm.active]
    if all(s.lr_factor is MethodSpec.lr_factor for s in specs):
        return factor
    return lambda step: factor(step) * cm.lr_factor(step)


def schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at a step: transformers' ``get_linear_schedule_with_warmup``,
    ``get_cosine_schedule_with_warmup`` (half a cycle) and ``get_constant_schedule_with_warmup``."""

    def factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, float(total - step) / float(max(1, total - warmup)))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    return factor


def trained_parameters(cm: Any) -> dict[str, nn.Parameter]:
    """What training updates: parameters that require gradients, except inactive adapters'."""
    idle = {id(p) for p in _idle_parameters(cm)}
    return {n: p for n, p in cm.named_parameters() if p.requires_grad and id(p) not in idle}


def idle_parameter_names(cm: Any) -> list[str]:
    idle = {id(p) for p in _idle_parameters(cm)}
    return [n for n, p in cm.named_parameters() if id(p) in idle]


def _idle_parameters(cm: Any) -> Iterator[nn.Parameter]:
    for name in cm.adapters:
        if name not in cm.active:
            yield from cm.store.layers[name].parameters()


@dataclass(frozen=True)
class Group:
    """One optimizer parameter group: parameter names, learning rate, weight decay. ``pairs``:
    the names are LoRA factors ``A1, B1, A2, B2, ...`` (LoRA-FA's and the Riemannian
    optimizer's), with LoRA-FA's ``scales``, one per pair."""

    names: tuple[str, ...]
    lr: float
    weight_decay: float
    pairs: bool = False
    scales: tuple[float, ...] = ()


def parameter_groups(
    cm: Any, trained: Mapping[str, nn.Parameter], config: TrainingConfig
) -> list[Group]:
    """Weight decay except on biases, norm weights and what adapter layers exempt (DoRA's
    magnitudes); with LoRA+, PEFT's grouping by learning rate; with LoRA-FA or the Riemannian
    optimizer, LoRA's factors first, as one group of pairs."""
    factors: list[Group] = []
    if config.optimizer in optimizers.FACTOR_OPTIMIZERS:
        pairs = optimizers.factor_pairs(cm, config.optimizer)
        names = tuple(n for pair in pairs for n in (pair.a, pair.b))
        scales = tuple(pair.scale for pair in pairs) if config.optimizer == "lorafa" else ()
        factors.append(Group(names, config.learning_rate, config.weight_decay, True, scales))
        trained = {n: p for n, p in trained.items() if n not in set(names)}
    exempt = no_decay_parameters(cm)
    kinds = _loraplus_kinds(cm, trained) if config.loraplus_lr_ratio else {}
    ratio = config.loraplus_lr_ratio or 1.0
    lrs = {
        "A": config.learning_rate,
        "B": config.learning_rate * ratio,
        "embedding": config.loraplus_lr_embedding,
    }
    buckets: dict[tuple[str, bool], list[str]] = {}
    for name, param in trained.items():
        buckets.setdefault((kinds.get(name, "A"), id(param) not in exempt), []).append(name)
    return factors + [
        Group(tuple(buckets[key]), lrs[key[0]], config.weight_decay if key[1] else 0.0)
        for key in [(kind, decays) for kind in lrs for decays in (True, False)]
        if key in buckets
    ]


def optimized_parameters(cm: Any, config: TrainingConfig) -> dict[str, nn.Parameter]:
    """What the optimizer holds: the trained parameters, and with LoRA-FA the A factors it reads
    (frozen while training, yet kept in checkpoints like the rest)."""
    trained = trained_parameters(cm)
    if config.optimizer != "lorafa":
        return trained
    params = dict(cm.named_parameters())
    factors = optimizers.factor_pairs(cm, config.optimizer)
    return {**{p.a: params[p.a] for p in factors}, **trained}


def frozen_factors(cm: Any, config: TrainingConfig) -> list[nn.Parameter]:
    """LoRA-FA's A factors, which no gradient reaches while it trains."""
    if config.optimizer != "lorafa":
        return []
    params = dict(cm.named_parameters())
    return [params[pair.a] for pair in optimizers.factor_pairs(cm, config.optimizer)]


NORMS = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
)


def no_decay_parameters(cm: Any) -> set[int]:
    """ids of parameters weight decay must not shrink."""
    out = set()
    for module in cm.modules():
        norm = isinstance(module, NORMS) or "Norm" in type(module).__name__
        exempt = set(getattr(module, "no_weight_decay", ()))
        for name, param in module.named_parameters(recurse=False):
            if norm or "bias" in name or name in exempt:
                out.add(id(param))
    return out


def _loraplus_kinds(cm: Any, trained: Mapping[str, nn.Parameter]) -> dict[str, str]:
    """LoRA+'s group of each trained parameter, as its adapter layer declares it
    (`AdapterLayer.loraplus_group`: PEFT's rule); base parameters trained beside the adapters
    (biases) go by the same rule as vectors."""
    groups = {
        id(param): layer.loraplus_group(pname, param)
        for adapter in cm.active
        for _, layer in cm.store.items(adapter)
        for pname, param in layer.named_parameters(recurse=False)
    }
    return {
        name: groups.get(id(param)) or loraplus_group_by_shape(param)
        for name, param in trained.items()
    }


def no_cache_arguments(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for models that would otherwise build a key/value cache on every
    forward: a training step never reads it, it costs memory, and a call with a cache cannot
    run as one specialised graph. Empty where the forward takes no such argument."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return {}
    try:
        parameters = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss compares position i with label i+1 (causal LMs, as the loss
    transformers' Trainer inspects): then the first label of each row is never counted."""
    if not (hasattr(model, "loss_type") or hasattr(type(model), "loss_function")):
        return False
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    custom = model.__dict__.get("_loss_function")
    if custom is not None:
        return custom is ForCausalLMLoss
    # transformers falls back to the causal LM loss for an unknown loss_type (GPT-2's is None)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None), ForCausalLMLoss) is ForCausalLMLoss


def output_loss(outputs: Any) -> torch.Tensor:
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise SpecError(
            f"train: the model returned {type(outputs).__name__} without a loss; give the samples "
            f"'labels' the model turns into a loss, or pass loss_fn(outputs, labels)"
        )
    return loss


def enable_gradient_checkpointing(cm: Any) -> None:
    """transformers' activation checkpointing, non-reentrant: adapter gradients inside a
    checkpointed block flow even though the frozen layers' inputs need no gradient."""
    kwargs = {"use_reentrant": False}
    enable = getattr(cm, "activation_checkpointing_enable", None)
    legacy = getattr(cm, "gradient_checkpointing_enable", None)
    if enable is None and legacy is None:
        raise SpecError(
            f"TrainingConfig.gradient_checkpointing=True: {type(cm.model).__name__} has no "
            f"gradient_checkpointing_enable() (transformers models have it)"
        )
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            legacy(gradient_checkpointing_kwargs=kwargs)
    except ValueError as err:
        raise SpecError(f"TrainingConfig.gradient_checkpointing=True: {err}") from None


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (every device) and, when loaded, NumPy's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)


# -- checks -----------------------------------------------------------------------------------


def _check_config(config: Any) -> TrainingConfig:
    if config is None:
        return TrainingConfig()
    if not isinstance(config, TrainingConfig):
        raise SpecError(
            f"train: config must be a surgeon.TrainingConfig, got {type(config).__name__}"
        )
    return config


def _resume_path(resume_from: Any, config: TrainingConfig) -> Path | None:
    if resume_from is None or resume_from is False:
        return None
    if resume_from is True:
        if config.output_dir is None:
            raise SpecError(
                "train: resume_from=True resumes from the latest checkpoint in "
                "TrainingConfig.output_dir, which is None; set output_dir or pass the checkpoint "
                "directory"
            )
        return Path(config.output_dir)
    if not isinstance(resume_from, (str, os.PathLike)) or not str(resume_from):
        raise SpecError(
            f"train: resume_from={resume_from!r}: expected a checkpoint directory, an output "
            f"directory, True (the latest checkpoint in config.output_dir) or None"
        )
    return Path(resume_from)


def _check_evaluation_data(config: TrainingConfig, eval_data: Any) -> None:
    for name, value in config._selecting_by_eval_loss().items():
        if eval_data is None:
            raise SpecError(
                f"train: TrainingConfig.{name}={value!r} selects by eval loss; pass eval_data"
            )


def _check_model(cm: Any) -> None:
    if not isinstance(cm, CompiledModel):
        raise SpecError(
            f"train: expected a compiled model (surgeon.compile(model, spec)), got "
            f"{type(cm).__name__}"
        )
    if cm.merged:
        raise SpecError(
            f"train: adapters {cm.merged} are merged into the weights; unmerge() before training"
        )
    if not trained_parameters(cm):
        raise SpecError(
            "train: the model has nothing to train (no active adapter, no trainable parameter)"
        )


def _check_optimizer(config: TrainingConfig, parallel: Parallel) -> None:
    """LoRA-FA and the Riemannian optimizer invert products of whole LoRA factors, and Flora
    projects whole matrices (its state is shaped by them), which FSDP shards."""
    if parallel.kind == "fsdp" and config.optimizer != "adamw":
        raise SpecError(
            f"distributed='fsdp': TrainingConfig.optimizer={config.optimizer!r} multiplies whole "
            f"matrices (LoRA's factors, Flora's projected weights), which FSDP shards; use "
            f"distributed='ddp'"
        )


def _check_methods(cm: Any, parallel: Parallel) -> None:
    """FSDP shards parameters and gradients: methods whose per-step hook reads or rewrites whole
    adapter tensors after each step (AdaLoRA's allocation from gradients, DyLoRA's rank draw held
    on its layers, CPT's projection) cannot run under it."""
    if parallel.kind != "fsdp":
        return
    for name in cm.active:
        spec = cm.spec(name)
        if type(spec).after_backward is not MethodSpec.after_backward:
            raise SpecError(
                f"distributed='fsdp': adapter {name!r} ({spec.name}) runs a hook on its whole "
                f"tensors after every step, which FSDP shards; use distributed='ddp'"
            )


def _warn_unsharded_loader(data: Any, parallel: Parallel) -> None:
    if not parallel.active or not isinstance(data, torch.utils.data.DataLoader):
        return
    if not isinstance(data.sampler, torch.utils.data.DistributedSampler):
        warnings.warn(
            "train: a DataLoader without a DistributedSampler gives every process the same "
            "batches; pass the dataset instead (train shards it) or use a DistributedSampler",
            stacklevel=3,
        )
