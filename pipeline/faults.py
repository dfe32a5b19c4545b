"""Preemption signals and exit codes (the one place they are defined).

The SLURM script requeues a job whose training processes exit with ``PREEMPTED_EXIT_CODE``:
SIGTERM or SIGUSR1 (``sbatch --signal=USR1@120``) -- or a first Ctrl-C (SIGINT) -- reached a rank, all ranks agreed at the next
step boundary, a complete checkpoint was written and every rank exited with this code.

Signal handlers only set a flag (a handler that saved directly could run in the middle of a
collective and deadlock); the trainer all-reduces the flag once per step.
"""

from __future__ import annotations

import signal

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
        for s in HANDLED_SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
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
