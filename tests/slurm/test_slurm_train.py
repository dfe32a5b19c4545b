"""launch/slurm/train.sbatch under a real Slurm controller with two nodes (tests/slurm/cluster.sh).

Each job trains the tiny reference run (tests/helpers.ref_config) on 2 nodes x 1 CPU rank through
the real sbatch -> srun -> node_launch.sh -> pipeline.train path, is stopped at chosen moments by
the real scancel/scontrol (or its --time limit) and requeued, and must end COMPLETED with exactly
the losses of the uninterrupted reference run (``ref_run``). Each node has one stand-in GPU, so
``--gpus-per-node=1`` gives the script SLURM_GPUS_ON_NODE=1 as on a GPU cluster; the time-limit job
asks for none, as on a CPU-only cluster (``--gpus-per-node=0`` with NPROC_PER_NODE).
"""

from __future__ import annotations

import pytest

from tests.helpers import REF_STEPS, read_metrics, ref_config, step_losses, wait_for, write_config

pytestmark = pytest.mark.slurm

SBATCH = "launch/slurm/train.sbatch"


def _submit(slurm, work, tiny_data, tiny_teacher, *sbatch_args, sleep_per_step: float, **env) -> int:
    """Submit the reference run as a 2-node job that writes under ``work``; its job id."""
    cfg = write_config(work / "config.yaml", ref_config(work / "run", tiny_data, tiny_teacher,
                                                        **{"debug.sleep_per_step": sleep_per_step}))
    return slurm.sbatch("--nodes=2", "--cpus-per-task=1", f"--output={work}/job.out", *sbatch_args,
                        SBATCH, str(cfg), SHD_LOG_DIR=str(work / "logs"), **env)


def _node_log(work, node: int, restart: int) -> str:
    """Node ``node``'s log of start ``restart`` ('' until it exists; named after the host, %N)."""
    return "".join(p.read_text(errors="replace") for p in (work / "logs").glob(f"node{node}-*.r{restart}.log"))


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


def test_stops_during_start_up_and_scontrol_requeue_resume_exactly(slurm, ref_run, tmp_path, tiny_data,
                                                                    tiny_teacher):
    """One job, stopped three times: (1) SIGUSR1 to the batch shell as soon as it runs (it is in
    env_setup.sh: the ranks start with the request pending and stop after their first step);
    (2) SIGUSR1 to every process of the step as soon as node_launch.sh has started the ranks (they
    are importing: ignored until their handler is installed, then forwarded); (3) `scontrol requeue`
    mid-run (Slurm requeues it itself; the log says so). Each stop saves a checkpoint; the job ends
    COMPLETED with the uninterrupted run's losses."""
    log = tmp_path / "job.out"
    job = _submit(slurm, tmp_path, tiny_data, tiny_teacher, "--gpus-per-node=1", sleep_per_step=1.0)
    slurm.wait(job, {"RUNNING"}, 60, log)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))                      # (1)

    _wait_restart(slurm, job, 1, log)
    wait_for(lambda: "started ranks" in _node_log(tmp_path, 0, 1), 120, "ranks of restart 1")
    slurm.run("scancel", "--signal=USR1", str(job))                                 # (2)

    _wait_restart(slurm, job, 2, log)
    wait_for(lambda: _steps_done(tmp_path) >= 4, 120, "step 4 after restart 2")
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
