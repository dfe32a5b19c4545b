"""Saving and resuming a run, and the ``checkpoint`` config section.

The checkpointer owns the policy around the on-disk format of ``pipeline.checkpoint``: which
checkpoint a start resumes (``auto`` passes over damaged ones, a universal copy when the world size
changed), the identity checks that refuse a checkpoint of another teacher, tokenizer, data or
shape, whose directory a run may write (``pipeline.run_dir``), and the save itself: never from
non-finite weights, never over another run's checkpoint, committed only when every rank's files
are on disk, then pruned to ``keep_last``. A checkpoint's ``trainer_state.json`` is read once, when
the resume is chosen.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from pydantic import model_validator

from pipeline import checkpoint as ckpt
from pipeline import distributed, run_dir
from pipeline.run_dir import RunDirRefused, RunDirs
from pipeline.settings import ConfigError, Section, setting
from pipeline.universal import is_universal, universal_path


class CheckpointConfig(Section):
    dir: Optional[str] = setting(None, "Checkpoint directory; empty = <output_dir>/checkpoints.")
    every_steps: int = setting(500, "Save every this many steps (0 = only at the end and on preemption).")
    keep_last: int = setting(3, "Complete checkpoints kept (>= 2).")
    resume: str = setting("auto", "'auto' = newest complete checkpoint if any, 'none' = start fresh, "
                                  "or a checkpoint directory.")
    force_resume: bool = setting(False, "Resume even if teacher/tokenizer/data/model shape changed.")
    move_aside: bool = setting(False, "When output_dir (or checkpoint.dir) already holds another run and this "
                                      "run starts fresh, rename the old run's directories to "
                                      "<dir>.moved-<timestamp> first (nothing is deleted); without it such a "
                                      "start is refused.")
    save_at_end: bool = setting(True, "Save when the run reaches max_steps.")

    @model_validator(mode="after")
    def _values(self) -> "CheckpointConfig":
        if self.keep_last < 2:
            raise ConfigError(f"checkpoint.keep_last must be >= 2 (a save interrupted mid-way must leave a "
                              f"complete one behind), got {self.keep_last}")
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        return self


class ResumeRefused(ConfigError):
    pass


@dataclass
class Resume:
    """The checkpoint a start resumes from, its trainer state, and what force_resume let change."""

    path: Path
    state: dict
    changes: list[str] = field(default_factory=list)


class Checkpointer:
    """Resume choice and checks at start-up, ``save`` / ``load`` of the student engine later."""

    def __init__(self, cfg: CheckpointConfig, root: Path, *, world: int, rank: int,
                 hang_in_save_at_step: int | None = None) -> None:
        self.cfg, self.root, self.world, self.rank = cfg, root, world, rank
        self.hang_in_save_at_step = hang_in_save_at_step
        self.notices: list[str] = []  # logged once the logger exists (skipped checkpoints, moves)
        self.run_id: str | None = None

    # ---- start-up ---------------------------------------------------------------------------

    def choose_resume(self) -> Resume | None:
        """The checkpoint to resume from, decided before the engines are built (a universal
        checkpoint needs ``load_universal`` in the student's DeepSpeed config). Damaged checkpoints
        are passed over by ``auto`` with a warning and refused when named."""
        r = self.cfg.resume
        if r == "none":
            return None
        if r == "auto":
            p = ckpt.find_latest(self.root, warn=lambda msg: self.notices.append("WARNING: " + msg))
            if p is None:
                if ckpt.complete_checkpoints(self.root):
                    raise ResumeRefused(f"no intact checkpoint in {self.root}: " + "; ".join(self.notices)
                                        + ". Restore the named files, or start over in a new output_dir")
                return None
            u = universal_path(p)
            if ckpt.read_state(p).get("world_size") != self.world and ckpt.is_complete(u):
                p = u
        else:
            p = Path(r)
        problems = ckpt.verify(p)
        if problems:
            raise ResumeRefused(f"checkpoint.resume={r}: cannot resume from {p}: " + "; ".join(problems))
        return Resume(p, ckpt.read_state(p))

    def check_resume(self, resume: Resume, identity: dict) -> None:
        """Refuse a checkpoint made with another teacher, tokenizer, data or model shape (unless
        force_resume, which records the changes in ``resume.changes``), then one saved by another
        number of ranks that is not a universal copy. Identity first: converting a checkpoint of
        another teacher would not make it resumable."""
        saved = dict(resume.state["identity"])
        teacher = saved.get("teacher")
        if teacher and "content_sha256" not in teacher and identity["teacher"]:
            # written before teacher content hashes: only the path can be compared
            self.notices.append(f"WARNING: {resume.path} predates teacher content hashes; the teacher's weights "
                                f"could not be compared with the checkpoint's (only its path)")
            saved["teacher"] = dict(identity["teacher"], path=teacher.get("path"))
        changes = ckpt.identity_changes(saved, identity)
        if changes and not self.cfg.force_resume:
            raise ResumeRefused("refusing to resume from " + str(resume.path) + ": it was made with a different\n  "
                                + "\n  ".join(changes)
                                + "\nto keep this run, restore what changed; to start a new run, use a new "
                                  "output_dir=... (or --move-aside to move this run's files aside); or set "
                                  "checkpoint.force_resume=true (--force-resume) to resume anyway")
        resume.changes = changes
        saved_world = resume.state.get("world_size")
        if saved_world != self.world and not is_universal(resume.path):
            p = resume.path
            raise ResumeRefused(f"{p} was saved by {saved_world} ranks and this run has {self.world}: "
                                f"convert it first with `python -m pipeline.universal --checkpoint {p}` "
                                f"(then --resume auto uses the converted copy)")

    def claim_run_dir(self, dirs: RunDirs, resume: Resume | None) -> str:
        """This run's id; refuses a start that would mix two runs in one directory (run_dir.py)."""
        path = resume.path if resume is not None else None

        def claim() -> tuple[str, list]:
            try:
                return run_dir.claim(dirs, path, move_aside=self.cfg.move_aside,
                                     restart=path is None and self.cfg.resume == "auto")
            except RunDirRefused as e:
                raise ResumeRefused(str(e)) from None

        self.run_id, moved = distributed.on_rank0(claim)
        self.notices += [f"moved the previous run's {src} to {dst}" for src, dst in moved]
        return self.run_id

    # ---- saving and loading -----------------------------------------------------------------

    def save(self, engine, step: int, records: ckpt.Records, log: Callable[[str], None]) -> Path | None:
        """Write and commit this step's checkpoint; None (nothing written) if the weights are not
        finite, so the last good checkpoint stays the newest."""
        root, tag = self.root, ckpt.tag_for(step)
        path = root / tag
        bad = nonfinite_parameters(engine)
        if bad:
            log(f"refusing to save step {step}: non-finite student weights in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}; the last good checkpoint in {root} is kept. Lower optim.lr "
                f"or check the data.")
            return None
        ours = ckpt.run_id_of(path) in (self.run_id, None)
        if ckpt.is_complete(path) and ours and not ckpt.verify(path):
            return path  # resumed at this very step: the checkpoint already holds this state
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if ckpt.is_complete(path) and not ours:  # refused at start-up (run_dir.claim)
                raise RuntimeError(f"{path} is a complete checkpoint of run {ckpt.run_id_of(path)}, "
                                   f"not of this run ({self.run_id}): not overwriting it")
            if ckpt.is_complete(path):  # ours but damaged (passed over at resume): kept for inspection
                aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
                log(f"moved damaged checkpoint {path.name} to {aside.name}")
            elif path.exists():
                shutil.rmtree(path)  # leftover of this run's save that was killed: start it clean
        dist.barrier()
        engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
        ckpt.save_rng(path, self.rank)
        if self.hang_in_save_at_step == step:
            (root / "SAVE_HANG").write_text(tag)
            time.sleep(3600)  # a test SIGKILLs the run here
        dist.barrier()  # every rank's files are on disk before the commit
        if self.rank == 0:
            ckpt.commit(root, path, records)
            log(f"saved checkpoint {path}")
            for p in ckpt.prune(root, self.cfg.keep_last, self.run_id):
                log(f"removed old checkpoint {p.name}")
        dist.barrier()
        return path

    def load(self, engine, resume: Resume, seed: int, log: Callable[[str], None]) -> None:
        """The engine's weights, optimizer and schedule from ``resume``, and this rank's RNG state
        (reseeded from ``seed`` and the step when the world size changed)."""
        path = resume.path
        groups = engine.optimizer.param_groups
        weight_decays = [g["weight_decay"] for g in groups]
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise ResumeRefused(f"DeepSpeed could not load {path}")
        if is_universal(path):
            # DeepSpeed's ZeRO-3 universal load copies param group 0's hyperparameters into every
            # group (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), which would decay
            # norms and biases: put back each group's own weight decay.
            for group, decay in zip(groups, weight_decays):
                group["weight_decay"] = decay
            log(f"optimizer param groups' weight_decay after universal load: {[g['weight_decay'] for g in groups]}")
            # It also gives every sub-group's state the *same* 'step' tensor object, and
            # torch.optim.Adam(W) increments it in place (step_t += 1) once per sub-group step, so
            # the step count (Adam's bias correction) would advance by the number of sub-groups
            # per optimizer step: give each sub-group its own copy.
            base = getattr(engine.optimizer, "optimizer", None)
            for st in (base.state.values() if base is not None else ()):
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        state = resume.state
        same_world = int(state.get("world_size", -1)) == self.world
        if not (same_world and ckpt.load_rng(path, self.rank)):
            torch.manual_seed(seed + int(state["step"]) * 1000 + self.rank)
        if resume.changes:
            log("WARNING: force_resume with changes:\n  " + "\n  ".join(resume.changes))
        log(f"resumed from {path} at step {state['step']} ({state['consumed_samples']} samples consumed)")


def nonfinite_parameters(engine) -> list[str]:
    """Names of the engine's parameters with a NaN/inf element on any rank (collective)."""
    names = [n for n, p in engine.module.named_parameters()
             if not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())]
    flags = torch.tensor([1.0 if names else 0.0], device=distributed.device())
    if distributed.all_reduce(flags, op=dist.ReduceOp.MAX).item() == 0:
        return []
    return names or ["(on another rank)"]
