"""The real Slurm cluster of the tests marked ``slurm`` (tests/slurm/): two nodes on this machine.

``slurm`` (session-scoped) starts it with tests/slurm/cluster.sh on first use and stops every daemon
at the end of the session; it skips, naming what is missing, where the cluster cannot start (no
Debian packages and no root to install them). Jobs are submitted from the repository root, as a
user would, through the real sbatch/scontrol/scancel; their state is read from the controller.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = Path(__file__).with_name("cluster.sh")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


class Cluster:
    """Client side of the test cluster: the environment its commands need and a few queries."""

    def __init__(self, conf: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SHD_"))}
        env.update(SLURM_CONF=str(conf), DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        self.env = env

    def run(self, *cmd: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """Run a command from the repository root with the cluster's environment (+ ``env``)."""
        res = subprocess.run(cmd, cwd=REPO, env={**self.env, **env}, capture_output=True, text=True, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def sbatch(self, *args: str, **env: str) -> int:
        """Submit with ``sbatch --parsable ARGS``; the job id."""
        return int(self.run("sbatch", "--parsable", *args, **env).stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """The controller's record of a job (``scontrol show job -o``) as {field: value}."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.splitlines()[0]
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int | str, states: set[str], timeout: float, log: Path | None = None) -> dict:
        """Poll until the job is in one of ``states`` (a final state it is not waiting for fails)."""
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if job["JobState"] in FINAL or time.time() > deadline:
                tail = log.read_text(errors="replace")[-5000:] if log and log.exists() else ""
                raise AssertionError(f"job {job_id} is {job['JobState']} ({job.get('Reason')}), waited for "
                                     f"{sorted(states)}\n{tail}")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Cluster:
    work = tmp_path_factory.mktemp("slurm_cluster")
    up = subprocess.run(["bash", str(CLUSTER_SH), "up", str(work)], capture_output=True, text=True, timeout=600)
    if up.returncode == 77:
        pytest.skip(up.stderr.strip().splitlines()[-1])
    assert up.returncode == 0, f"tests/slurm/cluster.sh up failed:\n{up.stderr}"
    try:
        yield Cluster(work / "slurm.conf")
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down", str(work)], timeout=120)
