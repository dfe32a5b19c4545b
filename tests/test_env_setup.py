"""launch/env_setup.sh under a stop signal: Slurm's scancel sends SIGTERM to every process of a job,
also to the `python -c "import ..."` checks the set-up is running; a check killed by it must not
read as "not installed" and start a long pip install (the batch script would then be killed after
KillWait without its "not requeued" line: caught by the real-Slurm test in CI)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup_copy(tmp_path: Path) -> Path:
    """A copy of env_setup.sh beside a pyproject.toml whose install stamp is current (SHD_NO_VENV=1
    installs into the current environment, which already has the project)."""
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "env_setup.sh", root / "launch" / "env_setup.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()
    (root / ".shd-installed").write_text(digest + "\n")
    return root


def _slow_python(tmp_path: Path) -> Path:
    """A `python` on PATH that takes a second and says when it checks the project's imports (the
    check after torch's), so that a signal lands in the middle of that check. It refuses `-m pip`:
    a failing test must not reinstall the test environment's project from the copy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/bash\ncase "$*" in *pipeline*) touch "{tmp_path}/started";; "-m pip"*) exit 99;; esac\n'
                       f'sleep 1\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return bin_dir


def test_a_sigterm_to_the_whole_job_during_the_checks_installs_nothing(tmp_path: Path) -> None:
    root = _setup_copy(tmp_path)
    env = {**os.environ, "SHD_NO_VENV": "1", "PATH": f"{_slow_python(tmp_path)}:{os.environ['PATH']}"}
    script = (f'got_term=0; trap "got_term=1" TERM; source "{root}/launch/env_setup.sh"; rc=$?; '
              'echo "rc=$rc got_term=$got_term"')
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as slurmstepd signals every process of the job
    out, _ = proc.communicate(timeout=120)
    assert "rc=0 got_term=1" in out, out
    assert "[setup]" not in out, out  # no install started
