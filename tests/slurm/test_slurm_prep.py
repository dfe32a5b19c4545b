"""launch/slurm/prep_array.sh and prep.sbatch under a real Slurm controller with two nodes.

A real 3-task array and its real ``afterok`` merge give the token streams of a one-process run;
a SIGUSR1 to one task during its start-up requeues only that task; a cancelled task is recovered
the way launch/slurm/README.md says ("After a failure"); a merge that sbatch refuses cancels the
array and names it.
"""

from __future__ import annotations

import re

import pytest
from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

from data_prep.shard import ShardOptions, build_shards
from shd_common.manifest import read_manifest
from tests.helpers import wait_for

pytestmark = pytest.mark.slurm

SHARD_OPTS = ["--val-fraction", "0.1", "--shard-tokens", "1000", "--unit-bytes", "2000"]
SMALL = ["--cpus-per-task=1", "--mem=500M"]  # instead of prep.sbatch's 32 CPUs and 64 GB


@pytest.fixture(scope="module")
def corpus(tiny_data):
    """(input .jsonl, tokenizer dir) of the tiny corpus (tests/data_fixtures.py)."""
    tokenizer_dir = tiny_data[0]
    return tokenizer_dir.parent / "corpus.jsonl", tokenizer_dir


def _streams(data_dir) -> dict[str, list[list[int]]]:
    """Every document of each split, in manifest order (read with DeepSpeed's MMapIndexedDataset)."""
    out = {}
    for split in ("train", "val"):
        docs = []
        for shard in read_manifest(data_dir).split_shards(split):
            dataset = MMapIndexedDataset(str(data_dir / shard.name), skip_warmup=True)
            docs += [dataset[i].tolist() for i in range(len(dataset))]
        out[split] = docs
    return out


def _prep_array(slurm, work, corpus, *extra_args, check: bool = True, **env):
    """Run prep_array.sh with 3 tasks into work/out; (array id, merge id, completed process)."""
    inputs, tok = corpus
    work.mkdir(parents=True, exist_ok=True)  # the jobs' --output directory (sbatch does not create it)
    env = {"SBATCH_ARGS": " ".join([*SMALL, f"--output={work}/%x-%j.out"]), **env}
    res = slurm.run("bash", "launch/slurm/prep_array.sh", "--tasks", "3", "--input", str(inputs), "--tokenizer",
                    str(tok), "--out", str(work / "out"), *SHARD_OPTS, *extra_args, check=check, **env)
    ids = re.search(r"array job (\d+) .* merge job\s+(\d+)", res.stdout, re.S)
    return (int(ids[1]), int(ids[2]), res) if ids else (None, None, res)


def test_array_and_afterok_merge_equal_one_run_and_a_cancelled_task_is_recovered(slurm, corpus, tmp_path):
    inputs, tok = corpus
    one = tmp_path / "one"
    build_shards(ShardOptions(inputs=(str(inputs),), tokenizer=tok, out=one, val_fraction=0.1, shard_tokens=1000))
    want = _streams(one)

    # Two arrays at once: "ok" runs through (task 2 gets SIGUSR1 as it starts: only it is requeued;
    # it is the task that carries the array's own job id, so a requeue of "ARRAY" instead of
    # "ARRAY_2" would requeue them all); in "cancelled", task 1 is cancelled: its merge never runs.
    ok_array, ok_merge, _ = _prep_array(slurm, tmp_path / "ok", corpus)
    bad_array, bad_merge, _ = _prep_array(slurm, tmp_path / "cancelled", corpus)
    slurm.run("scancel", f"{bad_array}_1")
    slurm.wait(f"{ok_array}_2", {"RUNNING"}, 60)
    slurm.run("scancel", "--batch", "--signal=USR1", f"{ok_array}_2")

    # README, "After a failure": scancel the stuck merge, resubmit the failed task with the same
    # arguments and --task-count, then merge (while the "ok" array goes on).
    wait_for(lambda: slurm.job(bad_merge)["Reason"] == "DependencyNeverSatisfied", 120, "the stuck merge")
    slurm.run("scancel", str(bad_merge))
    out = tmp_path / "cancelled" / "out"
    rerun = slurm.sbatch("--array=1", *SMALL, f"--output={tmp_path}/rerun.out",
                         "launch/slurm/prep.sbatch", "--input", str(inputs), "--tokenizer", str(tok), "--out",
                         str(out), *SHARD_OPTS, "--task-count", "3")
    merge = slurm.sbatch(f"--dependency=afterok:{rerun}", *SMALL, f"--output={tmp_path}/merge.out",
                         "launch/slurm/prep.sbatch", "merge", "--out", str(out))

    slurm.wait(ok_merge, {"COMPLETED"}, 180, tmp_path / "ok" / f"shd-prep-merge-{ok_merge}.out")
    assert slurm.job(f"{ok_array}_2")["Restarts"] == "1"
    assert {slurm.job(f"{ok_array}_{k}")["Restarts"] for k in (0, 1)} == {"0"}
    assert _streams(tmp_path / "ok" / "out") == want
    slurm.wait(merge, {"COMPLETED"}, 120, tmp_path / "merge.out")
    assert _streams(out) == want


def test_a_refused_merge_cancels_the_array(slurm, corpus, tmp_path):
    """The merge asks for more memory than a node has: sbatch refuses it, prep_array.sh cancels
    the array it had submitted and says so (no array left pending without its merge)."""
    _, _, res = _prep_array(slurm, tmp_path, corpus, check=False, MERGE_SBATCH_ARGS="--mem=100G")
    assert res.returncode == 2, res.stdout + res.stderr
    array = int(res.stderr.split("so array job ")[1].split()[0])
    assert "sbatch refused the merge job" in res.stderr and "MERGE_SBATCH_ARGS" in res.stderr
    assert slurm.job(array)["JobState"] == "CANCELLED"
