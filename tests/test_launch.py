"""The launch scripts where a real cluster does not reach: dry runs of allocations this machine
cannot have (2 nodes x 8 GPUs, every GPU-count source), argument refusals, a failing requeue, a
plain scancel's SIGTERM, the grace kill after a crash, and local.sh.

The real paths (two nodes, signals at each moment, requeues, time limit, job arrays) run under a
real Slurm cluster in tests/slurm/. Here the cluster is simulated: tiny stand-in `scontrol`/`srun`
scripts are written into tmp_path and put first on PATH (they stand in for Slurm, not for our
code). The multiprocess test runs local.sh with the real training engine on CPU (gloo).
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.runtime.faults import PREEMPTED_EXIT_CODE
from tests.helpers import REF_STEPS, read_metrics, ref_config, step_losses, tiny_config, wait_for, write_config

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
PREP = REPO / "launch" / "slurm" / "prep.sbatch"
NODE_LAUNCH = REPO / "launch" / "slurm" / "node_launch.sh"
LOCAL = REPO / "launch" / "local.sh"
HOSTS = ("gpu-a017", "gpu-a018")
NODE_ADDR = "10.1.0.17"  # the first host's NodeAddr (`scontrol show node`): the rendezvous address
JOB_ID = 4242421


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def cluster(tmp_path):
    """A simulated 2-node x 8-GPU allocation: (env, calls file). The stand-in `scontrol` records
    every call; `srun` records its arguments and its signals and exits with $FAKE_SRUN_RC."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    _script(bin_dir / "scontrol", f"""
echo "scontrol $*" >> {calls}
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' {' '.join(HOSTS)}; fi
if [ "$1 $2 $3 $4" = "show node -o {HOSTS[0]}" ]; then echo "NodeName=$4 NodeAddr={NODE_ADDR} State=ALLOCATED"; fi
exit "${{FAKE_SCONTROL_RC:-0}}"
""")
    _script(bin_dir / "srun", f"""
echo "srun $*" >> {calls}
trap 'echo "srun got USR1" >> {calls}; exit {PREEMPTED_EXIT_CODE}' USR1
trap 'echo "srun got TERM" >> {calls}; exit {PREEMPTED_EXIT_CODE}' TERM
if [ -n "${{FAKE_SRUN_WAIT:-}}" ]; then
  echo started > {tmp_path / "srun_started"}
  while :; do sleep 0.05; done
fi
exit "${{FAKE_SRUN_RC:-0}}"
""")
    env = dict(os.environ)
    for k in list(env):  # a real allocation of the machine running the tests must not leak in
        if k.startswith(("SLURM_", "SHD_", "MASTER_", "NPROC", "DRY_RUN", "CUDA_VISIBLE", "OMP_NUM_THREADS")):
            del env[k]
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               SLURM_JOB_ID=str(JOB_ID), SLURM_JOB_NAME="shd-train", SLURM_JOB_NODELIST="gpu-a[017-018]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64",
               SLURM_SUBMIT_DIR=str(REPO), SHD_ENV_SETUP="0", SHD_LOG_DIR=str(tmp_path / "logs"))
    return env, calls


def _run(cmd, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60, **kw)


def _rank_commands(stdout: str) -> dict[int, tuple[int, dict, list[str]]]:
    """{global rank: (node rank, env, argv)} from the `[node N rank R] env K=V ... cmd` lines."""
    out = {}
    for line in stdout.splitlines():
        if not line.startswith("[node "):
            continue
        head, _, cmd = line.partition("] ")
        node, rank = int(head.split()[1]), int(head.split()[3])
        words = shlex.split(cmd)
        assert words[0] == "env"
        i = 1
        env = {}
        while "=" in words[i]:
            k, v = words[i].split("=", 1)
            env[k] = v
            i += 1
        out[rank] = (node, env, words[i:])
    return out


# ------------------------------------------------------------------------------------------------
# train.sbatch: dry run on a simulated allocation
# ------------------------------------------------------------------------------------------------

def test_sbatch_dry_run_two_nodes_eight_gpus(cluster, tmp_path, tiny_data, tiny_teacher):
    env, calls = cluster
    # a space: the commands must be quoted correctly; a real config: the dry run checks it first
    cfg = write_config(tmp_path / "my run.yaml", tiny_config(tmp_path / "run", tiny_data, tiny_teacher))
    overrides = ["optim.max_steps=2000", "output_dir=runs/distill a", "--force-resume"]
    res = _run(["bash", SBATCH, "--dry-run", cfg, *overrides], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"config OK: {cfg}: stage distill")  # python -m pipeline.train --check
    assert "2000 steps, output_dir runs/distill a" in res.stdout.splitlines()[0]

    port = 10000 + JOB_ID % 50000
    ranks = _rank_commands(res.stdout)
    assert sorted(ranks) == list(range(16))
    for rank, (node, renv, argv) in ranks.items():
        assert node == rank // 8
        assert renv["RANK"] == str(rank) and renv["LOCAL_RANK"] == str(rank % 8)
        assert renv["WORLD_SIZE"] == "16" and renv["LOCAL_WORLD_SIZE"] == "8"
        assert renv["NODE_RANK"] == str(node)
        assert renv["MASTER_ADDR"] == NODE_ADDR and renv["MASTER_PORT"] == str(port)
        assert renv["OMP_NUM_THREADS"] == "8"  # 64 CPUs of the task / 8 ranks
        assert argv == ["python", "-m", "pipeline.train", "--config", str(cfg), "--resume", "auto", *overrides]

    lines = res.stdout.splitlines()
    # the srun line: one task per node, the per-node launcher with the allocation's numbers
    srun = shlex.split(next(line for line in lines if line.startswith("srun ")))
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=64"} <= set(srun)
    launcher = srun[srun.index("launch/slurm/node_launch.sh"):]
    assert launcher[:11] == ["launch/slurm/node_launch.sh", "--nnodes", "2", "--nproc-per-node", "8",
                             "--master-addr", NODE_ADDR, "--master-port", str(port), "--", "--config"]
    # per node: the same launcher command, told its node rank by Slurm
    for r in (0, 1):
        assert f"# node rank {r} ({HOSTS[r]}) runs:" in lines
        node_line = next(line for line in lines if line.startswith(f"SLURM_NODEID={r} "))
        assert shlex.split(node_line)[1:] == launcher
    assert f"scontrol requeue {JOB_ID}" in res.stdout
    assert calls.read_text().splitlines() == [  # nothing else ran
        "scontrol show hostnames gpu-a[017-018]", f"scontrol show node -o {HOSTS[0]}"]


def _launcher_args(calls: Path) -> dict[str, str]:
    """{option: value} of the node_launch.sh command the stand-in srun was given."""
    srun = shlex.split(next(line for line in calls.read_text().splitlines() if line.startswith("srun ")))
    launcher = srun[srun.index("launch/slurm/node_launch.sh") + 1:srun.index("--")]
    return dict(zip(launcher[::2], launcher[1::2]))


def test_sbatch_overrides_and_gpu_sources(cluster, tmp_path):
    """What the batch shell hands to srun (a real, not dry, start on the simulated allocation)."""
    env, calls = cluster
    cfg = REPO / "configs" / "tiny_cpu.yaml"

    def launcher(env_: dict) -> dict[str, str]:
        calls.unlink(missing_ok=True)
        res = _run(["bash", SBATCH, cfg], env_)
        assert res.returncode == 0, res.stderr
        return _launcher_args(calls)

    # MASTER_PORT/MASTER_ADDR overrides; GPU count from --gpus-per-node=h100:4 instead
    env2 = dict(env, MASTER_PORT="23456", MASTER_ADDR="10.2.0.17", SLURM_GPUS_PER_NODE="h100:4")
    del env2["SLURM_GPUS_ON_NODE"]
    assert launcher(env2) == {"--nnodes": "2", "--nproc-per-node": "4", "--master-addr": "10.2.0.17",
                              "--master-port": "23456"}
    # CUDA_VISIBLE_DEVICES as the last resort; NPROC_PER_NODE beats everything
    env3 = dict(env, CUDA_VISIBLE_DEVICES="0,1")
    del env3["SLURM_GPUS_ON_NODE"]
    assert launcher(env3)["--nproc-per-node"] == "2"
    assert launcher(dict(env3, NPROC_PER_NODE="3"))["--nproc-per-node"] == "3"
    # nothing tells the GPU count: the error says what to set
    del env3["CUDA_VISIBLE_DEVICES"]
    res = _run(["bash", SBATCH, cfg], env3)
    assert res.returncode == 2 and "--gpus-per-node" in res.stderr and "NPROC_PER_NODE" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["configs/tiny_cpu.yaml", "--resume", "none"], "always passes --resume auto"),
    # every spelling that would reach pipeline.train's resume choice (--resum was expanded by argparse)
    (["configs/tiny_cpu.yaml", "--resum", "none"], "'--resum': this script always passes --resume auto"),
    (["configs/tiny_cpu.yaml", "--res=none"], "always passes --resume auto"),
    (["configs/tiny_cpu.yaml", "--resume=none"], "always passes --resume auto"),
    (["configs/tiny_cpu.yaml", "checkpoint.resume=none"], "always passes --resume auto"),
    (["configs/tiny_cpu.yaml", " checkpoint.resume =none"], "always passes --resume auto"),
    (["configs/tiny_cpu.yaml", "checkpoint={resume: none}"], "a whole checkpoint section"),
    (["configs/tiny_cpu.yaml", "--move-aside"], "'--move-aside': moving another run's directories aside"),
    (["configs/tiny_cpu.yaml", "--move"], "moving another run's directories aside is a one-time choice"),
    (["configs/tiny_cpu.yaml", "checkpoint.move_aside=true"], "moving another run's directories aside"),
    (["configs/nope.yaml"], "config 'configs/nope.yaml' not found"),
    ([], "usage: sbatch launch/slurm/train.sbatch"),
])
@pytest.mark.parametrize("dry", [True, False], ids=["dry", "real"])
def test_sbatch_refuses_with_a_clear_message(cluster, args, message, dry):
    env, calls = cluster
    res = _run(["bash", SBATCH, *(["--dry-run"] if dry else []), *args], env)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not calls.exists()  # refused before anything ran: no scontrol, no srun


def test_sbatch_dry_run_checks_the_config_first(cluster):
    env, calls = cluster
    res = _run(["bash", SBATCH, "--dry-run", "configs/tiny_cpu.yaml", "optim.lr=.inf"], env)
    assert res.returncode == 2, res.stderr
    assert "error: config key 'optim.lr': inf is not a finite number" in res.stderr
    assert "the config check above failed" in res.stderr and "nothing was started" in res.stderr
    assert not calls.exists() and not _rank_commands(res.stdout)


def test_sbatch_dry_run_outside_slurm_simulates_one_node(cluster, tmp_path, tiny_data, tiny_teacher):
    """On a login node the dry run checks the config, then shows one node of the script's
    allocation (#SBATCH --gpus-per-node=8, --cpus-per-task=64); a real start is still refused."""
    env, calls = cluster
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", tiny_data, tiny_teacher))
    res = _run(["bash", SBATCH, "--dry-run", cfg], env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"config OK: {cfg}")
    assert lines[1].startswith("# dry run outside Slurm: simulating a one-node allocation")
    ranks = _rank_commands(res.stdout)
    assert sorted(ranks) == list(range(8)) and {r[0] for r in ranks.values()} == {0}
    assert {(r[1]["WORLD_SIZE"], r[1]["OMP_NUM_THREADS"], r[1]["MASTER_PORT"]) for r in ranks.values()} == {
        ("8", "8", "10000")}
    assert not calls.exists()  # no scontrol on a login node

    res = _run(["bash", SBATCH, "--dry-run", cfg, "optim.max_steps=0"], env)  # the check still comes first
    assert res.returncode == 2 and "optim.max_steps must be >= 1" in res.stderr and "simulating" not in res.stdout
    res = _run(["bash", SBATCH, cfg], env)
    assert res.returncode == 2 and "not inside a Slurm job" in res.stderr and "--dry-run" in res.stderr


# ------------------------------------------------------------------------------------------------
# train.sbatch: what a real cluster does not reach (tests/slurm/ runs the rest under real Slurm):
# a failing `scontrol requeue`, and SIGTERM from a plain scancel (with and without requeue-on-TERM)
# ------------------------------------------------------------------------------------------------

def test_sbatch_requeue_failure_is_reported(cluster):
    env, calls = cluster
    res = _run(["bash", SBATCH, "configs/tiny_cpu.yaml"],
               dict(env, FAKE_SRUN_RC=str(PREEMPTED_EXIT_CODE), FAKE_SCONTROL_RC="1"))
    assert res.returncode == PREEMPTED_EXIT_CODE
    assert f"'scontrol requeue {JOB_ID}' failed" in res.stderr and "resubmit the same command" in res.stderr


def _signal_running_sbatch(env, tmp_path, sig) -> tuple[int, list[str], str]:
    proc = subprocess.Popen(["bash", str(SBATCH), "configs/tiny_cpu.yaml"], env=dict(env, FAKE_SRUN_WAIT="1"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "srun_started").exists(), 30, "the stand-in srun")
        time.sleep(0.2)  # let the batch shell reach its `wait`
        proc.send_signal(sig)  # what `#SBATCH --signal=B:USR1@300` / scancel do to the batch shell
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc.returncode, (tmp_path / "calls").read_text().splitlines(), err


def test_sigterm_to_the_batch_shell_does_not_requeue_unless_asked(cluster, tmp_path):
    env, _ = cluster
    rc, log, err = _signal_running_sbatch(env, tmp_path, signal.SIGTERM)
    assert "srun got TERM" in log and f"scontrol requeue {JOB_ID}" not in log, err
    assert rc == PREEMPTED_EXIT_CODE and "SHD_REQUEUE_ON_TERM=1" in err
    (tmp_path / "srun_started").unlink()
    (tmp_path / "calls").unlink()
    rc, log, err = _signal_running_sbatch(dict(env, SHD_REQUEUE_ON_TERM="1"), tmp_path, signal.SIGTERM)
    assert f"scontrol requeue {JOB_ID}" in log and rc == 0, err


# ------------------------------------------------------------------------------------------------
# local.sh, prep.sbatch, node_launch.sh
# ------------------------------------------------------------------------------------------------

def test_local_dry_run_uses_two_cpu_processes(cluster):
    env, _ = cluster  # no GPU on this machine (and CUDA_VISIBLE_DEVICES removed)
    res = _run([LOCAL, "--dry-run", "configs/tiny_cpu.yaml", "optim.max_steps=3"], env)
    assert res.returncode == 0, res.stderr
    ranks = _rank_commands(res.stdout)
    assert sorted(ranks) == [0, 1]
    for rank, (node, renv, argv) in ranks.items():
        assert node == 0 and renv["RANK"] == str(rank) and renv["WORLD_SIZE"] == "2"
        assert renv["DS_ACCELERATOR"] == "cpu" and renv["MASTER_ADDR"] == "127.0.0.1"
        assert argv == ["python", "-m", "pipeline.train", "--config", "configs/tiny_cpu.yaml", "optim.max_steps=3"]
    assert len(_rank_commands(_run([LOCAL, "--dry-run", "configs/tiny_cpu.yaml"], dict(env, NPROC="3")).stdout)) == 3
    assert "2 process(es) on CPU" in res.stderr


def test_prep_dry_run_uses_the_allocations_cpus(cluster):
    env, _ = cluster
    res = _run(["bash", PREP, "--dry-run", "--input", "a b.jsonl", "--tokenizer", "tok", "--out", "out"],
               dict(env, SLURM_CPUS_PER_TASK="16"))
    assert res.returncode == 0, res.stderr
    cmd = next(line for line in res.stdout.splitlines() if line.startswith("python "))
    assert shlex.split(cmd) == ["python", "-m", "data_prep.shard", "--input", "a b.jsonl", "--tokenizer", "tok",
                                "--out", "out", "--workers", "16"]
    res = _run(["bash", PREP, "--dry-run", "--input", "x", "--workers", "3"], env)
    assert shlex.split(res.stdout.splitlines()[1])[-2:] == ["--workers", "3"]


def test_node_launch_kills_ranks_left_hanging_after_a_crash(tmp_path):
    """Rank 1 crashes; rank 0 would wait in a collective forever: after SHD_EXIT_GRACE_S it is killed
    and the node exits with the crash's code. (`python` here is a stand-in for the ranks only.)"""
    real = sys.executable
    _script(tmp_path / "bin" / "python", f"""
if [ "$1" = "-c" ]; then exec {real} "$@"; fi
echo "rank $RANK of $WORLD_SIZE"
if [ "$RANK" = 1 ]; then echo "boom" >&2; exit 7; fi
echo $$ > {tmp_path}/rank0.pid
exec sleep 600
""")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", SHD_EXIT_GRACE_S="1")
    start = time.time()
    res = _run([NODE_LAUNCH, "--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", "1234", "--", "--config", "x.yaml"], env)
    assert res.returncode == 7 and time.time() - start < 30
    assert "[rank 1] boom" in res.stdout and "[rank 0] rank 0 of 2" in res.stdout
    assert "rank 1 failed first: exit code 7" in res.stderr and "killing them" in res.stderr
    pid = int((tmp_path / "rank0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ------------------------------------------------------------------------------------------------
# Real runs (engine on CPU, gloo)
# ------------------------------------------------------------------------------------------------

def _real_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC"))}
    env.update(DS_ACCELERATOR="cpu", SHD_ENV_SETUP="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return env


@pytest.mark.multiprocess
def test_local_sh_usr1_checkpoints_exits_75_and_resumes_exactly(ref_run, tmp_path, tiny_data, tiny_teacher):
    """launch/local.sh with 2 CPU ranks: SIGUSR1 to the launcher (what Slurm's warning signal becomes)
    -> every rank saves and the launcher exits 75; the same command again resumes and finishes with
    the reference run's losses."""
    _, _, ref_records = ref_run
    out = tmp_path / "run"
    slow = write_config(tmp_path / "slow.yaml",
                        ref_config(out, tiny_data, tiny_teacher, **{"debug.sleep_per_step": 0.7}))
    env = dict(_real_env(), NPROC="2")
    log = open(tmp_path / "a.log", "wb")
    proc = subprocess.Popen([str(LOCAL), str(slow)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def at_step_3():
            return any(r.get("step", 0) >= 3 for r in read_metrics(out) if "loss/total" in r)
        wait_for(at_step_3, 300, "step 3")
        proc.send_signal(signal.SIGUSR1)  # local.sh exec'd node_launch.sh: this is the launcher
        assert proc.wait(timeout=300) == PREEMPTED_EXIT_CODE, (tmp_path / "a.log").read_text()[-4000:]
    finally:
        proc.kill()
    assert "SIGUSR1: forwarding to the ranks" in (tmp_path / "a.log").read_text()
    stopped = max(r["step"] for r in read_metrics(out) if "loss/total" in r)
    assert stopped < REF_STEPS

    cfg = write_config(tmp_path / "cfg.yaml", ref_config(out, tiny_data, tiny_teacher))
    res = subprocess.run([str(LOCAL), str(cfg)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr
    got, want = step_losses(read_metrics(out)), step_losses(ref_records)
    assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]


def test_prep_usr1_stops_the_tokenizer_and_requeues(cluster, tmp_path):
    """prep.sbatch at the time-limit warning: the tokenizer's process group is stopped and the job
    requeued (data_prep.shard skips completed shards on the next run). `python` is a stand-in here."""
    env, calls = cluster
    real = sys.executable
    _script(tmp_path / "bin" / "python", f"""
if [ "$1" = "-c" ]; then exec {real} "$@"; fi
echo "$*" > {tmp_path}/prep_args
exec sleep 600
""")
    proc = subprocess.Popen(["bash", str(PREP), "--input", "x", "--tokenizer", "t", "--out", "o"],
                            env=dict(env, SLURM_CPUS_PER_TASK="4"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "prep_args").exists(), 30, "the stand-in tokenizer")
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert (tmp_path / "prep_args").read_text().split() == [
        "-m", "data_prep.shard", "--input", "x", "--tokenizer", "t", "--out", "o", "--workers", "4"]
    assert proc.returncode == 0 and f"scontrol requeue {JOB_ID}" in calls.read_text(), err
