"""What a study run was trained on beyond its config: the content of its data and of its teacher.

A run's config names its data directory and teacher by path, and the same paths hold other content
after the study rebuilt the data (another corpus, a new tokenizer recipe) or re-trained the teacher
(another --teacher-steps). The run directory's ``inputs.json``, written when the run starts, records
the content identities; a run is reused or resumed only while they still match, so a table never
reports a student of the old data or teacher as one of the new.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path

from pipeline.models.identity import teacher_identity
from shd_common.manifest import DataError, read_manifest

INPUTS_NAME = "inputs.json"


def data_identity(data_dir: str | Path) -> str | None:
    """A hash of the shards' and the tokenizer's checksums in the manifest (None: no finished data)."""
    try:
        manifest = read_manifest(data_dir)
    except DataError:
        return None
    lines = [f"tokenizer:{manifest.tokenizer.files_sha256}"]
    lines += [f"{s.split}:{s.name}:{s.bin.sha256}:{s.idx.sha256}" for s in manifest.shards]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class RunInputs:
    """Computes the inputs of run configs; a teacher's file hashes are re-read only when a file's
    size or modification time changes (a study reads the same teacher for every student)."""

    def __init__(self) -> None:
        self._teacher_files: dict[str, dict] = {}
        self._lock = threading.Lock()  # --jobs: students start from several threads

    def of(self, cfg: Mapping) -> dict | None:
        """{"data", "teacher"} content identities of what cfg reads (teacher None for a pre-training);
        None while the data or the teacher does not exist yet (a dry run, a stage still to come)."""
        data = data_identity(cfg["data"]["dir"])
        if data is None:
            return None
        if cfg.get("stage", "distill") == "pretrain":
            return {"data": data, "teacher": None}
        path = Path(cfg["teacher"]["path"])
        if not (path / "config.json").is_file():
            return None
        with self._lock:
            ident, files = teacher_identity(path, self._teacher_files.get(str(path)))
            self._teacher_files[str(path)] = files
        return {"data": data, "teacher": ident["content_sha256"]}


def recorded_inputs(run_dir: Path) -> dict | None:
    """The inputs recorded when the run in run_dir started (None: none recorded, or unreadable)."""
    try:
        return json.loads((run_dir / INPUTS_NAME).read_text())
    except (OSError, ValueError):
        return None


def record_inputs(run_dir: Path, inputs: dict) -> None:
    """Record the inputs of the run about to start in run_dir."""
    (run_dir / INPUTS_NAME).write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
