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

import errno
import hashlib
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# DeepSpeed's dtype codes (indexed_dataset.dtypes) for the two token dtypes we write.
DTYPE_CODES = {np.dtype(np.uint16): 6, np.dtype(np.int32): 4}
_HEADER = struct.Struct("<9sQBQQ")
TMP_SUFFIX = ".tmp"
#: A write that failed with less free space than this is taken for a full disk: torch's file writer
#: reports a failed write as a bare RuntimeError ("unexpected pos ...") without the errno, and a
#: write that ran out of space leaves the disk (nearly) full, since it wrote all that fitted.
NEARLY_FULL_BYTES = 64 << 20


class DiskFull(Exception):
    """A write ran out of space; the message names the directory, its free bytes, what was kept and the fix."""


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """Whether `exc` is a write under `path` that ran out of space: ENOSPC/EDQUOT in it or in an
    exception it was raised from (torch and DeepSpeed re-raise an OSError as their own error), the
    OS's words for them in its text (safetensors' error has no errno), or an error of torch's file
    writer, which loses the errno, with the disk nearly full."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, DiskFull) or (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        if any(words in str(cause) for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
            return True
        cause = cause.__cause__ or cause.__context__
    torch_writer = any(words in str(exc) for words in ("unexpected pos", "PytorchStreamWriter", "file write failed"))
    return torch_writer and free_bytes(path) < NEARLY_FULL_BYTES


@contextmanager
def naming_disk_full(path: Path, consequence: str) -> Iterator[None]:
    """Run the block; a write in it that ran out of space is raised as :class:`DiskFull`,
    ``no space left at PATH: N bytes free``, then `consequence` (what was kept and the fix).
    Nothing is deleted here: what the writer had written is left for its owner to ignore. Nested
    blocks: the outermost names the directory and the consequence (it knows what was being saved)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- re-raised unchanged unless it is a full disk
        if not is_disk_full(exc, path):
            raise
        raise DiskFull(f"no space left at {path}: {free_bytes(path)} bytes free; {consequence}") from exc


class IndexFormatError(ValueError):
    """An `.idx`/`.bin` pair that does not follow the format; the message names the file."""


@dataclass(frozen=True)
class FileDigest:
    """Size and sha256 of one written file, as recorded in the manifest."""

    bytes: int
    sha256: str


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


def fsync_dir(path: Path) -> None:
    """fsync a directory, so the renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in chunks (files of any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: Path, *, leave_out: str, hash_max_bytes: int | None = None) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``directory`` but those named
    ``leave_out`` (the record being written); files bigger than ``hash_max_bytes`` get no sha256
    (checked by size only, so a record of gigabytes is not re-read). The file list of a
    checkpoint's COMPLETE and of an export's marker."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != leave_out:
            entry: dict = {"bytes": path.stat().st_size}
            if hash_max_bytes is None or entry["bytes"] <= hash_max_bytes:
                entry["sha256"] = sha256_file(path)
            files[path.relative_to(directory).as_posix()] = entry
    return files


def write_atomic(path: Path, data: bytes) -> FileDigest:
    """Write `data` to `path` via a temporary file, fsync and rename, so `path` is never partial."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with naming_disk_full(path.parent, f"{path.name} was not replaced (its previous version is kept): free "
                                       f"space there and run the command again"):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return FileDigest(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


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
