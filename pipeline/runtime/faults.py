"""Preemption signals and exit codes (the one place they are defined).

The SLURM script requeues a job whose training processes exit with ``PREEMPTED_EXIT_CODE``:
SIGTERM or SIGUSR1 (``sbatch --signal=USR1@120``) -- or a first Ctrl-C (SIGINT) -- reached a rank, all
ranks agreed at the next step boundary, a complete checkpoint was written and every rank exited with this code.

Signal handlers only set a flag (a handler that saved directly could run in the middle of a
collective and deadlock); the trainer all-reduces the flag once per step.

A stop requested at any moment of start-up is kept: ``python -m pipeline.train`` installs a
``StopRequest`` before its heavy imports (torch, DeepSpeed, the models), and the trainer's own
``StopRequest``, installed over it, takes over a signal that already arrived, so the ranks stop and
save after their first step. Before that first handler the launcher (launch/slurm/node_launch.sh)
starts each rank with these signals ignored and forwards a signal only once the rank catches it.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import DebugConfig


#: Exit code of a run stopped by SIGTERM/SIGUSR1 after saving a checkpoint (EX_TEMPFAIL:
#: "temporary failure, retry"). Requeue on it; ``--resume auto`` continues from that checkpoint.
PREEMPTED_EXIT_CODE = 75

#: Exit code of a run stopped after ``optim.max_consecutive_nonfinite`` consecutive skipped steps
#: (non-finite loss or gradient norm). Do not requeue: the last good checkpoint is left as it is.
NONFINITE_EXIT_CODE = 3

#: Exit code of a run refused at start-up (bad config, incompatible models/data, refused resume).
CONFIG_ERROR_EXIT_CODE = 2

#: SIGINT (Ctrl-C) is handled like SIGTERM the first time; a second Ctrl-C interrupts at once.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Records the first SIGTERM/SIGUSR1; ``signum`` is 0 until one arrives."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        """Handle the signals from now on; a signal already recorded by the StopRequest whose
        handlers these replace (the early one of ``python -m pipeline.train``) is taken over."""
        for s in HANDLED_SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
            earlier = getattr(self._previous[s], "__self__", None)
            if isinstance(earlier, StopRequest) and earlier.signum and not self.signum:
                self.signum = earlier.signum
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handler(self, signum, frame) -> None:  # only sets the flag
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, no checkpoint
        if not self.signum:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum != 0


def ignore_stop_signals() -> None:
    """After the run: ignore SIGTERM/SIGUSR1 for good. The launchers may send a stop signal again
    (train.sbatch repeats its USR1 until the step ends), and while Python exits it gives the
    signals it handled their default, fatal action back: a late one would turn a finished or
    cleanly stopped rank into one killed by a signal."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)




class FaultInjector:
    """The test-only faults of the ``debug`` config section, each a hook the training loop calls at a
    named point; in a real run (the section left empty) every hook does nothing."""

    def __init__(self, debug: DebugConfig, rank: int) -> None:
        self.debug, self.rank = debug, rank

    def on_loss(self, step: int, micro_batch: int, loss, terms: dict):
        """Before the non-finite check of a micro-batch's loss: debug.nan_loss_at_steps makes rank 0's
        first loss of those (1-based) steps NaN, its logged total too. Returns the loss to use."""
        if step in self.debug.nan_loss_at_steps and self.rank == 0 and micro_batch == 0:
            terms["loss/total"] = terms["loss/total"] * float("nan")
            return loss * float("nan")
        return loss

    def after_step(self, step: int, student) -> None:
        """After optimizer step ``step``, before its save: debug.nonfinite_weights_at_step overwrites
        rank 0's partition of the student's first parameter (a ZeRO-3 engine's) with NaN."""
        if self.debug.nonfinite_weights_at_step == step and self.rank == 0:
            import torch

            with torch.no_grad():
                next(student.module.parameters()).ds_tensor.fill_(float("nan"))

    def between_steps(self) -> None:
        """At the end of a loop iteration (after the step's save and evaluation): debug.sleep_per_step
        seconds of sleep, so that a test can signal a run mid-way."""
        if self.debug.sleep_per_step:
            import time

            time.sleep(self.debug.sleep_per_step)
