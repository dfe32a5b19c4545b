"""The distillation objective of one micro-batch, and its ``distill`` config section.

    total = w_ce CE + w_kd tau_kd^2 KL(teacher || student) + w_shd mean over distilled layers of SHD

CE and KD come from the student's LM head run in chunks inside its own forward
(``pipeline.lm_head``: no [B, T, vocab] logits); SHD comes from the attention capture
(``pipeline.attention.ShdCapture``), computed inside each distilled student layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import torch
from pydantic import model_validator

from pipeline import lm_head
from pipeline.losses import head_ce_kd
from pipeline.settings import ConfigError, Float, Section, setting

if TYPE_CHECKING:
    from pipeline.attention import ShdCapture
    from pipeline.config import RunConfig


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
        "select", "Head-squeezing plan: select = each student head distils the first teacher head of its "
                  "group (the default: it beat every merged target at 8->4 and 16->4 heads in "
                  "docs/results.md section 5); pairwise = the paper's SHD; group; mean.")
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
    select_heads: Literal["first", "random", "reconstruct", "contribution"] = setting(
        "first", "plan=select: which teacher head of its group each student head distils; first = the group's "
                 "first head; random = one per group and layer drawn with distill.select_seed (a control: does the "
                 "choice matter?); reconstruct = the head whose map alone best reproduces the group's output "
                 "(SHD's objective) over a calibration pass; contribution = the head with the largest output "
                 "||A_m X_m|| over that pass. Fixed for the whole run (kept in checkpoints) and logged at start.")
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
    student_layers: Optional[list[int]] = setting(None, "Student layers that get the SHD term; empty = all.")
    layer_map: Optional[list[int]] = setting(None, "Teacher layer for each student layer (length = student "
                                                   "layers); empty = uniform g(l) = round((l+1) Lt/Ls) - 1.")
    shd_block_size: int = setting(128, "Query rows per block of the streaming SHD loss.")
    allow_padded_vocab: bool = setting(False, "Allow model vocab sizes larger than the tokenizer's (padded "
                                              "embeddings); KD then uses the tokenizer's first V logits.")

    @model_validator(mode="after")
    def _ranges(self) -> "DistillConfig":
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


class DistillObjective:
    """The loss of one micro-batch and its logged terms.

    Works on any callables of the HF model interface (DeepSpeed engines in training, plain modules
    in tests). ``n_tok`` / ``n_rows`` are the *global* counts of valid tokens / query rows of the
    step, so the per-step sum of the returned losses over micro-batches and ranks is the global mean.
    """

    def __init__(self, cfg: RunConfig, vocab: int, capture: ShdCapture | None) -> None:
        self.cfg, self.d, self.vocab, self.capture = cfg, cfg.distill, vocab, capture

    def shd_weight(self, step: int | None) -> float:
        """w_shd at optimizer step ``step`` (1-based), ramped over distill.shd_warmup_steps; the full
        weight when ``step`` is None (a loss measured outside the training loop)."""
        ramp = self.d.shd_warmup_steps
        if step is None or ramp == 0 or step >= ramp:
            return self.d.w_shd
        return self.d.w_shd * max(step, 0) / ramp

    def __call__(self, student, teacher, inp, labels, valid, mask, n_tok: float, n_rows: float,
                 step: int | None = None):
        cfg, d, capture = self.cfg, self.d, self.capture
        if capture is not None:
            capture.begin(mask)
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
        loss = ce_kd
        terms: dict[str, torch.Tensor] = {"loss/ce": ce_sum / n_tok}
        if cfg.uses_kd:
            terms["loss/kd"] = kl_sum / n_tok
        if capture is not None:
            rows = mask.sum() if mask is not None else float(inp.numel())  # a tensor: no host sync
            # each layer's loss is a mean over this micro-batch's valid rows: reweight to the global mean
            per_layer = {l: v * (rows / n_rows) for l, v in capture.layer_losses().items()}
            shd = torch.stack(list(per_layer.values())).mean()
            loss = loss + self.shd_weight(step) * shd
            terms["loss/shd"] = shd
            for l, v in per_layer.items():
                terms[f"shd/layer_{l:02d}"] = v
        terms["loss/total"] = loss
        return loss, {k: v.detach().float() for k, v in terms.items()}
