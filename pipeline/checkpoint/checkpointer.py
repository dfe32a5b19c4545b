"""Saving and resuming a run, and the ``checkpoint`` config section.

The checkpointer owns the policy around the on-disk format of ``pipeline.checkpoint.records``: the
output_dir's lock (``pipeline.checkpoint.run_lock``: one live run per directory), which checkpoint a start
resumes (``auto`` passes over damaged ones, a universal copy when the world size changed), the
resume contract (``pipeline.checkpoint.resume_contract``: identity changes refused before any model loads,
schedule changes applied, the diff printed), whose directory a run may write (``pipeline.checkpoint.run_dir``:
no second run, no silent restart, no rollback over newer checkpoints), and the save itself: never
from non-finite weights, never over another run's checkpoint, never skipped because a checkpoint
of that step exists (it is moved aside), committed only when every rank's files are on disk, then
pruned to ``keep_last``. A checkpoint's ``trainer_state.json`` is read once, when the resume is
chosen.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeline.checkpoint import records as ckpt
from pipeline.checkpoint import run_dir
from pipeline.checkpoint.records import is_universal, universal_path
from pipeline.checkpoint.resume_contract import (
    CONTENT,
    IDENTITY,
    RunIdentity,
    config_changes,
    describe,
    record_changes,
    refusal,
    refused,
)
from pipeline.checkpoint.run_dir import RunDirRefused, RunDirs
from pipeline.checkpoint.run_lock import RunLock
from pipeline.runtime import distributed
from shd_common.integrity import naming_disk_full
from shd_common.settings import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig


class ResumeRefused(ConfigError):
    pass


@dataclass
class Resume:
    """The checkpoint a start resumes from, its trainer state, and what force_resume let change."""

    path: Path
    state: dict
    changes: list[str] = field(default_factory=list)


class Checkpointer:
    """Lock, resume choice and checks at start-up, ``save`` / ``load`` of the student engine later."""

    def __init__(self, run: RunConfig, *, world: int, rank: int) -> None:
        self.run_cfg, self.cfg, self.root, self.world, self.rank = run, run.checkpoint, run.checkpoint_dir, world, rank
        self.dirs = RunDirs(output=run.output_path, checkpoints=run.checkpoint_dir, tensorboard=run.tb_dir)
        self.hang_in_save_at_step = run.debug.hang_in_save_at_step
        self.notices: list[str] = []  # logged once the logger exists (skipped checkpoints, moves, the diff)
        self.run_id: str | None = None
        self.resume: Resume | None = None
        self.locks: list[RunLock] = []  # rank 0's, held until the process ends

    # ---- start-up ---------------------------------------------------------------------------

    def lock_run_dir(self) -> None:
        """Rank 0 takes the output_dir's lock before the run writes anything, and checkpoint.dir's
        when the checkpoints live outside the output_dir (every rank gets the refusal when another
        live run holds either)."""
        def take() -> None:
            self.locks = [RunLock(self.dirs.output)]
            if not self._checkpoints_inside_output():
                try:
                    self.locks.append(RunLock(self.dirs.checkpoints, "checkpoint.dir"))
                except ConfigError:
                    self.locks.pop().release()  # this start is refused: its output_dir is free again
                    raise

        distributed.on_rank0(take)

    def _checkpoints_inside_output(self) -> bool:
        return self.dirs.checkpoints.resolve().is_relative_to(self.dirs.output.resolve())

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
                self.notices.append(f"no checkpoint in {self.root}: this run starts at step 1 (output_dir "
                                    f"{self.dirs.output})")
                return None
            u = universal_path(p)
            if ckpt.read_state(p).get("world_size") != self.world and ckpt.is_complete(u):
                p = u
        else:
            p = Path(r)
            _refuse_a_checkpoint_root(p, r)
        problems = ckpt.verify(p)
        if problems:
            raise ResumeRefused(f"checkpoint.resume={r}: cannot resume from {p}: " + "; ".join(problems))
        self.resume = Resume(p, ckpt.read_state(p))
        return self.resume

    def check_resume(self, resume: Resume, identity: dict) -> None:
        """The resume contract (``pipeline.checkpoint.resume_contract``), before any model loads: refuse a
        changed identity (a config key of class identity, or another teacher, tokenizer, data or
        student shape; ``force_resume`` lets a teacher change through, recorded in
        ``resume.changes``), a max_steps the checkpoint has passed, then a checkpoint saved by
        another number of ranks that is not a universal copy; note the other changes for the log."""
        saved = dict(resume.state["identity"])
        teacher = saved.get("teacher")
        if teacher and "content_sha256" not in teacher and identity["teacher"]:
            self.notices.append(f"WARNING: {resume.path} predates teacher content hashes; the teacher's weights "
                                f"could not be compared with the checkpoint's (only its path)")
        saved_config = ckpt.read_config(resume.path)
        if saved_config is None:
            self.notices.append(f"WARNING: {resume.path} has no readable resolved_config.yaml: its settings "
                                f"could not be compared with this run's")
        keys = config_changes(saved_config, self.run_cfg) if saved_config is not None else []
        refusing, forced = refused([c for c in keys if c.kind == IDENTITY] + record_changes(saved, identity),
                                   self.cfg.force_resume)
        if refusing:  # with the keys behind a changed record entry (student.num_layers behind student_shape)
            behind = [c for c in keys if c.kind == CONTENT] if any(c.kind == CONTENT for c in refusing) else []
            raise ResumeRefused(refusal(f"from {resume.path}", "checkpoint", refusing + behind))
        resume.changes = [f"{c.key}: checkpoint has {c.saved!r}, this run has {c.now!r}" for c in forced]
        step, max_steps = int(resume.state["step"]), self.run_cfg.optim.max_steps
        if max_steps < step:
            raise ResumeRefused(f"optim.max_steps={max_steps} is below the step of {resume.path} ({step}): "
                                f"nothing would be trained. Set optim.max_steps above {step} to train on, or "
                                f"resume an older checkpoint with --resume DIR --rollback")
        saved_world = resume.state.get("world_size")
        if saved_world != self.world and not is_universal(resume.path):
            p = resume.path
            raise ResumeRefused(f"{p} was saved by {saved_world} ranks and this run has {self.world}: "
                                f"convert it first with `python -m pipeline.universal --checkpoint {p}` "
                                f"(then --resume auto uses the converted copy)")
        self.notices.append(describe(str(resume.path), [c for c in keys if c.kind != IDENTITY]))

    def claim_run_dir(self, resume: Resume | None, identity: dict) -> str:
        """This run's id; refuses a start that would mix two runs in one directory, restart a run
        that has checkpoints elsewhere, or roll back over newer checkpoints (run_dir.py)."""
        path = resume.path if resume is not None else None

        def claim() -> tuple[str, list]:
            try:
                run_id, moved = run_dir.claim(self.dirs, path, move_aside=self.cfg.move_aside,
                                              rollback=self.cfg.rollback,
                                              restart=path is None and self.cfg.resume == "auto",
                                              identity=RunIdentity.of(self.run_cfg, identity))
            except RunDirRefused as e:
                raise ResumeRefused(str(e)) from None
            if any(src == self.dirs.checkpoints for src, _ in moved) and len(self.locks) > 1:
                self.locks.pop().release()  # its lock file moved aside with the old checkpoints
                self.locks.append(RunLock(self.dirs.checkpoints, "checkpoint.dir"))
            for lock in self.locks:
                lock.set_run_id(run_id)
            return run_id, moved

        self.run_id, moved = distributed.on_rank0(claim)
        self.notices += [f"moved {src} to {dst}" for src, dst in moved]
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
        if self.resume is not None and step == int(self.resume.state["step"]):
            log(f"step {step}: nothing was trained since resuming from {self.resume.path}, which holds this "
                f"state: not saved again")
            return self.resume.path
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if ckpt.is_complete(path) and ckpt.run_id_of(path) not in (self.run_id, None):  # refused at start-up
                raise RuntimeError(f"{path} is a complete checkpoint of run {ckpt.run_id_of(path)}, "
                                   f"not of this run ({self.run_id}): not overwriting it")
            if ckpt.is_complete(path):  # damaged (passed over at resume) or of an earlier pass: kept
                why = "damaged" if ckpt.verify(path) else "replaced"
                aside = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}")
                path.rename(aside)
                log(f"moved {why} checkpoint {path.name} to {aside.name}")
            elif path.exists():
                shutil.rmtree(path)  # leftover of this run's save that was killed: start it clean
        dist.barrier()
        kept = ckpt.complete_checkpoints(root)
        with naming_disk_full(root, f"checkpoint {tag} is not complete (resume ignores it) and "
                                    f"{'the previous checkpoint ' + kept[-1].name if kept else 'nothing else'} "
                                    f"in {root} is kept: free space there (or set checkpoint.dir to a larger disk) "
                                    f"and continue with --resume auto"):
            engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
            ckpt.save_rng(path, self.rank)
            if self.hang_in_save_at_step == step:
                (root / "SAVE_HANG").write_text(tag)
                time.sleep(3600)  # a test SIGKILLs the run here
            dist.barrier()  # every rank's files are on disk before the commit
            if self.rank == 0:
                ckpt.commit(root, path, records)
        if self.rank == 0:
            run_dir.record_save(self.dirs, step)
            log(f"saved checkpoint {path}")
            for p in ckpt.prune(root, self.cfg.keep_last, self.run_id):
                log(f"removed old checkpoint {p.name}")
        dist.barrier()
        return path

    def load(self, engine, resume: Resume, seed: int, log: Callable[[str], None]) -> None:
        """The engine's weights, optimizer state and schedule position from ``resume``, this rank's
        RNG state (reseeded from ``seed`` and the step when the world size changed), and the
        config's hyperparameters (see :func:`_configured_hyperparameters`)."""
        path = resume.path
        put_back = _configured_hyperparameters(engine)
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise ResumeRefused(f"DeepSpeed could not load {path}")
        put_back()
        groups = engine.optimizer.param_groups
        log(f"optimizer param groups' weight_decay after {'universal ' if is_universal(path) else ''}load: "
            f"{[g['weight_decay'] for g in groups]}, betas {[tuple(g['betas']) for g in groups]}, eps "
            f"{[g['eps'] for g in groups]}, lr of the next step {[g['lr'] for g in groups]} (optim.* of this run)")
        if is_universal(path):
            # DeepSpeed's ZeRO-3 universal load gives every sub-group's state the *same* 'step' tensor object, and
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


def _configured_hyperparameters(engine) -> Callable[[], None]:
    """Call before ``load_checkpoint``; the function it returns, called after, puts back what this
    run's config set: every optimizer param group's hyperparameters (weight decay, betas, eps) and
    the LR schedule's base rates, then each group's current rate from the schedule at the loaded
    position (the schedule's function is this run's: lr, min_lr, warmup_steps, max_steps).

    DeepSpeed's load restores the saved ones (and a universal load gives every group param group
    0's, which would decay norms and biases): without this a changed optim.* would be ignored
    while resolved_config.yaml records it. Unchanged values give bit-identical rates."""
    configured = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    sched = engine.lr_scheduler
    base_lrs = list(sched.base_lrs)

    def put_back() -> None:
        groups = engine.optimizer.param_groups  # torch's load_state_dict made new group dicts
        for group, values in zip(groups, configured):
            group.update(values)
        sched.base_lrs = list(base_lrs)
        for group, base, rate in zip(groups, base_lrs, sched.lr_lambdas):
            group["lr"] = base * rate(sched.last_epoch)

    return put_back


def _refuse_a_checkpoint_root(p: Path, given: str) -> None:
    """``--resume`` naming a directory of checkpoints (a checkpoint.dir or a run's output_dir)
    instead of one checkpoint: refused with the two ways to say what was meant."""
    for root in (p, p / "checkpoints"):
        newest = ckpt.complete_checkpoints(root)
        if not ckpt.is_complete(p) and newest:
            raise ResumeRefused(f"checkpoint.resume={given}: {p} holds checkpoints but is not one: name one "
                                f"(--resume {newest[-1]}, the newest), or continue the run they belong to "
                                f"with --resume auto (checkpoint.dir={root} if it is not the default)")


def nonfinite_parameters(engine) -> list[str]:
    """Names of the engine's parameters with a NaN/inf element on any rank (collective)."""
    names = [n for n, p in engine.module.named_parameters()
             if not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())]
    flags = torch.tensor([1.0 if names else 0.0], device=distributed.device())
    if distributed.all_reduce(flags, op=dist.ReduceOp.MAX).item() == 0:
        return []
    return names or ["(on another rank)"]
