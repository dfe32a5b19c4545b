"""The one place that removes or replaces user-visible directories: only what this project made is deleted.

Every command that clears a directory to write another in its place (the study's run, teacher and
data directories, a tokenizer's or an export's ``--out``) goes through `clear` or `replace_dir`,
telling it what makes the directory its own (`ours`): the marker `mark` wrote when this project made
it (`marked(kind)`), or the command's own marker (an export's ``shd_export.json``). A directory that
is ours is deleted; anything else (a directory a user made or filled, one of ours whose files were
changed since, one holding results the caller keeps) is renamed to ``NAME.moved-<time>`` beside it.
Every deletion and move is logged with its reason. An empty directory is simply removed.

It lives in ``data_prep`` because ``pipeline`` already depends on ``data_prep`` (manifest, shard
reader) and never the other way round: both import it, and there is one copy of the rules.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shd_common.integrity import file_digests

#: The file `mark` writes into a directory this project made.
MARKER_NAME = ".shd-made.json"
MARKER_FORMAT = "shd-pipeline directory"
#: What a directory moved aside is named: NAME.moved-<time>.
MOVED_INFIX = ".moved-"

Log = Callable[[str], None]
Ours = Callable[[Path], bool]


def note(message: str) -> None:
    """The default log: one line on stderr."""
    print(message, file=sys.stderr, flush=True)


def mark(directory: Path, kind: str, *, files: bool = False) -> None:
    """Create `directory` if needed and record that this project made it, for `kind` ("tokenizer",
    "study-run", ...). With `files`, the record lists every file in it with its size and sha256 (call
    it when the directory is complete): it stays ours only while it holds exactly those files."""
    directory.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"format": MARKER_FORMAT, "kind": kind, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if files:
        record["files"] = file_digests(directory, leave_out=MARKER_NAME)
    (directory / MARKER_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def made_here(directory: Path, kind: str) -> bool:
    """True when `directory` holds this project's marker for `kind` and, if the marker lists files,
    nothing else: every other file in it is one the marker lists, unchanged (files may be missing, as
    after a deletion that was cut short: deleting the rest loses nothing)."""
    try:
        record = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format") != MARKER_FORMAT or record.get("kind") != kind:
        return False
    listed = record.get("files")
    return listed is None or all(listed.get(name) == digest
                                 for name, digest in file_digests(directory, leave_out=MARKER_NAME).items())


def marked(kind: str) -> Ours:
    """The `ours` test of directories this project marked for `kind` (see `made_here`)."""
    return lambda directory: made_here(directory, kind)


def aside_path(path: Path) -> Path:
    """A free name beside `path`: ``NAME.moved-<time>``, then ``NAME.moved-<time>-1``, ..."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.name}{MOVED_INFIX}{stamp}"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = path.with_name(f"{path.name}{MOVED_INFIX}{stamp}-{n}"), n + 1
    return candidate


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _delete(path: Path, reason: str, log: Log) -> None:
    """Delete the directory `path`, its marker last: a deletion cut short leaves a directory that is
    still recognised as ours (see `made_here`)."""
    for child in path.iterdir():
        if child.name != MARKER_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (path / MARKER_NAME).unlink(missing_ok=True)
    path.rmdir()
    log(f"deleted {path}: {reason}")


def _moved(path: Path, aside: Path, reason: str, log: Log) -> Path:
    log(f"moved {path} aside to {aside} (nothing deleted): {reason}")
    return aside


def clear(path: Path, *, ours: Ours, reason: str, log: Log = note, name_for: Path | None = None) -> Path | None:
    """Make `path` free: delete it when `ours(path)` (or it is an empty directory), else rename it
    to ``NAME.moved-<time>`` (NAME: that of `name_for`, default `path`). Logs which, with `reason`.
    Returns where it was moved, or None (deleted, or nothing there)."""
    if not (path.exists() or path.is_symlink()):
        return None
    if _is_empty_dir(path):
        path.rmdir()
        return None
    if path.is_dir() and not path.is_symlink() and ours(path):
        _delete(path, reason, log)
        return None
    aside = aside_path(name_for or path)
    os.rename(path, aside)
    return _moved(path if name_for is None else name_for, aside, reason, log)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), str(b))


def replace_dir(new: Path, target: Path, *, ours: Ours, reason: str, log: Log = note) -> Path | None:
    """Put the complete directory `new` at `target` (same filesystem); what was at `target` is then
    deleted when `ours`, else moved to ``TARGET.moved-<time>``, as `clear` does. Returns where it was
    moved, or None.

    With an atomic exchange (Linux), `target` holds the old or the new directory at every instant; a
    kill after the exchange leaves the old one at `new`'s path, which the caller clears on its next
    run (``clear(new, ..., name_for=target)``). Elsewhere the old directory is moved aside first, and a
    kill between the two renames leaves it at ``TARGET.moved-<time>``.
    """
    if not (target.exists() or target.is_symlink()) or _is_empty_dir(target):
        if target.is_dir():
            target.rmdir()
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return clear(new, ours=ours, reason=reason, log=log, name_for=target)
    aside = aside_path(target)
    os.rename(target, aside)
    os.rename(new, target)
    if ours(aside):
        _delete(aside, reason, log)
        return None
    return _moved(target, aside, reason, log)
