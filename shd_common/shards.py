"""Megatron/DeepSpeed mmap indexed dataset files (`<prefix>.bin` + `<prefix>.idx`).

The layout matches DeepSpeed's `MMapIndexedDataset` byte for byte, so shards written here can be read
by DeepSpeed and Megatron tooling, while this project writes and verifies them without importing
either. The `.idx` file is, little endian:

    magic b"MMIDIDX\\x00\\x00" | version u64 (1) | dtype code u8 | items u64 | doc_idx entries u64
    | sizes int32[items] | pointers int64[items] (byte offsets into .bin) | doc_idx int64[entries]

We store one document per item, so `doc_idx` is `[0, 1, ..., items]`. The `.bin` file is the
documents' tokens back to back.
"""

from __future__ import annotations

import hashlib
import os
import struct
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shd_common.integrity import TMP_SUFFIX, FileDigest, naming_disk_full, write_atomic

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# DeepSpeed's dtype codes (indexed_dataset.dtypes) for the two token dtypes we write.
DTYPE_CODES: dict[np.dtype[Any], int] = {np.dtype(np.uint16): 6, np.dtype(np.int32): 4}
_HEADER = struct.Struct("<9sQBQQ")


class IndexFormatError(ValueError):
    """An `.idx`/`.bin` pair that does not follow the format; the message names the file."""



@dataclass(frozen=True)
class IndexContents:
    """The parsed `.idx` file: token dtype and the size (in tokens) of each document."""

    dtype: np.dtype
    sizes: np.ndarray


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (as Megatron's `best_fitting_dtype`), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def encode_index(dtype: np.dtype, sizes: np.ndarray) -> bytes:
    """The bytes of an `.idx` file for documents of `sizes` tokens, one document per item."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[dtype], len(sizes), len(doc_idx))
    return header + sizes.astype(np.int32).tobytes() + pointers.tobytes() + doc_idx.tobytes()


def read_index(idx_path: Path) -> IndexContents:
    """Parse and check an `.idx` file; raises IndexFormatError naming the file on any mismatch."""
    data = idx_path.read_bytes()
    if len(data) < _HEADER.size:
        raise IndexFormatError(f"{idx_path}: truncated index ({len(data)} bytes)")
    magic, version, code, items, entries = _HEADER.unpack_from(data)
    codes = {c: d for d, c in DTYPE_CODES.items()}
    if magic != MAGIC or version != VERSION or code not in codes:
        raise IndexFormatError(f"{idx_path}: not an mmap indexed dataset index (magic/version/dtype)")
    expected = _HEADER.size + items * (4 + 8) + entries * 8
    if len(data) != expected:
        raise IndexFormatError(f"{idx_path}: {len(data)} bytes, expected {expected} for {items} documents")
    sizes = np.frombuffer(data, dtype=np.int32, count=items, offset=_HEADER.size).astype(np.int64)
    return IndexContents(dtype=codes[code], sizes=sizes)


class ShardWriter:
    """Streams documents into `<prefix>.bin.tmp`; `finish()` writes the index and renames both.

    Until `finish()` returns, only `.tmp` files exist, so a killed run never leaves a shard that
    looks complete.
    """

    def __init__(self, prefix: Path, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.dtype = dtype
        self._bin_path = prefix.with_name(prefix.name + ".bin")
        self._tmp_path = self._bin_path.with_name(self._bin_path.name + TMP_SUFFIX)
        self._file = open(self._tmp_path, "wb")
        self._sha = hashlib.sha256()
        self._sizes: list[int] = []
        self.tokens = 0

    @property
    def documents(self) -> int:
        return len(self._sizes)

    def _disk_full(self) -> AbstractContextManager[None]:
        """Where a write of this shard runs out of space: DiskFull, naming what is kept and the fix."""
        return naming_disk_full(self.prefix.parent, f"shard {self.prefix.name} is not complete (manifest.json "
                                f"does not list it) and the shards completed before it are kept: "
                                f"free space (or choose another --out) and run the same command again to resume")

    def add(self, tokens: np.ndarray) -> None:
        """Append one document's tokens (already ending in EOS)."""
        data = tokens.astype(self.dtype, copy=False).tobytes()
        with self._disk_full():
            self._file.write(data)
        self._sha.update(data)
        self._sizes.append(len(tokens))
        self.tokens += len(tokens)

    def finish(self) -> tuple[FileDigest, FileDigest]:
        """Make the shard durable and visible; returns the digests of the `.bin` and `.idx` files."""
        with self._disk_full():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        bin_digest = FileDigest(bytes=self.tokens * self.dtype.itemsize, sha256=self._sha.hexdigest())
        os.replace(self._tmp_path, self._bin_path)
        with self._disk_full():
            idx_digest = write_atomic(self.prefix.with_name(self.prefix.name + ".idx"),
                                      encode_index(self.dtype, np.array(self._sizes, dtype=np.int64)))
        return bin_digest, idx_digest
