"""The training step that pretraining and fine-tuning share: micro-batches, autocast, loss scaling, gradient
accumulation (with DDP's all-reduce only on the last micro-batch), clipping, and the optimizer and schedule step,
skipped when the loss or the gradients are not finite (`optimizer_step`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bertkit.train import distributed
from bertkit.train.optim import optimizer_step
from bertkit.train.precision import Precision


# --activation-checkpointing, in pretraining and fine-tuning alike
CHECKPOINTING_HELP = ("keep only each encoder block's input and run the block again in backward (transformers' "
                      "activation checkpointing), so that a longer or larger batch fits: base at length 512 on a CPU "
                      "took 0.45x the memory for 1.3x the time a step; the same gradients")


def train_step(model, micro_batches: list[dict], optimizer, scheduler, precision: Precision, max_grad_norm: float,
               device: torch.device, d=None, forward: Callable | None = None,
               on_output: Callable | None = None, weights: list[float] | None = None) -> tuple[torch.Tensor, bool]:
    """One optimizer step over `micro_batches` (each a dict of CPU or device tensors), their gradients averaged.

    `forward(model, batch)` gives a model output with `.loss` (default: `model(**batch)`); `on_output(output,
    batch)` sees each micro-batch's output before the next one runs (to sum statistics without keeping logits).
    Micro-batch i's loss is multiplied by `weights[i]` before backward (default: 1 / the number of micro-batches;
    losses that are means over micro-batches of unequal sizes need their shares of the step instead, and a process
    whose share of a step differs from the others' sets its own, 0 for a share of none). Returns the mean of the
    micro-batches' losses (a 0-dim tensor on the device, not synchronised with the host) and whether the update
    was made.
    """
    losses = []
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with distributed.no_sync(model, sync=i == len(micro_batches) - 1):
            with precision.autocast():
                out = forward(model, batch) if forward is not None else model(**batch)
            share = out.loss / len(micro_batches) if weights is None else out.loss * weights[i]
            precision.scaler.scale(share).backward()
        losses.append(out.loss.detach().float())
        if on_output is not None:
            on_output(out, batch)
    loss = torch.stack(losses).mean()
    ok = optimizer_step(model, optimizer, scheduler, loss, max_grad_norm, precision.scaler, d)
    return loss, ok
