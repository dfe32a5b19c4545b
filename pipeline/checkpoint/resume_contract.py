"""The resume contract: what a start may change of the run it continues, key by key.

Every leaf key of the run config has one class, declared next to the config
(``pipeline.config.RESUME_CLASSES``, checked complete when that module is imported):

- ``identity``: defines the run (stage, seed, student shape, seq_len, precision, the calibrated SHD
  choices). A change is refused before any model loads, naming each key and the fix: restore it,
  or start a new run (a new ``output_dir``, or ``--move-aside``).
- ``identity-by-content``: the paths among them (teacher, data, tokenizer, ``student.init_from``)
  and the student's shape fields. They are compared by what they hold or build (the checkpoint's
  identity record: content hashes, the student's shape), so a moved teacher resumes, one replaced
  in place does not, and an empty shape field that derives the saved value is no change. A
  different teacher is the
  one identity change a resumed run can carry (the student's weights and optimizer load, the
  objective reads the new teacher): ``--force-resume`` allows it, and only it.
- ``schedule``: optimizer, LR schedule, loss weights, batch size. May change; the new value applies
  from the next step (``Checkpointer.load`` puts the config's optimizer hyperparameters and LR
  schedule back after DeepSpeed restored the saved ones) and the change is printed at start.
- ``free``: logging, evaluation, checkpoint cadence, placement, paths. Take effect as given.

The same identity decides whether a start may adopt a run directory whose run died before its
first checkpoint (``run.json`` records it: ``pipeline.checkpoint.run_dir``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from pipeline.config.run import CONTENT, FREE, IDENTITY, SCHEDULE
from shd_common.settings import flatten

#: What a change of each class does on resume (printed beside it).
EFFECT = {IDENTITY: "refused", CONTENT: "compared by content", SCHEDULE: "applied from the next step",
          FREE: "as given"}
#: Entries of the identity record (trainer_state.json "identity") and whether --force-resume may
#: override a change of it; seq_len is data.seq_len, compared as a config key.
RECORD_FORCIBLE = {"teacher": True, "tokenizer_sha256": False, "data_sha256": False, "student_shape": False}


class Classified(Protocol):
    """A run config that knows its keys' classes (``pipeline.config.RunConfig``)."""

    def key_classes(self) -> dict[str, str]: ...

    def model_dump(self) -> dict: ...


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the checkpoint (or run.json) and this start."""

    key: str
    saved: Any
    now: Any
    kind: str

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.now!r} ({self.kind}: {EFFECT.get(self.kind, 'refused')})"


@dataclass(frozen=True)
class RunIdentity:
    """What defines a run: its identity config keys (by value) and its identity record (content)."""

    config: dict[str, Any]
    record: dict[str, Any]

    @classmethod
    def of(cls, cfg: Classified, record: dict[str, Any]) -> RunIdentity:
        classes = cfg.key_classes()
        return cls({k: v for k, v in flatten(cfg.model_dump()).items() if classes[k] == IDENTITY}, dict(record))

    @classmethod
    def from_json(cls, data: dict) -> RunIdentity:
        return cls(dict(data.get("config") or {}), dict(data.get("record") or {}))

    def to_json(self) -> dict:
        return asdict(self)


def config_changes(saved_config: dict, cfg: Classified) -> list[Change]:
    """Every key whose saved value (a checkpoint's resolved_config.yaml, parsed) differs from this
    start's, with its class. A key the checkpoint does not record (added since) is not compared."""
    classes = cfg.key_classes()
    saved = flatten({k: v for k, v in saved_config.items() if k != "derived"})
    now = flatten(cfg.model_dump())
    return [Change(k, saved[k], v, classes[k]) for k, v in now.items() if k in saved and saved[k] != v]


def record_changes(saved: dict, now: dict) -> list[Change]:
    """Changes of the identity record's content entries. The teacher is compared by its content
    hash (its path may move); a record written before content hashes compares the path only."""
    changes = []
    for key in RECORD_FORCIBLE:
        old, new = saved.get(key), now.get(key)
        if key == "teacher" and old and new:
            field = "content_sha256" if "content_sha256" in old else "path"
            if old.get(field) == new.get(field):
                continue
        if old != new:
            changes.append(Change(key, old, new, CONTENT))
    return changes


def identity_changes(saved: RunIdentity, now: RunIdentity) -> list[Change]:
    """What differs between two run identities (config keys recorded by both, then the record)."""
    config = [Change(k, saved.config[k], v, IDENTITY) for k, v in now.config.items()
              if k in saved.config and saved.config[k] != v]
    return config + record_changes(saved.record, now.record)


def refused(changes: list[Change], force: bool) -> tuple[list[Change], list[Change]]:
    """(changes that refuse the resume, changes ``force`` lets through): identity keys always
    refuse; of the record, only a teacher change may be forced."""
    hard = [c for c in changes if c.kind == IDENTITY or (c.kind == CONTENT and not RECORD_FORCIBLE[c.key])]
    soft = [c for c in changes if c.kind == CONTENT and RECORD_FORCIBLE[c.key]]
    return (hard + ([] if force else soft)), (soft if force else [])


def refusal(what: str, source: str, changes: list[Change]) -> str:
    """The message of a refused resume of ``what``: each change (``source`` has ..., this run has
    ...) and the ways out."""
    lines = "\n  ".join(f"{c.key}: {source} has {c.saved!r}, this run has {c.now!r}" for c in changes)
    forcible = all(c.kind == CONTENT and RECORD_FORCIBLE.get(c.key, True) for c in changes)
    return (f"refusing to resume {what}: it was made with a different\n  {lines}\nto continue that run, restore "
            f"what changed; to start a new run, use a new output_dir=... (or --move-aside to move that "
            f"run's files aside)"
            + ("; or set checkpoint.force_resume=true (--force-resume) to resume with this teacher anyway"
               if forcible else ""))


def describe(where: str, changes: list[Change]) -> str:
    """The diff printed at the start of a resumed run."""
    if not changes:
        return f"resume contract: the config is the one {where} was saved with"
    return f"resume contract: config changes since {where}:\n  " + "\n  ".join(str(c) for c in changes)
