"""Dense oracles: the SHD weights and loss computed from full [B, H, T, T] attention maps.

These follow the specification literally (explicit maps, explicit circuits X_i = V_i W_O^(i)T in
d_model dimensions, autograd for gradients). They cost O(T^2) memory per head and exist so that
the streaming implementations can be tested against them; training never calls them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss import check_variant, check_windows
from .masking import (
    MapSpec,
    allowed_keys,
    check_mask,
    compute_dtype,
    loss_dtype,
    normalized_weights,
    repeat_kv,
    tensor_sum,
    valid_rows,
)
from .plan import squeeze_plan
from .simplex import best_vertex, simplex_least_squares
from .weights import check_teacher_inputs, constant_weights, needs_maps

# a head of `weights_from_maps`: ({teacher head: weight [B]}, its map [B, T, T], its circuit [B, T, R])
_Head = tuple[dict[int, Tensor], Tensor, Tensor]


def attention_maps(queries: Tensor, keys: Tensor, attention_mask: Tensor | None = None, tau: float = 1.0,
                   spec: MapSpec = MapSpec()) -> Tensor:
    """Full causal, padding-masked (and windowed) maps softmax(q k^T * scale / tau): [B, H, T, T]."""
    length = queries.shape[2]
    keys = repeat_kv(keys, queries.shape[1])
    scores = (queries @ keys.transpose(-1, -2)) * (spec.scale_for(queries.shape[-1]) / tau)
    hidden = ~allowed_keys(attention_mask, 0, length, queries.device, spec.window)
    return scores.masked_fill(hidden, float("-inf")).softmax(-1)


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
    spec: MapSpec = MapSpec(),
) -> Tensor:
    """`squeeze_weights` from explicit maps (same signature); see `weights_from_maps`."""
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, objective, selection)
    dtype = compute_dtype(teacher_q, teacher_k, teacher_v)
    maps = attention_maps(teacher_q.to(dtype), teacher_k.to(dtype), attention_mask, spec=spec)
    return weights_from_maps(maps, teacher_v.to(dtype), o_proj_weight, num_student_heads, plan=plan,
                             objective=objective, attention_mask=attention_mask, selection=selection)


def weights_from_maps(
    maps: Tensor,
    values: Tensor,
    o_proj_weight: Tensor | None,
    num_student_heads: int,
    *,
    plan: str = "pairwise",
    objective: str = "output",
    attention_mask: Tensor | None = None,
    selection: str = "soft",
) -> Tensor:
    """W [B, N, M] from teacher maps [B, M, T, T] and values [B, M_kv, T, d], literally: circuits
    X_m = V_m W_O^(m)T in d_model dimensions, every candidate A_h X formed in full, the merged
    map carried as a [T, T] matrix; only the simplex solver is shared with `squeeze_weights`."""
    batch, num_heads, length, _ = maps.shape
    structure = squeeze_plan(num_heads, num_student_heads, plan)
    if not needs_maps(structure):
        return constant_weights(structure, batch, maps.dtype, maps.device)
    per_head_values = repeat_kv(values, num_heads)
    if o_proj_weight is None:
        circuits = per_head_values
    else:
        w_o = o_proj_weight.to(maps.dtype).view(-1, num_heads, values.shape[-1])
        circuits = torch.einsum("bmtd,emd->bmte", per_head_values, w_o)
    rows = valid_rows(attention_mask, batch, length, maps.dtype, maps.device)[:, :, None]
    ones = torch.ones(batch, dtype=maps.dtype, device=maps.device)
    # a head: ({teacher head: weight [B]}, its map [B, T, T], its circuit [B, T, R])
    heads = [({m: ones}, maps[:, m], circuits[:, m]) for m in range(num_heads)]
    for round_groups in structure.rounds:
        heads = [heads[g[0]] if len(g) == 1 else _merge_explicit([heads[i] for i in g], rows, objective, selection)
                 for g in round_groups]
    weights = torch.zeros(batch, num_student_heads, num_heads, dtype=maps.dtype, device=maps.device)
    for n, (members, _, _) in enumerate(heads):
        for m, w in members.items():
            weights[:, n, m] = w
    return weights


def _merge_explicit(heads: list[_Head], rows: Tensor, objective: str, selection: str) -> _Head:
    maps = [h[1] for h in heads]
    circuit = tensor_sum(h[2] for h in heads)
    if objective == "output":  # one merged map on the summed circuit vs the summed outputs
        candidates = [[a @ circuit] for a in maps]
        targets = [tensor_sum(a @ x for a, (_, _, x) in zip(maps, heads))]
    else:  # each head's own output on its own circuit
        candidates = [[a @ x for (_, _, x) in heads] for a in maps]
        targets = [a @ x for a, (_, _, x) in zip(maps, heads)]
    stacked = torch.stack([torch.stack(c, dim=1) for c in candidates], dim=1) * rows[:, None, None]  # [B, K, J, T, R]
    target = torch.stack(targets, dim=1) * rows[:, None]
    centred = stacked[:, :-1] - stacked[:, -1:]
    residual = target - stacked[:, -1]
    gram = torch.einsum("bkjtr,bljtr->bkl", centred, centred).double()
    cross = torch.einsum("bkjtr,bjtr->bk", centred, residual).double()
    tolerance = (1e3 * torch.finfo(rows.dtype).eps) ** 2 * stacked.pow(2).sum(dim=(2, 3, 4)).amax(dim=1).double()
    mix = (best_vertex if selection == "hard" else simplex_least_squares)(gram, cross, tolerance).to(rows.dtype)
    members: dict[int, Tensor] = {}
    for k, (own, _, _) in enumerate(heads):
        for m, w in own.items():
            members[m] = w * mix[:, k]
    return members, tensor_sum(mix[:, k, None, None] * a for k, a in enumerate(maps)), circuit


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
    teacher_spec: MapSpec = MapSpec(),
    student_spec: MapSpec = MapSpec(),
    divergence: str = "forward",
) -> Tensor:
    """`shd_loss` from full maps, differentiated by autograd (`block_size` is accepted and unused)."""
    del block_size
    check_mask(attention_mask, student_q.shape[0], student_q.shape[2])
    check_variant(tau, merge, sharpen, divergence)
    check_windows(teacher_spec, student_spec, student_q.shape[2])
    batch, num_student, length, _ = student_q.shape
    dtype = compute_dtype(student_q, student_k, teacher_q, teacher_k)
    hidden = ~allowed_keys(attention_mask, 0, length, student_q.device, student_spec.window)
    teacher_hidden = ~allowed_keys(attention_mask, 0, length, student_q.device, teacher_spec.window)
    mix = normalized_weights(weights, dtype)
    if merge == "prob":
        teacher_maps = attention_maps(teacher_q.detach().to(dtype), teacher_k.detach().to(dtype), attention_mask, tau,
                                      teacher_spec)
        target = torch.einsum("bnm,bmij->bnij", mix, teacher_maps)
        target = target ** (1.0 / sharpen)
        target = target / target.sum(-1, keepdim=True)
    else:
        teacher_keys = repeat_kv(teacher_k.detach(), teacher_q.shape[1]).to(dtype)
        scale = teacher_spec.scale_for(teacher_q.shape[-1])
        teacher_scores = (teacher_q.detach().to(dtype) @ teacher_keys.transpose(-1, -2)) * scale
        mixed = torch.einsum("bnm,bmij->bnij", mix, teacher_scores.masked_fill(teacher_hidden, 0.0))
        target = (mixed / (tau * sharpen)).masked_fill(teacher_hidden, float("-inf")).softmax(-1)
    keys = repeat_kv(student_k, num_student).to(dtype)
    scores = (student_q.to(dtype) @ keys.transpose(-1, -2)) * (student_spec.scale_for(student_q.shape[-1]) / tau)
    log_student = scores.masked_fill(hidden, float("-inf")).log_softmax(-1).masked_fill(hidden, 0.0)
    if divergence == "forward":
        row_kl = (torch.xlogy(target, target) - target * log_student).sum(-1)  # [B, N, T]
    else:
        student = log_student.exp().masked_fill(hidden, 0.0)
        row_kl = (student * (log_student - target.clamp_min(torch.finfo(dtype).tiny).log())).sum(-1)
    rows = valid_rows(attention_mask, batch, length, dtype, student_q.device)
    loss = (row_kl * rows[:, None]).sum() / (num_student * rows.sum().clamp_min(1.0))
    return (loss * tau * tau).to(loss_dtype(student_q))
