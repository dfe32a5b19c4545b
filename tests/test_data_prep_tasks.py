"""Multi-task data preparation: work units, 3 tasks + merge against one run, resume, merge errors,
streaming memory, the Slurm array submission, and the trainer on merged data."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import make_tokenizer, tiny_documents, write_jsonl
from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

from data_prep import shard as shard_cli
from data_prep.documents import InputReport
from data_prep.merge import merge_tasks
from data_prep.shard import ShardOptions, build_shards, split_of
from data_prep.sources import resolve_inputs
from data_prep.tasks import assign_units, plan_units
from pipeline.data.reader import PackedSampleReader
from shd_common.manifest import DataError, load_manifest, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
DOCS = tiny_documents(150)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"), DOCS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A directory of inputs of every kind that is cut: two .jsonl files, a parquet file of 5 row groups,
    a .txt file; and its documents in input order (what a single run reads)."""
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "a.jsonl", DOCS[:60])
    write_jsonl(root / "b.jsonl", DOCS[60:100] + [""])  # an empty document: counted, skipped
    pq.write_table(pa.table({"text": DOCS[100:149]}), root / "c.parquet", row_group_size=10)
    (root / "d.txt").write_text(DOCS[149])
    return root, DOCS


def _options(corpus_dir: Path, tokenizer_dir: Path, out: Path, **kwargs) -> ShardOptions:
    return ShardOptions(inputs=(str(corpus_dir),), tokenizer=tokenizer_dir, out=out, val_fraction=0.2,
                        shard_tokens=400, **kwargs)


def _run_tasks(options: ShardOptions, count: int, unit_bytes: int = 1500) -> None:
    for index in range(count):
        build_shards(options.replace(task_index=index, task_count=count, unit_bytes=unit_bytes))


def _split_docs(data_dir: Path, split: str) -> list[list[int]]:
    """Every document of a split, in manifest order, read by DeepSpeed's own MMapIndexedDataset."""
    docs = []
    for shard in read_manifest(data_dir).split_shards(split):
        dataset = MMapIndexedDataset(str(data_dir / shard.name), skip_warmup=True)
        docs += [dataset[i].tolist() for i in range(len(dataset))]
    return docs


def _checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- work units --------------------------------------------------------------------------------------------

def test_units_cover_every_document_once_in_order(corpus: tuple[Path, list[str]]) -> None:
    root, docs = corpus
    sources = resolve_inputs([str(root)])
    whole = [d.text for d in sources[0].documents("text", InputReport()) if d.text]
    for unit_bytes in (1, 97, 1500, 10**9):  # 1: a range per byte, most of them empty
        units = plan_units(sources, unit_bytes)
        kinds = {u.kind for u in units}
        assert kinds == ({"bytes", "row_groups", "whole"} if unit_bytes < 5000 else {"whole", "row_groups"})
        texts = [d.text for u in units for d in u.documents(sources, "text", InputReport())]
        assert texts == whole == [d for d in docs if d]
        for count in (1, 3, 7, len(units) + 5):
            tasks = assign_units(units, count)
            assert len(tasks) == count and [u for t in tasks for u in t] == units  # contiguous, each once
            assert tasks == assign_units(plan_units(sources, unit_bytes), count)  # a function of the inputs
    tasks = assign_units(plan_units(sources, 500), 3)
    weights = [sum(u.weight for u in t) for t in tasks]
    assert max(weights) - min(weights) <= 2 * 500 + max(u.weight for u in plan_units(sources, 500))


# --- 1 task against 3 tasks ------------------------------------------------------------------------------

def test_three_tasks_merged_equal_one_run_and_reruns_are_identical(tmp_path: Path, tokenizer_dir: Path,
                                                                    corpus: tuple[Path, list[str]]) -> None:
    root, docs = corpus
    single = tmp_path / "single"
    build_shards(_options(root, tokenizer_dir, single))
    out = tmp_path / "three"
    options = _options(root, tokenizer_dir, out)
    _run_tasks(options, 3)
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(out)  # nothing for readers before the merge
    merged = merge_tasks(out)
    assert read_manifest(out) == merged
    assert {s.name.split("/")[1] for s in merged.shards} == {"task-00000", "task-00001", "task-00002"}
    reference = read_manifest(single)
    assert merged.stats["documents"] == reference.stats["documents"]
    assert merged.stats["tokens"] == reference.stats["tokens"]
    assert merged.stats["input"]["empty_documents"]["count"] == 1
    texts = [d for d in docs if d]
    for split in ("train", "val"):
        assert _split_docs(out, split) == _split_docs(single, split)  # same documents, tokens and order
        # first_doc/last_doc are global input indices, as in a single run
        expected = [i for i, t in enumerate(texts) if split_of(t, 0, 0.2) == split]
        seen = 0
        for shard in merged.split_shards(split):
            assert (shard.first_doc, shard.last_doc) == (expected[seen], expected[seen + shard.documents - 1])
            seen += shard.documents
    assert merged.shards != reference.shards and len(merged.shards) > len(reference.shards)

    before = _checksums(out)
    merge_tasks(out)  # merging again is harmless: the same bytes
    build_shards(options.replace(task_index=1, task_count=3, unit_bytes=1500))  # complete: nothing done
    assert _checksums(out) == before
    shutil.rmtree(out)  # a full rerun from nothing gives the same bytes, file for file
    _run_tasks(options, 3)
    merge_tasks(out)
    assert _checksums(out) == before


def test_killed_task_resumes_to_the_same_bytes(tmp_path: Path, tokenizer_dir: Path,
                                               corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    out = tmp_path / "out"
    options = _options(root, tokenizer_dir, out).replace(task_index=1, task_count=2, unit_bytes=1500)
    build_shards(options)
    task_dir = out / "parts" / "task-00001"
    complete = _checksums(task_dir)
    manifest = load_manifest(task_dir, require_complete=True)
    assert len(manifest.shards) >= 3
    kept = manifest.shards[0]
    # the state a kill after the first committed shard leaves: that shard, the manifest listing it, debris
    write_manifest(replace(manifest, complete=False, shards=(kept,),
                           stats={key: manifest.stats[key] for key in ("rerun", "fingerprints")}))
    for shard in manifest.shards[1:]:
        shard.bin_path(task_dir).unlink()
        shard.idx_path(task_dir).unlink()
    (task_dir / "train-00009.bin.tmp").write_bytes(b"half")
    mtime = kept.bin_path(task_dir).stat().st_mtime_ns
    build_shards(options.replace(workers=2))
    assert _checksums(task_dir) == complete
    assert kept.bin_path(task_dir).stat().st_mtime_ns == mtime  # reused, not rewritten


# --- merge errors ------------------------------------------------------------------------------------------

def test_merge_names_each_task_to_rerun_and_its_command(tmp_path: Path, tokenizer_dir: Path,
                                                        corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    out = tmp_path / "out"
    options = _options(root, tokenizer_dir, out)
    with pytest.raises(DataError, match="no task has written its manifest yet"):
        merge_tasks(out)
    build_shards(options.replace(task_index=0, task_count=3, unit_bytes=1500))
    with pytest.raises(DataError) as error:
        merge_tasks(out)
    message = str(error.value)
    assert "task 1: has not run" in message and "task 2: has not run" in message
    assert "for K in 1-2" in message and "sbatch --array=1-2 launch/slurm/prep.sbatch" in message
    build_shards(options.replace(task_index=2, task_count=3, unit_bytes=1500))
    task1 = out / "parts" / "task-00001"
    build_shards(options.replace(task_index=1, task_count=3, unit_bytes=1500))
    manifest = load_manifest(task1, require_complete=True)
    write_manifest(replace(manifest, complete=False))
    proc = subprocess.run([sys.executable, "-m", "data_prep.shard", "merge", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    command = proc.stderr.split("rerun it: ")[1].split("; then merge again")[0]
    assert "task 1: has not finished" in proc.stderr
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "data_prep.shard"] and words[-2:] == ["--task-index", "1"]
    assert ["--task-count", "3", "--unit-bytes", "1500"] == words[-6:-2]
    subprocess.run([sys.executable, *words[1:]], cwd=REPO, check=True, capture_output=True, timeout=120)  # as told
    assert merge_tasks(out).complete
    # a task made with other options is named, with --overwrite in its command
    build_shards(options.replace(task_index=1, task_count=3, unit_bytes=1500, seed=5, overwrite=True))
    with pytest.raises(DataError, match="run again after the merge; merge again: python -m data_prep.shard merge"):
        read_manifest(out)  # the merged manifest listed the shards task 1 just replaced
    with pytest.raises(DataError, match=r"task 1: made with another.*--overwrite --task-index 1"):
        merge_tasks(out)
    # a single-task output in --out is never overwritten by a merge or joined by tasks
    single = tmp_path / "single"
    build_shards(_options(root, tokenizer_dir, single))
    with pytest.raises(DataError, match="without --task-count"):
        build_shards(options.replace(out=single, task_index=0, task_count=3))


@pytest.mark.parametrize("argv, message", [
    (["--task-index", "1"], "--task-index and --task-count: give both"),
    (["--task-index", "3", "--task-count", "3"], r"--task-index 3: must be in \[0, --task-count 3\)"),
    (["--unit-bytes", "0"], "--unit-bytes 0: must be >= 1"),
])
def test_task_flags_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        shard_cli.main(["--input", "x", "--tokenizer", "t", "--out", "o", *argv])


def test_slurm_array_variables_give_the_task(tmp_path: Path, tokenizer_dir: Path,
                                             corpus: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    shard_cli.main(["--input", str(corpus[0]), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")])
    task = load_manifest(tmp_path / "o" / "parts" / "task-00001", require_complete=True).options["task"]
    assert (task["index"], task["count"]) == (1, 2)
    assert not (tmp_path / "o" / "parts" / "task-00000").exists()


# --- memory ------------------------------------------------------------------------------------------------

def _trivial_tokenizer(out: Path) -> Path:
    """A word-level tokenizer (a few words, the rest <unk>): tokenizing costs next to nothing, so the
    test measures reading and writing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "the": 3, "doc": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    return out


def _peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of one `python -m data_prep.shard` child (its own rusage, not the test process's)."""
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.shard", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss / 1024


def test_a_file_larger_than_the_memory_allowance_is_streamed(tmp_path: Path) -> None:
    tokenizer = _trivial_tokenizer(tmp_path / "tok")
    body = " ".join(["x" * 2000] * 50)  # ~100 KB per document
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    with open(big, "w") as f:
        for i in range(2100):
            f.write(json.dumps({"text": f"doc the {i} {body}"}) + "\n")
    with open(big, "rb") as f:
        head = f.read(big.stat().st_size // 200)
    small.write_bytes(head[:head.rindex(b"\n") + 1])  # whole lines: ~1 MB, same documents
    assert big.stat().st_size > 200e6
    common = ["--tokenizer", str(tokenizer), "--shard-tokens", "50000"]
    baseline = _peak_rss_mb(["--input", str(small), "--out", str(tmp_path / "small"), *common])
    peak = _peak_rss_mb(["--input", str(big), "--out", str(tmp_path / "big"), *common, "--task-index", "0",
                         "--task-count", "1", "--unit-bytes", str(64 << 20)])
    manifest = load_manifest(tmp_path / "big" / "parts" / "task-00000", require_complete=True)
    assert sum(manifest.stats["documents"].values()) == 2100
    assert peak - baseline < 80, (peak, baseline)  # batches of <= 1 MiB of text in flight, not the file


# --- Slurm array submission --------------------------------------------------------------------------------

def _stand_in(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_prep_array_submits_the_array_and_a_dependent_merge(tmp_path: Path) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    # stand-in sbatch: records its arguments, answers --parsable with a job id (then JOBID;CLUSTER)
    _stand_in(bin_dir / "sbatch", f'n=$(wc -l < {calls} 2>/dev/null || echo 0)\n'
                                  f'echo "sbatch $(printf "%q " "$@")" >> {calls}\n'
                                  'if ((n == 0)); then echo 9001; else echo "9002;cluster"; fi\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "SBATCH"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               SBATCH_ARGS="--partition=cpu")
    script = REPO / "launch" / "slurm" / "prep_array.sh"
    args = ["--tasks", "3", "--parallel", "2", "--input", "/data/a b", "--tokenizer", "tok", "--out", "data/x"]
    dry = subprocess.run(["bash", str(script), "--dry-run", *args], env=env, capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    assert not calls.exists()
    lines = [shlex.split(line) for line in dry.stdout.splitlines() if not line.startswith("#")]
    shard_args = ["--input", "/data/a b", "--tokenizer", "tok", "--out", "data/x"]
    assert lines[0] == ["sbatch", "--parsable", "--array=0-2%2", "--partition=cpu", "launch/slurm/prep.sbatch",
                        *shard_args, "--task-count", "3"]
    assert lines[1][:3] == ["sbatch", "--parsable", "--dependency=afterok:ARRAY_JOB_ID"]
    assert lines[1][-4:] == ["launch/slurm/prep.sbatch", "merge", "--out", "data/x"]
    assert lines[2:] == [["python", "-m", "data_prep.shard", *shard_args, "--task-count", "3", "--task-index", str(k)]
                         for k in range(3)]

    real = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert real.returncode == 0, real.stderr
    submitted = [shlex.split(line) for line in calls.read_text().splitlines()]
    assert submitted[0] == lines[0]
    assert submitted[1] == [w.replace("ARRAY_JOB_ID", "9001") for w in lines[1]]
    assert "array job 9001" in real.stdout and "merge job 9002" in real.stdout

    # an array task: prep.sbatch passes the array index and the node's CPUs
    task_env = {**env, "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_ID": "9004",
                "SLURM_SUBMIT_DIR": str(REPO)}
    task = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "prep.sbatch"), "--dry-run",
                           *lines[0][lines[0].index("launch/slurm/prep.sbatch") + 1:]],
                          env=task_env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert task.returncode == 0, task.stderr
    command = next(shlex.split(line) for line in task.stdout.splitlines() if line.startswith("python "))
    assert command == ["python", "-m", "data_prep.shard", *shard_args, "--task-count", "3", "--workers", "16",
                       "--task-index", "2"]
    merge = subprocess.run(["bash", str(REPO / "launch" / "slurm" / "prep.sbatch"), "--dry-run", "merge", "--out",
                            "data/x"], env=task_env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert ["python", "-m", "data_prep.shard", "merge", "--out", "data/x"] in [
        shlex.split(line) for line in merge.stdout.splitlines()]
    bad = subprocess.run(["bash", str(script), "--tasks", "3", *shard_args, "--task-index", "1"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "--task-index: set by this script" in bad.stderr


# --- the trainer on merged data ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged_data(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path,
                corpus: tuple[Path, list[str]]) -> Path:
    out = tmp_path_factory.mktemp("merged") / "data"
    _run_tasks(ShardOptions(inputs=(str(corpus[0]),), tokenizer=tokenizer_dir, out=out, val_fraction=0.1,
                            shard_tokens=2000), 3)
    merge_tasks(out)
    return out


def test_trainer_accepts_merged_data(tmp_path: Path, tokenizer_dir: Path, merged_data: Path) -> None:
    from pipeline.config import config_from_dict
    from pipeline.training.preflight import Preflight
    from tests.helpers import tiny_config

    reader = PackedSampleReader(merged_data, split="train", seq_len=32)  # checks every shard's sha256
    batch = reader.next_batch(4)
    assert batch.shape == (4, 33) and int(batch.max()) < read_manifest(merged_data).tokenizer.vocab_size
    assert reader.num_samples >= 64
    cfg = config_from_dict(tiny_config(tmp_path / "run", (tokenizer_dir, merged_data), None))
    assert Preflight(cfg).vocab == 400


@pytest.mark.multiprocess
def test_pretrain_two_steps_on_merged_data(tmp_path: Path, tokenizer_dir: Path, merged_data: Path) -> None:
    from tests.helpers import run_ranks, tiny_config

    cfg = tiny_config(tmp_path / "run", (tokenizer_dir, merged_data), None, **{"optim.max_steps": 2})
    records = run_ranks(1, cfg, tmp_path)
    losses = [r["loss/total"] for r in records if "loss/total" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
