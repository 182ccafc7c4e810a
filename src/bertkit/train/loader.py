"""The order pretraining reads examples in: a fresh plan every epoch, shared out over ranks and micro-steps.

The dataset's plan is already shuffled per (seed, epoch), so examples are read in index order: each optimizer step
takes the next `global batch` examples of the epoch, and micro-step m of rank r reads the slice m * world + r of
them. So 2 processes and 1 process accumulating 2 micro-batches see the very same examples in each step, and a
resumed run, whatever its process count, reads what the interrupted one would have read: the position is (epoch,
examples of it consumed). With a batch-size ramp the number of micro-steps per step grows from 1 to `grad_accum`
over the first `ramp_steps` steps (Cramming's ramp); the position is counted in examples for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from bertkit.errors import BertkitError
from bertkit.train.distributed import Distributed


class PretrainBatches:
    """Step after step, this rank's micro-batches; restartable at any (epoch, step, examples consumed)."""

    def __init__(self, dataset, batch_size: int, grad_accum: int, d: Distributed, num_workers: int = 0,
                 ramp_steps: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.d = d
        self.num_workers = num_workers
        self.ramp_steps = ramp_steps

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step once any ramp is over."""
        return self.batch_size * self.d.world_size * self.grad_accum

    def accumulation(self, step: int) -> int:
        """Micro-batches per process in optimizer step `step` (0-based): 1 at the start of a ramp, growing linearly
        to grad_accum at ramp_steps, then grad_accum."""
        if step >= self.ramp_steps:
            return self.grad_accum
        return 1 + (self.grad_accum - 1) * step // self.ramp_steps

    def _order(self, step: int, example: int) -> list[list[range]]:
        """This rank's micro-batches (index ranges) for each step from `step`, `example` examples into the epoch,
        to the last step the epoch still fills (the tail that would leave a step short is dropped)."""
        B, W, r = self.batch_size, self.d.world_size, self.d.rank
        steps = []
        while True:
            size = B * W * self.accumulation(step)
            if example + size > len(self.dataset):
                return steps
            # ranges, not lists: the order covers the rest of the epoch, and lists of ints took 45 bytes an example
            # (184 MiB on a 2 GB corpus), more than the epoch's plan itself
            steps.append([range(example + (m * W + r) * B, example + (m * W + r + 1) * B)
                          for m in range(size // (B * W))])
            step, example = step + 1, example + size

    def __call__(self, epoch: int, step: int, example: int) -> Iterator[tuple[int, int, list[dict[str, torch.Tensor]]]]:
        """Yield (epoch, examples of it consumed after this step, micro-batches) for optimizer step `step` on, which
        starts `example` examples into `epoch`."""
        while True:
            self.dataset.set_epoch(epoch)
            order = self._order(step, example)
            if not order:
                if example == 0:
                    raise BertkitError(
                        f"{self.dataset.corpus.out_dir}: {len(self.dataset)} examples in epoch {epoch}; expected at "
                        f"least one global batch of {self.batch_size * self.d.world_size * self.accumulation(step)} "
                        "(batch size x processes x accumulation)"
                    )
                epoch, example = epoch + 1, 0
                continue
            # A private generator: DataLoader draws its worker seed from it, and drawing from the global one would
            # shift the dropout stream of a run restarted mid-epoch.
            loader = DataLoader(
                self.dataset,
                batch_sampler=[batch for micro_batches in order for batch in micro_batches],
                collate_fn=self.dataset.collate,
                num_workers=self.num_workers,
                pin_memory=self.d.device.type == "cuda",
                generator=torch.Generator(),
            )
            micro_batches = iter(loader)
            for step_batches in order:
                example += len(step_batches) * self.batch_size * self.d.world_size
                step += 1
                yield epoch, example, [next(micro_batches) for _ in step_batches]
            epoch, example = epoch + 1, 0


def eval_loader(dataset, batch_size: int, num_batches: int, d: Distributed) -> DataLoader:
    """The first `num_batches` batches of the held-out examples (epoch 0, fixed), batch j on rank j % world."""
    dataset.set_epoch(0)
    count = min(num_batches * batch_size, len(dataset))
    batches = [list(range(j * batch_size, min((j + 1) * batch_size, count))) for j in range(math.ceil(count / batch_size))]
    return DataLoader(dataset, batch_sampler=batches[d.rank :: d.world_size], collate_fn=dataset.collate,
                      generator=torch.Generator())
