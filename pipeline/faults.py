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
from typing import Optional

from pydantic import model_validator

from pipeline.settings import ConfigError, Float, Section, setting

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

    def install(self) -> "StopRequest":
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


class DebugConfig(Section):
    """Fault injection for tests; leave empty in real runs."""

    nan_loss_at_steps: list[int] = setting([], "Make the loss NaN on rank 0 at these (1-based) steps.")
    sleep_per_step: Float = setting(0.0, "Seconds to sleep after each step (lets a test signal mid-run).")
    hang_in_save_at_step: Optional[int] = setting(None, "During this step's save, after the DeepSpeed files are "
                                                        "written and before the commit, touch <ckpt>/SAVE_HANG "
                                                        "and sleep (a test SIGKILLs it).")
    nonfinite_weights_at_step: Optional[int] = setting(None, "After this optimizer step, overwrite rank 0's share of "
                                                             "the student's weights with NaN (tests that no "
                                                             "checkpoint or export is written from non-finite "
                                                             "weights).")

    @model_validator(mode="after")
    def _one_based(self) -> "DebugConfig":
        # steps are 1-based: a step 0 would never fire and the test would pass vacuously
        for k in ("hang_in_save_at_step", "nonfinite_weights_at_step"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"debug.{k} must be >= 1 (a 1-based step) or empty, got {getattr(self, k)}")
        if not all(s >= 1 for s in self.nan_loss_at_steps):
            raise ConfigError(f"debug.nan_loss_at_steps must hold 1-based steps (>= 1), got {self.nan_loss_at_steps}")
        return self
