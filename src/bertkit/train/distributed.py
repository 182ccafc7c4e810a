"""Distributed set-up: one process per device under torchrun (DDP over gloo on CPU, nccl on GPU), else one process.

Every helper is a no-op in a single process, so the training loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bertkit.errors import BertkitError


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: its rank among `world_size` processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this set-up created the process group, so teardown destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Distributed(rank, world_size, local_rank, device, owns)


def teardown(d: Distributed) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Distributed) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several processes (it broadcasts rank 0's weights)."""
    if not d.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on accumulation micro-steps; only the last one of a step synchronises."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_sum(tensor: torch.Tensor, d: Distributed) -> torch.Tensor:
    """Sum a tensor over all processes, in place."""
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj, d: Distributed) -> list:
    """Every rank's `obj`, in rank order."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn, d: Distributed):
    """Run `fn` on rank 0 only (writing shared files), then return its result on every rank.

    A BertkitError on rank 0 is raised on every rank, so no process is left waiting at a barrier for a failed one.
    """
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except BertkitError as e:
            error = str(e)
    if not d.enabled:
        if error is not None:
            raise BertkitError(error)
        return result
    box = [(result, error)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise BertkitError(error)
    return result
