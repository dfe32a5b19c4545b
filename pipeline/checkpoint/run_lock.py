"""One live run per output_dir: an exclusive ``flock`` on ``<output_dir>/run.lock`` (and on
``<checkpoint.dir>/run.lock`` when checkpoints are written outside the output_dir, so that two runs
with different output_dirs never share one checkpoint directory).

Taken by rank 0 before the run writes anything there, held until the process ends. The kernel
releases it when the holder dies, however it dies (SIGKILL, OOM, a node reboot on a local disk), so
there are no stale locks: a lock file left behind by a dead run is simply taken again. While it is
held, the file names the holder (host, pid, run id, start time), which is what a second start is
refused with. The lock says only "a process is running here"; whether a start may continue the
run whose files it finds is ``pipeline.checkpoint.run_dir.claim``'s question, asked under the lock.

``flock`` is per open file: two starts in one process also exclude each other. On network file
systems it is as reliable as their lock support (NFSv4 and Lustre with ``flock`` mounts honour it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from shd_common.settings import ConfigError

LOCK_FILE = "run.lock"


class RunDirLocked(ConfigError):
    """Another live process holds the output_dir (or the checkpoint.dir); the message names it."""


class RunLock:
    """The held lock of one run directory (keep the object: closing its file releases the lock).
    ``key`` is the config key that names the directory (``output_dir`` or ``checkpoint.dir``)."""

    def __init__(self, directory: Path, key: str = "output_dir") -> None:
        self.path = directory / LOCK_FILE
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{key} {directory} exists and is not a directory: choose another {key}=...")
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._fd)
            os.close(self._fd)
            raise RunDirLocked(f"{key} {directory} is in use by a live run ({holder}; lock {self.path}): "
                               f"two runs in one directory would mix their checkpoints and logs. Wait for it "
                               f"to end (or stop it), or start this run with another {key}=...") from None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": None,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        self._write()

    def set_run_id(self, run_id: str) -> None:
        """Name the run in the lock file once it is known (after the claim)."""
        self.holder["run_id"] = run_id
        self._write()

    def _write(self) -> None:
        # in place, not by rename: the lock belongs to this inode
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(self.holder) + "\n").encode(), 0)

    def release(self) -> None:
        os.close(self._fd)  # closing the only descriptor of the open file releases the flock


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it may be mid-write: then only 'another process')."""
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode())
        return (f"host {h['host']}, pid {h['pid']}, run {h.get('run_id') or '(starting)'}, "
                f"started {h['started']}")
    except (ValueError, KeyError, TypeError):
        return "another process"
