"""Tokenize a corpus into Megatron-compatible mmap shards (`.bin` + `.idx`) with a manifest.

    python -m data_prep.shard --input python-stdlib --tokenizer runs/tok --out runs/data --workers 2

Each document becomes one entry: its tokens followed by EOS. Each document goes to `train` or `val`
by a hash of its text and --seed, so the split does not depend on --workers or on resuming. Each
split is cut into shards of at least --shard-tokens tokens (whole documents) in input order, so shard
boundaries, and hence the output files, are a function of the inputs and options only.

Crash safety and resume: a shard is written under a `.tmp` name and renamed when complete, and
`manifest.json` is replaced atomically after every shard. Running the same command again after a
crash re-reads the input, skips (without tokenizing) the documents already in completed shards and
finishes with exactly the output of an uninterrupted run. An output directory made with another
tokenizer or options is refused unless --overwrite, and so is one made from an input that changed since
(compared by content, `data_prep.fingerprint`, not by path and size). Readers only accept a manifest
marked complete.

Multi-node: with --task-index K --task-count N (defaults: a Slurm array's SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT) a run does only task K's share of the inputs (`data_prep.tasks`) into
`OUT/parts/task-0000K`, with the same commits and resume, and `python -m data_prep.shard merge --out
OUT` (`data_prep.merge`) then writes the one manifest over all tasks' shards. The documents of each
split and their tokens are the same for any N (and the same order as a single run).

--overwrite never touches a complete output before its replacement is complete: the new output is
built (and, after a kill, resumed) in `OUT/.overwrite-staging`, and only then swapped in (see
`data_prep.output_dir`). An input that turns out to be unusable leaves the old output exactly as it was.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import model_validator
from tqdm import tqdm

from data_prep.cli import Options, add_options, command_line, option, options_from_args, run_cli
from data_prep.documents import Document, InputReport, Source
from data_prep.encode import DocumentEncoder, EncodedBatch, document_separator
from data_prep.fingerprint import file_units, with_content
from data_prep.merge import merge_main
from data_prep.output_dir import build_root, differences, manifest_or_none, prepare_dir, remove_staging, swap_in
from data_prep.sources import TXT_DOCUMENTS, iter_documents, resolve_inputs
from data_prep.tasks import PARTS_DIR, assign_units, plan_sha256, plan_units, task_dir_name
from shd_common.cli import command_parser
from shd_common.manifest import (
    MANIFEST_NAME,
    SPLITS,
    DataError,
    Manifest,
    ShardRecord,
    load_hf_tokenizer,
    tokenizer_identity,
    write_manifest,
)
from shd_common.settings import Float
from shd_common.shards import ShardWriter, token_dtype

# Test hook: seconds to sleep after each committed shard, so a test can kill the run at a known point.
SLEEP_AFTER_SHARD_ENV = "DATA_PREP_SLEEP_AFTER_SHARD"
# A batch sent to the encoder: big enough to amortize process hand-offs, small enough to keep memory flat.
BATCH_DOCS = 512
BATCH_CHARS = 1 << 20


class ShardOptions(Options):
    """Options of `python -m data_prep.shard`; those in `settings()` must match to resume a directory."""

    inputs: tuple[str, ...] = option(
        flag="--input", help="files (.txt/.jsonl/.json/.parquet), directories, globs, dataset directories, Hub "
                             "dataset names owner/name[:config], or python-stdlib")
    tokenizer: Path = option(help="Hugging Face tokenizer directory (trained one or the teacher's)")
    out: Path = option(help="output directory for shards and manifest.json")
    text_field: str = option("text", "record field holding the text (jsonl/parquet/datasets)")
    workers: int = option(1, "tokenizer processes; the output does not depend on it")
    val_fraction: Float = option(0.01, "fraction of documents in the val split")
    seed: int = option(0, "seed of the per-document train/val assignment")
    shard_tokens: int = option(20_000_000, "tokens per shard (whole documents)")
    strict: bool = option(False, "fail on a record without text instead of skipping it")
    txt_documents: str = option("file", "how a .txt file is read: 'file' = the whole file is one document, 'line' = "
                                        "each non-blank line is one document")
    max_document_mb: Float = option(16.0, "a longer document is refused (tokenizing one text at once takes about "
                                          "100 times its size in memory); split it, or raise this")
    overwrite: bool = option(False, "replace an output directory made differently; the old output stays until "
                                    "the new one is complete (room for both is needed)")
    task_index: int | None = option(
        None, "multi-task run (e.g. a Slurm array): this task's index, from 0; it writes OUT/parts/task-NNNNN, "
              "and `python -m data_prep.shard merge --out OUT` joins the tasks (default: $SLURM_ARRAY_TASK_ID)")
    task_count: int | None = option(
        None, "multi-task run: the number of tasks; give it explicitly when resubmitting only some tasks "
              "(default: $SLURM_ARRAY_TASK_COUNT)")
    separator: str | None = option(
        None, "token appended after every document, as its text (e.g. '<|endoftext|>') or its id; default: the "
              "tokenizer's end-of-text token, a pretraining one (<|endoftext|>, <|end_of_text|>, </s>) preferred "
              "over a chat-turn end (<|im_end|>, <|eot_id|>) that instruct tokenizers name as EOS")
    unit_bytes: int = option(256 << 20, "multi-task run: .jsonl files larger than this are cut into byte ranges of "
                                        "this size and parquet files into row groups of about this size, which are "
                                        "then divided among the tasks")

    @model_validator(mode="after")
    def _values(self) -> ShardOptions:
        if not self.inputs:
            raise DataError("--input: give at least one input")
        if self.workers < 1:
            raise DataError(f"--workers {self.workers}: must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.seed < 0:
            raise DataError(f"--seed {self.seed}: must be >= 0")
        if self.shard_tokens < 1:
            raise DataError(f"--shard-tokens {self.shard_tokens}: must be >= 1")
        if not self.text_field:
            raise DataError("--text-field: must not be empty")
        if (self.task_index is None) != (self.task_count is None):
            raise DataError("--task-index and --task-count: give both (a multi-task run) or neither")
        if self.task_count is not None and not 0 <= self.task_index < self.task_count:
            raise DataError(f"--task-index {self.task_index}: must be in [0, --task-count {self.task_count})")
        if self.unit_bytes < 1:
            raise DataError(f"--unit-bytes {self.unit_bytes}: must be >= 1")
        if self.txt_documents not in TXT_DOCUMENTS:
            raise DataError(f"--txt-documents {self.txt_documents}: must be one of {', '.join(TXT_DOCUMENTS)}")
        if not self.max_document_mb > 0:
            raise DataError(f"--max-document-mb {self.max_document_mb}: must be > 0")
        return self

    def settings(self) -> dict[str, Any]:
        """The options that determine the output (not --workers, which only changes speed)."""
        return {"text_field": self.text_field, "val_fraction": self.val_fraction, "seed": self.seed,
                "shard_tokens": self.shard_tokens, "strict": self.strict}

    @property
    def splits(self) -> tuple[str, ...]:
        return SPLITS if self.val_fraction > 0 else ("train",)


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """`val` for a fixed pseudo-random `val_fraction` of documents, chosen by content and seed."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    return "val" if int.from_bytes(digest, "little") < val_fraction * 2**64 else "train"


class _SplitWriter:
    """Cuts one split's documents into shards of at least `shard_tokens` tokens, in order."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int, next_index: int,
                 on_shard: Callable[[ShardRecord], None]) -> None:
        self._root, self._split, self._dtype = root, split, dtype
        self._shard_tokens, self._next_index, self._on_shard = shard_tokens, next_index, on_shard
        self._writer: ShardWriter | None = None
        self._first_doc = self._last_doc = -1

    def add(self, doc_index: int, tokens: np.ndarray) -> None:
        if self._writer is None:
            self._writer = ShardWriter(self._root / f"{self._split}-{self._next_index:05d}", self._dtype)
            self._first_doc = doc_index
        self._writer.add(tokens)
        self._last_doc = doc_index
        if self._writer.tokens >= self._shard_tokens:
            self.close()

    def close(self) -> None:
        """Complete the current shard, if any (also called at the end for the last, partial shard)."""
        if self._writer is None:
            return
        bin_digest, idx_digest = self._writer.finish()
        record = ShardRecord(name=self._writer.prefix.name, split=self._split, documents=self._writer.documents,
                             tokens=self._writer.tokens, first_doc=self._first_doc, last_doc=self._last_doc,
                             bin=bin_digest, idx=idx_digest)
        self._writer = None
        self._next_index += 1
        self._on_shard(record)


_WORKER_ENCODER: DocumentEncoder | None = None  # each pool worker's own encoder, set by _init_worker


def _init_worker(tokenizer_dir: Path, separator: str | None) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: --workers sets the parallelism
    _WORKER_ENCODER = DocumentEncoder(tokenizer_dir, separator)


def _encode_in_worker(texts: list[str]) -> EncodedBatch:
    return _WORKER_ENCODER.encode(texts)


Batch = list[tuple[int, str, str]]  # (document index, split, text)


def _encode_batches(batches: Iterator[Batch], options: ShardOptions) -> Iterator[tuple[Batch, EncodedBatch]]:
    """Encode batches in order, in-process for one worker, else in a pool with a bounded window."""
    if options.workers == 1:
        encoder = DocumentEncoder(options.tokenizer, options.separator)
        for batch in batches:
            yield batch, encoder.encode([text for _, _, text in batch])
        return
    init_args = (options.tokenizer, options.separator)
    with multiprocessing.get_context().Pool(options.workers, _init_worker, init_args) as pool:
        window: deque = deque()
        for batch in batches:
            window.append((batch, pool.apply_async(_encode_in_worker, ([text for _, _, text in batch],))))
            if len(window) >= 2 * options.workers:
                done, result = window.popleft()
                yield done, result.get()
        while window:
            done, result = window.popleft()
            yield done, result.get()


class _PendingBatches:
    """Groups documents into encoder batches, leaving out those a completed shard already holds."""

    def __init__(self, documents: Iterator[Document], options: ShardOptions, done: dict[str, int]) -> None:
        self._documents, self._options, self._done = documents, options, done
        self.read = 0  # documents read so far, including those left out

    def __iter__(self) -> Iterator[Batch]:
        batch: Batch = []
        chars = 0
        for index, doc in enumerate(self._documents):
            self.read = index + 1
            split = split_of(doc.text, self._options.seed, self._options.val_fraction)
            if index <= self._done[split]:
                continue
            batch.append((index, split, doc.text))
            chars += len(doc.text)
            if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch


class _Progress:
    """tqdm bar on stderr: documents read, tokens written and the tokenization rate."""

    def __init__(self) -> None:
        self.bar = tqdm(unit="doc", desc="sharding", file=sys.stderr, mininterval=1.0)
        self.start = time.perf_counter()
        self.tokens = 0

    def update(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)
        self.bar.update(documents)


Documents = Callable[[InputReport], Iterator[Document]]  # the documents to shard, noting skips in the report


def build_shards(options: ShardOptions) -> Manifest:
    """Write (or finish) the shard directory described by `options`; returns its complete manifest.

    With --task-index/--task-count, that is this task's part, `OUT/parts/task-NNNNN` (see `_build_task`).
    """
    sources = resolve_inputs(options.inputs, options.txt_documents)
    identity = tokenizer_identity(options.tokenizer)
    separator = document_separator(load_hf_tokenizer(options.tokenizer), options.separator)
    dtype = token_dtype(identity.vocab_size)
    fresh = Manifest(path=options.out / MANIFEST_NAME, complete=False, tokenizer=identity, dtype=dtype.name,
                     options={"inputs": [s.describe() for s in sources], **options.settings(),
                              "separator": separator.describe()}, shards=())
    print(f"[shard] documents end with the separator {separator.token!r} (id {separator.id})", file=sys.stderr)
    if options.task_count is not None:
        return _build_task(options, sources, fresh, dtype)
    return _build(options, with_content(fresh, file_units(sources)), dtype,
                  lambda report: iter_documents(sources, options.text_field, report))


def _build_task(options: ShardOptions, sources: list[Source], fresh: Manifest, dtype: np.dtype) -> Manifest:
    """One task of a multi-task run: its work units, sharded into `OUT/parts/task-NNNNN` like a whole run.

    Its manifest adds, under options["task"], the task, the whole plan (unit count and digest) and the
    keys of its units, which `data_prep.merge` checks; stats["rerun"] is the command of the run.
    """
    merged = manifest_or_none(options.out)
    if merged is not None and "tasks" not in merged.options:
        raise DataError(f"{options.out}: holds the output of a run without --task-count; choose another --out "
                        "for a multi-task run")
    units = plan_units(sources, options.unit_bytes)
    mine = assign_units(units, options.task_count)[options.task_index]
    task_out = options.out / PARTS_DIR / task_dir_name(options.task_index)
    task = {"index": options.task_index, "count": options.task_count, "unit_bytes": options.unit_bytes,
            "plan_units": len(units), "plan_sha256": plan_sha256([u.key for u in units]),
            "units": [u.key for u in mine]}
    rerun = command_line("python -m data_prep.shard", options, leave_out=("task_index", "workers", "overwrite"))
    fresh = with_content(replace(fresh, path=task_out / MANIFEST_NAME, options={**fresh.options, "task": task},
                                 stats={"rerun": rerun}), mine)

    def documents(report: InputReport) -> Iterator[Document]:
        for unit in mine:
            yield from unit.documents(sources, options.text_field, report)

    current = manifest_or_none(task_out)
    if (merged is not None and merged.complete
            and (options.overwrite or current is None or not current.complete or differences(current, fresh))):
        write_manifest(replace(merged, complete=False))  # it may list shards this task replaces: merge again
    return _build(options.replace(out=task_out), fresh, dtype, documents)


def _build(options: ShardOptions, fresh: Manifest, dtype: np.dtype, documents: Documents) -> Manifest:
    """Write, resume or replace (--overwrite) the output `fresh` describes in `options.out`."""
    root = build_root(options.out, options.overwrite, fresh)
    if root != options.out:
        return _replace_output(options, replace(fresh, path=root / MANIFEST_NAME), dtype, documents)
    manifest = prepare_dir(fresh, options.overwrite)
    if manifest.complete:
        print(f"{options.out}: already complete, nothing to do", file=sys.stderr)
        return manifest
    manifest, summary = _run(options, manifest, dtype, documents)
    print(summary, file=sys.stderr)
    return manifest


def _replace_output(options: ShardOptions, fresh: Manifest, dtype: np.dtype, documents: Documents) -> Manifest:
    """Build (or resume, or reuse when complete) the output in the staging dir `fresh.root`, then swap it in.

    Bad input found while building removes the staging directory: the old output is untouched and
    nothing staged is worth resuming once the input or options change.
    """
    staged, summary = manifest_or_none(fresh.root), f"{options.out}: replaced by the output finished in {fresh.root}"
    if staged is None or not staged.complete or differences(staged, fresh):
        try:
            staged, summary = _run(options, prepare_dir(fresh, overwrite=True), dtype, documents)
        except DataError:
            remove_staging(fresh.root)
            raise
    manifest = swap_in(staged, options.out)
    print(summary, file=sys.stderr)
    return manifest


def _run(options: ShardOptions, manifest: Manifest, dtype: np.dtype, documents: Documents) -> tuple[Manifest, str]:
    """Tokenize the documents not yet in `manifest`'s shards into its directory; returns it complete and a summary.

    No documents at all is an error, except for a task of a multi-task run (it may get no work units).
    """
    records = list(manifest.shards)
    sleep_after_shard = float(os.environ.get(SLEEP_AFTER_SHARD_ENV, "0"))

    def commit(record: ShardRecord) -> None:
        records.append(record)
        write_manifest(replace(manifest, shards=tuple(records)))
        time.sleep(sleep_after_shard)

    done = {split: max((r.last_doc for r in records if r.split == split), default=-1) for split in options.splits}
    writers = {split: _SplitWriter(manifest.root, split, dtype, options.shard_tokens,
                                   sum(r.split == split for r in records), commit) for split in options.splits}
    report = InputReport(strict=options.strict, max_document_bytes=int(options.max_document_mb * 2**20))
    progress = _Progress()
    pending = _PendingBatches(documents(report), options, done)
    reported = 0
    try:
        for batch, encoded in _encode_batches(iter(pending), options):
            ends = np.cumsum(encoded.lengths)
            for (index, split, _), end, length in zip(batch, ends, encoded.lengths):
                writers[split].add(index, encoded.tokens[end - length:end])
            progress.update(pending.read - reported, len(encoded.tokens))
            reported = pending.read
        for split in options.splits:
            writers[split].close()
    finally:
        progress.bar.close()  # before any error message, so that message is the last line
    if pending.read == 0 and options.task_count is None:
        raise DataError(f"no documents in the inputs ({', '.join(options.inputs)}); check --input and --text-field"
                        + "".join(f"; {line}" for line in report.summary_lines()))
    stats = {**manifest.stats,
             "documents": {s: sum(r.documents for r in records if r.split == s) for s in options.splits},
             "tokens": {s: sum(r.tokens for r in records if r.split == s) for s in options.splits},
             "input": report.as_dict(), "documents_read": pending.read}
    final = replace(manifest, shards=tuple(records), complete=True, stats=stats)
    write_manifest(final)
    return final, _summary(options.out, final, report, progress)


def _summary(out: Path, manifest: Manifest, report: InputReport, progress: _Progress) -> str:
    """What was written to `out` (the --out directory, also when built in staging), for stderr."""
    elapsed = time.perf_counter() - progress.start
    lines = [f"wrote {out} ({manifest.dtype}, vocab {manifest.tokenizer.vocab_size})"]
    for split, documents in manifest.stats["documents"].items():
        shards = len(manifest.split_shards(split))
        lines.append(f"  {split}: {documents:,} documents, {manifest.stats['tokens'][split]:,} tokens, {shards} shards")
    lines.append(f"  tokenized {progress.tokens:,} tokens in {elapsed:.1f} s "
                 f"({progress.tokens / max(elapsed, 1e-9):,.0f} tok/s)")
    lines += [f"  {line}" for line in report.summary_lines()]
    if "val" in manifest.stats["documents"] and manifest.stats["documents"]["val"] == 0:
        lines.append("  warning: no document fell into val; raise --val-fraction for a validation split")
    return "\n".join(lines)


# Slurm array variables that give --task-index and --task-count their defaults.
SLURM_TASK_DEFAULTS = {"task_index": "SLURM_ARRAY_TASK_ID", "task_count": "SLURM_ARRAY_TASK_COUNT"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        merge_main(argv[1:])
        return
    parser = command_parser("python -m data_prep.shard", __doc__,
                            epilog="python -m data_prep.shard merge --out OUT: join the parts of a "
                                   "multi-task run (see `merge --help`)")
    add_options(parser, ShardOptions)
    args = parser.parse_args(argv)
    for name, variable in SLURM_TASK_DEFAULTS.items():
        if getattr(args, name) is None and os.environ.get(variable, "").isdigit():
            setattr(args, name, int(os.environ[variable]))
    build_shards(options_from_args(ShardOptions, args))


if __name__ == "__main__":
    run_cli(main)
