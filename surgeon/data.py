"""Training data for `surgeon.train`: samples to padded batches, a seeded order per epoch shared
out between processes, and the position in that order (for exact resumption).

A sample is a dict of forward arguments (``input_ids``, ``attention_mask``, ``labels``, or any
names the model takes) or a tuple of tensors (``TensorDataset``). Token sequences of different
lengths are padded on the right: ``labels`` with -100 (ignored by the loss), ``attention_mask``
with 0, ``input_ids`` with the model's pad token id (0 when it has none), ``position_ids`` with
0, 1, 2, ... (the padding is one more packed sequence), anything else with 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from surgeon.errors import SpecError

IGNORE_INDEX = -100
"""Label value the loss skips (transformers' and ``F.cross_entropy``'s default)."""

Batch = Mapping[str, Any] | Sequence[Any]


# -- collation ---------------------------------------------------------------------------------


def collate(samples: Sequence[Any], pad_id: int = 0) -> Batch:
    """One batch from samples: dicts become a dict of stacked (padded) tensors, tuples a tuple."""
    first = samples[0]
    if isinstance(first, Mapping):
        return _collate_dicts(samples, pad_id)
    if isinstance(first, (tuple, list)) and first and not _is_number(first[0]):
        columns = zip(*samples)
        return tuple(_stack("item", list(column), 0) for column in columns)
    raise SpecError(
        f"train_data: a sample is a {type(first).__name__}; expected a dict of forward arguments "
        f"(input_ids, attention_mask, labels, ...) or a tuple of tensors (inputs..., target)"
    )


def _collate_dicts(samples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    keys = list(samples[0])
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or (list(sample) != keys and set(sample) != set(keys)):
            found = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
            raise SpecError(
                f"train_data: samples in one batch have different fields: {found} (sample {i}) "
                f"vs {sorted(keys)} (the first)"
            )
    batch = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key == "position_ids":
            batch[key] = _pad_positions(values)
            continue
        pad = IGNORE_INDEX if key == "labels" else pad_id if key == "input_ids" else 0
        batch[key] = _stack(key, values, pad)
    # Packed rows (position_ids restarting per sample) get no attention mask: transformers
    # keeps packed samples apart only without one, and their padding is a sequence of its own.
    if "input_ids" in batch and "attention_mask" not in batch and "position_ids" not in batch:
        lengths = [len(s["input_ids"]) for s in samples]
        if len(set(lengths)) > 1:  # padding was added: the model must not attend to it
            width = batch["input_ids"].shape[1]
            batch["attention_mask"] = (
                torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
            ).long()
    return batch


def _stack(key: str, values: list[Any], pad: int) -> torch.Tensor:
    try:
        tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError) as err:
        raise SpecError(
            f"train_data: field {key!r} holds {type(values[0]).__name__} values that are not "
            f"numbers or tensors ({err})"
        ) from None
    shapes = {t.shape for t in tensors}
    if len(shapes) == 1:
        return torch.stack(tensors)
    if len({t.dim() for t in tensors}) > 1 or len({t.shape[1:] for t in tensors}) > 1:
        raise SpecError(
            f"train_data: field {key!r} has shapes {sorted(tuple(s) for s in shapes)} that differ "
            f"beyond the first (sequence) dimension; only sequence lengths can be padded"
        )
    width = max(t.shape[0] for t in tensors)
    out = tensors[0].new_full((len(tensors), width, *tensors[0].shape[1:]), pad)
    for row, t in zip(out, tensors):
        row[: t.shape[0]] = t
    return out


def _pad_positions(values: list[Any]) -> torch.Tensor:
    """Position ids padded with 0, 1, 2, ...: the padding forms one more packed sequence, which
    the real tokens never attend to (and a causal model would not either)."""
    batch = _stack("position_ids", values, 0)
    if batch.dim() == 2:  # else per-sample position grids (multimodal rotary): padded with 0
        for row, value in zip(batch, values):
            row[len(value) :] = torch.arange(batch.shape[1] - len(value))
    return batch


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pad_token_id(model: Any) -> int:
    """The model config's pad token id, or 0 (padded positions are masked out anyway)."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


# -- batch contents ----------------------------------------------------------------------------


def rows(batch: Batch) -> int:
    """The number of samples in a batch (the first dimension of its first tensor)."""
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise SpecError("train_data: a batch holds no tensor with a batch dimension")


def to_device(batch: Batch, device: torch.device) -> Batch:
    def move(value: Any) -> Any:
        return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, Mapping):
        return {k: move(v) for k, v in batch.items()}
    return tuple(move(v) for v in batch)


def count_items(labels: Any, n_rows: int, shifts: bool) -> torch.Tensor:
    """What a mean loss over ``labels`` divides by: the label tokens that are not -100 (those
    after the first position when the model shifts labels, as causal LMs do) for integer token
    labels, otherwise the number of samples."""
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
        if shifts and labels.dim() >= 2:
            labels = labels[..., 1:]
        return (labels != IGNORE_INDEX).sum()
    return torch.tensor(n_rows)


# -- order -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Order:
    """Which samples each batch of one process holds, epoch by epoch.

    Epoch ``e`` is a permutation drawn from ``seed + e`` (or the natural order), padded by
    wrapping around to a multiple of ``world`` and dealt out round-robin, as
    ``DistributedSampler`` does: with ``world`` processes of batch ``b`` each global batch holds
    the same samples as one process's batch of ``world * b``.
    """

    size: int
    batch_size: int
    seed: int
    shuffle: bool
    rank: int = 0
    world: int = 1
    pad: bool = True

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world)

    def batches_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            extra = self.per_rank * self.world - self.size
            order += (order * math.ceil(extra / self.size))[:extra]
        return order[self.rank :: self.world]

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """The index lists of the epoch's batches, from batch ``start`` on."""
        mine = self.indices(epoch)
        for b in range(start, self.batches_per_epoch()):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


class Source:
    """Batches, epoch by epoch, from a map-style dataset (ordered by an `Order`) or a DataLoader
    (its own order; its sampler's ``set_epoch`` is called when it has one)."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int,
        world: int,
        pad_id: int,
    ) -> None:
        self.loader = data if isinstance(data, torch.utils.data.DataLoader) else None
        self.pad_id = pad_id
        if self.loader is None:
            check_dataset(data, "train_data")
            self.data = data
            self.order = Order(len(data), batch_size, seed, shuffle, rank, world)

    def batches_per_epoch(self) -> int | None:
        if self.loader is None:
            return self.order.batches_per_epoch()
        try:
            return len(self.loader)
        except TypeError:  # an iterable dataset without a length
            return None

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        if self.loader is None:
            for indices in self.order.batches(epoch, start):
                yield collate([self.data[i] for i in indices], self.pad_id)
            return
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for i, batch in enumerate(self.loader):
            if i >= start:
                yield batch


def check_dataset(data: Any, what: str) -> None:
    if isinstance(data, torch.utils.data.IterableDataset) or not (
        hasattr(data, "__len__") and hasattr(data, "__getitem__")
    ):
        raise SpecError(
            f"{what}: expected a list of samples, a map-style torch Dataset or a DataLoader; got "
            f"{type(data).__name__} (wrap iterable datasets in a DataLoader and set max_steps)"
        )
    if len(data) == 0:
        raise SpecError(f"{what}: the dataset is empty")
