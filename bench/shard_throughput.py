"""Benchmark: `data_prep.shard` throughput against plain batch encoding of the same texts.

    python bench/shard_throughput.py               # trains a tokenizer on python-stdlib first (cached)
    python bench/shard_throughput.py --tokenizer DIR --json bench/results/data_prep.json

Measures, on the `python-stdlib` corpus (no network):
  * plain: `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)` on all documents,
    already in memory, in one process (the Rust backend may use several threads, as for any user),
    and the Rust backend's `encode_batch_fast` alone (what data_prep calls), as a stricter floor;
  * shard (1 and 2 workers): the whole `build_shards` run into an empty directory: resolving and
    reading the files, tokenizer loading, split hashing, encoding, writing shards, checksums, manifest.
Target: shard at 1 worker within 1.3x of plain.

Multi-task runs (`--task-index/--task-count` + `merge`), on the same documents written to one
`.jsonl` file (so that it is cut into byte ranges), each run a `python -m data_prep.shard` process
measured by its own rusage:
  * 1 task (no task flags, 1 worker) against 2 tasks x 1 worker, then merge: wall time and tokens/s
    with the 2 tasks at the same time; CPU seconds (user + sys) per token with them one after the
    other (two processes sharing the cores inflate each other's CPU time, which is not a cost of the
    split). The fixed cost of one more process start (imports, tokenizer load), measured on a
    one-document input, is reported apart: it does not grow with the corpus. Target: split + merge
    add <= 5 % CPU per token;
  * the merge of a 2-task run of about 1,000 shard files (in-process, best of 3).
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from data_prep.documents import InputReport
from data_prep.merge import merge_tasks
from data_prep.shard import ShardOptions, build_shards
from data_prep.sources import iter_documents, resolve_inputs
from data_prep.tokenizer import TokenizerTrainOptions, train_tokenizer
from shd_common.manifest import load_hf_tokenizer, read_manifest

CORPUS = "python-stdlib"
TARGET_RATIO = 1.3
TARGET_SPLIT_OVERHEAD = 0.05
MERGE_FILES = 1000
REPO = Path(__file__).resolve().parents[1]


def _tokenizer(args: argparse.Namespace) -> Path:
    if args.tokenizer is not None:
        return args.tokenizer
    cached = args.work_dir / f"tokenizer-stdlib-{args.vocab_size}"
    if not (cached / "tokenizer.json").is_file():
        print(f"training a {args.vocab_size}-piece tokenizer on {CORPUS} into {cached} ...", file=sys.stderr)
        train_tokenizer(TokenizerTrainOptions(inputs=(CORPUS,), out=cached, vocab_size=args.vocab_size,
                                              max_sentences=300_000, overwrite=True))
    return cached


def _plain(tokenizer_dir: Path) -> tuple[list[dict], int, int]:
    """Time the wrapper call users write, and the Rust backend call data_prep uses, on in-memory texts."""
    texts = [doc.text for doc in iter_documents(resolve_inputs([CORPUS]), "text", InputReport())]
    tokenizer = load_hf_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    wrapper_s = time.perf_counter() - start
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    start = time.perf_counter()
    backend.encode_batch_fast(texts, add_special_tokens=False)
    backend_s = time.perf_counter() - start
    tokens = sum(map(len, ids)) + len(texts)  # counted with one EOS per document, as the shards store them
    rows = [{"run": "plain batch encode", "workers": 1, "seconds": wrapper_s, "tokens": tokens},
            {"run": "backend encode_fast", "workers": 1, "seconds": backend_s, "tokens": tokens}]
    return rows, tokens, len(texts)


def _shard(tokenizer_dir: Path, out: Path, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = build_shards(ShardOptions(inputs=(CORPUS,), tokenizer=tokenizer_dir, out=out, workers=workers))
    seconds = time.perf_counter() - start
    return seconds, sum(s.tokens for s in manifest.shards)


def _corpus_jsonl(work_dir: Path) -> Path:
    """The corpus's documents as one .jsonl file (a multi-task run cuts it into byte ranges)."""
    path = work_dir / "stdlib.jsonl"
    if not path.is_file():
        docs = iter_documents(resolve_inputs([CORPUS]), "text", InputReport())
        path.write_text("".join(json.dumps({"text": doc.text}) + "\n" for doc in docs))
    return path


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}  # one thread: the task's CPU is what it uses
    return subprocess.Popen([sys.executable, "-m", "data_prep.shard", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> float:
    """Wait for `proc`; its CPU seconds (user + sys, its own children included: none at 1 worker)."""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{proc.args} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_utime + usage.ru_stime


def _tasks(tokenizer_dir: Path, work_dir: Path) -> dict:
    """1 task against 2 tasks x 1 worker (at once) + merge, as processes: wall, tokens/s, CPU per token."""
    corpus = _corpus_jsonl(work_dir)
    unit_bytes = corpus.stat().st_size // 16 + 1
    common = ["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--workers", "1"]
    one_doc = work_dir / "one.jsonl"
    one_doc.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n")
    for out in ("tasks-1", "tasks-2", "one-doc"):
        shutil.rmtree(work_dir / out, ignore_errors=True)
    start_cpu = _finish(_start(["--input", str(one_doc), "--tokenizer", str(tokenizer_dir),
                                "--out", str(work_dir / "one-doc")]))
    start = time.perf_counter()
    one_cpu = _finish(_start([*common, "--out", str(work_dir / "tasks-1")]))
    one_wall = time.perf_counter() - start
    tokens = sum(s.tokens for s in read_manifest(work_dir / "tasks-1").shards)

    def two_tasks(out: Path, at_once: bool) -> tuple[float, list[float], float]:
        """Wall seconds, CPU seconds of each task and of the merge."""
        shutil.rmtree(out, ignore_errors=True)
        def task(k: int) -> subprocess.Popen:
            return _start([*common, "--out", str(out), "--task-count", "2", "--task-index", str(k),
                           "--unit-bytes", str(unit_bytes)])

        start = time.perf_counter()
        if at_once:
            task_cpu = [_finish(p) for p in [task(k) for k in range(2)]]
        else:
            task_cpu = [_finish(task(k)) for k in range(2)]
        merge_cpu = _finish(_start(["merge", "--out", str(out)]))
        if read_manifest(out).stats["tokens"] != read_manifest(work_dir / "tasks-1").stats["tokens"]:
            raise SystemExit("token counts differ between the 1-task and the merged 2-task output")
        return time.perf_counter() - start, task_cpu, merge_cpu

    wall, _, _ = two_tasks(work_dir / "tasks-2", at_once=True)
    _, task_cpu, merge_cpu = two_tasks(work_dir / "tasks-2", at_once=False)
    two_cpu = sum(task_cpu) + merge_cpu
    return {"tokens": tokens, "unit_bytes": unit_bytes, "process_start_cpu_s": start_cpu,
            "one_task": {"wall_s": one_wall, "cpu_s": one_cpu, "tokens_per_s": tokens / one_wall,
                         "cpu_us_per_token": 1e6 * one_cpu / tokens},
            "two_tasks": {"wall_s": wall, "cpu_s": two_cpu, "task_cpu_s": task_cpu, "merge_cpu_s": merge_cpu,
                          "tokens_per_s": tokens / wall, "cpu_us_per_token": 1e6 * two_cpu / tokens},
            "cpu_overhead": two_cpu / one_cpu - 1,
            "cpu_overhead_without_extra_start": (two_cpu - 2 * start_cpu) / (one_cpu - start_cpu) - 1}


def _merge_time(tokenizer_dir: Path, work_dir: Path, tokens: int) -> dict:
    """Seconds to merge a 2-task run of about MERGE_FILES shard files (best of 3); shards hold whole documents,
    so on this corpus they overshoot `shard_tokens` about 2x: tokens / MERGE_FILES gives ~MERGE_FILES / 2 shards."""
    out = work_dir / "merge-bench"
    shutil.rmtree(out, ignore_errors=True)
    corpus = _corpus_jsonl(work_dir)
    options = ShardOptions(inputs=(str(corpus),), tokenizer=tokenizer_dir, out=out, val_fraction=0,
                           shard_tokens=max(1, tokens // MERGE_FILES), task_count=2, task_index=0,
                           unit_bytes=corpus.stat().st_size // 16 + 1)
    for k in range(2):
        build_shards(replace(options, task_index=k))
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        manifest = merge_tasks(out)
        seconds.append(time.perf_counter() - start)
    return {"shards": len(manifest.shards), "files": 2 * len(manifest.shards), "seconds": min(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: train one on python-stdlib)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained tokenizer")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "shd-bench-data-prep")
    parser.add_argument("--json", type=Path, default=Path("bench/results/data_prep.json"),
                        help="where to write the results")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = _tokenizer(args)

    rows, plain_tokens, documents = _plain(tokenizer_dir)
    plain_s = rows[0]["seconds"]
    for workers in (1, 2):
        seconds, tokens = _shard(tokenizer_dir, args.work_dir / f"shards-w{workers}", workers)
        if tokens != plain_tokens:  # same texts, same tokenizer: the same tokens
            raise SystemExit(f"token count mismatch: shard {tokens} vs plain {plain_tokens}")
        rows.append({"run": "data_prep.shard", "workers": workers, "seconds": seconds, "tokens": tokens})
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
        row["ratio_to_plain"] = row["seconds"] / plain_s

    print(f"\n{CORPUS}: {documents:,} documents, {plain_tokens:,} tokens (with EOS), "
          f"{os.cpu_count()} CPUs, tokenizer {tokenizer_dir}")
    print(f"{'run':<21} {'workers':>7} {'seconds':>8} {'tokens/s':>12} {'x plain':>8}")
    for row in rows:
        print(f"{row['run']:<21} {row['workers']:>7} {row['seconds']:>8.2f} {row['tokens_per_s']:>12,.0f} "
              f"{row['ratio_to_plain']:>8.2f}")
    one_worker = rows[2]["ratio_to_plain"]
    verdict = "meets" if one_worker <= TARGET_RATIO else "misses"
    print(f"shard at 1 worker is {one_worker:.2f}x plain encoding: {verdict} the {TARGET_RATIO}x target")

    tasks = _tasks(tokenizer_dir, args.work_dir)
    print(f"\nmulti-task, same documents as one .jsonl file ({tasks['tokens']:,} tokens, units of "
          f"{tasks['unit_bytes']:,} bytes), each task 1 worker; wall: 2 tasks at once, CPU: one after the other")
    print(f"{'run':<28} {'wall s':>8} {'tokens/s':>12} {'CPU s':>8} {'CPU us/token':>13}")
    for name, key in (("1 task", "one_task"), ("2 tasks + merge", "two_tasks")):
        row = tasks[key]
        print(f"{name:<28} {row['wall_s']:>8.2f} {row['tokens_per_s']:>12,.0f} {row['cpu_s']:>8.2f} "
              f"{row['cpu_us_per_token']:>13.3f}")
    print(f"merge process: {tasks['two_tasks']['merge_cpu_s']:.2f} CPU s; one more process start: "
          f"{tasks['process_start_cpu_s']:.2f} CPU s (fixed, not per token)")
    overhead = tasks["cpu_overhead_without_extra_start"]
    print(f"split + merge CPU per token: {100 * tasks['cpu_overhead']:+.1f} % in all, "
          f"{100 * overhead:+.1f} % without the extra process start: "
          f"{'meets' if overhead <= TARGET_SPLIT_OVERHEAD else 'misses'} the "
          f"{100 * TARGET_SPLIT_OVERHEAD:.0f} % target")
    merge = _merge_time(tokenizer_dir, args.work_dir, tasks["tokens"])
    print(f"merge of {merge['shards']:,} shards ({merge['files']:,} files): {merge['seconds']:.3f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"corpus": CORPUS, "documents": documents, "cpus": os.cpu_count(),
                                     "python": platform.python_version(), "tokenizer": str(tokenizer_dir),
                                     "target_ratio": TARGET_RATIO, "rows": rows, "tasks": tasks,
                                     "target_split_overhead": TARGET_SPLIT_OVERHEAD, "merge": merge},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
