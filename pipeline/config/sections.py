"""Every section of the run config, one class each, below every component that uses them.

Each section is a :class:`shd_common.settings.Section` (pydantic v2, strict types, finite floats,
each field's description printed by ``python -m pipeline.train --help-config``); its validators
check the section's own ranges and rules and name the key and the fix. The rules across sections,
the resume classes and the loading are in :mod:`pipeline.config.run`. Components receive the
validated sections; nothing here imports a component (the layer rule is checked in CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from shd_common.settings import ConfigError, Float, Section, setting

__all__ = ["CheckpointConfig", "DataConfig", "DebugConfig", "DeepSpeedSection", "DistillConfig", "EvalConfig",
           "LoggingConfig", "OptimConfig", "StudentConfig", "TeacherConfig"]


# ---- TeacherConfig (read by pipeline/models/hf_configs.py)
class TeacherConfig(Section):
    path: str | None = setting(None, "Hugging Face LLaMA-family model directory of the frozen teacher "
                                        "(required for stage 'distill', must be empty for stage 'pretrain').")
    placement: Literal["auto", "partitioned", "replicated", "node"] = setting(
        "auto", "Where the frozen teacher's weights live. auto = replicated when the whole teacher fits beside "
                "the student's share on every rank (by an estimate the log prints), else node when it fits "
                "a node's ranks in a multi-node job, else partitioned. partitioned = ZeRO-3 over all ranks (fits "
                       "any size; every micro-batch all-gathers the whole teacher, across nodes too); "
                       "replicated = the whole teacher on every rank (no gathers: fastest when it fits one "
                       "GPU); node = ZeRO-3 within each node only (ZeRO++ hpZ: a copy of the teacher per node, "
                       "gathers never cross the network; on one node it is 'partitioned', with one rank per "
                       "node 'replicated'). docs/teacher-placement.md compares them.")
    offload_params: bool = setting(False, "Keep the teacher's ZeRO-3 parameter partitions in CPU memory "
                                          "(placement 'partitioned' only).")
    dtype: Literal["same", "fp32", "bf16"] = setting(
        "same", "The teacher's inference precision: same = the student's (deepspeed.precision); bf16 halves "
                "its memory and, on GPUs and CPUs with bf16 units, its forward time (the losses it gives "
                "change little: docs/results.md section 8).")

    @model_validator(mode="after")
    def _offload_needs_partitioned(self) -> TeacherConfig:
        if self.offload_params and self.placement not in ("partitioned", "auto"):
            raise ConfigError(f"teacher.offload_params=true needs teacher.placement=partitioned (got "
                              f"{self.placement!r}): a replicated or per-node teacher is kept on the GPU to "
                              f"avoid gathers; offloading it would move it over PCIe every step instead")
        return self

# ---- StudentConfig (read by pipeline/models/hf_configs.py)
class StudentConfig(Section):
    init_from: str | None = setting(None, "Hugging Face directory to start the student from; when set, "
                                             "the shape fields below are ignored and taken from it. A student "
                                             "made by python -m pipeline.prune holds a pruning.json: distillation "
                                             "then pairs each student layer and head with the teacher layer and "
                                             "head it was cut from (distill.layer_map, distill.select_heads=pruned).")
    num_layers: int = setting(4, "Decoder layers.")
    hidden_size: int = setting(256, "Model width.")
    num_heads: int = setting(4, "Attention (query) heads.")
    num_kv_heads: int | None = setting(None, "Key/value heads (grouped-query attention); empty = num_heads.")
    intermediate_size: int | None = setting(None, "FFN width; empty = 8/3 * hidden rounded up to a multiple "
                                                     "of 64.")
    vocab_size: int | None = setting(None, "Empty = the tokenizer's vocabulary size (from the data manifest).")
    max_position_embeddings: int | None = setting(
        None, "Largest sequence length the student supports; empty = the teacher's (2048 without a teacher).")
    rope_theta: Float | None = setting(
        None, "RoPE base; empty = the teacher's RoPE (base and scaling; 10000 without a teacher).")
    rms_norm_eps: Float = setting(1e-5, "RMSNorm epsilon.")
    tie_word_embeddings: bool | None = setting(
        None, "Share input embedding and LM head; empty = as the teacher does (untied without a teacher).")
    init_std: Float = setting(0.02, "Std of the normal initialisation of a student built from config.")
    activation_checkpointing: bool = setting(False, "Recompute each decoder layer in backward (non-reentrant).")

    @model_validator(mode="after")
    def _shape(self) -> StudentConfig:
        if self.init_from is not None:
            return self
        for k in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"student.{k} must be >= 1, got {getattr(self, k)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"student.hidden_size ({self.hidden_size}) must be divisible by student.num_heads "
                              f"({self.num_heads})")
        kv = self.num_kv_heads or self.num_heads
        if kv < 1 or self.num_heads % kv:
            raise ConfigError(f"student.num_heads ({self.num_heads}) must be a multiple of student.num_kv_heads "
                              f"({kv})")
        return self

# ---- DataConfig (read by pipeline/data/reader.py)
class DataConfig(Section):
    dir: str = setting("", "Directory written by data_prep (manifest + shards).")
    tokenizer_dir: str | None = setting(None, "Tokenizer directory; when set its identity must match the "
                                                 "manifest's, and export copies it next to the model.")
    seq_len: int = setting(128, "Tokens per training sample (the reader yields seq_len + 1 for the shift).")
    micro_batch_size: int = setting(8, "Samples per rank per forward/backward.")
    verify_checksums: bool = setting(True, "Verify shard checksums when opening the data.")
    check_model_tokenizers: bool = setting(
        True, "Refuse a teacher (teacher.path) or a starting student (student.init_from) whose export "
              "marker or tokenizer files name another tokenizer than the one the data was prepared with "
              "(its token ids would mean other text). false = you vouch that the ids agree.")

    @model_validator(mode="after")
    def _values(self) -> DataConfig:
        if not self.dir:
            raise ConfigError("data.dir is required (the directory written by data_prep)")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        return self

# ---- DistillConfig (read by pipeline/loss/objective.py)
class DistillConfig(Section):
    w_ce: Float = setting(1.0, "Weight of the cross-entropy term.")
    w_kd: Float = setting(1.0, "Weight of the logit KD term (multiplied by tau_kd^2).")
    tau_kd: Float = setting(1.0, "Temperature of the logit KD term.")
    kd_chunk_size: int = setting(512, "Positions per chunk of the LM head + CE/KD computation (the "
                                      "logits exist only as float32 [chunk, vocab] buffers).")
    w_shd: Float = setting(0.1, "Weight of the SHD attention term (mean over distilled layers). 0.1: at 1 a real "
                                "pretrained teacher's attention term left the student far behind KD alone, at 0.1 "
                                "it was ahead of KD there and on the bench teachers (docs/results.md section 8).")
    tau_shd: Float = setting(1.0, "Temperature of the SHD attention maps.")
    plan: Literal["pairwise", "group", "mean", "select"] = setting(
        "select", "Head-squeezing plan: select = each student head distils one teacher head, by default the "
                  "first of its group (distill.select_heads; the default plan: it beat every merged target at "
                  "8->4 and 16->4 heads in docs/results.md section 5); pairwise = the paper's SHD; group; mean.")
    objective: Literal["output", "per_head"] = setting("output", "Objective that chooses the mixing weights.")
    selection: Literal["soft", "hard"] = setting("soft", "soft = optimal mixing weights; hard = each merge "
                                                         "snapped to its best single head (dynamic selection).")
    merge: Literal["prob", "logit"] = setting("prob", "Merge squeezed teacher maps in probability space "
                                                      "(paper) or in score space (product of experts, stays "
                                                      "sharp).")
    sharpen: Float = setting(1.0, "Target temperature applied after merging (< 1 sharpens; 1 = off).")
    shd_divergence: Literal["forward", "reverse"] = setting(
        "forward", "Direction of the attention-map KL: forward = KL(target || student), the paper's "
                   "(mass-covering); reverse = KL(student || target), mode-seeking: a student head may "
                   "match one member of a merged target instead of its blur.")
    select_heads: Literal["first", "random", "reconstruct", "contribution", "pruned"] = setting(
        "first", "plan=select: which teacher head each student head distils; first = its group's first head; "
                 "random = one per group and layer drawn with distill.select_seed (a control: does the "
                 "choice matter?); reconstruct = the head whose map alone best reproduces the group's output "
                 "(SHD's objective) over a calibration pass; contribution = the head with the largest output "
                 "||A_m X_m|| over that pass; pruned = the teacher head it was cut from, as the pruning.json of "
                 "student.init_from (python -m pipeline.prune) names it (the default when init_from holds one). "
                 "Fixed for the whole run (kept in checkpoints) and logged at start.")
    select_seed: int = setting(0, "Seed of select_heads=random.")
    mixing_weights: Literal["per_sequence", "calibrated"] = setting(
        "per_sequence", "plan=pairwise|group: per_sequence = the mixing weights (the paper's alpha) solved for "
                        "every sequence; calibrated = solved once by the same objective summed over a "
                        "calibration pass, then fixed for the whole run (static alphas; kept in checkpoints, "
                        "logged at start).")
    select_calibration_batches: int = setting(8, "select_heads=reconstruct|contribution and "
                                                 "mixing_weights=calibrated: training micro-batches per rank of "
                                                 "the calibration pass (the first ones of the data order, teacher "
                                                 "forward only, before step 1).")
    shd_warmup_steps: int = setting(0, "Linear ramp of w_shd over the first S optimizer steps (step s uses "
                                       "w_shd * min(1, s / S)); 0 = the full weight from step 1.")
    student_layers: list[int] | None = setting(None, "Student layers that get the SHD term; empty = all.")
    layer_map: list[int] | None = setting(None, "Teacher layer for each student layer (length = student "
                                                   "layers); empty = the layer each was cut from when "
                                                   "student.init_from holds a pruning.json (python -m "
                                                   "pipeline.prune), else uniform g(l) = round((l+1) Lt/Ls) - 1.")
    shd_block_size: int = setting(128, "Query rows per block of the streaming SHD loss.")
    allow_padded_vocab: bool = setting(False, "Allow model vocab sizes larger than the tokenizer's (padded "
                                              "embeddings); KD then uses the tokenizer's first V logits.")

    @model_validator(mode="after")
    def _ranges(self) -> DistillConfig:
        checks = [(getattr(self, k) >= 0, f"distill.{k} must be >= 0, got {getattr(self, k)}")
                  for k in ("w_ce", "w_kd", "w_shd")]
        checks += [
            (self.tau_kd > 0, f"distill.tau_kd must be > 0, got {self.tau_kd}"),
            (self.tau_shd > 0, f"distill.tau_shd must be > 0, got {self.tau_shd}"),
            (self.sharpen > 0, f"distill.sharpen must be > 0 (1 = off, < 1 sharpens), got {self.sharpen}"),
            (self.kd_chunk_size >= 1, f"distill.kd_chunk_size must be >= 1, got {self.kd_chunk_size}"),
            (self.shd_block_size >= 1, f"distill.shd_block_size must be >= 1, got {self.shd_block_size}"),
            (self.select_calibration_batches >= 1, f"distill.select_calibration_batches must be >= 1, got "
                                                   f"{self.select_calibration_batches}"),
            (self.shd_warmup_steps >= 0, f"distill.shd_warmup_steps must be >= 0 (0 = no ramp), got "
                                         f"{self.shd_warmup_steps}"),
        ]
        checks.append((self.select_heads == "first" or self.plan == "select",
                       f"distill.select_heads={self.select_heads} only applies to distill.plan=select (plan is "
                       f"{self.plan}): set distill.plan=select, or leave select_heads at first"))
        checks.append((self.mixing_weights == "per_sequence" or self.plan in ("pairwise", "group"),
                       f"distill.mixing_weights=calibrated only applies to distill.plan=pairwise or group (plan is "
                       f"{self.plan}, whose weights are fixed already): set distill.plan=pairwise, or leave "
                       "mixing_weights at per_sequence"))
        layers = self.student_layers
        if layers is not None:
            checks += [(len(layers) > 0, "distill.student_layers is an empty list: leave it empty (null) for all "
                                         "layers or set distill.w_shd=0 to turn SHD off"),
                       (len(set(layers)) == len(layers), f"distill.student_layers has duplicates: {layers}")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

# ---- OptimConfig (read by pipeline/training/builders.py)
class OptimConfig(Section):
    lr: Float = setting(3e-4, "Peak learning rate (AdamW).")
    min_lr: Float = setting(3e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = setting(100, "Linear warmup steps.")
    max_steps: int = setting(1000, "Optimizer steps of the run.")
    weight_decay: Float = setting(0.1, "AdamW weight decay (not applied to norms and biases).")
    beta1: Float = setting(0.9, "AdamW beta1.")
    beta2: Float = setting(0.95, "AdamW beta2.")
    eps: Float = setting(1e-8, "AdamW epsilon.")
    grad_clip: Float = setting(1.0, "Global gradient-norm clip (0 = off).")
    grad_accum_steps: int = setting(1, "Micro-batches per optimizer step on each rank.")
    max_consecutive_nonfinite: int = setting(5, "Stop after this many consecutive skipped (non-finite) steps.")

    @model_validator(mode="after")
    def _ranges(self) -> OptimConfig:
        checks = [
            (self.max_steps >= 1, f"optim.max_steps must be >= 1, got {self.max_steps}"),
            (self.lr > 0, f"optim.lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"optim.min_lr ({self.min_lr}) must be in [0, optim.lr={self.lr}]"),
            (0 <= self.warmup_steps <= self.max_steps,
             f"optim.warmup_steps ({self.warmup_steps}) must be in [0, optim.max_steps={self.max_steps}]"),
            (self.grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}"),
            (self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)"),
            (self.max_consecutive_nonfinite >= 1, "optim.max_consecutive_nonfinite must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

# ---- DeepSpeedSection (read by pipeline/training/deepspeed_config.py)
class DeepSpeedSection(Section):
    config: str = setting("ds_configs/zero3.json", "DeepSpeed JSON of the student engine (ZeRO-3). Batch, "
                                                   "precision, clipping and optimizer fields are filled from "
                                                   "this config; the JSON may leave them out or 'auto'.")
    precision: Literal["auto", "fp32", "bf16"] = setting("auto", "auto = bf16 on a CUDA GPU that supports it, "
                                                                "else fp32.")

    @model_validator(mode="after")
    def _json_file(self) -> DeepSpeedSection:
        suffix = Path(self.config).suffix
        if suffix and suffix != ".json":
            raise ConfigError(f"deepspeed.config must be a .json file, got {self.config}")
        return self

#: Ways of writing "none" that YAML or a tired hand produce (``no``/``off``/``false`` are YAML
#: booleans, ``null``/``~`` YAML's null).
_NONE_WORDS = ("none", "no", "off", "false", "null")


# ---- CheckpointConfig (read by pipeline/checkpoint/checkpointer.py)
class CheckpointConfig(Section):
    dir: str | None = setting(None, "Checkpoint directory; empty = <output_dir>/checkpoints.")
    every_steps: int = setting(500, "Save every this many steps (0 = only at the end and on preemption).")
    keep_last: int = setting(3, "Complete checkpoints kept (>= 2).")
    resume: str = setting("auto", "'auto' = newest complete checkpoint if any, 'none' = start fresh, "
                                  "or a checkpoint directory (a step_N directory).")
    force_resume: bool = setting(False, "Resume although the teacher changed (its content); other identity "
                                        "changes (tokenizer, data, student shape, seq_len, seed, ...) are "
                                        "always refused: they cannot continue a run.")
    rollback: bool = setting(False, "Resuming a checkpoint older than the run's newest: rename the newer ones "
                                    "to <name>.rolled-back-<timestamp> (nothing is deleted) and continue "
                                    "from it; without it such a resume is refused.")
    move_aside: bool = setting(False, "When output_dir (or checkpoint.dir) already holds another run and this "
                                      "run starts fresh, rename the old run's directories to "
                                      "<dir>.moved-<timestamp> first (nothing is deleted); without it such a "
                                      "start is refused.")
    save_at_end: bool = setting(True, "Save when the run reaches max_steps.")

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_words(cls, value: Any) -> Any:
        """'none' however it was written (None, no, off, false, null: YAML turns some into booleans);
        any other non-string is refused naming the choices."""
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return "none"
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"got {value!r}: give auto, none or a checkpoint directory (step_N)")
        return "auto" if value.strip().lower() == "auto" else value

    @model_validator(mode="after")
    def _values(self) -> CheckpointConfig:
        if self.keep_last < 2:
            raise ConfigError(f"checkpoint.keep_last must be >= 2 (a save interrupted mid-way must leave a "
                              f"complete one behind), got {self.keep_last}")
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        return self

# ---- LoggingConfig (read by pipeline/training/metrics.py)
class LoggingConfig(Section):
    tb_dir: str | None = setting(None, "TensorBoard directory; empty = <output_dir>/tb.")
    every_steps: int = setting(10, "Console line every this many steps (TensorBoard gets every step).")
    progress_bar: Literal["auto", "on", "off"] = setting("auto", "auto = when stderr is a terminal.")

    @model_validator(mode="after")
    def _values(self) -> LoggingConfig:
        if self.every_steps < 1:
            raise ConfigError(f"logging.every_steps must be >= 1, got {self.every_steps}")
        return self

# ---- EvalConfig (read by pipeline/training/evaluator.py)
class EvalConfig(Section):
    every_steps: int = setting(500, "Held-out perplexity every this many steps (0 = off during training).")
    at_end: bool = setting(True, "Evaluate at the end of the run.")
    max_batches: int | None = setting(
        50, "Evaluate the first max_batches x micro_batch_size sequences of the split, the same ones whatever the "
            "number of ranks; empty = the whole split.")
    micro_batch_size: int | None = setting(None, "Empty = data.micro_batch_size.")
    split: str = setting("val", "Data split used for evaluation.")

    @model_validator(mode="after")
    def _values(self) -> EvalConfig:
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        return self

# ---- DebugConfig (read by pipeline/runtime/faults.py)
class DebugConfig(Section):
    """Fault injection for tests; leave empty in real runs."""

    nan_loss_at_steps: list[int] = setting([], "Make the loss NaN on rank 0 at these (1-based) steps.")
    sleep_per_step: Float = setting(0.0, "Seconds to sleep after each step (lets a test signal mid-run).")
    hang_in_save_at_step: int | None = setting(None, "During this step's save, after the DeepSpeed files are "
                                                        "written and before the commit, touch <ckpt>/SAVE_HANG "
                                                        "and sleep (a test SIGKILLs it).")
    nonfinite_weights_at_step: int | None = setting(None, "After this optimizer step, overwrite rank 0's share of "
                                                             "the student's weights with NaN (tests that no "
                                                             "checkpoint or export is written from non-finite "
                                                             "weights).")

    @model_validator(mode="after")
    def _one_based(self) -> DebugConfig:
        # steps are 1-based: a step 0 would never fire and the test would pass vacuously
        for k in ("hang_in_save_at_step", "nonfinite_weights_at_step"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ConfigError(f"debug.{k} must be >= 1 (a 1-based step) or empty, got {getattr(self, k)}")
        if not all(s >= 1 for s in self.nan_loss_at_steps):
            raise ConfigError(f"debug.nan_loss_at_steps must hold 1-based steps (>= 1), got {self.nan_loss_at_steps}")
        return self
