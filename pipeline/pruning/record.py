"""`pruning.json`: where a pruned student comes from, written next to its weights.

Distillation of a pruned student reads it to pair every student layer with the teacher layer it was
cut from, and every student head with its source teacher head (instead of a uniform layer map and
squeezed head groups). It also says what the student was made from (the teacher's path and content
hash, `pipeline.models.identity.teacher_identity`; the calibration data's identity as a training run
records it, the train shards' `data_sha256` and the manifest's `tokenizer_sha256`, and how it was
read) and with which options, so a student
can be traced and remade. Written atomically (`write_atomic`: temporary file, fsync, rename).

Layout (format_version 1):

    format, format_version, created
    teacher:      path, content_sha256, model_type, architectures, shape, head_dim
    calibration:  data_dir, data_sha256, tokenizer_sha256, split, batches, batch_size, seq_len, seed,
                  tokens, dtype
    options:      the command's pruning options as given (null = left out: the teacher's size)
    student:      shape, head_dim
    hidden_channels: kept, of, indices (teacher channel of each student channel)
    teacher_layers: per teacher layer: block_influence, student_layer (null when dropped)
    layers:       per student layer: teacher_layer, block_influence,
                  heads [student_head, teacher_head, student_kv_head, teacher_kv_head, importance],
                  kv_heads [student_kv_head, teacher_kv_head, importance],
                  neurons: kept, of, indices
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError
from shd_common.integrity import write_atomic

from .choice import PruneChoice
from .importance import Importance
from .shape import StudentShape, head_dim, teacher_shape

if TYPE_CHECKING:
    from transformers import PretrainedConfig

RECORD_NAME = "pruning.json"
_INT_LIST = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")  # index lists: one line each
RECORD_FORMAT = "shd-pipeline pruning"
FORMAT_VERSION = 1


def make_record(*, teacher: Mapping[str, Any], teacher_config: PretrainedConfig, calibration: Mapping[str, Any],
                options: Mapping[str, Any], shape: StudentShape, choice: PruneChoice,
                importance: Importance) -> dict[str, Any]:
    """The record of one pruning: `teacher` is `teacher_identity`'s identity (path, content_sha256),
    `calibration` describes the data read (identity and reader options), `options` the command's."""
    per_kv = shape.heads // shape.kv_heads
    groups = importance.kv_groups(teacher_config.num_key_value_heads)
    kept_as = {layer.teacher_layer: j for j, layer in enumerate(choice.layers)}
    layers = []
    for j, layer in enumerate(choice.layers):
        t = layer.teacher_layer
        layers.append({
            "student_layer": j,
            "teacher_layer": t,
            "block_influence": float(importance.layers[t]),
            "heads": [{"student_head": n, "teacher_head": h, "student_kv_head": n // per_kv,
                       "teacher_kv_head": choice.kv_of(h), "importance": float(importance.heads[t, h])}
                      for n, h in enumerate(layer.q_heads)],
            "kv_heads": [{"student_kv_head": k, "teacher_kv_head": kv, "importance": float(groups[t, kv])}
                         for k, kv in enumerate(layer.kv_heads)],
            "neurons": {"kept": len(layer.neurons), "of": teacher_config.intermediate_size,
                        "indices": list(layer.neurons)},
        })
    return {
        "format": RECORD_FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {**teacher, "model_type": teacher_config.model_type,
                    "architectures": list(teacher_config.architectures or []),
                    "shape": teacher_shape(teacher_config).as_dict(), "head_dim": head_dim(teacher_config)},
        "calibration": {**calibration, "tokens": importance.tokens},
        "options": dict(options),
        "student": {"shape": shape.as_dict(), "head_dim": head_dim(teacher_config)},
        "hidden_channels": {"kept": len(choice.channels), "of": teacher_config.hidden_size,
                            "indices": list(choice.channels)},
        "teacher_layers": [{"teacher_layer": t, "block_influence": float(s), "student_layer": kept_as.get(t)}
                           for t, s in enumerate(importance.layers.tolist())],
        "layers": layers,
    }


def write_record(directory: Path, record: Mapping[str, Any]) -> Path:
    """Write `record` as `directory/pruning.json` atomically (index lists on one line); returns its path."""
    path = Path(directory) / RECORD_NAME
    text = _INT_LIST.sub(lambda m: "[" + re.sub(r",\s+", ", ", m[1]) + "]", json.dumps(record, indent=1))
    write_atomic(path, (text + "\n").encode())
    return path


def read_record(directory: str | Path) -> dict[str, Any]:
    """The pruning record of a student directory; ConfigError naming the file when it is missing,
    unreadable, or of another format or version."""
    path = Path(directory) / RECORD_NAME
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no pruning record; is {directory} a student made by python -m pipeline.prune?"
                          ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable pruning record ({exc})") from exc
    if not isinstance(body, dict) or body.get("format") != RECORD_FORMAT:
        found = body.get("format") if isinstance(body, dict) else None
        raise ConfigError(f"{path}: not a pruning record (format {found!r}, expected {RECORD_FORMAT!r})")
    if body.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: pruning record version {body.get('format_version')}, this code reads "
                          f"{FORMAT_VERSION}")
    return body


def layer_sources(record: Mapping[str, Any]) -> list[int]:
    """The teacher layer of each student layer, in student order."""
    return [layer["teacher_layer"] for layer in record["layers"]]


def head_sources(record: Mapping[str, Any]) -> list[list[int]]:
    """Per student layer, the teacher query head of each student head."""
    return [[head["teacher_head"] for head in layer["heads"]] for layer in record["layers"]]
