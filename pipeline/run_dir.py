"""A run directory belongs to one run: ``<output_dir>/run.json`` holds its id, written at creation.

Every checkpoint records the run id too, so a start can tell "the same run again" (a requeue, a
resume) from "a different run pointed at a used directory". The second is refused before anything
is written, because continuing would mix the two runs' checkpoints, metrics and TensorBoard logs
(and pruning would delete the other run's checkpoints). The way out is a new ``output_dir``, or
``--move-aside``, which renames the old run's files to ``<dir>.moved-<time>`` (nothing is deleted).

Decided on rank 0 and broadcast, so every rank takes the same decision from the same files.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline import checkpoint as ckpt

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

    def recorded_run_id(self) -> str | None:
        """The id in ``run.json``, or None when the directory has none."""
        if not self.marker.is_file():
            return None
        try:
            return json.loads(self.marker.read_text())["run_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RunDirRefused(f"{self.marker} is not a run marker written by this pipeline: remove it "
                                f"if {self.output} holds no run, or choose another output_dir") from None

    def traces(self) -> list[Path]:
        """What a run leaves behind here (config files and launcher logs do not count)."""
        found = [p for p in (self.marker, self.output / METRICS_FILE) if p.exists()]
        if self.checkpoints.is_dir():
            found += sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step_"))
        if self.tensorboard.is_dir():
            found += sorted(self.tensorboard.rglob("events.out.tfevents.*"))
        return found


def claim(dirs: RunDirs, resume_from: Path | None, *, restart: bool,
          move_aside: bool) -> tuple[str, list[tuple[Path, Path]]]:
    """(id of the run starting now in ``dirs``, what was moved aside); writes ``run.json`` (call on
    rank 0 only).

    - resuming a checkpoint of ``dirs.checkpoints``: that checkpoint's run (checked against run.json);
    - no checkpoint, but run.json, and ``restart`` (``--resume auto`` found nothing to resume): the
      same run starting again before its first checkpoint (a requeue);
    - otherwise a new run, refused if the directories hold another run's files, unless
      ``move_aside`` (the old files are renamed first).
    """
    recorded = dirs.recorded_run_id()
    moved: list[tuple[Path, Path]] = []
    if resume_from is not None and resume_from.parent.resolve() == dirs.checkpoints.resolve():
        run_id = ckpt.run_id_of(resume_from) or recorded or _new_id()
        if recorded is not None and run_id != recorded:
            raise RunDirRefused(f"{resume_from} was written by run {run_id}, but {dirs.marker} says "
                                f"{dirs.output} holds run {recorded}: checkpoint.dir and output_dir belong "
                                f"to different runs; point them at the same run")
    elif restart and recorded is not None and not _complete_of_other_runs(dirs, recorded):
        run_id = recorded
    else:
        traces = dirs.traces()
        if traces and not move_aside:
            raise RunDirRefused(_used_message(dirs, traces, resume_from))
        if traces:
            moved = _move_aside(dirs)
            recorded = None
        run_id = _new_id()
    if recorded != run_id:
        dirs.output.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(dirs.marker, json.dumps(
            {"run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}, indent=1) + "\n")
    return run_id, moved


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
