"""The training engine: a frozen teacher and a ZeRO-3 student in one process per rank.

One optimizer step (``train_step``)::

    batches  <- grad_accum_steps micro-batches from the reader (this rank's slice of the global batch)
    N_tok    <- all-reduce(valid tokens of those batches)           # global normaliser, before compute
    for each micro-batch:
        loss = objective(student, teacher, batch)   # pipeline.objective: CE + KD + SHD, sums / N_tok
        all-reduce "is any rank's loss non-finite?"  -> if so the backward is poisoned with NaN
        engine.backward(loss * world * gas)      # DeepSpeed divides by gas and averages over ranks
    engine.step()                                # skipped by ZeRO-3 when the grad norm is non-finite

The logged loss is the sum over micro-batches and ranks of the ``loss`` tensors that were
backpropagated, i.e. exactly the optimised objective. Saving and resuming is the checkpointer's
(``pipeline.checkpointer``), evaluation the evaluator's (``pipeline.evaluator``), building the
models the builders' (``pipeline.builders``); this module is the loop.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import architectures, checkpoint, distributed, lm_head, summary
from pipeline.attention import ShdCapture
from pipeline.builders import build_student_engine, build_student_module, build_teacher
from pipeline.checkpointer import Checkpointer
from pipeline.config import Derived, RunConfig, derive, dump_yaml
from pipeline.data import PackedSampleReader, split_tokens
from pipeline.ds_config import (build_ds_configs, placement_estimate, resolve_dtype, resolve_placement,
                                resolve_teacher_dtype)
from pipeline.evaluator import Evaluator
from pipeline.faults import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, StopRequest
from pipeline.identity import teacher_identity
from pipeline.metrics import MetricsLogger, peak_memory_mib
from pipeline.model_configs import model_shape
from pipeline.objective import DistillObjective
from pipeline.preflight import Preflight
from pipeline.universal import is_universal


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine (the model itself when it has no engine)."""
    return getattr(model, "module", model)


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
        self.vocab, self.student_cfg, self.model_notes = pre.vocab, pre.student_cfg, pre.notes()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.teacher_dtype = resolve_teacher_dtype(cfg)
        self.placement_estimate = (placement_estimate(pre.teacher_cfg, self.student_cfg, self.teacher_dtype,
                                                      self.device, per_node)
                                   if cfg.uses_teacher and cfg.teacher.placement == "auto" else None)
        self.placement = resolve_placement(cfg, self.world, per_node, self.placement_estimate)
        student_ds, teacher_ds = build_ds_configs(cfg, self.world, self.placement)
        self.dtype = resolve_dtype(cfg)
        self.reader = PackedSampleReader(
            cfg.data.dir, split="train", seq_len=cfg.data.seq_len, seed=cfg.seed, dp_rank=self.rank,
            dp_world_size=self.world, verify_checksums=cfg.data.verify_checksums,
            model_vocab_size=self.student_cfg.vocab_size)

        # Resume decided before the engines are built: a refused resume costs no model loading. The
        # output_dir's lock first: the decision and the claim are made by the one live run there.
        self.checkpointer = Checkpointer(cfg, world=self.world, rank=self.rank)
        self.checkpointer.lock_run_dir()
        self.resume = self.checkpointer.choose_resume()
        teacher_ident, self.teacher_files = None, {}
        if cfg.uses_teacher:
            known = self.resume.state.get("teacher_files") if self.resume else None
            teacher_ident, self.teacher_files = distributed.on_rank0(
                lambda: teacher_identity(cfg.teacher.path, known))
        self.identity = {"teacher": teacher_ident, "tokenizer_sha256": pre.manifest.tokenizer.files_sha256,
                         "data_sha256": self.reader.state_dict()["data_sha256"],
                         "student_shape": model_shape(self.student_cfg), "seq_len": cfg.data.seq_len}
        if self.resume is not None:
            self.checkpointer.check_resume(self.resume, self.identity)
            if is_universal(self.resume.path):
                student_ds["checkpoint"] = {"load_universal": True}
        self.run_id = self.checkpointer.claim_run_dir(self.resume, self.identity)

        self.capture = (ShdCapture.from_config(cfg.distill, pre.pairs, self.student_cfg.num_attention_heads)
                        if cfg.uses_shd else None)
        self.objective = DistillObjective(cfg, self.vocab, self.capture)
        student = build_student_module(cfg, self.student_cfg, self.capture.student_impl if self.capture
                                       else architectures.plain_attn_implementation(self.student_cfg))
        self.student, _ = build_student_engine(cfg, student, student_ds)
        self.teacher = None
        if cfg.uses_teacher:
            impl = (self.capture.teacher_impl if self.capture
                    else architectures.plain_attn_implementation(pre.teacher_cfg))
            self.teacher = build_teacher(cfg, self.placement, teacher_ds, impl, self.teacher_dtype, self.device)
        if self.capture is not None:  # after deepspeed.initialize: see pipeline/attention.py
            self.capture.attach(self.student.module, unwrapped(self.teacher))
            if self.capture.needs_calibration:
                self._calibrate()
        e = cfg.eval
        self.evaluator = None
        if e.every_steps > 0 or e.at_end:
            self.evaluator = Evaluator(cfg.data.dir, split=e.split, seq_len=cfg.data.seq_len,
                                       micro_batch_size=e.micro_batch_size or cfg.data.micro_batch_size,
                                       max_batches=e.max_batches, vocab=self.vocab,
                                       chunk=cfg.distill.kd_chunk_size, seed=cfg.seed,
                                       model_vocab_size=self.student_cfg.vocab_size, device=self.device)
        self.step = self.consumed_tokens = self.skipped_steps = self.consecutive_nonfinite = 0
        self.stop_agreed = False
        self.resolved_yaml = dump_yaml(cfg, self.derived)
        self.log: MetricsLogger | None = None

    def _calibrate(self) -> None:
        """distill.select_heads=reconstruct|contribution or mixing_weights=calibrated: what a resumed
        run chose, else a calibration pass (teacher forward only) over this rank's first training
        micro-batches."""
        what = self.capture.calibrated_setting
        if self.resume is not None and self.capture.use_calibrated(self.resume.state):
            self.checkpointer.notices.append(f"SHD {what}: taken from {self.resume.path} (not recalibrated)")
            return
        cfg = self.cfg
        reader = PackedSampleReader(cfg.data.dir, split="train", seq_len=cfg.data.seq_len, seed=cfg.seed,
                                    dp_rank=self.rank, dp_world_size=self.world, verify_checksums=False,
                                    model_vocab_size=self.student_cfg.vocab_size)
        batches = (split_tokens(reader.next_batch(cfg.data.micro_batch_size), self.device)
                   for _ in range(cfg.distill.select_calibration_batches))
        t0 = time.perf_counter()
        self.capture.calibrate(lambda inp, mask: lm_head.teacher_rows(self.teacher, inp, mask, keep_logits=False),
                               ((inp, mask) for inp, _, _, mask in batches), distributed.all_reduce)
        self.checkpointer.notices.append(
            f"SHD {what}: calibrated over {cfg.distill.select_calibration_batches} micro-batch(es) per rank in "
            f"{time.perf_counter() - t0:.1f} s")

    def train_step(self) -> dict[str, float]:
        cfg, world = self.cfg, self.world
        gas, mb = cfg.optim.grad_accum_steps, cfg.data.micro_batch_size
        t0 = time.perf_counter()
        batches = [split_tokens(self.reader.next_batch(mb), self.device) for _ in range(gas)]
        # Global normalisers first: one all-reduce, so every micro-batch loss is a share of the
        # global per-token mean (exact with padding and any number of ranks).
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _, _, valid, mask in batches:
            counts[0] += valid.sum()
            counts[1] += mask.sum() if mask is not None else valid.numel()
        distributed.all_reduce(counts)
        n_tok, n_rows = max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

        logged: dict[str, torch.Tensor] = {}
        # 1 from the first micro-batch on which any rank's loss is non-finite: decided on all ranks
        # together, on the device (no host sync per micro-batch); it poisons the gradients so that
        # ZeRO-3's non-finite grad-norm check skips the step on every rank.
        poisoned = torch.zeros(1, device=self.device)
        for i, batch in enumerate(batches):
            loss, terms = self.objective(self.student, self.teacher, *batch, n_tok, n_rows, step=self.step + 1)
            if self.step + 1 in cfg.debug.nan_loss_at_steps and self.rank == 0 and i == 0:
                loss = loss * float("nan")
                terms["loss/total"] = terms["loss/total"] * float("nan")
            bad = (~torch.isfinite(loss.detach())).to(poisoned.dtype).reshape(1)
            poisoned = torch.maximum(poisoned, distributed.all_reduce(bad, op=dist.ReduceOp.MAX))
            scale = torch.where(poisoned > 0, float("nan"), float(world * gas))
            self.student.backward(loss * scale.squeeze(0))
            if self.capture is not None:
                self.capture.end()
            for k, v in terms.items():
                logged[k] = logged.get(k, 0.0) + v
        lr = self.student.get_lr()[0]  # the rate this step uses (the scheduler advances in step())
        self.student.step()
        applied = self.student.was_step_applied() and not bool(poisoned.item() > 0)
        self.skipped_steps += not applied
        self.consecutive_nonfinite = 0 if applied else self.consecutive_nonfinite + 1

        # One all-reduce for all logged terms and the preemption flag (step-boundary agreement).
        keys = sorted(logged)
        stop = torch.tensor(float(self.stop.requested), device=self.device)
        vec = torch.stack([logged[k].to(self.device) for k in keys] + [stop])
        vec = distributed.all_reduce(vec.to(self.device, torch.float64)).cpu()
        self.stop_agreed = vec[-1].item() > 0
        self.step += 1
        self.consumed_tokens += self.derived.tokens_per_step
        if cfg.debug.nonfinite_weights_at_step == self.step and self.rank == 0:
            with torch.no_grad():
                next(self.student.module.parameters()).ds_tensor.fill_(float("nan"))
        step_time = time.perf_counter() - t0
        gn = self.student.get_global_grad_norm()
        out = {k: vec[i].item() for i, k in enumerate(keys)}
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
        if self.capture is not None:  # tagged by student layer, as shd/layer_XX (its teacher layer: the run log)
            out["optim/w_shd"] = self.objective.shd_weight(self.step)  # after the ramp (self.step: just taken)
            for s, (mean_max, entropy) in self.capture.weight_stats().items():
                out[f"shd_weights/layer_{s:02d}_mean_max"] = mean_max
                out[f"shd_weights/layer_{s:02d}_entropy"] = entropy
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
            if cfg.debug.sleep_per_step:
                time.sleep(cfg.debug.sleep_per_step)
        if cfg.checkpoint.save_at_end and self.save() is None:
            return NONFINITE_EXIT_CODE
        if cfg.eval.at_end:
            self.log.log_eval(self.step, self.evaluate())
        return 0
