"""Data-parallel training for `surgeon.train`: DDP or FSDP2 over a ``torch.distributed`` group.

Launched with ``torchrun`` (or any launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``),
``train`` joins the process group itself when none is initialised yet: NCCL when CUDA is there,
gloo otherwise (CPU training works too).

FSDP2 (``fully_shard``) shards each transformer block (``model._no_split_modules``) and puts the
rest, adapters included, in one root group. Rewritten region graphs hold their adapter parameters
as attributes of their own (see `surgeon.rewrite.RegionModule`); FSDP swaps sharded and gathered
parameters by setting module attributes, so those holders are shown to ``fully_shard`` as
modules sharing the parameters, and it swaps them there too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.errors import SpecError

KINDS = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """How this process takes part: ``kind`` is none, ddp or fsdp."""

    kind: str = "none"
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.kind != "none"

    # -- wrapping -----------------------------------------------------------------------------

    def wrap(self, cm: nn.Module, ignored: Sequence[str]) -> nn.Module:
        """The module the training loop calls: DDP around ``cm``, or ``cm`` sharded in place."""
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(p.device for p in cm.parameters() if p.requires_grad)
            # parameters of inactive adapters get no gradients; DDP must not wait for them
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(cm, list(ignored))
            try:
                return DistributedDataParallel(
                    cm,
                    device_ids=[device.index] if device.type == "cuda" else None,
                    broadcast_buffers=False,
                )
            finally:
                del cm._ddp_params_and_buffers_to_ignore
        if self.kind == "fsdp":
            _shard(cm)
        return cm

    @contextlib.contextmanager
    def sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Reduce gradients across processes only on the last micro-batch of a step."""
        if self.kind == "ddp" and not last:
            with model.no_sync():
                yield
            return
        if self.kind == "fsdp":
            model.set_requires_gradient_sync(last)
        yield

    # -- collectives --------------------------------------------------------------------------

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (``tensor`` itself without a group)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        backend_device = _collective_device()
        moved = tensor.to(backend_device) if backend_device is not None else tensor
        dist.all_reduce(moved)
        return moved.to(tensor.device)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every process rank 0's values (in place)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)

    @contextlib.contextmanager
    def gathered(self, cm: nn.Module, keep: bool = False) -> Iterator[None]:
        """Under FSDP, the trained parameters gathered in full on every process for the block
        (to save them); resharded after it unless ``keep``."""
        if self.kind != "fsdp":
            yield
            return
        groups = _trained_groups(cm)
        for m in groups:
            m.unshard()
        try:
            yield
        finally:
            if not keep:
                for m in groups:
                    m.reshard()

    def reshard(self, cm: nn.Module) -> None:
        """Under FSDP, drop the gathered trained parameters (the root group keeps them after a
        forward), so that what is written into the shards is what the next gather reads."""
        if self.kind == "fsdp":
            for m in _trained_groups(cm):
                m.reshard()


def _trained_groups(cm: nn.Module) -> list[nn.Module]:
    """The FSDP-sharded modules that hold trained parameters."""
    from torch.distributed.fsdp import FSDPModule

    return [
        m
        for m in cm.modules()
        if isinstance(m, FSDPModule) and any(p.requires_grad for p in m.parameters())
    ]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a DTensor); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param``: sharded when ``param`` is an FSDP shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and tuple(value.shape) == tuple(param.shape):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def context(kind: str) -> Parallel:
    """The process group to train in, joining one from ``torchrun``'s environment if needed."""
    if kind == "none":
        return Parallel()
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if dist.is_available() and not dist.is_initialized() and launched:
        _init_from_environment()
    grouped = dist.is_available() and dist.is_initialized()
    if not grouped:
        if kind == "auto":
            return Parallel()
        raise SpecError(
            f"TrainingConfig.distributed={kind!r}: no process group; launch with torchrun "
            f"(or call torch.distributed.init_process_group first), or use 'auto'/'none'"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if kind == "auto":
        return Parallel("ddp", rank, world) if world > 1 else Parallel()
    return Parallel(kind, rank, world)


def _init_from_environment() -> None:
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _collective_device() -> torch.device | None:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


# -- FSDP2 ------------------------------------------------------------------------------------


def _shard(cm: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    # a specialised region builds its graphs at call time, after fully_shard has registered the
    # graphs' parameter references below: FSDP could not swap what those graphs read
    cm.graph.specialising = False
    cm._forget_plans()
    cm._recompile()
    blocks = set(getattr(cm.model, "_no_split_modules", None) or ())
    for module in list(cm.model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module)
    holders = [r.gm for r in cm.graph.regions if r.gm is not None]
    refs = nn.ModuleList(
        h.adapters for h in holders if isinstance(getattr(h, "adapters", None), nn.Module)
    )
    cm.add_module("_adapter_graph_refs", refs)
    try:
        # the root stays gathered between forward and backward: the loop adds the methods'
        # regularisers (read from the adapter parameters) after the forward
        fully_shard(cm, reshard_after_forward=False)
    finally:
        del cm._modules["_adapter_graph_refs"]
    _check_graphs_see_shards(cm)


def _check_graphs_see_shards(cm: Any) -> None:
    """Every parameter a region graph holds must be one FSDP manages (else it would train a copy)."""
    from torch.distributed.tensor import DTensor

    for region in cm.graph.regions:
        if region.gm is None:
            continue
        for name, param in region.gm.named_parameters(remove_duplicate=False):
            if not isinstance(param, DTensor):
                raise SpecError(
                    f"distributed='fsdp': the rewritten graph of {region.path or 'the model'} "
                    f"reads parameter {name} directly, which FSDP cannot swap; use "
                    f"distributed='ddp' for this model"
                )
