"""Squeeze weights: the mixing matrix W [B, N, M] that turns M teacher maps into N targets.

Student head n's target map is sum_m W[b, n, m] * A_m. For the "pairwise" and "group" plans the
weights are chosen per sequence so that one merged map, applied to the merged heads' combined
value-output circuit, best reproduces what the heads add to the residual stream (shd-method.md).

Everything needed is an attention map applied to some values, A_a X, so no [T, T] map is ever
formed: `StreamingMaps` gets A_a X from scaled-dot-product attention calls (head a's queries and
keys on another head's values), and circuits X_i = V_i W_O^(i)T are first reduced to a basis of
their group's output columns (a QR factorisation), which preserves every inner product the
objective uses while shrinking d_model to at most (group size x head dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import allowed_keys, check_mask, compute_dtype, is_right_padded, repeat_kv, valid_rows
from .plan import SqueezePlan, squeeze_plan
from .simplex import simplex_least_squares

OBJECTIVES = ("output", "per_head")
""""output": one merged map on the merged circuit reproduces the heads' summed output (paper).
"per_head": the merged map reproduces each head's own output on its own circuit."""

WEIGHTS_BLOCK_SIZE = 128
"""Query rows per block when maps must be applied with an explicit (non right-padded) mask."""


class MapOperator(Protocol):
    """Applies teacher attention maps to values: the only access the weights need to the maps."""

    def apply(self, heads: list[int], values: Tensor) -> Tensor:
        """A_{heads[i]} @ values[:, i] for every i: values [B, len(heads), T, R] -> same shape."""
        ...


CircuitFn = Callable[[tuple[int, ...]], Tensor]
"""Maps a final group of teacher heads to their circuits [B, len(group), T, R] in one shared basis."""


class StreamingMaps:
    """Teacher maps applied through attention kernels, never materialised."""

    def __init__(self, queries: Tensor, keys: Tensor, attention_mask: Tensor | None, scale: float):
        self.queries, self.keys, self.mask, self.scale = queries, keys, attention_mask, scale
        self.fused = is_right_padded(attention_mask)

    def apply(self, heads: list[int], values: Tensor) -> Tensor:
        q, k = self.queries[:, heads], self.keys[:, heads]
        if self.fused:
            return self._fused(q, k, values)
        out = torch.empty_like(values)
        length = q.shape[2]
        for start in range(0, length, WEIGHTS_BLOCK_SIZE):
            end = min(length, start + WEIGHTS_BLOCK_SIZE)
            scores = (q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)) * self.scale
            scores = scores.masked_fill(~allowed_keys(self.mask, start, end, q.device), float("-inf"))
            out[:, :, start:end] = scores.softmax(dim=-1) @ values[:, :, :end]
        return out

    def _fused(self, q: Tensor, k: Tensor, values: Tensor) -> Tensor:
        """Causal attention through the fused kernels, which need values of the query head dim.

        Wider values are cut into head-dim chunks that become extra heads of one call; otherwise
        the kernels fall back to the math path, which builds the [T, T] map.
        """
        batch, heads, length, width = values.shape
        head_dim = q.shape[-1]
        chunks = -(-width // head_dim)
        chunked = F.pad(values, (0, chunks * head_dim - width)).view(batch, heads, length, chunks, head_dim)
        chunked = chunked.transpose(2, 3).reshape(batch, heads * chunks, length, head_dim)
        out = F.scaled_dot_product_attention(
            q.repeat_interleave(chunks, dim=1), k.repeat_interleave(chunks, dim=1), chunked,
            is_causal=True, scale=self.scale,
        )
        out = out.view(batch, heads, chunks, length, head_dim).transpose(2, 3).reshape(batch, heads, length, -1)
        return out[..., :width]


@dataclass
class _MergedHead:
    """A head of some merge round: a weighted set of teacher maps and the summed circuit."""

    members: tuple[int, ...]
    member_weights: Tensor  # [B, len(members)]
    circuit: Tensor  # [B, T, R]


def walk_plan(
    plan: SqueezePlan, maps: MapOperator, circuits: CircuitFn, rows: Tensor, objective: str
) -> Tensor:
    """Runs the merge rounds of a "pairwise" or "group" plan and returns W [B, N, M]."""
    batch = rows.shape[0]
    ones = torch.ones(batch, 1, dtype=rows.dtype, device=rows.device)
    heads: list[_MergedHead | None] = [None] * plan.num_teacher_heads
    for group in plan.groups:
        group_circuits = circuits(group)
        for i, head in enumerate(group):
            heads[head] = _MergedHead((head,), ones, group_circuits[:, i])
    for round_groups in plan.rounds:
        heads = [
            heads[g[0]] if len(g) == 1 else _merge([heads[i] for i in g], maps, rows, objective)
            for g in round_groups
        ]
    weights = torch.zeros(batch, plan.num_student_heads, plan.num_teacher_heads, dtype=rows.dtype, device=rows.device)
    for n, head in enumerate(heads):
        weights[:, n, list(head.members)] = head.member_weights
    return weights


def _merge(heads: list[_MergedHead], maps: MapOperator, rows: Tensor, objective: str) -> _MergedHead:
    """Merges heads into one with simplex weights chosen by the reconstruction objective."""
    members = [m for h in heads for m in h.members]
    owner = [i for i, h in enumerate(heads) for _ in h.members]
    # ownership[b, h, a] = weight of member a inside merged head h (zero for other heads' members)
    ownership = torch.zeros(rows.shape[0], len(heads), len(members), dtype=rows.dtype, device=rows.device)
    start = 0
    for i, h in enumerate(heads):
        ownership[:, i, start : start + len(h.members)] = h.member_weights
        start += len(h.members)
    circuit = sum(h.circuit for h in heads)
    if objective == "output":
        # target: sum_h A_h X_h; candidates: A_h (sum_h X_h)
        values = torch.stack([torch.cat([circuit, heads[o].circuit], dim=-1) for o in owner], dim=1)
        on_all, on_own = maps.apply(members, values).chunk(2, dim=-1)
        candidates = torch.einsum("bha,batr->bhtr", ownership, on_all)[:, :, None]
        targets = torch.einsum("ba,batr->btr", ownership.sum(dim=1), on_own)[:, None]
    else:
        # targets: A_j X_j for each head j; candidates: A_h X_j
        per_circuit = [
            torch.einsum("bha,batr->bhtr", ownership, maps.apply(members, h.circuit[:, None].expand(-1, len(members), -1, -1)))
            for h in heads
        ]
        candidates = torch.stack(per_circuit, dim=2)
        targets = torch.stack([per_circuit[j][:, j] for j in range(len(heads))], dim=1)
    mix = _solve(candidates, targets, rows)
    return _MergedHead(
        tuple(members), (ownership * mix[:, :, None]).sum(dim=1), circuit
    )


def _solve(candidates: Tensor, targets: Tensor, rows: Tensor) -> Tensor:
    """Simplex weights over heads minimising sum_j ||targets_j - sum_h w_h candidates_{h,j}||^2.

    candidates [B, H, J, T, R], targets [B, J, T, R]; only valid query rows count.
    """
    row_weight = rows[:, None, :, None]
    reference = candidates[:, -1]
    centred = (candidates[:, :-1] - reference[:, None]) * row_weight[:, None]
    residual = (targets - reference) * row_weight
    gram = torch.einsum("bkjtr,bljtr->bkl", centred, centred).double()
    cross = torch.einsum("bkjtr,bjtr->bk", centred, residual).double()
    return simplex_least_squares(gram, cross).to(rows.dtype)


def constant_weights(plan: SqueezePlan, batch: int, dtype: torch.dtype, device) -> Tensor:
    """W for plans that need no maps: identity, "mean" (equal weights), "select" (first head)."""
    weights = torch.zeros(batch, plan.num_student_heads, plan.num_teacher_heads, dtype=dtype, device=device)
    for n, group in enumerate(plan.groups):
        if plan.name == "select":
            weights[:, n, group[0]] = 1.0
        else:
            weights[:, n, list(group)] = 1.0 / len(group)
    return weights


def needs_maps(plan: SqueezePlan) -> bool:
    """Whether the plan's weights depend on the input (and so on the teacher's maps)."""
    return plan.name in ("pairwise", "group") and bool(plan.rounds)


def check_teacher_inputs(q: Tensor, k: Tensor, v: Tensor, o_proj_weight: Tensor | None, objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown squeeze objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("teacher q, k, v must be [B, heads, T, head_dim] tensors")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"teacher shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(expected q [B, M, T, d], k and v [B, M_kv, T, d])"
        )
    if o_proj_weight is not None and tuple(o_proj_weight.shape[1:]) != (q.shape[1] * v.shape[-1],):
        raise ValueError(
            f"o_proj_weight has shape {tuple(o_proj_weight.shape)}, expected [d_model, {q.shape[1] * v.shape[-1]}] "
            f"(num_teacher_heads x head_dim = {q.shape[1]} x {v.shape[-1]}), i.e. nn.Linear.weight of o_proj"
        )


def reduced_circuits(values: Tensor, o_proj_weight: Tensor | None, group: tuple[int, ...]) -> Tensor:
    """Circuits X_i = V_i W_O^(i)T of a group in an orthonormal basis of the group's o_proj columns.

    With W_S = Q R (reduced QR of the group's columns), X_i = V_i R_i^T Q^T and Q has orthonormal
    columns, so V_i R_i^T has exactly the inner products of X_i in min(d_model, |S| d) dimensions.
    Without o_proj (value-space variant) the circuits are the values themselves.
    """
    group_values = values[:, list(group)]
    if o_proj_weight is None:
        return group_values
    head_dim = values.shape[-1]
    columns = torch.cat([o_proj_weight[:, h * head_dim : (h + 1) * head_dim] for h in group], dim=1)
    _, r = torch.linalg.qr(columns.double(), mode="reduced")
    blocks = r.to(values.dtype).reshape(r.shape[0], len(group), head_dim).permute(1, 2, 0)  # [|S|, d, r]
    return torch.einsum("bstd,sdr->bstr", group_values, blocks)


def squeeze_weights(
    teacher_q: Tensor,
    teacher_k: Tensor,
    teacher_v: Tensor,
    o_proj_weight: Tensor | None,
    num_student_heads: int,
    *,
    plan: str = "pairwise",
    objective: str = "output",
    attention_mask: Tensor | None = None,
) -> Tensor:
    """The mixing matrix W [B, N, M] of one layer (rows non-negative, summing to 1).

    teacher_q [B, M, T, d] after rotary embedding; teacher_k and teacher_v [B, M_kv, T, d] before
    grouped-query repetition; o_proj_weight the layer's `o_proj.weight` ([d_model, M*d]) or None
    for the value-space variant. Computed without autograd in float32 (float64 when the inputs
    are), using O(T * d) memory per head: no [T, T] map is built.
    """
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, objective)
    batch, num_heads, length, head_dim = teacher_q.shape
    check_mask(attention_mask, batch, length)
    structure = squeeze_plan(num_heads, num_student_heads, plan)
    dtype = compute_dtype(teacher_q, teacher_k, teacher_v)
    if not needs_maps(structure):
        return constant_weights(structure, batch, dtype, teacher_q.device)
    with torch.no_grad():
        queries = teacher_q.to(dtype)
        keys = repeat_kv(teacher_k, num_heads).to(dtype)
        values = repeat_kv(teacher_v, num_heads).to(dtype)
        maps = StreamingMaps(queries, keys, attention_mask, head_dim**-0.5)
        rows = valid_rows(attention_mask, batch, length, dtype, teacher_q.device)
        return walk_plan(
            structure, maps, lambda group: reduced_circuits(values, o_proj_weight, group), rows, objective
        )
