"""What a training loop does when a step goes wrong or the user stops it: a loss that is not a number, Ctrl-C.

Both loops (pretraining, fine-tuning) use these the same way: `NonFiniteSteps.record` after every step,
`Interrupt.requested` at the end of every step.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from bertkit.errors import BertkitError
from bertkit.train import distributed
from bertkit.train.distributed import Distributed

logger = logging.getLogger("bertkit")


class NonFiniteSteps:
    """Counts the steps skipped because the loss (or a gradient) was nan or inf, and stops the run after `limit`
    of them in a row.

    Stopping, rather than rolling back to the last checkpoint with a lower learning rate, is deliberate: a
    rollback would silently train a model other than the one the config describes (another schedule, another
    lr, logs that no longer match pretrain_config.json), and the last checkpoint is still there for the user to
    resume from with the change they choose. Isolated bad steps (one batch that overflows) are only skipped.
    """

    def __init__(self, limit: int, hint: str):
        self.limit = limit
        self.hint = hint  # what to try, named with the run's own flags and values
        self.in_row = 0
        self.total = 0
        self.window = 0  # since the last log row; the loop resets it
        self.first_in_row = 0

    def record(self, ok: bool, step: int) -> None:
        """Note whether optimizer step `step` (1-based) was applied; raise after `limit` skipped in a row."""
        if ok:
            self.in_row = 0
            return
        if self.in_row == 0:
            self.first_in_row = step
        self.in_row += 1
        self.total += 1
        self.window += 1
        logger.warning("step %d: the loss is not finite (nan or inf): step skipped, no update (%d in a row, %d in "
                       "all; the run stops at %d in a row)", step, self.in_row, self.total, self.limit)
        if self.in_row >= self.limit:
            raise BertkitError(
                f"step {step}: the loss was not finite (nan or inf) for {self.in_row} steps in a row (steps "
                f"{self.first_in_row}-{step}, each skipped without an update); stopped. Expected a finite loss: "
                f"{self.hint}")


class Interrupt:
    """Ctrl-C (SIGINT), or SIGTERM (a scheduler preempting the job, `kill`), asks the loop to stop at the end of the
    current step, save a checkpoint and exit: the loop raises `stop(...)`, and the CLI exits with status 130 after
    Ctrl-C, 143 after SIGTERM. The same signal again stops at once; checkpoints are written atomically, so even that
    leaves the previous one whole."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self._requested = False
        self._previous: dict = {}
        self.signum: int | None = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():  # signals are only delivered there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self._requested, self.signum = True, signum
        self._restore()
        what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        logger.warning("%s: saving a checkpoint at the end of this step (%s again to stop at once)", what,
                       self.SIGNALS[signum])

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def stop(self, message: str) -> KeyboardInterrupt:
        """What the loop raises once its checkpoint is saved; `status` is the CLI's exit status (128 + signal)."""
        e = KeyboardInterrupt(message)
        e.status = 128 + (self.signum or signal.SIGINT)  # a process that got no signal stops with the others
        return e

    def requested(self, d: Distributed | None = None) -> bool:
        """Whether any process was interrupted (all processes then stop at the same step)."""
        if d is None or not d.enabled:
            return self._requested
        flag = torch.tensor([float(self._requested)], device=d.device)
        return bool(distributed.all_reduce_sum(flag, d).item())
