"""Dense oracles: the SHD weights and loss computed from full [B, H, T, T] attention maps.

These follow the specification literally (explicit maps, explicit circuits X_i = V_i W_O^(i)T in
d_model dimensions, autograd for gradients). They cost O(T^2) memory per head and exist so that
the streaming implementations can be tested against them; training never calls them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss import check_variant
from .masking import allowed_keys, check_mask, compute_dtype, loss_dtype, normalized_weights, repeat_kv, valid_rows
from .plan import squeeze_plan
from .weights import check_teacher_inputs, circuit_fn, constant_weights, needs_maps, walk_plan


def attention_maps(queries: Tensor, keys: Tensor, attention_mask: Tensor | None = None, tau: float = 1.0) -> Tensor:
    """Full causal, padding-masked attention maps softmax(q k^T / sqrt(d) / tau): [B, H, T, T]."""
    length = queries.shape[2]
    keys = repeat_kv(keys, queries.shape[1])
    scores = (queries @ keys.transpose(-1, -2)) * (queries.shape[-1] ** -0.5 / tau)
    return scores.masked_fill(~allowed_keys(attention_mask, 0, length, queries.device), float("-inf")).softmax(-1)


class DenseMaps:
    """Teacher maps held in full; `apply` is a plain matrix product."""

    def __init__(self, maps: Tensor):
        self.maps = maps

    def apply(self, heads: list[int], values: Tensor) -> Tensor:
        return self.maps[:, heads] @ values[:, None]


def squeeze_weights_reference(
    teacher_q: Tensor,
    teacher_k: Tensor,
    teacher_v: Tensor,
    o_proj_weight: Tensor | None,
    num_student_heads: int,
    *,
    plan: str = "pairwise",
    objective: str = "output",
    attention_mask: Tensor | None = None,
    selection: str = "soft",
) -> Tensor:
    """`squeeze_weights` from explicit maps and full d_model circuits (same signature, no QR)."""
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, objective, selection)
    batch, num_heads, length, _ = teacher_q.shape
    structure = squeeze_plan(num_heads, num_student_heads, plan)
    dtype = compute_dtype(teacher_q, teacher_k, teacher_v)
    if not needs_maps(structure):
        return constant_weights(structure, batch, dtype, teacher_q.device)
    maps = DenseMaps(attention_maps(teacher_q.to(dtype), teacher_k.to(dtype), attention_mask))
    values = teacher_v.to(dtype)
    rows = valid_rows(attention_mask, batch, length, dtype, teacher_q.device)
    circuits = circuit_fn(values, o_proj_weight, num_heads, reduce=False)
    return walk_plan(structure, maps, circuits, rows, objective, selection)


def shd_loss_reference(
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
) -> Tensor:
    """`shd_loss` from full maps, differentiated by autograd (`block_size` is accepted and unused)."""
    del block_size
    check_mask(attention_mask, student_q.shape[0], student_q.shape[2])
    check_variant(tau, merge, sharpen)
    batch, num_student, length, _ = student_q.shape
    dtype = compute_dtype(student_q, student_k, teacher_q, teacher_k)
    hidden = ~allowed_keys(attention_mask, 0, length, student_q.device)
    mix = normalized_weights(weights, dtype)
    if merge == "prob":
        teacher_maps = attention_maps(teacher_q.detach().to(dtype), teacher_k.detach().to(dtype), attention_mask, tau)
        target = torch.einsum("bnm,bmij->bnij", mix, teacher_maps)
        target = target ** (1.0 / sharpen)
        target = target / target.sum(-1, keepdim=True)
    else:
        teacher_keys = repeat_kv(teacher_k.detach(), teacher_q.shape[1]).to(dtype)
        teacher_scores = (teacher_q.detach().to(dtype) @ teacher_keys.transpose(-1, -2)) * teacher_q.shape[-1] ** -0.5
        mixed = torch.einsum("bnm,bmij->bnij", mix, teacher_scores.masked_fill(hidden, 0.0))
        target = (mixed / (tau * sharpen)).masked_fill(hidden, float("-inf")).softmax(-1)
    keys = repeat_kv(student_k, num_student).to(dtype)
    scores = (student_q.to(dtype) @ keys.transpose(-1, -2)) * (student_q.shape[-1] ** -0.5 / tau)
    log_student = scores.masked_fill(hidden, float("-inf")).log_softmax(-1).masked_fill(hidden, 0.0)
    row_kl = (torch.xlogy(target, target) - target * log_student).sum(-1)  # [B, N, T]
    rows = valid_rows(attention_mask, batch, length, dtype, student_q.device)
    loss = (row_kl * rows[:, None]).sum() / (num_student * rows.sum().clamp_min(1.0))
    return (loss * tau * tau).to(loss_dtype(student_q))
