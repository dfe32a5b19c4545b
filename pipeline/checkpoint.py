"""Checkpoints: DeepSpeed state plus client state, committed atomically, last k kept.

Layout of ``checkpoint.dir``::

    step_00000100/            DeepSpeed files (ZeRO-3 partitions of every rank, model states)
        rng_rank00000.pt      python/numpy/torch RNG state of each rank
        trainer_state.json    step, consumed samples/tokens, reader state, identities (readable copy)
        resolved_config.yaml  the run config with its derived values
        COMPLETE              written last, after every rank finished writing
    latest                    name of the newest complete checkpoint (atomic rename)

Commit protocol: every rank writes (DeepSpeed with ``save_latest=False``: its own ``latest`` file
is written before all ranks are done), barrier, then rank 0 writes COMPLETE and the pointer
(temp file, fsync, rename, fsync of the directory). Resume trusts only directories with COMPLETE;
a save killed half-way leaves a directory without it, which is ignored and later removed.
The teacher is never part of a checkpoint: only the student engine is saved.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from data_prep.indexed import write_atomic

COMPLETE = "COMPLETE"
POINTER = "latest"
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file, fsync and rename (never a partial file)."""
    write_atomic(path, text.encode())


def is_complete(ckpt: Path) -> bool:
    return (ckpt / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def resolve(path: str | Path) -> Path:
    """`path` itself if it is a complete checkpoint, else the newest complete one under it.

    For the command-line tools that take `--checkpoint` (export, evaluate, universal).
    """
    path = Path(path)
    if is_complete(path):
        return path
    latest = find_latest(path)
    if latest is None:
        raise SystemExit(f"error: {path} is neither a complete checkpoint nor a directory holding one")
    return latest


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint: the pointer's target if complete, else the newest found."""
    ptr = root / POINTER
    if ptr.is_file():
        cand = root / ptr.read_text().strip()
        if is_complete(cand):
            newer = [p for p in complete_checkpoints(root) if p.name > cand.name]
            return newer[-1] if newer else cand
    found = complete_checkpoints(root)
    return found[-1] if found else None


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


def commit(root: Path, ckpt: Path, trainer_state: dict, resolved_yaml: str) -> None:
    """Rank 0, after the barrier that follows every rank's writes."""
    (ckpt / "resolved_config.yaml").write_text(resolved_yaml)
    (ckpt / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    atomic_write_text(ckpt / COMPLETE, "")
    atomic_write_text(root / POINTER, ckpt.name + "\n")


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove complete checkpoints beyond the newest keep_last, and incomplete ones older than the
    newest complete one (left by a killed save). Rank 0 only. Returns what was removed."""
    complete = complete_checkpoints(root)
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


def identity_changes(saved: dict, current: dict) -> list[str]:
    """Human-readable list of what differs between two identity dicts."""
    changes = []
    for k in sorted(set(saved) | set(current)):
        if saved.get(k) != current.get(k):
            changes.append(f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}")
    return changes
