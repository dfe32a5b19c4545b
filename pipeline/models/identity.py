"""Identity of a model directory: a teacher's content hash for resume checks (re-read only when a file
changes), and the tokenizer a model directory says it was trained with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shd_common.integrity import sha256_file
from shd_common.manifest import TOKENIZER_FILES, tokenizer_files_sha256

#: (where a tokenizer identity comes from, its tokenizer files sha256)
Claim = tuple[str, str]

#: The files of a Hugging Face model directory that determine the teacher's outputs.
TEACHER_FILE_PATTERNS = ("config.json", "*.index.json", "*.safetensors", "*.bin", "*.pt", "*.pth")


def teacher_identity(path: str | Path, known: dict | None = None) -> tuple[dict, dict]:
    """(identity, file records) of a teacher directory.

    identity = {"path", "content_sha256"}: a hash over the sha256 of every file that defines the
    model, so weights replaced in place (same shapes) are seen. File records {name: {bytes,
    mtime_ns, sha256}} are stored with each checkpoint; passing them back as ``known`` reuses a
    file's hash while its size and modification time are unchanged, so a requeue does not re-read
    a 100 GB teacher.
    """
    p = Path(path)
    known = known or {}
    records = {}
    for f in sorted({f for pattern in TEACHER_FILE_PATTERNS for f in p.glob(pattern) if f.is_file()}):
        st = f.stat()
        old = known.get(f.name, {})
        same = old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns
        records[f.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "sha256": old["sha256"] if same and "sha256" in old else sha256_file(f)}
    h = hashlib.sha256("".join(f"{n}:{r['sha256']}\n" for n, r in records.items()).encode())
    return {"path": str(p.resolve()), "content_sha256": h.hexdigest()}, records


#: The marker file of an export written by `python -m pipeline.export` (its presence makes a directory "ours").
MARKER = "shd_export.json"
MARKER_FORMAT = "shd-pipeline export"


def read_marker(directory: str | Path) -> dict | None:
    """The marker of an export written by `python -m pipeline.export` in `directory`, or None (absent or not ours)."""
    try:
        body = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("format") == MARKER_FORMAT else None


def model_tokenizer_claims(model_dir: Path) -> list[Claim]:
    """What an exported/HF directory says its tokenizer is: its export marker, its tokenizer files."""
    claims = []
    marker = read_marker(model_dir)
    if marker is not None and marker.get("tokenizer_sha256"):
        claims.append((f"the export marker {model_dir / MARKER}", marker["tokenizer_sha256"]))
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        claims.append((f"the tokenizer files in {model_dir}", tokenizer_files_sha256(model_dir)))
    return claims
