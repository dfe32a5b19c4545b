"""Squeeze weights: the mixing matrix W [B, N, M] that turns M teacher maps into N targets.

Student head n's target map is sum_m W[b, n, m] * A_m. For the "pairwise" and "group" plans the
weights are chosen per sequence so that one merged map, applied to the merged heads' combined
value-output circuit, best reproduces what the heads add to the residual stream (shd-method.md).

Everything needed is an attention map applied to some circuit, A_a X, so no [T, T] map is ever
formed: per final group, one scaled-dot-product attention call applies each member's map to the
value heads the group reads (head a's queries and keys on head b's values), and every A_a X_b
follows by a small matrix product, since X_b = V_b W_O^(b)T. The output columns are first reduced
to an orthonormal basis of the group's W_O columns (QR), which preserves every inner product the
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
from .simplex import best_vertex, simplex_least_squares

OBJECTIVES = ("output", "per_head")
""""output": one merged map on the merged circuit reproduces the heads' summed output (paper).
"per_head": the merged map reproduces each head's own output on its own circuit."""

SELECTIONS = ("soft", "hard")
""""soft": the optimal weights on the simplex; "hard": snapped to the best single head of each
merge (dynamic selection by the same reconstruction objective, per sequence)."""

WEIGHTS_BLOCK_SIZE = 128
"""Query rows per block when maps must be applied with an explicit (non right-padded) mask."""


class MapOperator(Protocol):
    """Applies teacher attention maps to values: the only access the weights need to the maps."""

    def apply(self, heads: list[int], values: Tensor) -> Tensor:
        """A_h @ values for every h in heads: values [B, T, W] -> [B, len(heads), T, W]."""
        ...


@dataclass(frozen=True)
class GroupCircuits:
    """The value-output circuits of one final group, factored through the group's value heads.

    Head b's circuit is X_b = values @ lifts[i] for b = group[i]: `values` [B, T, U*d] stacks the
    U distinct value heads the group reads, and `lifts[i]` [U*d, R] holds W_O^(b)T (or an
    equivalent basis of it) in the rows of b's value head. So A_a X_b = (A_a values) @ lifts[i]:
    the maps only ever touch the U*d value columns, however wide d_model is.
    """

    values: Tensor
    lifts: Tensor


CircuitFn = Callable[[tuple[int, ...]], GroupCircuits]
"""Gives a final group of teacher heads its circuits."""


class StreamingMaps:
    """Teacher maps applied through attention kernels, never materialised."""

    def __init__(self, queries: Tensor, keys: Tensor, attention_mask: Tensor | None, scale: float):
        self.queries, self.keys, self.mask, self.scale = queries, keys, attention_mask, scale
        self.fused = is_right_padded(attention_mask)

    def apply(self, heads: list[int], values: Tensor) -> Tensor:
        q, k = self.queries[:, heads], self.keys[:, heads]
        values = values[:, None].expand(-1, len(heads), -1, -1)
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
    """A head of some merge round: a weighted set of teacher maps and the summed circuit.

    Maps are linear, so the merged map applied to the group's values, A_h @ values, is the
    weighted sum of its members' and is carried along instead of the members' own outputs.
    """

    members: tuple[int, ...]
    member_weights: Tensor  # [B, len(members)]
    attended: Tensor  # [B, T, U*d]: A_h @ values
    circuit: Tensor  # [U*d, R]: the summed lifts of the members (X_h = values @ circuit)


def walk_plan(
    plan: SqueezePlan, maps: MapOperator, circuits: CircuitFn, rows: Tensor, objective: str, selection: str
) -> Tensor:
    """Runs the merge rounds of a "pairwise" or "group" plan and returns W [B, N, M]."""
    batch = rows.shape[0]
    ones = torch.ones(batch, 1, dtype=rows.dtype, device=rows.device)
    heads: list[_MergedHead | None] = [None] * plan.num_teacher_heads
    for group in plan.groups:
        group_circuits = circuits(group)
        attended = maps.apply(list(group), group_circuits.values)
        for i, head in enumerate(group):
            heads[head] = _MergedHead((head,), ones, attended[:, i], group_circuits.lifts[i])
    for round_groups in plan.rounds:
        heads = [
            heads[g[0]] if len(g) == 1 else _merge([heads[i] for i in g], rows, objective, selection)
            for g in round_groups
        ]
    weights = torch.zeros(batch, plan.num_student_heads, plan.num_teacher_heads, dtype=rows.dtype, device=rows.device)
    for n, head in enumerate(heads):
        weights[:, n, list(head.members)] = head.member_weights
    return weights


def _merge(heads: list[_MergedHead], rows: Tensor, objective: str, selection: str) -> _MergedHead:
    """Merges heads into one with simplex weights chosen by the reconstruction objective."""
    circuit = sum(h.circuit for h in heads)
    if objective == "output":
        # target: sum_h A_h X_h; candidates: A_h (sum_h X_h)
        candidates = torch.stack([h.attended @ circuit for h in heads], dim=1)[:, :, None]
        targets = sum(h.attended @ h.circuit for h in heads)[:, None]
    else:
        # targets: A_j X_j for each head j; candidates: A_h X_j
        candidates = torch.stack([torch.stack([h.attended @ j.circuit for j in heads], dim=1) for h in heads], dim=1)
        targets = torch.stack([candidates[:, j, j] for j in range(len(heads))], dim=1)
    mix = _solve(candidates, targets, rows, hard=selection == "hard")
    return _MergedHead(
        members=sum((h.members for h in heads), ()),
        member_weights=torch.cat([h.member_weights * mix[:, i : i + 1] for i, h in enumerate(heads)], dim=1),
        attended=sum(h.attended * mix[:, i, None, None] for i, h in enumerate(heads)),
        circuit=circuit,
    )


def _solve(candidates: Tensor, targets: Tensor, rows: Tensor, hard: bool) -> Tensor:
    """Simplex weights over heads minimising sum_j ||targets_j - sum_h w_h candidates_{h,j}||^2.

    candidates [B, H, J, T, R], targets [B, J, T, R]; only valid query rows count. `hard`
    restricts the weights to the simplex's vertices (one head).
    """
    row_weight = rows[:, None, :, None]
    reference = candidates[:, -1]
    centred = (candidates[:, :-1] - reference[:, None]) * row_weight[:, None]
    residual = (targets - reference) * row_weight
    gram = torch.einsum("bkjtr,bljtr->bkl", centred, centred).double()
    cross = torch.einsum("bkjtr,bjtr->bk", centred, residual).double()
    # differences below ~1000 ulps of the candidates' own size are rounding, not signal
    scale = (candidates * row_weight[:, None]).pow(2).sum(dim=(2, 3, 4)).amax(dim=1).double()
    tolerance = (1e3 * torch.finfo(rows.dtype).eps) ** 2 * scale
    solver = best_vertex if hard else simplex_least_squares
    return solver(gram, cross, tolerance).to(rows.dtype)


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


def check_teacher_inputs(
    q: Tensor, k: Tensor, v: Tensor, o_proj_weight: Tensor | None, objective: str, selection: str
) -> None:
    """Refuses unknown options and inconsistent teacher shapes, naming the expected ones."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown squeeze objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown squeeze selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
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


def circuit_maps(o_proj_weight: Tensor | None, group: tuple[int, ...], head_dim: int, dtype: torch.dtype, *, reduce: bool) -> Tensor:
    """Each group head's output map [|S|, d, R]: X_b = V_b @ maps[b].

    W_O^(b)T itself when `reduce` is False (R = d_model). With `reduce`, the group's columns
    W_S = Q R are replaced by R's blocks: Q has orthonormal columns, so this keeps every inner
    product between the group's circuits in min(d_model, |S| d) dimensions. Without o_proj (the
    value-space variant) each circuit is its head's values (identity maps).
    """
    if o_proj_weight is None:
        return torch.eye(head_dim, dtype=dtype, device="cpu").expand(len(group), -1, -1)
    columns = torch.cat([o_proj_weight[:, h * head_dim : (h + 1) * head_dim] for h in group], dim=1)
    if not reduce:
        return columns.T.reshape(len(group), head_dim, -1).to(dtype)
    _, r = torch.linalg.qr(columns.to(dtype), mode="reduced")
    return r.reshape(r.shape[0], len(group), head_dim).permute(1, 2, 0)


def group_circuits(values: Tensor, group: tuple[int, ...], num_heads: int, head_maps: Tensor) -> GroupCircuits:
    """Factors a group's circuits through the value heads it reads (see `GroupCircuits`).

    values: [B, H_kv, T, d] before grouped-query repetition; head_maps from `circuit_maps`.
    """
    batch, num_kv, length, head_dim = values.shape
    per_kv = num_heads // num_kv
    kv_heads = sorted({h // per_kv for h in group})
    stacked = values[:, kv_heads].permute(0, 2, 1, 3).reshape(batch, length, len(kv_heads) * head_dim)
    lifts = values.new_zeros(len(group), len(kv_heads) * head_dim, head_maps.shape[-1])
    for i, head in enumerate(group):
        slot = kv_heads.index(head // per_kv)
        lifts[i, slot * head_dim : (slot + 1) * head_dim] = head_maps[i]
    return GroupCircuits(stacked, lifts)


def circuit_fn(values: Tensor, o_proj_weight: Tensor | None, num_heads: int, *, reduce: bool) -> CircuitFn:
    """The circuits of each final group, reduced to the QR basis or in full d_model dimensions."""

    def circuits(group: tuple[int, ...]) -> GroupCircuits:
        head_maps = circuit_maps(o_proj_weight, group, values.shape[-1], values.dtype, reduce=reduce)
        return group_circuits(values, group, num_heads, head_maps.to(values.device))

    return circuits


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
    selection: str = "soft",
) -> Tensor:
    """The mixing matrix W [B, N, M] of one layer (rows non-negative, summing to 1).

    teacher_q [B, M, T, d] after rotary embedding; teacher_k and teacher_v [B, M_kv, T, d] before
    grouped-query repetition; o_proj_weight the layer's `o_proj.weight` ([d_model, M*d]) or None
    for the value-space variant. `selection="hard"` snaps every merge to its best single head
    (rows of W are then one-hot). Computed without autograd in float32 (float64 when the inputs
    are), using O(T * d) memory per head: no [T, T] map is built.
    """
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, objective, selection)
    batch, num_heads, length, head_dim = teacher_q.shape
    check_mask(attention_mask, batch, length)
    structure = squeeze_plan(num_heads, num_student_heads, plan)
    dtype = compute_dtype(teacher_q, teacher_k, teacher_v)
    if not needs_maps(structure):
        return constant_weights(structure, batch, dtype, teacher_q.device)
    with torch.no_grad():
        queries = teacher_q.to(dtype)
        keys = repeat_kv(teacher_k, num_heads).to(dtype)
        values = teacher_v.to(dtype)
        maps = StreamingMaps(queries, keys, attention_mask, head_dim**-0.5)
        rows = valid_rows(attention_mask, batch, length, dtype, teacher_q.device)
        circuits = circuit_fn(values, o_proj_weight, num_heads, reduce=True)
        return walk_plan(structure, maps, circuits, rows, objective, selection)
