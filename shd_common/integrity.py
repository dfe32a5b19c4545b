"""File integrity shared by data preparation and training: atomic writes, fsync, sha256 digests,
and the one error a full disk becomes (naming the directory, its free bytes, what was kept).

The lowest layer: imports neither ``data_prep`` nor ``pipeline``; both write through it, so a crash
or a full disk never leaves a partial file that looks complete on either side.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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



@dataclass(frozen=True)
class FileDigest:
    """Size and sha256 of one written file, as recorded in the manifest."""

    bytes: int
    sha256: str


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


def file_digests(directory: Path, *, leave_out: str, hash_max_bytes: int | None = None) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``directory`` but those named
    ``leave_out`` (the record being written); files bigger than ``hash_max_bytes`` get no sha256
    (checked by size only, so a record of gigabytes is not re-read). The file list of a
    checkpoint's COMPLETE and of an export's marker."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != leave_out:
            entry: dict[str, Any] = {"bytes": path.stat().st_size}
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
