"""Distilling a student made by ``python -m pipeline.prune``: what a run takes from its pruning
record (``STUDENT_DIR/pruning.json``, `pipeline.pruning.record`) and every check of it, all before
any weights load.

- Defaults. When ``student.init_from`` holds a record, an empty ``distill.layer_map`` becomes the
  record's source layers (student layer s distils the teacher layer it was cut from) and, under
  ``distill.plan=select``, a ``distill.select_heads`` the config does not give becomes ``pruned``
  (student head n of layer s distils the teacher head the record names for (s, n), in teacher layer
  ``layer_map[s]``). A value the config gives overrides the record. The resolved config is the
  run's: printed at start-up (saying where the values came from), saved beside every checkpoint and
  compared on resume (``select_heads`` is an identity key).
- Checks, each a ConfigError naming the key and the fix: ``pruned`` asked with no record; a record
  of another student shape, or of another teacher (its shape here; its content, the hash the record
  stores against ``teacher.path``'s, by `check_teacher` once the teacher is hashed); two distilled
  student layers sharing a teacher layer with different source heads; on resume, a record that now
  names other sources than the checkpoint was trained with (`check_resumed`: the sources are kept
  in every checkpoint's trainer state under `STATE_KEY`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.pruning.record import RECORD_NAME, head_sources, layer_sources, read_record
from shd_common.settings import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig

#: The entry of a checkpoint's trainer state that keeps what the run took from its pruning record.
STATE_KEY = "pruning_record"

#: What to do to distil without the record (named in refusals).
_WITHOUT = ("or distil without the record: give distill.layer_map explicitly (and, under distill.plan=select, "
            "distill.select_heads, e.g. first)")
_SHAPE_FIELDS = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                 "intermediate_size": "intermediate_size", "hidden_size": "hidden_size"}


@dataclass(frozen=True)
class PruningRecord:
    """What distillation reads of a pruned student's record."""

    path: Path  # STUDENT_DIR/pruning.json
    layers: tuple[int, ...]  # the teacher layer each student layer was cut from
    heads: tuple[tuple[int, ...], ...]  # per student layer, the teacher head each student head was cut from
    teacher: dict[str, Any]  # the teacher it was cut from: path, content_sha256, shape
    student_shape: dict[str, Any]

    @property
    def origin(self) -> str:
        """How the start-up lines say where a value came from."""
        return f"from the pruning record {self.path}"

    def sources(self) -> dict[str, Any]:
        """The sources as a checkpoint keeps them (JSON)."""
        return {"path": str(self.path), "layers": list(self.layers), "heads": [list(h) for h in self.heads]}


def _uses_record(cfg: RunConfig) -> bool:
    """Whether the run takes anything from a record: pruned asked, or a key left to it."""
    d = cfg.distill
    heads_left = d.plan == "select" and "select_heads" not in d.model_fields_set
    return d.select_heads == "pruned" or d.layer_map is None or heads_left


def read_pruning_record(cfg: RunConfig) -> PruningRecord | None:
    """``student.init_from``'s record when the run uses it (stage distill; ``select_heads=pruned``,
    or ``distill.layer_map`` / ``distill.select_heads`` left to it and the record there), else None."""
    init_from, d = cfg.student.init_from, cfg.distill
    if not cfg.uses_teacher or not init_from or not _uses_record(cfg):
        return None
    asked = d.select_heads == "pruned"
    if not asked and not (Path(init_from) / RECORD_NAME).exists():
        return None
    try:
        body = read_record(init_from)
        layers = tuple(int(t) for t in layer_sources(body))
        heads = tuple(tuple(int(h) for h in row) for row in head_sources(body))
        teacher, student_shape = dict(body["teacher"]), dict(body["student"]["shape"])
    except ConfigError as e:
        if asked:
            raise ConfigError(f"distill.select_heads=pruned needs the pruning record of student.init_from: {e} "
                              f"Make the student with python -m pipeline.prune --teacher TEACHER --data DATA --out "
                              f"{init_from}, or choose another distill.select_heads (first, random, reconstruct, "
                              f"contribution)") from None
        raise ConfigError(f"{e}: distillation reads it for distill.layer_map and distill.select_heads; make the "
                          f"student again with python -m pipeline.prune, {_WITHOUT}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{Path(init_from) / RECORD_NAME}: malformed pruning record ({type(e).__name__}: {e}); "
                          f"make the student again with python -m pipeline.prune, {_WITHOUT}") from None
    return PruningRecord(Path(init_from) / RECORD_NAME, layers, heads, teacher, student_shape)


def check_shapes(record: PruningRecord, student_cfg, teacher_cfg) -> None:
    """The record must describe this student (``student.init_from``'s config) and, by its shape and
    indices, a teacher like ``teacher.path``'s."""
    want = {k: getattr(student_cfg, f, None) for k, f in _SHAPE_FIELDS.items()}
    got = {k: record.student_shape.get(k) for k in _SHAPE_FIELDS}
    if got != want or len(record.layers) != want["layers"] or any(len(h) != want["heads"] for h in record.heads):
        diff = ", ".join(f"{k} {got[k]} (record) / {want[k]} (student)" for k in _SHAPE_FIELDS if got[k] != want[k])
        raise ConfigError(f"the pruning record {record.path} does not describe the student in its directory "
                          f"({diff or 'its per-layer sources do not match the student layers and heads'}): "
                          f"was student.init_from changed after pruning? Prune it again with python -m "
                          f"pipeline.prune, {_WITHOUT}")
    shape = record.teacher.get("shape") or {}
    teacher_shape = {k: getattr(teacher_cfg, f, None) for k, f in _SHAPE_FIELDS.items()}
    out_of_range = (any(not 0 <= t < teacher_cfg.num_hidden_layers for t in record.layers)
                    or any(not 0 <= h < teacher_cfg.num_attention_heads for row in record.heads for h in row))
    if {k: shape.get(k) for k in _SHAPE_FIELDS} != teacher_shape or out_of_range:
        raise ConfigError(_other_teacher(record, f"a teacher of shape {shape}, but teacher.path "
                                                 f"{teacher_cfg.name_or_path} has {teacher_shape}"))


def _other_teacher(record: PruningRecord, what: str) -> str:
    return (f"student.init_from was pruned from another teacher: its pruning record {record.path} names {what}. "
            f"The record's layers and heads pair the student with the teacher it was cut from: set teacher.path to "
            f"that teacher ({record.teacher.get('path')}), {_WITHOUT}")


def check_teacher(record: PruningRecord, identity: dict[str, Any] | None) -> None:
    """The teacher's content (``pipeline.models.identity.teacher_identity``) must be the one the
    record was cut from."""
    want, got = record.teacher.get("content_sha256"), (identity or {}).get("content_sha256")
    if want != got:
        raise ConfigError(_other_teacher(record, f"the teacher with content sha256 {str(want)[:12]}, but "
                                                 f"teacher.path {(identity or {}).get('path')} has content sha256 "
                                                 f"{str(got)[:12]}"))


def with_record_defaults(cfg: RunConfig, record: PruningRecord | None) -> RunConfig:
    """``cfg`` with the keys it leaves to the record filled from it (the module's docstring)."""
    if record is None:
        return cfg
    d = cfg.distill
    update: dict[str, Any] = {}
    if d.layer_map is None:
        update["layer_map"] = list(record.layers)
    if d.plan == "select" and "select_heads" not in d.model_fields_set:
        update["select_heads"] = "pruned"
    if not update:
        return cfg
    return cfg.model_copy(update={"distill": d.model_copy(update=update)})


def record_notes(given: RunConfig, resolved: RunConfig, record: PruningRecord) -> list[str]:
    """The start-up lines that say what the run took from the record, and what the config overrode."""
    d, r = given.distill, resolved.distill
    lines = []
    if d.layer_map is None:
        lines.append(f"distill.layer_map not given: {r.layer_map}, the teacher layer each student layer was cut "
                     f"from ({record.origin})")
    elif d.layer_map != list(record.layers):
        lines.append(f"distill.layer_map {d.layer_map} given: overrides the source layers {list(record.layers)} "
                     f"{record.origin}")
    if r.select_heads == "pruned":
        how = "not given" if "select_heads" not in d.model_fields_set else "given"
        lines.append(f"distill.select_heads {how}: pruned, each student head distils the teacher head it was cut "
                     f"from ({record.origin})")
    elif r.plan == "select":
        lines.append(f"distill.select_heads={r.select_heads} given: overrides the source heads {record.origin}")
    return lines


def heads_by_layer(record: PruningRecord, pairs: dict[int, int]) -> dict[int, tuple[int, ...]]:
    """{distilled student layer: the teacher head each of its heads distils} under select_heads=pruned.

    The select plan keeps one choice per teacher layer, so two student layers paired with one
    teacher layer must bring the same heads."""
    heads = {s: record.heads[s] for s in sorted(pairs)}
    first: dict[int, int] = {}
    for s, t in sorted(pairs.items()):
        other = first.setdefault(t, s)
        if heads[other] != heads[s]:
            raise ConfigError(f"distill.select_heads=pruned: student layers {other} and {s} both distil teacher "
                              f"layer {t} (distill.layer_map) but were cut from other heads ({list(heads[other])} "
                              f"and {list(heads[s])}, {record.origin}): give a distill.layer_map that pairs them "
                              f"with different teacher layers (empty = the record's), distill.student_layers "
                              f"without one of them, or another distill.select_heads")
    return heads


def check_resumed(record: PruningRecord | None, state: dict[str, Any], where: str | Path) -> None:
    """A resumed run that uses a record must find the sources its checkpoint was trained with."""
    saved = state.get(STATE_KEY)
    if record is None or not saved:
        return
    now = record.sources()
    if (saved.get("layers"), saved.get("heads")) != (now["layers"], now["heads"]):
        raise ConfigError(f"refusing to resume from {where}: the pruning record {record.path} now names other "
                          f"source layers or heads than the run was trained with (checkpoint: layers "
                          f"{saved.get('layers')}, heads {saved.get('heads')}; now: layers {now['layers']}, heads "
                          f"{now['heads']}): restore the record the run started from; to start a new run, use a new "
                          f"output_dir=... (or --move-aside)")
