"""Benchmark: `data_prep.shard` throughput against plain batch encoding of the same texts.

    python bench/shard_throughput.py               # trains a tokenizer on python-stdlib first (cached)
    python bench/shard_throughput.py --tokenizer DIR --json bench/results/data_prep.json

Measures, on the `python-stdlib` corpus (no network):
  * plain: `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)` on all documents,
    already in memory, in one process (the Rust backend may use several threads, as for any user),
    and the Rust backend's `encode_batch_fast` alone (what data_prep calls), as a stricter floor;
  * shard (1 and 2 workers): the whole `build_shards` run into an empty directory: resolving and
    reading the files, tokenizer loading, split hashing, encoding, writing shards, checksums, manifest.
Target: shard at 1 worker within 1.3x of plain. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data_prep.manifest import load_hf_tokenizer
from data_prep.shard import ShardOptions, build_shards
from data_prep.sources import InputReport, iter_documents, resolve_inputs
from data_prep.tokenizer import TokenizerTrainOptions, train_tokenizer

CORPUS = "python-stdlib"
TARGET_RATIO = 1.3


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
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"corpus": CORPUS, "documents": documents, "cpus": os.cpu_count(),
                                     "python": platform.python_version(), "tokenizer": str(tokenizer_dir),
                                     "target_ratio": TARGET_RATIO, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
