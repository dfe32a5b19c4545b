"""A run directory belongs to one run: ``<output_dir>/run.json`` says which, and where it lives.

``run.json`` holds the run's id, the absolute output and checkpoint directories, the run's identity
(``pipeline.checkpoint.resume_contract.RunIdentity``: the config keys and content that define it) and the
step of its newest checkpoint. Every checkpoint records the run id too, so a start can tell "the
same run again" (a requeue, a resume) from "a different run pointed at a used directory". The
second is refused before anything is written, because continuing would mix the two runs'
checkpoints, metrics and TensorBoard logs (and pruning would delete the other run's checkpoints).
The way out is a new ``output_dir``, or ``--move-aside``, which renames the old run's files to
``<dir>.moved-<time>`` (nothing is deleted). In particular:

- a run that died before its first checkpoint is continued (a requeue) only by a start with the
  same identity;
- a start that finds no checkpoint where ``run.json`` says the run saved some (``checkpoint.dir``
  changed, or the checkpoints were moved or deleted) is refused instead of starting at step 1;
- resuming a checkpoint older than the run's newest is refused unless ``--rollback``, which moves
  the newer ones aside (``step_N.rolled-back-<time>``) so that no save overwrites them.

Decided on rank 0 under the output_dir's lock (``pipeline.checkpoint.run_lock``) and broadcast, so every rank
takes the same decision from the same files.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import records as ckpt
from pipeline.checkpoint.records import universal_path
from pipeline.checkpoint.resume_contract import RunIdentity, identity_changes, refusal

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"


class RunDirRefused(ValueError):
    """Starting here would mix two runs; the message names the directory and the choices."""


@dataclass(frozen=True)
class RunDirs:
    """Where a run writes: its marker and metrics live in ``output``; checkpoints and TensorBoard
    may be elsewhere (``checkpoint.dir``, ``logging.tb_dir``)."""

    output: Path
    checkpoints: Path
    tensorboard: Path

    @property
    def marker(self) -> Path:
        return self.output / RUN_FILE

    def record(self) -> dict | None:
        """The parsed ``run.json`` (it has a run id), or None when the directory has none."""
        if not self.marker.is_file():
            return None
        try:
            record = json.loads(self.marker.read_text())
            if isinstance(record.get("run_id"), str):
                return record
        except (json.JSONDecodeError, AttributeError):
            pass
        raise RunDirRefused(f"{self.marker} is not a run marker written by this pipeline: remove it "
                            f"if {self.output} holds no run, or choose another output_dir")

    def recorded_run_id(self) -> str | None:
        """The id in ``run.json``, or None when the directory has none."""
        record = self.record()
        return record["run_id"] if record else None

    def traces(self) -> list[Path]:
        """What a run leaves behind here (config files and launcher logs do not count)."""
        found = [p for p in (self.marker, self.output / METRICS_FILE) if p.exists()]
        if self.checkpoints.is_dir():
            found += sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step_"))
        if self.tensorboard.is_dir():
            found += sorted(self.tensorboard.rglob("events.out.tfevents.*"))
        return found


def claim(dirs: RunDirs, resume_from: Path | None, *, restart: bool, move_aside: bool, rollback: bool = False,
          identity: RunIdentity | None = None) -> tuple[str, list[tuple[Path, Path]]]:
    """(id of the run starting now in ``dirs``, what was moved aside); writes ``run.json`` (call on
    rank 0 only, under the output_dir's lock).

    - resuming a checkpoint of ``dirs.checkpoints``: that checkpoint's run (checked against
      run.json); newer checkpoints of that run are refused, or moved aside with ``rollback``;
    - no checkpoint, but run.json, and ``restart`` (``--resume auto`` found nothing to resume): the
      same run starting again before its first checkpoint (a requeue), if its identity is this
      start's and run.json records no checkpoint;
    - otherwise a new run, refused if the directories hold another run's files, unless
      ``move_aside`` (the old files are renamed first).
    """
    record = dirs.record()
    recorded = record["run_id"] if record else None
    moved: list[tuple[Path, Path]] = []
    if resume_from is not None and resume_from.parent.resolve() == dirs.checkpoints.resolve():
        run_id = ckpt.run_id_of(resume_from) or recorded or _new_id()
        if recorded is not None and run_id != recorded:
            raise RunDirRefused(f"{resume_from} was written by run {run_id}, but {dirs.marker} says "
                                f"{dirs.output} holds run {recorded}: checkpoint.dir and output_dir belong "
                                f"to different runs; point them at the same run")
        moved = _newer_checkpoints_aside(dirs, resume_from, run_id, rollback)
        saved_step = int(ckpt.read_state(resume_from)["step"])
    elif restart and recorded is not None and not _complete_of_other_runs(dirs, recorded):
        _refuse_restart(dirs, record, identity)
        run_id, saved_step = recorded, 0
    else:
        traces = dirs.traces()
        if traces and not move_aside:
            raise RunDirRefused(_used_message(dirs, traces, resume_from))
        if traces:
            moved = _move_aside(dirs)
            record = None
        run_id, saved_step = _new_id(), 0
    same = record is not None and record["run_id"] == run_id
    _write_record(dirs, {"run_id": run_id, "created": record["created"] if same else _now(),
                         "output_dir": str(dirs.output.absolute()), "checkpoint_dir": str(dirs.checkpoints.absolute()),
                         "identity": identity.to_json() if identity else None, "saved_step": saved_step})
    return run_id, moved


def record_save(dirs: RunDirs, step: int) -> None:
    """Note in run.json that the run has a complete checkpoint of ``step`` (rank 0, after the commit)."""
    record = dirs.record()
    if record is not None:
        _write_record(dirs, dict(record, saved_step=step))


def _write_record(dirs: RunDirs, record: dict) -> None:
    dirs.output.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(dirs.marker, json.dumps(record, indent=1) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def _refuse_restart(dirs: RunDirs, record: dict, identity: RunIdentity | None) -> None:
    """A start that found no checkpoint may continue the run of run.json only if that run saved
    none (else they were moved or deleted, or checkpoint.dir changed) and it is the same run."""
    where = Path(record.get("checkpoint_dir") or dirs.checkpoints)
    if record.get("saved_step"):
        moved = "" if where == dirs.checkpoints.absolute() else f", and checkpoint.dir is now {dirs.checkpoints}"
        raise RunDirRefused(
            f"{dirs.marker} says run {record['run_id']} saved checkpoints up to step {record['saved_step']} "
            f"in {where}, but no checkpoint was found there{moved}: starting at step 1 would train the run "
            f"again over its own files. To continue it, set checkpoint.dir={where} (or bring its checkpoints "
            f"back); to start a new run, use a new output_dir=... or --move-aside (nothing is deleted)")
    if identity is not None and record.get("identity"):
        changes = identity_changes(RunIdentity.from_json(record["identity"]), identity)
        if changes:
            raise RunDirRefused(refusal(f"run {record['run_id']} in {dirs.output} (it stopped before its first "
                                        f"checkpoint)", "run.json", changes))


def _newer_checkpoints_aside(dirs: RunDirs, resume_from: Path, run_id: str, rollback: bool) -> list[tuple[Path, Path]]:
    """Resuming a checkpoint older than the run's newest intact one: refused, or (``rollback``) the
    newer intact checkpoints of the run and their universal copies renamed
    ``<name>.rolled-back-<time>``, so that the run's saves at those steps never meet them. (Damaged
    ones, passed over by ``--resume auto``, are moved aside by the save that reaches their step.)"""
    step = int(ckpt.read_state(resume_from)["step"])
    newer = [p for p in ckpt.complete_checkpoints(dirs.checkpoints)
             if int(ckpt.read_state(p)["step"]) > step and ckpt.run_id_of(p) in (run_id, None) and not ckpt.verify(p)]
    if not newer:
        return []
    if not rollback:
        raise RunDirRefused(
            f"{resume_from} is older than this run's newest checkpoint(s) {', '.join(p.name for p in newer)} "
            f"in {dirs.checkpoints}: continuing from it would train over them. To continue the run, use "
            f"--resume auto; to branch from step {step}, pass --rollback (checkpoint.rollback=true), which "
            f"renames the newer ones to <name>.rolled-back-<time> (nothing is deleted)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in newer:
        for src in (p, universal_path(p)):
            if src.exists():
                dst = src.with_name(f"{src.name}.rolled-back-{stamp}")
                src.rename(dst)
                moved.append((src, dst))
    return moved


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def _complete_of_other_runs(dirs: RunDirs, run_id: str) -> bool:
    return any(ckpt.run_id_of(p) not in (run_id, None) for p in ckpt.complete_checkpoints(dirs.checkpoints))


def _used_message(dirs: RunDirs, traces: list[Path], resume_from: Path | None) -> str:
    start = "a new run" if resume_from is None else f"a new run from {resume_from}"
    newest = ckpt.complete_checkpoints(dirs.checkpoints)
    held = f" (newest checkpoint {newest[-1].name})" if newest else ""
    shown = ", ".join(str(p) for p in traces[:3]) + (", ..." if len(traces) > 3 else "")
    return (f"output_dir {dirs.output} already holds another run{held}: {shown}. Starting {start} there "
            f"would mix the two runs' checkpoints and logs. Choose one: continue that run with "
            f"--resume auto; start this one in a new output_dir=...; or pass --move-aside "
            f"(checkpoint.move_aside=true) to rename the old run's files to *.moved-<time> first "
            f"(nothing is deleted)")


def _move_aside(dirs: RunDirs) -> list[tuple[Path, Path]]:
    """Rename the old run's marker, metrics, checkpoints and TensorBoard dirs out of the way.

    Files inside ``output`` go to the sibling ``<output>.moved-<time>/`` under the same relative
    names; checkpoint or TensorBoard directories elsewhere become ``<dir>.moved-<time>``.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside_root = dirs.output.with_name(f"{dirs.output.name}.moved-{stamp}")
    moved = []
    for src in (dirs.marker, dirs.output / METRICS_FILE, dirs.checkpoints, dirs.tensorboard):
        if not src.exists():
            continue
        try:
            dst = aside_root / src.resolve().relative_to(dirs.output.resolve())
        except ValueError:
            dst = src.with_name(f"{src.name}.moved-{stamp}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        moved.append((src, dst))
    return moved
