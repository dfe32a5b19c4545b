"""launch/slurm/train.sbatch under a real Slurm controller with two nodes (tests/slurm/cluster.sh).

Each job trains the tiny reference run (tests/helpers.ref_config) on 2 nodes x 1 CPU rank through
the real sbatch -> srun -> node_launch.sh -> pipeline.train path, is stopped at chosen moments by
the real scancel/scontrol (or its --time limit) and requeued, and must end COMPLETED with exactly
the losses of the uninterrupted reference run (``ref_run``). Each node has one stand-in GPU, so
``--gpus-per-node=1`` gives the script SLURM_GPUS_ON_NODE=1 as on a GPU cluster; the time-limit job
asks for none, as on a CPU-only cluster (``--gpus-per-node=0`` with NPROC_PER_NODE).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers import REF_STEPS, read_metrics, ref_config, step_losses, wait_for, write_config

pytestmark = pytest.mark.slurm

SBATCH = "launch/slurm/train.sbatch"
# Jobs whose start-up is not under test skip launch/env_setup.sh (the test's own environment is
# the project's .venv already): ~5 s less per start on a 2-core machine.
NO_SETUP = {"SHD_ENV_SETUP": "0"}


def _submit(slurm, work, tiny_data, tiny_teacher, *sbatch_args, sleep_per_step: float, **env) -> int:
    """Submit the reference run as a 2-node job that writes under ``work``; its job id."""
    cfg = write_config(work / "config.yaml", ref_config(work / "run", tiny_data, tiny_teacher,
                                                        **{"debug.sleep_per_step": sleep_per_step}))
    return slurm.sbatch("--nodes=2", "--cpus-per-task=1", f"--output={work}/job.out", *sbatch_args,
                        SBATCH, str(cfg), SHD_LOG_DIR=str(work / "logs"), **env)


def _node_log(work, node: int, restart: int) -> str:
    """Node ``node``'s log of start ``restart`` ('' until it exists; named after the host, %N)."""
    return "".join(p.read_text(errors="replace") for p in (work / "logs").glob(f"node{node}-*.r{restart}.log"))


def _wait_until_a_rank_imports(work) -> None:
    """Wait (polling fast) until node 0 of restart 1 has started its rank and the rank has become
    python: it is importing, before (on this machine, within ~0.2 s of) installing its handler."""
    deadline = time.time() + 120
    while not (pids := re.search(r"\(pids (\d+)\)", _node_log(work, 0, 1))):
        assert time.time() < deadline, "node 0 did not start its rank"
        time.sleep(0.02)
    status = Path(f"/proc/{pids[1]}/status")
    while status.exists() and not status.read_text().startswith("Name:\tpython"):
        assert time.time() < deadline, status.read_text()
        time.sleep(0.005)


def _steps_done(work) -> int:
    return max((r["step"] for r in read_metrics(work / "run") if "loss/total" in r), default=0)


def _wait_restart(slurm, job: int, restart: int, log) -> None:
    """Wait until the job runs again after its ``restart``-th requeue."""
    wait_for(lambda: int(slurm.job(job)["Restarts"]) >= restart, 120, f"restart {restart}", None)
    slurm.wait(job, {"RUNNING"}, 120, log)


def _assert_same_as_reference(work, ref_run) -> None:
    got, want = step_losses(read_metrics(work / "run")), step_losses(ref_run[2])
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]  # bit for bit


@pytest.fixture(scope="module")
def time_limit_job(slurm, tmp_path_factory, tiny_data, tiny_teacher):
    """(job id, work dir) of a job that cannot finish within its 2-minute --time: submitted before
    the module's first test so that it runs while that test drives its own job. SIGUSR1 60 s
    before the limit (the controller checks every 30 s and sends it up to 30 s early: 30-60 s
    after each start); 10 steps of 8 s take longer than the latest signal even with no start-up
    time (with 5 s steps an idle machine finished the run first). No GPU, as on a CPU-only cluster
    (--gpus-per-node=0 and NPROC_PER_NODE)."""
    work = tmp_path_factory.mktemp("time_limit")
    job = _submit(slurm, work, tiny_data, tiny_teacher, "--time=2", "--signal=B:USR1@60", "--gpus-per-node=0",
                  sleep_per_step=8.0, NPROC_PER_NODE="1", **NO_SETUP)
    return job, work


def test_stops_during_start_up_and_scontrol_requeue_resume_exactly(slurm, time_limit_job, ref_run, tmp_path,
                                                                    tiny_data, tiny_teacher):
    """One job, stopped three times: (1) SIGUSR1 to the batch shell as soon as it runs (it is in
    env_setup.sh: the ranks start with the request pending and stop after their first step);
    (2) SIGUSR1 to every process of the step as soon as node_launch.sh has started the ranks (they
    are importing: ignored until their handler is installed, then forwarded); (3) `scontrol requeue`
    mid-run (Slurm requeues it itself; the log says so). Each stop saves a checkpoint; the job ends
    COMPLETED with the uninterrupted run's losses."""
    log = tmp_path / "job.out"
    job = _submit(slurm, tmp_path, tiny_data, tiny_teacher, "--gpus-per-node=1", "--time=10", sleep_per_step=0.5)
    slurm.wait(job, {"RUNNING"}, 60, log)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))                      # (1)

    _wait_restart(slurm, job, 1, log)
    _wait_until_a_rank_imports(tmp_path)
    slurm.run("scancel", "--signal=USR1", str(job))                                 # (2)

    _wait_restart(slurm, job, 2, log)
    wait_for(lambda: _steps_done(tmp_path) >= 3, 120, "step 3 after restart 2")
    slurm.run("scontrol", "requeue", str(job))                                      # (3)

    _wait_restart(slurm, job, 3, log)
    final = slurm.wait(job, {"COMPLETED"}, 180, log)
    text = log.read_text()
    assert final["Restarts"] == "3", text
    assert "SIGUSR1 before the ranks started" in text                               # (1)
    assert text.count("scontrol requeue") >= 2                                      # (1), (2)
    assert "Slurm is requeueing this job itself" in text and "not requeued" not in text  # (3), defect 4
    assert "master 127.0.0.1:" in text                                              # NodeAddr, defect 6
    ranks = _node_log(tmp_path, 1, 1)
    assert "SIGUSR1: forwarding to the ranks" in ranks and "node exits 75" in ranks, ranks
    _assert_same_as_reference(tmp_path, ref_run)


def test_time_limit_requeues_until_done(slurm, time_limit_job, ref_run):
    """The 1-minute job of ``time_limit_job``: each SIGUSR1 from the time limit saves and requeues
    (at least once), and the job ends COMPLETED with the uninterrupted run's losses."""
    job, work = time_limit_job
    final = slurm.wait(job, {"COMPLETED"}, 400, work / "job.out")
    text = (work / "job.out").read_text()
    assert int(final["Restarts"]) >= 1, text
    assert "SIGUSR1 (time limit near)" in text and "scontrol requeue" in text
    _assert_same_as_reference(work, ref_run)


def test_failures_and_a_cancel_during_start_up_say_what_happened(slurm, tmp_path, tiny_data, tiny_teacher):
    """Three jobs that end in seconds and say why: a rank killed by SIGKILL (the node log says
    which signal; the job is not requeued), a MASTER_ADDR that does not resolve, and a plain
    scancel (SIGTERM) while the batch shell is still in env_setup.sh (the ranks are not started)."""
    one_node = ("--nodes=1", "--gpus-per-node=0")
    killed = _submit(slurm, tmp_path / "killed", tiny_data, tiny_teacher, *one_node, sleep_per_step=0.0,
                     NPROC_PER_NODE="1", **NO_SETUP)
    unresolved = _submit(slurm, tmp_path / "addr", tiny_data, tiny_teacher, "--gpus-per-node=0",
                         sleep_per_step=0.0, NPROC_PER_NODE="1", MASTER_ADDR="no-such-node.invalid", **NO_SETUP)
    cancelled = _submit(slurm, tmp_path / "cancel", tiny_data, tiny_teacher, *one_node, sleep_per_step=0.0,
                        NPROC_PER_NODE="1")
    slurm.wait(cancelled, {"RUNNING"}, 60)
    slurm.run("scancel", str(cancelled))
    wait_for(lambda: "started ranks" in _node_log(tmp_path / "killed", 0, 0), 120, "the ranks")
    pid = int(re.search(r"\(pids (\d+)\)", _node_log(tmp_path / "killed", 0, 0)).group(1))
    os.kill(pid, signal.SIGKILL)
    slurm.wait(killed, {"FAILED"}, 120, tmp_path / "killed" / "job.out")
    node = _node_log(tmp_path / "killed", 0, 0)
    assert "rank 0 failed first: killed by signal SIGKILL (exit status 137)" in node, node
    assert "not requeued" in (tmp_path / "killed" / "job.out").read_text()

    slurm.wait(unresolved, {"FAILED"}, 120, tmp_path / "addr" / "job.out")
    text = (tmp_path / "addr" / "job.out").read_text()
    assert "MASTER_ADDR 'no-such-node.invalid'" in text and "does not resolve" in text, text
    assert not (tmp_path / "addr" / "logs").exists()  # failed before srun

    slurm.wait(cancelled, {"CANCELLED"}, 120)
    wait_for(lambda: "not requeued" in (tmp_path / "cancel" / "job.out").read_text(), 60, "the cancelled job's end")
    text = (tmp_path / "cancel" / "job.out").read_text()
    assert "SIGTERM before the ranks started: not starting them" in text, text
    assert not (tmp_path / "cancel" / "logs").exists()
