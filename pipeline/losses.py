"""Token-level losses: cross-entropy and logit KD, computed in chunks of positions.

A float32 ``[B, T, vocab]`` probability tensor is the largest buffer of a distillation step
(B=8, T=4096, V=128k is 16 GiB). ``ce_kd_sums`` never builds it: forward and backward each walk
over ``chunk`` positions at a time and recompute the softmaxes of that chunk, so the extra memory
is ``O(chunk x vocab)``; only the logits themselves (model dtype) and their gradient exist in full.

Both terms are returned as *sums* over valid positions. The caller divides by the global number of
valid tokens (all ranks, all micro-batches of the step), so that the loss is a true per-token mean
of the global batch whatever the padding and the number of ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedCEKD(torch.autograd.Function):
    """(ce_sum, kl_sum) over rows of flattened logits, with a hand-written chunked backward.

    kl_sum = sum over valid rows of KL(softmax(t / tau) || softmax(s / tau)), 0 log 0 = 0.
    d kl / d s = (softmax(s / tau) - softmax(t / tau)) / tau ;  d ce / d s = softmax(s) - onehot.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, valid, tau: float, chunk: int, vocab: int):
        n = student.shape[0]
        ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            m = valid[r0:r1]
            zs = student[r0:r1, :vocab].float()
            lab = labels[r0:r1].clamp(0, vocab - 1)
            ce = torch.logsumexp(zs, dim=-1) - zs.gather(1, lab[:, None]).squeeze(1)
            ce_sum += (ce * m).sum()
            if teacher is not None:
                kl_sum += (_row_kl(teacher[r0:r1, :vocab].float(), zs, tau) * m).sum()
        ctx.save_for_backward(student, teacher, labels, valid)
        ctx.tau, ctx.chunk, ctx.vocab = tau, chunk, vocab
        return ce_sum, kl_sum

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        student, teacher, labels, valid = ctx.saved_tensors
        tau, chunk, vocab = ctx.tau, ctx.chunk, ctx.vocab
        grad = torch.zeros_like(student)
        for r0 in range(0, student.shape[0], chunk):
            r1 = min(student.shape[0], r0 + chunk)
            m = valid[r0:r1].to(torch.float32)[:, None]
            zs = student[r0:r1, :vocab].float()
            g = torch.softmax(zs, dim=-1)
            g.scatter_add_(1, labels[r0:r1].clamp(0, vocab - 1)[:, None],
                           torch.full((r1 - r0, 1), -1.0, device=g.device))
            g = g * g_ce
            if teacher is not None:
                pt = torch.softmax(teacher[r0:r1, :vocab].float() / tau, dim=-1)
                qs = torch.softmax(zs / tau, dim=-1)
                g = g + (qs - pt) * (g_kl / tau)
            grad[r0:r1, :vocab] = (g * m).to(grad.dtype)
        return grad, None, None, None, None, None, None


def _row_kl(zt: torch.Tensor, zs: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(zt/tau) || softmax(zs/tau)) per row, float32, 0 log 0 = 0."""
    log_pt = torch.log_softmax(zt / tau, dim=-1)
    log_qs = torch.log_softmax(zs / tau, dim=-1)
    pt = log_pt.exp()
    return torch.where(pt > 0, pt * (log_pt - log_qs), torch.zeros_like(pt)).sum(-1)


def ce_kd_sums(student_logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               teacher_logits: torch.Tensor | None = None, *, tau: float = 1.0, chunk: int = 512,
               vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of CE and sum of KL(teacher || student at tau) over valid positions, float32 scalars.

    student_logits / teacher_logits: [B, T, V*] (any float dtype; only the first ``vocab`` columns
    are used, which handles a padded embedding), labels [B, T] long, valid [B, T] bool.
    Gradients flow to student_logits only. The KL sum is NOT multiplied by tau^2.
    """
    v = vocab if vocab is not None else student_logits.shape[-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = None if teacher_logits is None else teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    return _ChunkedCEKD.apply(s, t, labels.reshape(-1), valid.reshape(-1).to(torch.float32),
                              float(tau), int(chunk), int(v))


def ce_kd_sums_reference(student_logits, labels, valid, teacher_logits=None, *, tau=1.0, vocab=None):
    """Dense float32 oracle of :func:`ce_kd_sums` (tests only)."""
    v = vocab if vocab is not None else student_logits.shape[-1]
    zs = student_logits[..., :v].float().reshape(-1, v)
    lab = labels.reshape(-1).clamp(0, v - 1)
    m = valid.reshape(-1).float()
    ce = (F.cross_entropy(zs, lab, reduction="none") * m).sum()
    if teacher_logits is None:
        return ce, torch.zeros((), device=zs.device)
    zt = teacher_logits[..., :v].detach().float().reshape(-1, v)
    return ce, (_row_kl(zt, zs, tau) * m).sum()
