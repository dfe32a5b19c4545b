"""The training engine: a frozen teacher and a ZeRO-3 student in one process per rank.

One optimizer step (``train_step``)::

    batches  <- grad_accum_steps Batches from the reader (this rank's slice of the global batch)
    totals   <- StepTotals.of(batches)             # one all-reduce of the valid tokens and query rows
    for each batch:
        with objective.micro_batch(student, teacher, batch, totals) as (loss, terms):
            # pipeline.loss.objective: CE + KD + SHD, sums / global counts; the SHD capture lives here
            all-reduce "is any rank's loss non-finite?"  -> if so the backward is poisoned with NaN
            engine.backward(loss * world * gas)  # DeepSpeed divides by gas and averages over ranks
    engine.step()                                  # skipped by ZeRO-3 when the grad norm is non-finite
    one all-reduce of the logged terms and the stop flag; the objective's step_scalars

The logged loss is the sum over micro-batches and ranks of the ``loss`` tensors that were
backpropagated, i.e. exactly the optimised objective. Saving and resuming is the checkpointer's
(``pipeline.checkpoint.checkpointer``), evaluation the evaluator's (``pipeline.training.evaluator``), building the
models the builders' (``pipeline.training.builders``), test-only faults the injector's
(``pipeline.runtime.faults.FaultInjector``); this module is the loop.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.checkpoint import records as checkpoint
from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.checkpoint.records import is_universal
from pipeline.config import Derived, RunConfig, derive, dump_yaml
from pipeline.data.reader import open_reader, split_tokens
from pipeline.loss import lm_head
from pipeline.loss.capture import ShdCapture
from pipeline.loss.objective import DistillObjective, StepTotals
from pipeline.models import architectures
from pipeline.models.hf_configs import model_shape
from pipeline.models.identity import teacher_identity
from pipeline.runtime import distributed
from pipeline.runtime.faults import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, FaultInjector, StopRequest
from pipeline.training import summary
from pipeline.training.builders import build_student_engine, build_student_module, build_teacher
from pipeline.training.deepspeed_config import (
    build_ds_configs,
    placement_estimate,
    resolve_dtype,
    resolve_placement,
    resolve_teacher_dtype,
)
from pipeline.training.evaluator import Evaluator
from pipeline.training.metrics import MetricsLogger, peak_memory_mib
from pipeline.training.preflight import Preflight
from pipeline.training.pruned import STATE_KEY as PRUNING_STATE_KEY
from pipeline.training.pruned import check_resumed


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine (the model itself when it has no engine)."""
    return getattr(model, "module", model)


def decide_placement(cfg: RunConfig, pre: Preflight, world: int, device: torch.device):
    """(teacher dtype, placement estimate or None, teacher placement, student DeepSpeed config,
    teacher DeepSpeed config): ``teacher.placement=auto`` decided from the model configs and a
    rank's memory, before any weight loads."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    teacher_dtype = resolve_teacher_dtype(cfg)
    estimate = (placement_estimate(pre.teacher_cfg, pre.student_cfg, teacher_dtype, device, per_node)
                if cfg.uses_teacher and cfg.teacher.placement == "auto" else None)
    placement = resolve_placement(cfg, world, per_node, estimate)
    return (teacher_dtype, estimate, placement, *build_ds_configs(cfg, world, placement))


def calibrate(capture: ShdCapture, cfg: RunConfig, teacher, resume, *, rank: int, world: int,
              model_vocab_size: int, device: torch.device) -> str:
    """distill.select_heads=reconstruct|contribution or mixing_weights=calibrated: what a resumed
    run chose, else a calibration pass (teacher forward only) over this rank's first training
    micro-batches. Returns the run-log line that says which."""
    what = capture.calibrated_setting
    if resume is not None and capture.use_calibrated(resume.state):
        return f"SHD {what}: taken from {resume.path} (not recalibrated)"
    reader = open_reader(cfg.data, seed=cfg.seed, rank=rank, world=world, model_vocab_size=model_vocab_size)
    n = cfg.distill.select_calibration_batches
    batches = (split_tokens(reader.next_batch(cfg.data.micro_batch_size), device) for _ in range(n))
    t0 = time.perf_counter()
    capture.calibrate(lambda b: lm_head.teacher_rows(teacher, b.input_ids, b.mask, keep_logits=False),
                      batches, distributed.all_reduce)
    return f"SHD {what}: calibrated over {n} micro-batch(es) per rank in {time.perf_counter() - t0:.1f} s"


def sum_over_ranks(logged: dict[str, torch.Tensor], stop_requested: bool,
                   device: torch.device) -> tuple[dict[str, float], bool]:
    """The logged terms summed over ranks, and whether any rank was asked to stop (the ranks agree
    at the step boundary), in one all-reduce."""
    keys = sorted(logged)
    stop = torch.tensor(float(stop_requested), device=device)
    vec = torch.stack([logged[k].to(device) for k in keys] + [stop])
    vec = distributed.all_reduce(vec.to(device, torch.float64)).cpu()
    return {k: vec[i].item() for i, k in enumerate(keys)}, vec[-1].item() > 0


class Trainer:
    """Builds everything from a validated RunConfig; ``fit()`` runs the loop and returns an exit code."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        # Installed first: a SIGTERM while the (possibly large) models load is honoured at step 1.
        self.stop = StopRequest().install()
        self.rank, self.world = distributed.init_distributed()
        self.device = distributed.device()
        self.derived: Derived = derive(cfg, self.world)
        pre = Preflight(cfg)  # every check that needs no weights, before anything is built
        # the config as resolved there: the keys a pruned student's record fills (pipeline.training.pruned)
        self.cfg = cfg = pre.cfg
        self.vocab, self.student_cfg, self.model_notes = pre.vocab, pre.student_cfg, pre.notes()
        self.pruning = pre.pruning
        (self.teacher_dtype, self.placement_estimate, self.placement, student_ds,
         teacher_ds) = decide_placement(cfg, pre, self.world, self.device)
        self.dtype = resolve_dtype(cfg)
        self.reader = open_reader(cfg.data, seed=cfg.seed, rank=self.rank, world=self.world,
                                  model_vocab_size=self.student_cfg.vocab_size,
                                  verify_checksums=cfg.data.verify_checksums)
        self._decide_resume(pre, student_ds)  # before the models: a refused resume costs no model loading
        self._build_models(pre, student_ds, teacher_ds)
        self.evaluator = (Evaluator.for_run(cfg, model_vocab_size=self.student_cfg.vocab_size, device=self.device)
                          if cfg.eval.every_steps > 0 or cfg.eval.at_end else None)
        self.faults = FaultInjector(cfg.debug, self.rank)
        self.step = self.consumed_tokens = self.skipped_steps = self.consecutive_nonfinite = 0
        self.stop_agreed = False
        self.resolved_yaml = dump_yaml(cfg, self.derived)
        self.log: MetricsLogger | None = None

    def _decide_resume(self, pre: Preflight, student_ds: dict) -> None:
        """The output_dir's lock first (the decision and the claim are made by the one live run
        there), then the checkpoint to resume from, checked against this run's identity, and the
        directory claimed for this run."""
        cfg = self.cfg
        self.checkpointer = Checkpointer(cfg, world=self.world, rank=self.rank)
        self.checkpointer.lock_run_dir()
        self.resume = self.checkpointer.choose_resume()
        teacher_ident, self.teacher_files = None, {}
        if cfg.uses_teacher:
            known = self.resume.state.get("teacher_files") if self.resume else None
            teacher_ident, self.teacher_files = distributed.on_rank0(
                lambda: teacher_identity(cfg.teacher.path, known))
            pre.check_teacher_content(teacher_ident)  # a pruned student's record names its teacher
        self.identity = {"teacher": teacher_ident, "tokenizer_sha256": pre.manifest.tokenizer.files_sha256,
                         "data_sha256": self.reader.state_dict()["data_sha256"],
                         "student_shape": model_shape(self.student_cfg), "seq_len": cfg.data.seq_len}
        if self.resume is not None:
            self.checkpointer.check_resume(self.resume, self.identity)
            check_resumed(self.pruning, self.resume.state, self.resume.path)
            if is_universal(self.resume.path):
                student_ds["checkpoint"] = {"load_universal": True}
        self.run_id = self.checkpointer.claim_run_dir(self.resume, self.identity)

    def _build_models(self, pre: Preflight, student_ds: dict, teacher_ds: dict) -> None:
        """The SHD capture and the objective, the student engine and the frozen teacher; then the
        capture attached to both and, if the config asks, calibrated."""
        cfg = self.cfg
        self.capture: ShdCapture | None = pre.shd_capture()
        self.objective = DistillObjective(cfg, self.vocab, self.capture)
        student = build_student_module(cfg, self.student_cfg, self.capture.student_impl if self.capture
                                       else architectures.plain_attn_implementation(self.student_cfg))
        self.student, _ = build_student_engine(cfg, student, student_ds)
        self.teacher = None
        if cfg.uses_teacher:
            impl = (self.capture.teacher_impl if self.capture
                    else architectures.plain_attn_implementation(pre.teacher_cfg))
            self.teacher = build_teacher(cfg, self.placement, teacher_ds, impl, self.teacher_dtype, self.device)
        if self.capture is not None:  # after deepspeed.initialize: see pipeline/loss/capture.py
            self.capture.attach(self.student.module, unwrapped(self.teacher))
            if self.capture.needs_calibration:
                self.checkpointer.notices.append(calibrate(
                    self.capture, cfg, self.teacher, self.resume, rank=self.rank, world=self.world,
                    model_vocab_size=self.student_cfg.vocab_size, device=self.device))

    def train_step(self) -> dict[str, float]:
        """One optimizer step (the outline in this module's docstring); the step's logged scalars."""
        t0, gas, step = time.perf_counter(), self.cfg.optim.grad_accum_steps, self.step + 1
        batches = [split_tokens(self.reader.next_batch(self.cfg.data.micro_batch_size), self.device)
                   for _ in range(gas)]
        # Global normalisers first: one all-reduce, so every micro-batch loss is a share of the
        # global per-token mean (exact with padding and any number of ranks).
        totals = StepTotals.of(batches, distributed.all_reduce)
        logged: dict[str, torch.Tensor] = {}
        # 1 from the first micro-batch on which any rank's loss is non-finite: decided on all ranks
        # together, on the device (no host sync per micro-batch); it poisons the gradients so that
        # ZeRO-3's non-finite grad-norm check skips the step on every rank.
        poisoned = torch.zeros(1, device=self.device)
        for i, batch in enumerate(batches):
            with self.objective.micro_batch(self.student, self.teacher, batch, totals, step) as (loss, terms):
                loss = self.faults.on_loss(step, i, loss, terms)
                bad = (~torch.isfinite(loss.detach())).to(poisoned.dtype).reshape(1)
                poisoned = torch.maximum(poisoned, distributed.all_reduce(bad, op=dist.ReduceOp.MAX))
                scale = torch.where(poisoned > 0, float("nan"), float(self.world * gas))
                self.student.backward(loss * scale.squeeze(0))  # DeepSpeed divides by gas, averages ranks
            for k, v in terms.items():
                logged[k] = logged.get(k, 0.0) + v
        lr = self.student.get_lr()[0]  # the rate this step uses (the scheduler advances in step())
        self.student.step()
        applied = self.student.was_step_applied() and not bool(poisoned.item() > 0)
        self.skipped_steps += not applied
        self.consecutive_nonfinite = 0 if applied else self.consecutive_nonfinite + 1
        out, self.stop_agreed = sum_over_ranks(logged, self.stop.requested, self.device)
        self.step, self.consumed_tokens = step, self.consumed_tokens + self.derived.tokens_per_step
        step_time, gn = time.perf_counter() - t0, self.student.get_global_grad_norm()
        out.update({
            "optim/lr": lr,
            "optim/grad_norm": float(gn) if gn is not None and self.student.was_step_applied() else None,
            "optim/skipped_steps": float(self.skipped_steps),
            "optim/step_applied": float(applied),
            "perf/step_time_s": step_time,
            "perf/tokens_per_s": self.derived.tokens_per_step / step_time,
            "perf/peak_mem_mib": peak_memory_mib(),
            "data/consumed_tokens": float(self.consumed_tokens),
        })
        out.update(self.objective.step_scalars(self.step))  # after the step: its SHD weight and mixing weights
        return out

    def evaluate(self) -> dict[str, float]:
        return self.evaluator(self.student)

    def save(self) -> Path | None:
        """This step's checkpoint (None: refused, the weights are not finite)."""
        state = {"run_id": self.run_id, "step": self.step, "consumed_tokens": self.consumed_tokens,
                 "consumed_samples": self.reader.state_dict()["consumed_samples"], "reader": self.reader.state_dict(),
                 "skipped_steps": self.skipped_steps, "world_size": self.world, "identity": self.identity,
                 "teacher_files": self.teacher_files}
        if self.capture is not None:  # the heads plan=select distils, or the calibrated mixing weights
            state.update(self.capture.calibrated_state())
        if self.pruning is not None:  # what the run took from a pruned student's record (compared on resume)
            state[PRUNING_STATE_KEY] = self.pruning.sources()
        records = checkpoint.Records(state, self.resolved_yaml, self.student_cfg.to_json_string())
        return self.checkpointer.save(self.student, self.step, records, self.log.info)

    def _restore(self) -> None:
        r = self.resume
        self.checkpointer.load(self.student, r, self.cfg.seed, self.log.info)
        self.step, self.consumed_tokens = int(r.state["step"]), int(r.state["consumed_tokens"])
        self.skipped_steps = int(r.state["skipped_steps"])
        self.reader.load_state_dict(r.state["reader"])

    def fit(self) -> int:
        cfg = self.cfg
        self.log = MetricsLogger(
            enabled=self.rank == 0, tb_dir=cfg.tb_dir, jsonl_path=Path(cfg.output_dir) / "metrics.jsonl",
            console_every=cfg.logging.every_steps, progress=cfg.logging.progress_bar,
            total_steps=cfg.optim.max_steps, start_step=0)
        try:
            for notice in self.checkpointer.notices:
                self.log.info(notice)
            if self.resume is not None:
                self._restore()
            self.log.info(summary.describe(self))
            return self._loop()
        finally:
            self.stop.uninstall()
            self.log.close()

    def _loop(self) -> int:
        cfg = self.cfg
        every_ckpt, every_eval = cfg.checkpoint.every_steps, cfg.eval.every_steps
        while self.step < cfg.optim.max_steps:
            scalars = self.train_step()  # advances self.step: the record is of the step just taken
            self.faults.after_step(self.step, self.student)
            self.log.log_step(self.step, scalars)
            if self.consecutive_nonfinite:
                self.log.info(f"step {self.step}: non-finite loss or gradient norm, step skipped "
                              f"({self.consecutive_nonfinite} in a row, {self.skipped_steps} in total)")
            if self.consecutive_nonfinite >= cfg.optim.max_consecutive_nonfinite:
                self.log.info(f"stopping: {self.consecutive_nonfinite} consecutive non-finite steps "
                              f"(optim.max_consecutive_nonfinite). The last good checkpoint in "
                              f"{cfg.checkpoint_dir} is kept; lower optim.lr or check the data.")
                return NONFINITE_EXIT_CODE
            if self.stop_agreed:
                self.log.info(f"stop requested (signal {self.stop.signum or 'on another rank'}): saving")
                if self.save() is None:
                    return NONFINITE_EXIT_CODE
                self.log.info(f"exiting with code {PREEMPTED_EXIT_CODE} (preempted, resumable)")
                return PREEMPTED_EXIT_CODE
            # Saved before evaluating: an evaluation that fails must not cost the step's checkpoint.
            if every_ckpt and self.step % every_ckpt == 0 and self.step < cfg.optim.max_steps:
                if self.save() is None:
                    return NONFINITE_EXIT_CODE
            if every_eval and self.step % every_eval == 0 and self.step < cfg.optim.max_steps:
                self.log.log_eval(self.step, self.evaluate())
            self.faults.between_steps()
        if cfg.checkpoint.save_at_end and self.save() is None:
            return NONFINITE_EXIT_CODE
        if cfg.eval.at_end:
            self.log.log_eval(self.step, self.evaluate())
        return 0
