"""The order pretraining reads examples in: a fresh plan every epoch, shared out over ranks and micro-steps.

The dataset's plan is already shuffled per (seed, epoch), so examples are read in index order. Each (micro-step m,
rank r) pair is a "virtual rank" v = m * world + r of world * grad_accum, and reads indices v, v + W, v + 2W, ...
So 2 processes and 1 process accumulating 2 micro-batches see the very same micro-batches, and a resumed run,
whatever its process count, reads what the interrupted one would have read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from bertkit.errors import BertkitError
from bertkit.train.distributed import Distributed


class PretrainBatches:
    """Step after step, this rank's `grad_accum` micro-batches; restartable at any (epoch, step in epoch)."""

    def __init__(self, dataset, batch_size: int, grad_accum: int, d: Distributed, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.d = d
        self.num_workers = num_workers
        self.virtual_world = d.world_size * grad_accum

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.virtual_world

    def steps_in_epoch(self) -> int:
        """Optimizer steps in the current epoch (the tail that would leave a step short is dropped)."""
        return len(self.dataset) // self.virtual_world // self.batch_size

    def _order(self, start: int, stop: int) -> list[list[int]]:
        """This rank's micro-batches (as index lists) for steps [start, stop) of the current epoch."""
        B = self.batch_size
        shares = [self.dataset.rank_indices(m * self.d.world_size + self.d.rank, self.virtual_world)
                  for m in range(self.grad_accum)]
        return [list(shares[m][s * B : (s + 1) * B]) for s in range(start, stop) for m in range(self.grad_accum)]

    def __call__(self, epoch: int, start: int) -> Iterator[tuple[int, int, list[dict[str, torch.Tensor]]]]:
        """Yield (epoch, steps done in that epoch after this one, micro-batches), from step `start` of `epoch` on."""
        while True:
            self.dataset.set_epoch(epoch)
            stop = self.steps_in_epoch()
            if stop == 0:
                raise BertkitError(
                    f"{self.dataset.corpus.out_dir}: {len(self.dataset)} examples in epoch {epoch}; expected at "
                    f"least one global batch of {self.global_batch} (batch size x processes x accumulation)"
                )
            # A private generator: DataLoader draws its worker seed from it, and drawing from the global one would
            # shift the dropout stream of a run restarted mid-epoch.
            loader = DataLoader(
                self.dataset,
                batch_sampler=self._order(start, stop),
                collate_fn=self.dataset.collate,
                num_workers=self.num_workers,
                pin_memory=self.d.device.type == "cuda",
                generator=torch.Generator(),
            )
            micro_batches = iter(loader)
            for step in range(start, stop):
                yield epoch, step + 1, [next(micro_batches) for _ in range(self.grad_accum)]
            epoch, start = epoch + 1, 0


def eval_loader(dataset, batch_size: int, num_batches: int, d: Distributed) -> DataLoader:
    """The first `num_batches` batches of the held-out examples (epoch 0, fixed), batch j on rank j % world."""
    dataset.set_epoch(0)
    count = min(num_batches * batch_size, len(dataset))
    batches = [list(range(j * batch_size, min((j + 1) * batch_size, count))) for j in range(math.ceil(count / batch_size))]
    return DataLoader(dataset, batch_sampler=batches[d.rank :: d.world_size], collate_fn=dataset.collate,
                      generator=torch.Generator())
