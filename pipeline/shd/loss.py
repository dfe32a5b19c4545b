"""The SHD attention loss of one layer, streamed over blocks of query rows.

L = tau^2 * mean over (sequence, valid query row) and student heads of
    KL( target_n || softmax(Z_n / tau) )      (divergence "forward", the paper's)
    KL( softmax(Z_n / tau) || target_n )      (divergence "reverse", mode-seeking)

with student scores Z_n and the squeezed teacher target of student head n (causal and padding
masked, and windowed where a model has a sliding window), built from the teacher scores z_m
by `merge`:
    "prob"  (the paper's): target_n = sum_m W[n, m] softmax(z_m / tau)
    "logit" (product of experts): target_n = softmax(sum_m W[n, m] z_m / tau), which keeps what the
            member heads agree on and stays as sharp as they are,
then sharpened when `sharpen` (a target temperature tau_t) is below 1: target^(1/tau_t),
renormalised per row. The forward loss's gradient is tau * (softmax(Z_n / tau) - target_n) per
row for every target, since the target does not depend on the student; the reverse one's is
tau * s * (log s - log target - KL) with s = softmax(Z_n / tau), log target floored at the
dtype's smallest normal number (`log_target_floor`). A full map is
B*H*T^2 numbers per layer, so the loss never holds one: each block of query rows recomputes the
teacher and student scores it needs (keys cut at the block's last row, since later keys are
masked, and, under a sliding window, before the block's first row minus the window), so extra
memory is O(B * H * block_size * T), O(B * H * block_size * (block_size + W)) with a window W.
Each side scores with its own scale and window (`MapSpec`, read from the model's attention module).

Because the loss is a scalar, its gradient with respect to the student's queries and keys is
accumulated in the same blockwise pass (dL/dZ_n = tau * (softmax(Z_n / tau) - target) / count per
row) and `backward` only scales it by the incoming gradient. This does the score computations
once instead of twice, and keeps the extra memory at the size of the student's q and k. The pass
is skipped when no gradient is needed (evaluation, `torch.no_grad`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, overload

import torch
from torch import Tensor

from .masking import (
    BlockMask,
    MapSpec,
    check_mask,
    compute_dtype,
    first_key,
    is_right_padded,
    loss_dtype,
    normalized_weights,
    repeat_kv,
    valid_rows,
)

MERGES = ("prob", "logit")
"""How squeezed teacher maps are merged: in probability space (paper) or in score space."""

DIVERGENCES = ("forward", "reverse")
""""forward": KL(target || student), the paper's (mass-covering: the student spreads over every key
the target puts mass on). "reverse": KL(student || target), mode-seeking: a student head may match
one member of a merged (flatter) target instead of its blur."""


def merged_target(teacher_scores: Tensor, mask: BlockMask, weights: Tensor, merge: str, sharpen: float) -> Tensor:
    """Student heads' target rows [B, N, rows, keys] from teacher scores [B, M, rows, keys].

    `teacher_scores` are already multiplied by the teacher's scale / tau and are overwritten (they
    are a scratch buffer of the block); `mask` hides the keys the rows may not see.
    """
    if merge == "prob":
        probs = mask.fill_(teacher_scores, float("-inf")).softmax(dim=-1)
        target = torch.einsum("bnm,bmij->bnij", weights, probs)
        del probs
        if sharpen != 1.0:  # log 0 = -inf stays 0 after the softmax
            target = target.log_().div_(sharpen).softmax(dim=-1)
        return target
    mixed = torch.einsum("bnm,bmij->bnij", weights, mask.fill_(teacher_scores, 0.0))
    return mask.fill_(mixed.div_(sharpen), float("-inf")).softmax(dim=-1)


def check_variant(tau: float, merge: str, sharpen: float, divergence: str = "forward") -> None:
    """Refuses an unknown merge or divergence or a non-positive temperature, naming the accepted values."""
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; choose one of {', '.join(MERGES)}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if sharpen <= 0:
        raise ValueError(f"sharpen (the target temperature) must be > 0, got {sharpen}")


def check_windows(teacher: MapSpec, student: MapSpec, length: int) -> None:
    """Refuses a student window narrower than the teacher's: the target would put probability on
    keys the student cannot attend to (an infinite KL)."""
    student_window, teacher_window = student.window_for(length), teacher.window_for(length)
    if student_window is not None and (teacher_window is None or teacher_window > student_window):
        raise ValueError(
            f"the student's sliding window ({student_window}) is narrower than the teacher's "
            f"({teacher_window or 'none'}) at sequence length {length}: the teacher's maps put probability on keys "
            "the student cannot see; use a student without a sliding window (or with one at least as wide)"
        )


def log_target_floor(dtype: torch.dtype) -> float:
    """The reverse KL's floor under log target: log of the dtype's smallest normal number. A key
    the target gives (numerically) no mass but the student may attend to (beyond a narrower teacher
    window, or an underflowed probability) then costs a large finite penalty, not an infinite loss."""
    return math.log(torch.finfo(dtype).tiny)


def _check_inputs(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, weights: Tensor) -> None:
    batch, num_student, length, _ = student_q.shape
    num_teacher = teacher_q.shape[1]
    if tuple(weights.shape) != (batch, num_student, num_teacher):
        raise ValueError(
            f"weights have shape {tuple(weights.shape)}, expected [B, N, M] = [{batch}, {num_student}, {num_teacher}] "
            "(make them with pipeline.shd.squeeze_weights)"
        )
    for name, tensor in (("student_k", student_k), ("teacher_q", teacher_q), ("teacher_k", teacher_k)):
        if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[2] != length:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected [B={batch}, heads, T={length}, d]")
    if student_k.shape[-1] != student_q.shape[-1] or teacher_k.shape[-1] != teacher_q.shape[-1]:
        raise ValueError("queries and keys of one model must share their head dim")


@overload
def _blockwise(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, weights: Tensor, tau: float,
               attention_mask: Tensor | None, block_size: int, merge: str, sharpen: float, teacher_spec: MapSpec,
               student_spec: MapSpec, divergence: str, with_grad: Literal[True]) -> tuple[Tensor, Tensor, Tensor]: ...


@overload
def _blockwise(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, weights: Tensor, tau: float,
               attention_mask: Tensor | None, block_size: int, merge: str, sharpen: float, teacher_spec: MapSpec,
               student_spec: MapSpec, divergence: str, with_grad: Literal[False]) -> tuple[Tensor, None, None]: ...


def _blockwise(
    student_q: Tensor,
    student_k: Tensor,
    teacher_q: Tensor,
    teacher_k: Tensor,
    weights: Tensor,
    tau: float,
    attention_mask: Tensor | None,
    block_size: int,
    merge: str,
    sharpen: float,
    teacher_spec: MapSpec,
    student_spec: MapSpec,
    divergence: str,
    with_grad: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss (and, if asked, its gradients w.r.t. student q and repeated k) in one blockwise pass."""
    batch, num_student, length, student_dim = student_q.shape
    dtype = compute_dtype(student_q, student_k, teacher_q, teacher_k)
    device = student_q.device
    sq = student_q.to(dtype)
    sk = repeat_kv(student_k, num_student).to(dtype)
    mix: Tensor | None  # None below when every target is one teacher head's map
    mix = normalized_weights(weights, dtype)
    # teacher heads that no target draws on (select, hard selection, weights clipped to 0) are skipped
    used = mix.ne(0).flatten(0, 1).any(dim=0).nonzero().flatten()
    per_kv = teacher_q.shape[1] // teacher_k.shape[1]
    mix = mix[:, :, used]
    if bool(((mix == 0) | (mix == 1)).all()):
        # every target is one teacher head's map (select, hard selection): score that head for each
        # student head directly, and get the target's entropy from its log-probabilities
        pick = used[mix.argmax(dim=-1)]  # [B, N] teacher head of each student head
        batch_index = torch.arange(batch, device=device)[:, None]
        tq = teacher_q[batch_index, pick].to(dtype)
        tk = teacher_k[batch_index, pick // per_kv].to(dtype)
        mix = None
    else:
        tq = teacher_q[:, used].to(dtype)
        tk = teacher_k[:, used // per_kv].to(dtype)
    student_scale = student_spec.scale_for(student_dim)
    teacher_scale = teacher_spec.scale_for(teacher_q.shape[-1])
    teacher_window, student_window = teacher_spec.window_for(length), student_spec.window_for(length)
    rows = valid_rows(attention_mask, batch, length, dtype, device)
    count = num_student * rows.sum().clamp_min(1.0)
    right_padded = is_right_padded(attention_mask)
    # hidden student scores get the lowest finite value, not -inf: their log-probabilities stay
    # finite, so target * log_student is 0 there without another masking pass
    lowest = torch.finfo(dtype).min

    total = torch.zeros((), dtype=dtype, device=device)
    grad_q = torch.zeros_like(sq) if with_grad else None
    grad_k = torch.zeros_like(sk) if with_grad else None
    for start in range(0, length, block_size):
        end = min(length, start + block_size)
        # keys [first, end): the student's window is at least the teacher's (check_windows)
        first = first_key(start, student_window)
        student_mask = BlockMask(attention_mask, right_padded, start, end, device, student_window, first)
        teacher_mask = (student_mask if teacher_window == student_window else
                        BlockMask(attention_mask, right_padded, start, end, device, teacher_window, first))
        # in-place masking and early deletes keep at most two [B, M, block, keys] buffers alive
        teacher_scores = (tq[:, :, start:end] @ tk[:, :, first:end].transpose(-1, -2)).mul_(teacher_scale / tau)
        # each row's KL as batched row-by-row dot products:
        #   forward  sum t log t - sum t log s, gradient tau * (s - t)
        #   reverse  sum s (log s - log t),     gradient tau * s * (log s - log t - KL)
        # (gradients of tau^2 KL with respect to q k^T * scale, before 1/count and the row mask)
        forward = divergence == "forward"
        if mix is None:
            log_target = teacher_mask.fill_(teacher_scores.div_(sharpen), lowest).log_softmax(dim=-1)
            del teacher_scores
            if forward:
                target = log_target.exp()
                row_kl = _row_dot(target, log_target)
                del log_target
            else:
                log_target = log_target.clamp_min_(log_target_floor(dtype))
        else:
            target = merged_target(teacher_scores, teacher_mask, mix, merge, sharpen)
            del teacher_scores
            if forward:
                row_kl = torch.xlogy(target, target).sum(dim=-1)
            else:
                log_target = target.clamp_min_(torch.finfo(dtype).tiny).log_()
                del target
        student_scores = (sq[:, :, start:end] @ sk[:, :, first:end].transpose(-1, -2)).mul_(student_scale / tau)
        log_student = student_mask.fill_(student_scores, lowest).log_softmax(dim=-1)
        del student_scores
        block_rows = rows[:, None, start:end]
        row_scale = block_rows[..., None] * (tau * student_scale) / count if with_grad else None
        if forward:
            row_kl = row_kl.sub_(_row_dot(target, log_student))
            if row_scale is not None:
                grad_scores = log_student.exp_().sub_(target).mul_(row_scale)
        else:  # one more [B, N, block, keys] buffer than forward: the student's probabilities
            student = log_student.exp()
            diff = log_student.sub_(log_target)
            del log_target
            row_kl = _row_dot(student, diff)
            if row_scale is not None:
                grad_scores = diff.sub_(row_kl[..., None]).mul_(student).mul_(row_scale)
            del student, diff
        total = total + (row_kl * block_rows).sum()
        if grad_q is not None and grad_k is not None:
            grad_q[:, :, start:end] = grad_scores @ sk[:, :, first:end]
            grad_k[:, :, first:end] += grad_scores.transpose(-1, -2) @ sq[:, :, start:end]
    return total * (tau * tau) / count, grad_q, grad_k


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum over the last dim of a * b, as a batched matrix product (no [.., keys] temporary)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).view(a.shape[:-1])


def _fold_kv_grad(grad_k: Tensor, num_kv: int) -> Tensor:
    """Sums the gradient of repeated key heads back onto their grouped-query key head."""
    batch, num_heads, length, dim = grad_k.shape
    return grad_k.view(batch, num_kv, num_heads // num_kv, length, dim).sum(dim=2)


class _StreamingSHDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, weights: Tensor,
                tau: float, attention_mask: Tensor | None, block_size: int, merge: str, sharpen: float,
                teacher_spec: MapSpec, student_spec: MapSpec, divergence: str) -> Tensor:
        loss, grad_q, grad_k = _blockwise(
            student_q, student_k, teacher_q, teacher_k, weights, tau, attention_mask, block_size, merge, sharpen,
            teacher_spec, student_spec, divergence, with_grad=True,
        )
        # Kept on ctx, not saved with save_for_backward: saved-tensor hooks (activation
        # checkpointing) would drop them and re-run this whole pass in backward to get them back;
        # kept here they cost the size of q and k per layer, and the layer's recomputation can
        # skip the loss (pipeline/loss/capture.py).
        ctx.grads = (grad_q.to(student_q.dtype), _fold_kv_grad(grad_k, student_k.shape[1]).to(student_k.dtype))
        return loss.to(loss_dtype(student_q))

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_q, grad_k = ctx.grads
        scale = grad_output.to(grad_q.dtype)
        return grad_q * scale, grad_k * scale, None, None, None, None, None, None, None, None, None, None, None


def shd_loss(
    student_q: Tensor,
    student_k: Tensor,
    teacher_q: Tensor,
    teacher_k: Tensor,
    weights: Tensor,
    *,
    tau: float = 1.0,
    attention_mask: Tensor | None = None,
    block_size: int = 128,
    merge: str = "prob",
    sharpen: float = 1.0,
    teacher_spec: MapSpec = MapSpec(),
    student_spec: MapSpec = MapSpec(),
    divergence: str = "forward",
) -> Tensor:
    """SHD loss of one layer (a scalar), streamed over query blocks; gradients reach student q, k only.

    student_q [B, N, T, d_s], student_k [B, N_kv, T, d_s], teacher_q [B, M, T, d_t], teacher_k
    [B, M_kv, T, d_t], all after rotary embedding; weights [B, N, M] from `squeeze_weights` (rows
are renormalised to sum to 1 in the compute dtype, which bf16 rounding would otherwise break);
    attention_mask [B, T] (1 = real token) or None. Each side scores with its own scale and
    sliding window (`teacher_spec`, `student_spec`; default 1/sqrt(d), no window); a student window
    narrower than the teacher's is refused.
    `merge` ("prob" or "logit") and `sharpen` (target temperature, 1 = none) choose the target,
    `divergence` ("forward" or "reverse", `DIVERGENCES`) the direction of the KL.
    Computed in float32 (float64 when an input is float64); the loss is float32 for bf16 inputs.
    """
    _check_inputs(student_q, student_k, teacher_q, teacher_k, weights)
    check_mask(attention_mask, student_q.shape[0], student_q.shape[2])
    check_variant(tau, merge, sharpen, divergence)
    check_windows(teacher_spec, student_spec, student_q.shape[2])
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    teacher_q, teacher_k, weights = teacher_q.detach(), teacher_k.detach(), weights.detach()
    if torch.is_grad_enabled() and (student_q.requires_grad or student_k.requires_grad):
        # torch leaves Function.apply unannotated; it returns what forward returns, the loss
        loss: Tensor = _StreamingSHDLoss.apply(  # type: ignore[no-untyped-call]
            student_q, student_k, teacher_q, teacher_k, weights, tau, attention_mask, block_size, merge, sharpen,
            teacher_spec, student_spec, divergence,
        )
        return loss
    loss, _, _ = _blockwise(
        student_q, student_k, teacher_q, teacher_k, weights, tau, attention_mask, block_size, merge, sharpen,
        teacher_spec, student_spec, divergence, with_grad=False,
    )
    return loss.to(loss_dtype(student_q))
