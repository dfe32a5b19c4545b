"""Checkpoints: DeepSpeed state plus client state, committed atomically, verified on load.

Layout of ``checkpoint.dir``::

    step_00000100/            DeepSpeed files (ZeRO-3 partitions of every rank, model states)
        rng_rank00000.pt      python/numpy/torch RNG state of each rank
        trainer_state.json    step, consumed samples/tokens, reader state, identities, run id
        resolved_config.yaml  the run config with its derived values
        COMPLETE              written last: the size (and, for small files, sha256) of every file
    latest                    name of the newest complete checkpoint (atomic rename; informational)

Commit protocol: every rank writes (DeepSpeed with ``save_latest=False``: its own ``latest`` file
is written before all ranks are done), barrier, then rank 0 writes COMPLETE and the pointer
(temp file, fsync, rename, fsync of the directory). Resume trusts only directories with COMPLETE
whose files still match it (:func:`verify`): a deleted or truncated file is named, and
``--resume auto`` falls back to the previous good checkpoint. A save killed half-way leaves a
directory without COMPLETE, which is ignored and later removed.

Every checkpoint records the id of the run that wrote it (``run_id``); pruning only ever counts
and removes this run's checkpoints. The teacher is never part of a checkpoint: only the student
engine is saved.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import yaml

from shd_common.integrity import file_digests, sha256_file, write_atomic

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
#: Files up to this size get a sha256 in COMPLETE (model states, configs, RNG); bigger ones (the
#: optimizer partitions) are checked by size only, so a save does not re-read gigabytes.
HASHED_MAX_BYTES = 64 * 2**20
POINTER = "latest"
_TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


#: A universal copy (``python -m pipeline.universal``) of checkpoint ``step_N`` is ``step_N_universal``,
#: recognised by its marker file.
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_MARKER = "UNIVERSAL"


def universal_path(path: Path) -> Path:
    """Where the universal copy of checkpoint `path` is (or will be) written."""
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def is_universal(path: Path) -> bool:
    """Whether checkpoint `path` is a universal copy (it resumes on any number of ranks)."""
    return (path / UNIVERSAL_MARKER).is_file()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file, fsync and rename (never a partial file)."""
    write_atomic(path, text.encode())


def is_complete(ckpt: Path) -> bool:
    """Committed (COMPLETE written); whether its files are still intact is :func:`verify`'s question."""
    return (ckpt / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def read_state(ckpt: Path) -> dict:
    """The checkpoint's ``trainer_state.json`` (the one place it is parsed)."""
    path = ckpt / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({e})") from None


def read_config(ckpt: Path) -> dict | None:
    """The run config a checkpoint was saved with (its ``resolved_config.yaml``, parsed), or None
    when it has none or it cannot be read (a checkpoint of an old version)."""
    try:
        config = yaml.safe_load((ckpt / RECORD_FILES[1]).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def run_id_of(ckpt: Path) -> str | None:
    """Id of the run that wrote ``ckpt`` (None: written before run ids existed, or unreadable)."""
    try:
        return read_state(ckpt).get("run_id")
    except CheckpointError:
        return None


def verify(ckpt: Path) -> list[str]:
    """What is wrong with a committed checkpoint's files (empty: intact), each naming the file.

    Checks every file COMPLETE lists by size, and by sha256 where COMPLETE recorded one. An empty
    COMPLETE (written before files were recorded) cannot be checked and passes.
    """
    marker = ckpt / COMPLETE
    if not marker.is_file():
        return [f"{ckpt}: not a complete checkpoint (no {COMPLETE} file)"]
    text = marker.read_text()
    if not text.strip():
        return []
    try:
        files = json.loads(text)["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{marker}: unreadable file list"]
    problems = []
    for rel, want in sorted(files.items()):
        path = ckpt / rel
        if not path.is_file():
            problems.append(f"{path}: missing ({COMPLETE} lists it, {want['bytes']} bytes)")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, {COMPLETE} records {want['bytes']} "
                            f"(truncated or replaced)")
        elif "sha256" in want and sha256_file(path) != want["sha256"]:
            problems.append(f"{path}: content differs from the sha256 {COMPLETE} records (corrupt)")
    return problems


def write_complete(ckpt: Path) -> None:
    """Record every file of ``ckpt`` (size; sha256 up to HASHED_MAX_BYTES) in COMPLETE, atomically."""
    files = file_digests(ckpt, leave_out=COMPLETE, hash_max_bytes=HASHED_MAX_BYTES)
    atomic_write_text(ckpt / COMPLETE, json.dumps({"files": files}, indent=1, sort_keys=True))


def resolve(path: str | Path) -> Path:
    """`path` itself if it is an intact complete checkpoint, else the newest intact one under it.

    For the command-line tools that take `--checkpoint` (export, evaluate, universal): a refused
    checkpoint is a one-line error naming the bad file, exit status 2.
    """
    path = Path(path)
    if is_complete(path):
        problems = verify(path)
        if problems:
            _refuse(f"checkpoint {path} is damaged: " + "; ".join(problems))
        return path
    latest = find_latest(path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if latest is None:
        _refuse(f"{path} is neither a complete checkpoint nor a directory holding an intact one")
    return latest


def _refuse(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def find_latest(root: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint whose files verify; each newer damaged one is passed over
    with a warning naming what is wrong (the ``latest`` pointer is not needed: COMPLETE is)."""
    for ckpt in reversed(complete_checkpoints(root)):
        problems = verify(ckpt)
        if not problems:
            return ckpt
        if warn is not None:
            warn(f"skipping damaged checkpoint {ckpt}: " + "; ".join(problems))
    return None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(ckpt: Path, rank: int) -> None:
    torch.save(rng_state(), ckpt / f"rng_rank{rank:05d}.pt")


def load_rng(ckpt: Path, rank: int) -> bool:
    p = ckpt / f"rng_rank{rank:05d}.pt"
    if not p.is_file():
        return False
    set_rng_state(torch.load(p, weights_only=False))
    return True


@dataclass(frozen=True)
class Records:
    """What a checkpoint records beside DeepSpeed's files (:data:`RECORD_FILES`)."""

    trainer_state: dict  # step, consumed samples/tokens, reader state, identities, run id
    resolved_config: str  # the run config with its derived values (YAML)
    student_config: str  # the student's Hugging Face config (JSON)


#: The files of :class:`Records`, in every checkpoint and in its universal copy.
RECORD_FILES = (STATE, "resolved_config.yaml", "student_config.json")


def commit(root: Path, ckpt: Path, records: Records) -> None:
    """Write the records, COMPLETE and the pointer: rank 0, after the barrier that follows every
    rank's writes."""
    texts = (json.dumps(records.trainer_state, indent=1, sort_keys=True), records.resolved_config,
             records.student_config)
    for name, text in zip(RECORD_FILES, texts):
        (ckpt / name).write_text(text)
    write_complete(ckpt)
    atomic_write_text(root / POINTER, ckpt.name + "\n")


def prune(root: Path, keep_last: int, run_id: str) -> list[Path]:
    """Remove this run's complete checkpoints beyond its newest keep_last, and incomplete ones older
    than its newest (left by a killed save). Checkpoints of another run are never counted or
    touched (those without a run id predate run ids and belong to the run that resumed them).
    Rank 0 only. Returns what was removed."""
    complete = [p for p in complete_checkpoints(root) if run_id_of(p) in (run_id, None)]
    removed = []
    for p in complete[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if complete:
        newest = complete[-1].name
        for p in root.iterdir():
            if p.is_dir() and _TAG_RE.match(p.name) and not is_complete(p) and p.name < newest:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
