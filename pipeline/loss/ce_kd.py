"""Token-level losses: cross-entropy and logit KD computed from the LM head, in chunks of positions.

The logits are the largest tensors of a distillation step: student and teacher ``[B, T, vocab]``
plus the gradient of the student's (B=8, T=4096, V=128k is 8 GiB each in bf16, twice that in
float32 for the softmaxes). ``head_ce_kd`` never builds any of them. It takes the hidden states
that enter each model's LM head and the heads' weights, and walks over ``chunk`` positions at a
time: logits of the chunk, CE and KL of the chunk, and at once the chunk's gradient with respect to
the student's hidden states and head weight (the "fused linear cross-entropy" of Liger-Kernel).
The backward then only scales those gradients, so the extra memory is ``O(chunk x vocab)`` plus
one float32 gradient of the head weight, whatever T.

The weights of CE and KD in the total are known before the forward (they include the global token
count), which is what lets the forward compute the gradient of their weighted sum.

CE and KL are returned as *sums* over valid positions besides the weighted total; the caller
divides by the global number of valid tokens (all ranks, all micro-batches of the step), so that
the loss is a true per-token mean of the global batch whatever the padding and the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TeacherRows:
    """The teacher's logits, either as (hidden states [N, H], head weight [V, H]) or in full [N, V]."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def rows(self, r0: int, r1: int, vocab: int) -> torch.Tensor:
        """float32 logits of rows r0:r1 over the first ``vocab`` entries."""
        if self.logits is not None:
            return self.logits[r0:r1, :vocab].float()
        return F.linear(self.hidden[r0:r1], self.weight[:vocab]).float()


class _HeadCEKD(torch.autograd.Function):
    """(w_ce ce_sum + w_kl kl_sum, ce_sum, kl_sum) from the student's head input and weight.

    kl_sum = sum over valid rows of KL(softmax(t / tau) || softmax(s / tau)), 0 log 0 = 0.
    d kl / d s = (softmax(s / tau) - softmax(t / tau)) / tau ;  d ce / d s = softmax(s) - onehot.
    Only the total is differentiable; the gradients are computed in the forward (when needed).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher: TeacherRows | None, labels, valid, tau: float,
                chunk: int, vocab: int, w_ce: float, w_kl: float):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight[:vocab]
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        for r0 in range(0, hidden.shape[0], chunk):
            r1 = min(hidden.shape[0], r0 + chunk)
            m = valid[r0:r1]
            h = hidden[r0:r1]
            zs = F.linear(h, w).float()
            lab = labels[r0:r1].clamp(0, vocab - 1)
            log_ps = torch.log_softmax(zs, dim=-1)
            ce_sum += (-log_ps.gather(1, lab[:, None]).squeeze(1) * m).sum()
            dz = None
            if need_grad:
                dz = log_ps.exp_().scatter_add_(1, lab[:, None], torch.full_like(m[:, None], -1.0)) * w_ce
            del log_ps
            if teacher is not None:
                log_pt = torch.log_softmax(teacher.rows(r0, r1, vocab) / tau, dim=-1)
                log_qs = torch.log_softmax(zs / tau, dim=-1)
                pt = log_pt.exp()
                kl_sum += (torch.where(pt > 0, pt * (log_pt - log_qs), 0.0).sum(-1) * m).sum()
                if need_grad:
                    dz += (log_qs.exp_() - pt) * (w_kl / tau)
                del log_pt, log_qs, pt
            if need_grad:
                dz = (dz * m[:, None]).to(hidden.dtype)
                grad_h[r0:r1] = dz @ w
                grad_w += (dz.t() @ h).float()
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        ctx.grads = (grad_h, grad_w, weight.shape, weight.dtype)
        return w_ce * ce_sum + w_kl * kl_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_kl):
        grad_h, grad_w, w_shape, w_dtype = ctx.grads
        del ctx.grads
        gw = None
        if grad_w is not None:
            gw = torch.zeros(w_shape, dtype=w_dtype, device=grad_w.device)
            gw[: grad_w.shape[0]] = grad_w * g_total
        return (None if grad_h is None else grad_h * g_total.to(grad_h.dtype)), gw, *([None] * 8)


def head_ce_kd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               teacher: TeacherRows | None = None, *, tau: float = 1.0, chunk: int = 512,
               vocab: int | None = None, w_ce: float = 1.0, w_kl: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_ce CE_sum + w_kl KL_sum, CE_sum, KL_sum) over valid positions, float32 scalars.

    hidden: [B, T, H] input of the student's LM head, weight: its [V*, H] weight (rows beyond
    ``vocab`` are a padded embedding and get no gradient); labels [B, T] long, valid [B, T] bool;
    teacher: the teacher's logits for the same positions, flattened to [B*T, ...] rows.
    Gradients flow to hidden and weight through the total only. KL is NOT multiplied by tau^2.
    """
    v = vocab if vocab is not None else weight.shape[0]
    return _HeadCEKD.apply(hidden.reshape(-1, hidden.shape[-1]), weight, teacher, labels.reshape(-1),
                           valid.reshape(-1).to(torch.float32),
                           float(tau), int(chunk), int(v), float(w_ce), float(w_kl))


def ce_kd_sums_reference(student_logits, labels, valid, teacher_logits=None, *, tau=1.0, vocab=None):
    """CE and KL sums from full logits, dense float32: the oracle of tests and the naive baseline of
    bench/step_cost.py."""
    v = vocab if vocab is not None else student_logits.shape[-1]
    zs = student_logits[..., :v].float().reshape(-1, v)
    lab = labels.reshape(-1).clamp(0, v - 1)
    m = valid.reshape(-1).float()
    ce = (F.cross_entropy(zs, lab, reduction="none") * m).sum()
    if teacher_logits is None:
        return ce, torch.zeros((), device=zs.device)
    zt = teacher_logits[..., :v].detach().float().reshape(-1, v)
    log_pt = torch.log_softmax(zt / tau, dim=-1)
    log_qs = torch.log_softmax(zs / tau, dim=-1)
    pt = log_pt.exp()
    return ce, (torch.where(pt > 0, pt * (log_pt - log_qs), 0.0).sum(-1) * m).sum()
