"""The training engine: a frozen ZeRO-3 teacher and a ZeRO-3 student in one process per rank.

One optimizer step (``train_step``)::

    batches  <- grad_accum_steps micro-batches from the reader (this rank's slice of the global batch)
    N_tok    <- all-reduce(valid tokens of those batches)           # global normaliser, before compute
    for each micro-batch:
        teacher forward (no_grad)   -> head input; distilled layers leave q, k, W in the SHD channel
        student forward             -> CE/KD sums from the LM head in chunks (pipeline.lm_head);
                                       distilled layers add their SHD loss in attention
        loss = w_ce CE + w_kd tau^2 KL + w_shd mean_l SHD_l      (sums / N_tok: a global mean)
        all-reduce "is any rank's loss non-finite?"  -> if so the backward is poisoned with NaN
        engine.backward(loss * world * gas)      # DeepSpeed divides by gas and averages over ranks
    engine.step()                                # skipped by ZeRO-3 when the grad norm is non-finite

The logged loss is the sum over micro-batches and ranks of the ``loss`` tensors that were
backpropagated, i.e. exactly the optimised objective.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import architectures
from pipeline import attention as attn
from pipeline import checkpoint as ckpt
from pipeline import lm_head, models, run_dir
from pipeline.config import ConfigError, Derived, RunConfig, derive, dump_yaml
from pipeline.faults import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE, StopRequest
from pipeline.losses import head_ce_kd
from pipeline.metrics import MetricsLogger, memory_now_mib, peak_memory_mib
from pipeline.run_dir import RunDirRefused, RunDirs
from pipeline.universal import is_universal, universal_path


class ResumeRefused(ConfigError):
    pass


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The HF model inside a DeepSpeed engine (the model itself when it has no engine)."""
    return getattr(model, "module", model)


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) from the launcher's environment."""
    import deepspeed

    if torch.cuda.is_available():  # before NCCL starts: else every rank opens a context on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m pipeline.train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def split_tokens(tokens: torch.Tensor, pad_id: int | None, device=None):
    """[B, T+1] samples -> (inputs [B, T], labels [B, T], valid labels [B, T] bool, 2-D mask or None)."""
    full = pad_id is None or bool((tokens[:, :-1] != pad_id).all())  # before the copy: no device sync
    if device is not None:
        tokens = tokens.to(device)
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    if pad_id is None:
        return inp, labels, torch.ones_like(labels, dtype=torch.bool), None
    return inp, labels, labels != pad_id, (None if full else (inp != pad_id).long())


class DistillObjective:
    """total = w_ce CE + w_kd tau_kd^2 KL(teacher || student) + w_shd mean over distilled layers of SHD.

    Works on any callables returning ``.logits`` (DeepSpeed engines in training, plain modules in
    tests). ``n_tok`` / ``n_rows`` are the *global* counts of valid tokens / query rows of the step,
    so the per-step sum of the returned losses over micro-batches and ranks is the global mean.
    """

    def __init__(self, cfg: RunConfig, vocab: int, chan: attn.ShdChannel | None) -> None:
        self.cfg, self.d, self.vocab, self.chan = cfg, cfg.distill, vocab, chan

    def __call__(self, student, teacher, inp, labels, valid, mask, n_tok: float, n_rows: float):
        cfg, d, chan = self.cfg, self.d, self.chan
        if chan is not None:
            chan.begin(mask)
        teacher_rows = None
        if teacher is not None:
            with torch.no_grad():
                teacher_rows = lm_head.teacher_rows(teacher, inp, mask, keep_logits=cfg.uses_kd)
        w_kl = d.w_kd * d.tau_kd ** 2 / n_tok if cfg.uses_kd else 0.0

        def student_loss(head, hidden):
            return torch.stack(head_ce_kd(hidden, head.weight, labels, valid, teacher_rows, tau=d.tau_kd,
                                          chunk=d.kd_chunk_size, vocab=self.vocab, w_ce=d.w_ce / n_tok,
                                          w_kl=w_kl))

        with lm_head.intercept(student, student_loss):
            ce_kd, ce_sum, kl_sum = student(input_ids=inp, attention_mask=mask, use_cache=False).logits
        del teacher_rows
        ce = ce_sum / n_tok
        loss = ce_kd
        terms: dict[str, torch.Tensor] = {"loss/ce": ce}
        if cfg.uses_kd:
            terms["loss/kd"] = kl_sum / n_tok
        if chan is not None:
            chan.recording = False  # checkpoint recomputation in backward must not compute it again
            if set(chan.losses) != set(chan.pairs):
                raise RuntimeError(f"SHD losses recorded for layers {sorted(chan.losses)}, expected "
                                   f"{sorted(chan.pairs)}")
            rows = mask.sum() if mask is not None else float(inp.numel())  # a tensor: no host sync
            # shd_loss is a mean over this micro-batch's valid rows: reweight to the global mean
            per_layer = {l: v * (rows / n_rows) for l, v in sorted(chan.losses.items())}
            shd = torch.stack(list(per_layer.values())).mean()
            loss = loss + d.w_shd * shd
            terms["loss/shd"] = shd
            for l, v in per_layer.items():
                terms[f"shd/layer_{l:02d}"] = v
        terms["loss/total"] = loss
        return loss, {k: v.detach().float() for k, v in terms.items()}


class Trainer:
    """Builds everything from a validated RunConfig; ``fit()`` runs the loop and returns an exit code."""

    def __init__(self, cfg: RunConfig, *, for_eval: bool = False) -> None:
        """for_eval: build only the student (no teacher, no SHD capture, no optimizer use)."""
        from pipeline.data import PackedSampleReader

        self.cfg = cfg
        # Installed first: a SIGTERM while the (possibly large) models load is honoured at step 1.
        self.stop = StopRequest().install() if not for_eval else StopRequest()
        self.rank, self.world = init_distributed()
        self.device = _device()
        self.derived: Derived = derive(cfg, self.world)

        # ---- checks before any compute -------------------------------------------------------
        pre = models.Preflight(cfg)
        self.manifest, self.vocab, self.pad_id = pre.manifest, pre.vocab, pre.pad_id
        self.teacher_cfg, self.student_cfg = pre.teacher_cfg, pre.student_cfg
        self.placement = models.resolve_placement(cfg, self.world,
                                                  int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        student_ds, teacher_ds = models.build_ds_configs(cfg, self.world, self.placement)
        self.dtype = models.resolve_dtype(cfg)
        # ---- data ----------------------------------------------------------------------------
        self.reader = PackedSampleReader(
            cfg.data.dir, split="train", seq_len=cfg.data.seq_len, seed=cfg.seed, dp_rank=self.rank,
            dp_world_size=self.world, verify_checksums=cfg.data.verify_checksums,
            model_vocab_size=self.student_cfg.vocab_size)

        # Decided before the engines are built: a refused resume costs no model loading, and a
        # universal checkpoint needs load_universal in the student's DeepSpeed config.
        self.notices: list[str] = []  # logged once the logger exists (skipped checkpoints, moves)
        self.resume_from = None if for_eval else self.resume_path()
        saved_state = ckpt.read_state(self.resume_from) if self.resume_from is not None else {}
        self.teacher_files: dict = {}
        teacher_ident = None
        if cfg.uses_teacher and not for_eval:
            teacher_ident, self.teacher_files = self._on_rank0(
                lambda: models.teacher_identity(cfg.teacher.path, saved_state.get("teacher_files")))
        self.identity = {
            "teacher": teacher_ident,
            "tokenizer_sha256": self.manifest.tokenizer.files_sha256,
            "data_sha256": self.reader.state_dict()["data_sha256"],
            "student_shape": models.model_shape(self.student_cfg),
            "seq_len": cfg.data.seq_len,
        }
        self.resume_changes: list[str] = []
        if self.resume_from is not None:
            self.resume_changes = self.check_resume_identity(self.resume_from, saved_state)
            self.check_resume_world(self.resume_from, saved_state)
            if is_universal(self.resume_from):
                student_ds["checkpoint"] = {"load_universal": True}
        self.run_id = None if for_eval else self._claim_run_dir()

        # ---- models --------------------------------------------------------------------------
        self.chan: attn.ShdChannel | None = None
        if cfg.uses_shd and not for_eval:
            d = cfg.distill
            self.chan = attn.ShdChannel.from_config(d, pre.pairs, self.student_cfg.num_attention_heads)
        self.objective = DistillObjective(cfg, self.vocab, self.chan)
        student = models.build_student_module(
            cfg, self.student_cfg,
            attn.STUDENT_ATTN if self.chan else architectures.plain_attn_implementation(self.student_cfg))
        self.student, self.scheduler = models.build_student_engine(cfg, student, student_ds)
        self.teacher = None
        if cfg.uses_teacher and not for_eval:
            teacher_attn = (attn.TEACHER_ATTN if self.chan
                            else architectures.plain_attn_implementation(self.teacher_cfg))
            self.teacher = models.build_teacher(cfg, self.placement, teacher_ds, teacher_attn, self.dtype, self.device)
        if self.chan is not None:
            attn.attach_student(self.student.module, self.chan)
            attn.attach_teacher(_unwrapped(self.teacher), self.chan)  # after initialize: see attention.py

        # ---- state ---------------------------------------------------------------------------
        self.step = 0
        self.consumed_tokens = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.resolved_yaml = dump_yaml(cfg, self.derived)
        self.log: MetricsLogger | None = None

    def _on_rank0(self, fn):
        """fn() computed on rank 0 only and broadcast (an exception there is raised on every rank)."""
        result: list = [None]
        if self.rank == 0:
            try:
                result = [("ok", fn())]
            except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
                result = [("error", e)]
        if self.world > 1:
            dist.broadcast_object_list(result, src=0)
        kind, value = result[0]
        if kind == "error":
            raise value
        return value

    def _claim_run_dir(self) -> str:
        """This run's id; refuses a start that would mix two runs in one directory (run_dir.py)."""
        cfg = self.cfg
        dirs = RunDirs(output=Path(cfg.output_dir), checkpoints=cfg.checkpoint_dir, tensorboard=cfg.tb_dir)

        def claim() -> tuple[str, list]:
            try:
                return run_dir.claim(dirs, self.resume_from, move_aside=cfg.checkpoint.move_aside,
                                     restart=self.resume_from is None and cfg.checkpoint.resume == "auto")
            except RunDirRefused as e:
                raise ResumeRefused(str(e)) from None

        run_id, moved = self._on_rank0(claim)
        self.notices += [f"moved the previous run's {src} to {dst}" for src, dst in moved]
        return run_id

    # ------------------------------------------------------------------------------------------
    # one step
    # ------------------------------------------------------------------------------------------

    def _split(self, tokens: torch.Tensor):
        return split_tokens(tokens, self.pad_id, self.device)

    def _all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op)
        return t

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        gas, mb = cfg.optim.grad_accum_steps, cfg.data.micro_batch_size
        t0 = time.perf_counter()
        batches = [self.reader.next_batch(mb) for _ in range(gas)]
        # Global normalisers first: one all-reduce, so every micro-batch loss is a share of the
        # global per-token mean (exact with padding and any number of ranks).
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches:
            _, _, valid, mask = self._split(b)
            counts[0] += valid.sum()
            counts[1] += mask.sum() if mask is not None else valid.numel()
        self._all_reduce(counts)
        n_tok, n_rows = max(counts[0].item(), 1.0), max(counts[1].item(), 1.0)

        logged: dict[str, torch.Tensor] = {}
        # 1 from the first micro-batch on which any rank's loss is non-finite: decided on all ranks
        # together, on the device (no host sync per micro-batch); it poisons the gradients so that
        # ZeRO-3's non-finite grad-norm check skips the step on every rank.
        poisoned = torch.zeros(1, device=self.device)
        for i, b in enumerate(batches):
            loss, terms = self.objective(self.student, self.teacher, *self._split(b), n_tok, n_rows)
            if self.step + 1 in cfg.debug.nan_loss_at_steps and self.rank == 0 and i == 0:
                loss = loss * float("nan")
                terms["loss/total"] = terms["loss/total"] * float("nan")
            bad = (~torch.isfinite(loss.detach())).to(poisoned.dtype).reshape(1)
            poisoned = torch.maximum(poisoned, self._all_reduce(bad, op=dist.ReduceOp.MAX))
            scale = torch.where(poisoned > 0, float("nan"), float(self.world * gas))
            self.student.backward(loss * scale.squeeze(0))
            if self.chan is not None:
                self.chan.clear()
            for k, v in terms.items():
                logged[k] = logged.get(k, 0.0) + v
        lr = self.student.get_lr()[0]  # the rate this step uses (the scheduler advances in step())
        self.student.step()
        applied = self.student.was_step_applied()
        nonfinite = bool(poisoned.item() > 0)
        if not applied or nonfinite:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        else:
            self.consecutive_nonfinite = 0

        # One all-reduce for all logged terms and the preemption flag (step-boundary agreement).
        keys = sorted(logged)
        stop = torch.tensor(float(self.stop.requested), device=self.device)
        vec = torch.stack([logged[k].to(self.device) for k in keys] + [stop])
        vec = self._all_reduce(vec.to(self.device, torch.float64)).cpu()
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
            "optim/grad_norm": float(gn) if gn is not None and applied else None,
            "optim/skipped_steps": float(self.skipped_steps),
            "optim/step_applied": float(applied and not nonfinite),
            "perf/step_time_s": step_time,
            "perf/tokens_per_s": self.derived.tokens_per_step / step_time,
            "perf/peak_mem_mib": peak_memory_mib(),
            "data/consumed_tokens": float(self.consumed_tokens),
        })
        if self.chan is not None:  # tagged by student layer, as shd/layer_XX (its teacher layer: the run log)
            for s, t in sorted(self.chan.pairs.items()):
                if t in self.chan.weight_stats:
                    st = self.chan.weight_stats[t]
                    out[f"shd_weights/layer_{s:02d}_mean_max"] = st[0].item()
                    out[f"shd_weights/layer_{s:02d}_entropy"] = st[1].item()
        return out

    # ------------------------------------------------------------------------------------------
    # evaluation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from pipeline.data import PackedSampleReader

        cfg = self.cfg
        reader = PackedSampleReader(cfg.data.dir, split=cfg.eval.split, seq_len=cfg.data.seq_len,
                                    seed=cfg.seed, dp_rank=self.rank, dp_world_size=self.world,
                                    verify_checksums=False, model_vocab_size=self.student_cfg.vocab_size)
        mb = cfg.eval.micro_batch_size or cfg.data.micro_batch_size
        batches = list(reader.eval_batches(mb, max_batches=cfg.eval.max_batches))
        # Every forward of a ZeRO-3 model is collective: all ranks must run the same number.
        n = torch.tensor([len(batches)], device=self.device)
        n = int(self._all_reduce(n, op=dist.ReduceOp.MIN).item())
        self.student.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for b in batches[:n]:
                inp, labels, valid, mask = self._split(b)
                ce_sum = lm_head.ce_sum(self.student, inp, mask, labels, valid,
                                        chunk=cfg.distill.kd_chunk_size, vocab=self.vocab)
                sums[0] += ce_sum.double()
                sums[1] += valid.sum()
        finally:
            self.student.train()
        self._all_reduce(sums)
        loss = (sums[0] / sums[1].clamp_min(1)).item()
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": sums[1].item()}

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------

    def client_state(self) -> dict:
        return {
            "run_id": self.run_id,
            "step": self.step,
            "consumed_samples": self.reader.state_dict()["consumed_samples"],
            "consumed_tokens": self.consumed_tokens,
            "reader": self.reader.state_dict(),
            "skipped_steps": self.skipped_steps,
            "world_size": self.world,
            "identity": self.identity,
            "teacher_files": self.teacher_files,
            "resolved_config": self.resolved_yaml,
        }

    def nonfinite_parameters(self) -> list[str]:
        """Names of student parameters with a NaN/inf element on any rank (collective)."""
        names = [n for n, p in self.student.module.named_parameters()
                 if not bool(torch.isfinite(getattr(p, "ds_tensor", p)).all())]
        flags = torch.tensor([1.0 if names else 0.0], device=self.device)
        if self._all_reduce(flags, op=dist.ReduceOp.MAX).item() == 0:
            return []
        return names or ["(on another rank)"]

    def save(self) -> Path | None:
        """Write and commit this step's checkpoint; None (nothing written) if the weights are not
        finite, so the last good checkpoint stays the newest."""
        root = self.cfg.checkpoint_dir
        tag = ckpt.tag_for(self.step)
        path = root / tag
        bad = self.nonfinite_parameters()
        if bad:
            self.log.info(f"refusing to save step {self.step}: non-finite student weights in "
                          f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the last good checkpoint "
                          f"in {root} is kept. Lower optim.lr or check the data.")
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
                self.log.info(f"moved damaged checkpoint {path.name} to {aside.name}")
            elif path.exists():
                shutil.rmtree(path)  # leftover of this run's save that was killed: start it clean
        dist.barrier()
        self.student.save_checkpoint(str(root), tag=tag, client_state={"run_id": self.run_id},
                                     save_latest=False)
        ckpt.save_rng(path, self.rank)
        if self.cfg.debug.hang_in_save_at_step == self.step:
            (root / "SAVE_HANG").write_text(tag)
            time.sleep(3600)  # a test SIGKILLs the run here
        dist.barrier()  # every rank's files are on disk before the commit
        if self.rank == 0:
            state = {k: v for k, v in self.client_state().items() if k != "resolved_config"}
            (path / "student_config.json").write_text(self.student_cfg.to_json_string())
            ckpt.commit(root, path, state, self.resolved_yaml)
            self.log.info(f"saved checkpoint {path}")
            for p in ckpt.prune(root, self.cfg.checkpoint.keep_last, self.run_id):
                self.log.info(f"removed old checkpoint {p.name}")
        dist.barrier()
        return path

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from (decided before the engines are built: a universal
        checkpoint needs ``load_universal`` in the student's DeepSpeed config). Damaged
        checkpoints are passed over by ``auto`` with a warning and refused when named."""
        r = self.cfg.checkpoint.resume
        if r == "none":
            return None
        if r == "auto":
            root = self.cfg.checkpoint_dir
            p = ckpt.find_latest(root, warn=lambda msg: self.notices.append("WARNING: " + msg))
            if p is None:
                if ckpt.complete_checkpoints(root):
                    raise ResumeRefused(f"no intact checkpoint in {root}: " + "; ".join(self.notices)
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
        return p

    def check_resume_world(self, p: Path, state: dict) -> None:
        saved_world = state.get("world_size")
        if saved_world != self.world and not is_universal(p):
            raise ResumeRefused(f"{p} was saved by {saved_world} ranks and this run has {self.world}: "
                                f"convert it first with `python -m pipeline.universal --checkpoint {p}` "
                                f"(then --resume auto uses the converted copy)")

    def check_resume_identity(self, path: Path, state: dict) -> list[str]:
        """Refuse a checkpoint made with another teacher, tokenizer, data or model shape."""
        saved = dict(state["identity"])
        teacher = saved.get("teacher")
        if teacher and "content_sha256" not in teacher and self.identity["teacher"]:
            # written before teacher content hashes: only the path can be compared
            self.notices.append(f"WARNING: {path} predates teacher content hashes; the teacher's weights "
                                f"could not be compared with the checkpoint's (only its path)")
            saved["teacher"] = dict(self.identity["teacher"], path=teacher.get("path"))
        changes = ckpt.identity_changes(saved, self.identity)
        if changes and not self.cfg.checkpoint.force_resume:
            raise ResumeRefused("refusing to resume from " + str(path) + ": it was made with a different\n  "
                                + "\n  ".join(changes)
                                + "\nto keep this run, restore what changed; to start a new run, use a new "
                                  "output_dir=... (or --move-aside to move this run's files aside); or set "
                                  "checkpoint.force_resume=true (--force-resume) to resume anyway")
        return changes

    def load(self, path: Path) -> None:
        state = ckpt.read_state(path)
        changes = self.resume_changes
        groups = self.student.optimizer.param_groups
        weight_decays = [g["weight_decay"] for g in groups]
        load_path, client = self.student.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ResumeRefused(f"DeepSpeed could not load {path}")
        if is_universal(path):
            # DeepSpeed's ZeRO-3 universal load copies param group 0's hyperparameters into every
            # group (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), which would decay
            # norms and biases: put back each group's own weight decay.
            for group, decay in zip(groups, weight_decays):
                group["weight_decay"] = decay
            self.log.info(f"optimizer param groups' weight_decay after universal load: "
                          f"{[g['weight_decay'] for g in groups]}")
            # It also gives every sub-group's state the *same* 'step' tensor object, and
            # torch.optim.Adam(W) increments it in place (step_t += 1) once per sub-group step, so
            # the step count (Adam's bias correction) would advance by the number of sub-groups
            # per optimizer step: give each sub-group its own copy.
            base = getattr(self.student.optimizer, "optimizer", None)
            for st in (base.state.values() if base is not None else ()):
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        client = state  # trainer_state.json: written at commit, present in universal copies too
        self.step = int(client["step"])
        self.consumed_tokens = int(client["consumed_tokens"])
        self.skipped_steps = int(client["skipped_steps"])
        self.reader.load_state_dict(client["reader"])
        same_world = int(client.get("world_size", -1)) == self.world
        if not (same_world and ckpt.load_rng(path, self.rank)):
            torch.manual_seed(self.cfg.seed + self.step * 1000 + self.rank)
        if changes:
            self.log.info("WARNING: force_resume with changes:\n  " + "\n  ".join(changes))
        self.log.info(f"resumed from {path} at step {self.step} "
                      f"({client['consumed_samples']} samples consumed)")

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------

    def fit(self) -> int:
        cfg = self.cfg
        resume = self.resume_from
        self.log = MetricsLogger(
            enabled=self.rank == 0, tb_dir=cfg.tb_dir, jsonl_path=Path(cfg.output_dir) / "metrics.jsonl",
            console_every=cfg.logging.every_steps, progress=cfg.logging.progress_bar,
            total_steps=cfg.optim.max_steps, start_step=0)
        try:
            for notice in self.notices:
                self.log.info(notice)
            if resume is not None:
                self.load(resume)
            self.log.info(self.describe())
            return self._loop()
        finally:
            self.stop.uninstall()
            self.log.close()

    def describe(self) -> str:
        d = self.derived
        n_s = sum(getattr(p, "ds_numel", p.numel()) for p in self.student.module.parameters())
        lines = [f"stage {self.cfg.stage} | {self.world} rank(s) | {self.dtype} | student {n_s / 1e6:.2f}M params"
                 f" | global batch {d.global_batch_size} samples = {d.tokens_per_step} tokens/step"
                 f" | {self.cfg.optim.max_steps} steps = {d.total_tokens} tokens"
                 f" | memory after loading: peak {peak_memory_mib():.0f} MiB, now {memory_now_mib():.0f} MiB"
                 f" (rank 0)"]
        if self.teacher is not None:
            params = list(_unwrapped(self.teacher).parameters())
            n_t = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            t_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
            pl, gas = self.placement, self.cfg.optim.grad_accum_steps
            gathered, across = (b * gas for b in pl.gathered_bytes_per_forward(t_bytes))
            offload = ", offloaded to CPU" if self.cfg.teacher.offload_params else ""
            lines.append(f"teacher {self.cfg.teacher.path} ({n_t / 1e6:.2f}M params, frozen) | placement "
                         f"{pl.kind} ({pl.world} ranks, {pl.ranks_per_node} per node{offload}) | "
                         f"{pl.param_bytes_per_rank(t_bytes) / 2**20:.1f} MiB of teacher parameters per rank | "
                         f"gathered per step per rank {gathered / 2**20:.1f} MiB, {across / 2**20:.1f} MiB of it "
                         f"across nodes (computed)")
            if pl.kind == "node":
                secondary = sum(getattr(p, "ds_secondary_tensor", None) is not None for p in params)
                lines.append(f"teacher hpZ: {secondary} of {len(params)} parameters have a per-node secondary "
                             f"partition (their gathers stay within the node)")
        if self.chan is not None:
            lines.append(f"SHD plan={self.chan.plan} objective={self.chan.objective} "
                         f"layers (student->teacher) {self.chan.pairs}")
        return "\n".join(lines)

    def _loop(self) -> int:
        cfg = self.cfg
        every_ckpt, every_eval = cfg.checkpoint.every_steps, cfg.eval.every_steps
        while self.step < cfg.optim.max_steps:
            scalars = self.train_step()
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
