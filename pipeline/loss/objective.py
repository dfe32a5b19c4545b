"""The distillation objective of one micro-batch, and its ``distill`` config section.

    total = w_ce CE + w_kd tau_kd^2 KL(teacher || student) + w_shd mean over distilled layers of SHD

CE and KD come from the student's LM head run in chunks inside its own forward
(``pipeline.loss.lm_head``: no [B, T, vocab] logits); SHD comes from the attention capture
(``pipeline.loss.capture.ShdCapture``), computed inside each distilled student layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.loss import lm_head
from pipeline.loss.ce_kd import head_ce_kd

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.data.reader import Batch
    from pipeline.loss.capture import ShdCapture


@dataclass(frozen=True)
class StepTotals:
    """The global counts of one optimizer step that every micro-batch's loss is divided by: valid
    tokens (CE, KD) and real query rows (SHD) of all its micro-batches on all ranks. The losses of
    the step's micro-batches, summed over micro-batches and ranks, are then the global per-token
    mean, exactly, with padding and with any number of ranks."""

    tokens: float
    rows: float

    @classmethod
    def of(cls, batches: list[Batch], all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> StepTotals:
        """This rank's counts of ``batches``, summed over ranks by one ``all_reduce`` (before any compute)."""
        counts = torch.zeros(2, dtype=torch.float64, device=batches[0].valid.device)
        for batch in batches:
            counts[0] += batch.valid.sum()
            counts[1] += batch.query_rows()
        all_reduce(counts)
        return cls(tokens=max(counts[0].item(), 1.0), rows=max(counts[1].item(), 1.0))


class DistillObjective:
    """The loss of one micro-batch, its logged terms, and the step's other logged values.

    Works on any callables of the HF model interface (DeepSpeed engines in training, plain modules
    in tests). It owns the SHD attention capture's per-micro-batch lifecycle (``micro_batch``).
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

    @contextmanager
    def micro_batch(self, student, teacher, batch: Batch, totals: StepTotals,
                    step: int | None = None) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``with objective.micro_batch(student, teacher, batch, totals, step) as (loss, terms):``
        then the backward of ``loss``, inside the block.

        ``loss`` is this micro-batch's share of the step's global mean (``totals``), ``terms`` its
        logged terms (detached, float32; ``loss/total`` is ``loss``). ``step`` (1-based) sets the
        w_shd ramp; None = the full weight.

        The block is the lifetime of the SHD capture of the micro-batch: opened before the
        teacher's forward, closed after the backward. With activation checkpointing the backward
        runs the student layers' forwards again; they run with this micro-batch's capture still
        open and its recording off (stopped when the SHD terms were taken, before the block's
        body), so they skip the SHD loss, whose gradient is already on the graph. Closing it drops
        the teacher's captured q, k and mixing weights and keeps the weights' statistics for
        ``step_scalars``.
        """
        with self.capture.micro_batch(batch.mask) if self.capture is not None else nullcontext():
            yield self._loss(student, teacher, batch, totals, step)

    def _loss(self, student, teacher, batch: Batch, totals: StepTotals, step: int | None):
        cfg, d, n_tok = self.cfg, self.d, totals.tokens
        teacher_rows = None
        if teacher is not None:
            with torch.no_grad():
                teacher_rows = lm_head.teacher_rows(teacher, batch.input_ids, batch.mask, keep_logits=cfg.uses_kd)
        w_kl = d.w_kd * d.tau_kd ** 2 / n_tok if cfg.uses_kd else 0.0

        def student_loss(head, hidden):
            return torch.stack(head_ce_kd(hidden, head.weight, batch.labels, batch.valid, teacher_rows, tau=d.tau_kd,
                                          chunk=d.kd_chunk_size, vocab=self.vocab, w_ce=d.w_ce / n_tok,
                                          w_kl=w_kl))

        with lm_head.intercept(student, student_loss):
            ce_kd, ce_sum, kl_sum = student(input_ids=batch.input_ids, attention_mask=batch.mask,
                                            use_cache=False).logits
        loss = ce_kd
        terms: dict[str, torch.Tensor] = {"loss/ce": ce_sum / n_tok}
        if cfg.uses_kd:
            terms["loss/kd"] = kl_sum / n_tok
        if self.capture is not None:
            rows = batch.query_rows()  # a tensor when masked: no host sync
            # each layer's loss is a mean over this micro-batch's valid rows: reweight to the global mean
            per_layer = {l: v * (rows / totals.rows) for l, v in self.capture.layer_losses().items()}
            shd = torch.stack(list(per_layer.values())).mean()
            loss = loss + self.shd_weight(step) * shd
            terms["loss/shd"] = shd
            for l, v in per_layer.items():
                terms[f"shd/layer_{l:02d}"] = v
        terms["loss/total"] = loss
        return loss, {k: v.detach().float() for k, v in terms.items()}

    def step_scalars(self, step: int) -> dict[str, float]:
        """The values the log records beside the summed terms after optimizer step ``step``: the SHD
        weight it used (after the ramp), and per distilled student layer (``shd_weights/layer_XX``;
        its teacher layer is in the run log) the mean max and the mean entropy of the mixing weights
        of the step's last micro-batch. Empty without SHD."""
        if self.capture is None:
            return {}
        out = {"optim/w_shd": self.shd_weight(step)}
        for s, (mean_max, entropy) in self.capture.weight_stats().items():
            out[f"shd_weights/layer_{s:02d}_mean_max"] = mean_max
            out[f"shd_weights/layer_{s:02d}_entropy"] = entropy
        return out
