"""Distributed set-up: one process per device under torchrun (DDP over gloo on CPU, nccl on GPU), else one process.

Every helper is a no-op in a single process, so the training loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (before any group exists: see teardown)
from torch.nn.parallel import DistributedDataParallel

from bertkit.errors import BertkitError

logger = logging.getLogger("bertkit")

# More threads than this is never asked for by default: the small and base models stop gaining well before.
MAX_DEFAULT_THREADS = 16
MAX_THREADS = 1024


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
    """Destroy the process group while Python is still whole, its gloo threads stopped with it.

    A group that outlived destroy_process_group() kept its threads into interpreter shutdown, where one releasing a
    tensor aborted the process ("terminate called without an active exception", 6 of 70 two-process runs). Two
    things kept it alive: torch.distributed.nn, whose functions default to `group=group.WORLD`, when first imported
    after the group was made (DDP imports it through torch._dynamo), hence its import at the top of this file; and
    the DDP wrapper, freed only by the cycle collector, hence the collection here.
    """
    if d.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Distributed) -> torch.nn.Module:
    """DistributedDataParallel around the model when there are several processes (it broadcasts rank 0's weights)."""
    if not d.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


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


def default_threads(processes: int = 1) -> int:
    """torch's CPU threads per process when --threads is not given: the cores that the last minute's load average
    leaves idle (cores minus the rounded load), shared out over this machine's `processes`, at least 1 and at most
    16.

    torch's own default, one thread per core, collapses on a machine where another job runs: its threads wait on
    each other's busy cores (fine-tuning fell from 107 to 7 examples/s). Fewer threads than cores only slows a run
    in proportion. The load average lags by a minute, so a machine that just became free is still seen as busy.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        load = 0.0
    idle = cores - min(cores, int(load + 0.5))
    return max(1, min(idle // max(1, processes), MAX_DEFAULT_THREADS))


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    if threads is not None and not (isinstance(threads, int) and 1 <= threads <= MAX_THREADS):
        raise BertkitError(f"{flag} is {threads}; expected a whole number from 1 to {MAX_THREADS} (unset: chosen "
                           "from the idle cores)")


@contextlib.contextmanager
def torch_threads(threads: int | None, processes: int = 1):
    """Run the block with `threads` torch threads (None: `default_threads`), then give torch its setting back, so
    that a Python caller's own setting survives the call."""
    check_threads(threads)
    before = torch.get_num_threads()
    chosen = threads or default_threads(processes)
    if not threads:
        logger.info("torch threads: %d (idle cores per the load average; --threads sets it)", chosen)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
