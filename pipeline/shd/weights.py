"""Squeeze weights: the mixing matrix W [B, N, M] that turns M teacher maps into N targets.

Student head n's target map is sum_m W[b, n, m] * A_m. For the "pairwise" and "group" plans the
weights are chosen per sequence so that one merged map, applied to the merged heads' combined
value-output circuit, best reproduces what the heads add to the residual stream (shd-method.md).

Everything needed is an inner product between attention maps applied to circuits, <A_a X_x,
A_b X_y>, so no [T, T] map is ever formed. Per final group, one scaled-dot-product attention call
applies each member's map to the value heads the group reads (head a's queries and keys on head
b's values); a head's map on its own value head is the teacher's attention output, which the
engine passes in (`head_outputs`), so with grouped-query attention there is no call at all. All
inner products the merges need are then reduced over T once, into one small Gram tensor per group
(`GroupGram`), and every merge round works on that tensor alone. Output columns are reduced to an
orthonormal basis of the group's W_O columns (QR), which keeps every inner product while shrinking
d_model to at most (group size x head dim).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .masking import (
    MapSpec,
    allowed_keys,
    check_mask,
    compute_dtype,
    first_key,
    is_right_padded,
    tensor_sum,
    valid_rows,
)
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


@dataclass(frozen=True)
class GroupCircuits:
    """The value-output circuits of one final group, factored through the group's value heads.

    `values` [B, T, U*d] stacks the U distinct value heads the group reads (`kv_heads`, in
    order); head b = group[i] reads slot `slots[i]` of it, and its circuit is X_b = V_b @
    head_maps[i] with head_maps[i] [d, R] = W_O^(b)T (or an equivalent basis of it). So A_a X_b =
    (A_a values)[slot of b] @ head_maps[i]: the maps only ever touch the U*d value columns,
    however wide d_model is.
    """

    values: Tensor
    kv_heads: tuple[int, ...]
    slots: tuple[int, ...]
    head_maps: Tensor


CircuitFn = Callable[[tuple[int, ...]], GroupCircuits]
"""Gives a final group of teacher heads its circuits."""


class StreamingMaps:
    """Teacher maps applied through attention kernels, never materialised.

    `head_outputs` [B, M, T, d], when given, are the teacher's own attention outputs A_h V_kv(h)
    (what its o_proj reads): those columns are taken from it instead of computed again, so a
    group that reads a single value head (grouped-query attention) needs no attention call.
    A sliding `window` (None = none) is applied in blocks of rows, keys cut to the window.
    """

    def __init__(self, queries: Tensor, keys: Tensor, attention_mask: Tensor | None, scale: float,
                 head_outputs: Tensor | None = None, window: int | None = None):
        """queries [B, M, T, d]; keys [B, M_kv, T, d] before grouped-query repetition."""
        self.queries, self.keys, self.mask, self.scale = queries, keys, attention_mask, scale
        self.window = MapSpec(window=window).window_for(queries.shape[2])
        self.fused = is_right_padded(attention_mask) and self.window is None
        self.head_outputs = head_outputs
        self.per_kv = queries.shape[1] // keys.shape[1]

    def apply(self, heads: list[int], circuits: GroupCircuits) -> Tensor:
        """A_h @ circuits.values for every h in heads: [B, len(heads), T, U*d]."""
        values, kv_heads = circuits.values, circuits.kv_heads
        if self.head_outputs is None:
            return self._attend(heads, values[:, None].expand(-1, len(heads), -1, -1))
        batch, length, _ = values.shape
        width = self.head_outputs.shape[-1]
        slots = values.view(batch, length, len(kv_heads), width)
        own = [kv_heads.index(h // self.per_kv) for h in heads]
        out = values.new_empty(batch, len(heads), length, len(kv_heads), width)
        for i, (head, slot) in enumerate(zip(heads, own)):
            out[:, i, :, slot] = self.head_outputs[:, head]
        if len(kv_heads) > 1:  # every other value head of the group, per head, in one call
            others = [[u for u in range(len(kv_heads)) if u != o] for o in own]
            other_values = torch.stack([slots[:, :, idx] for idx in others], dim=1)  # [B, H, T, U-1, d]
            attended = self._attend(heads, other_values.flatten(3))
            for i, idx in enumerate(others):
                out[:, i][:, :, idx] = attended[:, i].view(batch, length, len(idx), width)
        return out.flatten(3)

    def _attend(self, heads: list[int], values: Tensor) -> Tensor:
        """A_h @ values[:, i] for h = heads[i]: values [B, len(heads), T, W]."""
        q, k = self.queries[:, heads], self.keys[:, [h // self.per_kv for h in heads]]
        if self.fused:
            return self._fused(q, k, values)
        out = torch.empty_like(values)
        length = q.shape[2]
        for start in range(0, length, WEIGHTS_BLOCK_SIZE):
            end = min(length, start + WEIGHTS_BLOCK_SIZE)
            first = first_key(start, self.window)
            scores = (q[:, :, start:end] @ k[:, :, first:end].transpose(-1, -2)) * self.scale
            hidden = ~allowed_keys(self.mask, start, end, q.device, self.window, first)
            out[:, :, start:end] = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1) @ values[:, :, first:end]
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
    """A head of some merge round, inside one final group of S teacher heads.

    Maps are linear, so its map is sum_i coef[:, i] A_i over the group's heads, and its circuit
    is the sum of its members' circuits. Everything the objective needs is then an inner product
    of such terms, read off the group's Gram tensor (`GroupGram`), so merging costs nothing that
    grows with T.
    """

    gram: GroupGram
    coef: Tensor  # [B, S], float64
    circuit: Tensor  # [S], float64: which members' circuits it sums


class GroupGram:
    """Every inner product the merges of one final group need, once, in float64.

    G[b, i, x, j, y] = <A_i X_x, A_j X_y> over the valid rows of sequence b, for heads i, x, j, y
    of the group (S of them). A circuit that is a sum of member circuits is a 0/1 vector over the
    group, and every inner product of merged heads is a small contraction of G.

    Two ways to the same G, the cheaper one is used: "values" reduces over T once in the space
    of the U value heads the group reads ((S U d)^2 T work: best with grouped-query attention,
    U = 1), then maps blocks through W_O; "circuits" forms the S^2 products A_i X_x [T, R] and
    reduces those (S^2 d R T + S^4 R T: best when every head has its own value head). Rows are
    taken in chunks, so extra memory stays O(S^2 * chunk * R).
    """

    ROWS_PER_CHUNK = 256

    def __init__(self, group: tuple[int, ...], attended: Tensor, circuits: GroupCircuits, rows: Tensor,
                 method: str = "auto"):
        size, head_dim, rank = circuits.head_maps.shape
        width = attended.shape[-1]
        if method == "auto":
            values_cheaper = width * width * size * size <= size**2 * head_dim * rank + size**4 * rank
            method = "values" if values_cheaper else "circuits"
        # rows are 0/1, so weighting one factor weights the product
        attended = attended * rows[:, None, :, None]
        self.group = group
        self.gram = (self._by_values if method == "values" else self._by_circuits)(attended, circuits)

    def _by_values(self, attended: Tensor, circuits: GroupCircuits) -> Tensor:
        batch, size, length, width = attended.shape
        head_dim = circuits.head_maps.shape[1]
        flat = attended.transpose(1, 2).reshape(batch, length, size * width).double()
        values_gram = (flat.transpose(1, 2) @ flat).view(batch, size, width // head_dim, head_dim,
                                                          size, width // head_dim, head_dim)
        slots = list(circuits.slots)
        blocks = values_gram[:, :, slots][:, :, :, :, :, slots]  # [B, i, x, u, j, y, v]
        maps = circuits.head_maps.double()
        kernel = torch.einsum("xur,yvr->xyuv", maps, maps)
        return torch.einsum("bixujyv,xyuv->bixjy", blocks, kernel)

    def _by_circuits(self, attended: Tensor, circuits: GroupCircuits) -> Tensor:
        batch, size, length, _ = attended.shape
        head_dim = circuits.head_maps.shape[1]
        gram = torch.zeros(batch, size * size, size * size, dtype=torch.float64, device=attended.device)
        for start in range(0, length, self.ROWS_PER_CHUNK):
            chunk = attended[:, :, start : start + self.ROWS_PER_CHUNK]
            products = torch.stack([  # [B, S (map i), S (circuit x), chunk, R]
                chunk[..., slot * head_dim : (slot + 1) * head_dim] @ circuits.head_maps[x]
                for x, slot in enumerate(circuits.slots)
            ], dim=2).flatten(1, 2).flatten(2).double()
            gram += products @ products.transpose(1, 2)
        return gram.view(batch, size, size, size, size)

    @classmethod
    def of(cls, group: tuple[int, ...], gram: Tensor) -> GroupGram:
        """A group's Gram tensor [B, S, S, S, S] given as it is (e.g. summed over a calibration set)."""
        out = cls.__new__(cls)
        out.group, out.gram = tuple(group), gram
        return out

    def between(self, left: Tensor, right: Tensor) -> Tensor:
        """H[b, i, j] = <A_i X_left, A_j X_right> for circuits given as 0/1 vectors [S] over the group."""
        return torch.einsum("bixjy,x,y->bij", self.gram, left, right)


def group_grams(plan: SqueezePlan, maps: StreamingMaps, circuits: CircuitFn, rows: Tensor) -> list[GroupGram]:
    """The Gram tensor of every final group of `plan`, in `plan.groups` order."""
    grams = []
    for group in plan.groups:
        group_circuits = circuits(group)
        grams.append(GroupGram(group, maps.apply(list(group), group_circuits), group_circuits, rows))
    return grams


def teacher_grams(teacher_q: Tensor, teacher_k: Tensor, teacher_v: Tensor, o_proj_weight: Tensor | None,
                  plan: SqueezePlan, attention_mask: Tensor | None, head_outputs: Tensor | None,
                  spec: MapSpec) -> list[GroupGram]:
    """The Gram tensor of every final group of `plan` from a layer's teacher inputs (shapes as
    `squeeze_weights`), computed without autograd at the inputs' compute dtype."""
    batch, num_heads, length, head_dim = teacher_q.shape
    dtype = compute_dtype(teacher_q, teacher_k, teacher_v)
    with torch.no_grad():
        maps = StreamingMaps(teacher_q.to(dtype), teacher_k.to(dtype), attention_mask, spec.scale_for(head_dim),
                             None if head_outputs is None else head_outputs.to(dtype), window=spec.window)
        rows = valid_rows(attention_mask, batch, length, dtype, teacher_q.device)
        return group_grams(plan, maps, circuit_fn(teacher_v.to(dtype), o_proj_weight, num_heads), rows)


def merge_rounds(plan: SqueezePlan, grams: Sequence[GroupGram], objective: str, selection: str,
                 dtype: torch.dtype) -> Tensor:
    """Runs the merge rounds of a "pairwise" or "group" plan on its groups' Gram tensors (batch B
    of them: per sequence, or one summed over a calibration set) and returns W [B, N, M]."""
    batch, device = grams[0].gram.shape[0], grams[0].gram.device
    teacher_heads: dict[int, _MergedHead] = {}
    for gram in grams:
        one_hot = torch.eye(len(gram.group), dtype=torch.float64, device=device)
        for i, teacher_head in enumerate(gram.group):
            teacher_heads[teacher_head] = _MergedHead(gram, one_hot[i].expand(batch, -1), one_hot[i])
    heads = [teacher_heads[m] for m in range(plan.num_teacher_heads)]
    for round_groups in plan.rounds:
        heads = [
            heads[g[0]] if len(g) == 1 else _merge([heads[i] for i in g], objective, selection, dtype)
            for g in round_groups
        ]
    weights = torch.zeros(batch, plan.num_student_heads, plan.num_teacher_heads, dtype=dtype, device=device)
    for n, head in enumerate(heads):
        weights[:, n, list(head.gram.group)] = head.coef.to(dtype)
    return weights


def _merge(heads: list[_MergedHead], objective: str, selection: str, dtype: torch.dtype) -> _MergedHead:
    """Merges heads into one with simplex weights chosen by the reconstruction objective.

    Candidates are the heads' maps applied to a circuit: "output" reproduces the heads' summed
    output, sum_h A_h X_h, with one merged map on the summed circuit; "per_head" reproduces each
    head's own output A_j X_j on its own circuit. Inner products are taken with the last candidate
    subtracted (its weight is 1 - the others'), as the simplex solver expects.
    """
    gram = heads[0].gram
    coef = torch.stack([h.coef for h in heads], dim=1)  # [B, K, S]
    centred = coef[:, :-1] - coef[:, -1:]
    circuit = tensor_sum(h.circuit for h in heads)
    if objective == "output":
        between = gram.between(circuit, circuit)
        own = torch.einsum("bkij,bkj->bki", torch.stack([gram.between(circuit, h.circuit) for h in heads], 1), coef)
        reach = own.sum(dim=1) - torch.einsum("bij,bj->bi", between, coef[:, -1])  # <., target - last>
        cross = torch.einsum("bki,bi->bk", centred, reach)
        quadratic = [between]
    else:
        quadratic = [gram.between(h.circuit, h.circuit) for h in heads]
        cross = tensor_sum(torch.einsum("bki,bij,bj->bk", centred, q, coef[:, j] - coef[:, -1])
                           for j, q in enumerate(quadratic))
    products = tensor_sum(torch.einsum("bki,bij,blj->bkl", centred, q, centred) for q in quadratic)
    norms = tensor_sum(torch.einsum("bki,bij,bkj->bk", coef, q, coef) for q in quadratic)
    # differences below ~1000 ulps of the candidates' own size are rounding, not signal
    tolerance = (1e3 * torch.finfo(dtype).eps) ** 2 * norms.amax(dim=1)
    solver = best_vertex if selection == "hard" else simplex_least_squares
    mix = solver(products, cross, tolerance)
    return _MergedHead(gram, torch.einsum("bk,bki->bi", mix, coef), circuit)


def constant_weights(plan: SqueezePlan, batch: int, dtype: torch.dtype, device: torch.device | str,
                     selected: Sequence[int] | None = None) -> Tensor:
    """W for plans that need no maps: identity, "mean" (equal weights), "select" (student head n
    distils teacher head `selected[n]`, default its group's first: `pipeline.shd.plan.selected_heads`).

    A selected head may be any teacher head, in its student head's group or not: a pruned student's
    head distils the head it was cut from (distill.select_heads=pruned), wherever that is."""
    weights = torch.zeros(batch, plan.num_student_heads, plan.num_teacher_heads, dtype=dtype, device=device)
    picks = tuple(group[0] for group in plan.groups) if selected is None else tuple(selected)
    if plan.name == "select" and (len(picks) != len(plan.groups)
                                  or not all(0 <= h < plan.num_teacher_heads for h in picks)):
        raise ValueError(f"selected heads {picks} do not name one teacher head (0..{plan.num_teacher_heads - 1}) "
                         f"for each of the {plan.num_student_heads} student heads")
    for n, group in enumerate(plan.groups):
        if plan.name == "select":
            weights[:, n, picks[n]] = 1.0
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


def circuit_maps(o_proj_weight: Tensor | None, group: tuple[int, ...], head_dim: int, dtype: torch.dtype) -> Tensor:
    """Each group head's output map [|S|, d, R]: X_b = V_b @ maps[b], up to a rotation.

    The group's W_O columns W_S = Q R are replaced by R's blocks: Q has orthonormal columns, so
    this keeps every inner product between the group's circuits in min(d_model, |S| d)
    dimensions. Without o_proj (the value-space variant) each circuit is its head's values.
    """
    if o_proj_weight is None:
        return torch.eye(head_dim, dtype=dtype, device="cpu").expand(len(group), -1, -1)
    columns = torch.cat([o_proj_weight[:, h * head_dim : (h + 1) * head_dim] for h in group], dim=1)
    r: Tensor = torch.linalg.qr(columns.to(dtype), mode="reduced").R  # torch.linalg's functions are typed Any
    return r.reshape(r.shape[0], len(group), head_dim).permute(1, 2, 0)


def group_circuits(values: Tensor, group: tuple[int, ...], num_heads: int, head_maps: Tensor) -> GroupCircuits:
    """Factors a group's circuits through the value heads it reads (see `GroupCircuits`).

    values: [B, H_kv, T, d] before grouped-query repetition; head_maps from `circuit_maps`.
    """
    batch, num_kv, length, head_dim = values.shape
    per_kv = num_heads // num_kv
    kv_heads = sorted({h // per_kv for h in group})
    stacked = values[:, kv_heads].permute(0, 2, 1, 3).reshape(batch, length, len(kv_heads) * head_dim)
    slots = tuple(kv_heads.index(h // per_kv) for h in group)
    return GroupCircuits(stacked, tuple(kv_heads), slots, head_maps)


def circuit_fn(values: Tensor, o_proj_weight: Tensor | None, num_heads: int) -> CircuitFn:
    """The circuits of each final group, in the group's QR basis."""

    def circuits(group: tuple[int, ...]) -> GroupCircuits:
        head_maps = circuit_maps(o_proj_weight, group, values.shape[-1], values.dtype)
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
    head_outputs: Tensor | None = None,
    spec: MapSpec = MapSpec(),
    selected: Sequence[int] | None = None,
) -> Tensor:
    """The mixing matrix W [B, N, M] of one layer (rows non-negative, summing to 1).

    teacher_q [B, M, T, d] after rotary embedding; teacher_k and teacher_v [B, M_kv, T, d] before
    grouped-query repetition; o_proj_weight the layer's `o_proj.weight` ([d_model, M*d]) or None
    for the value-space variant. `selection="hard"` snaps every merge to its best single head
    (rows of W are then one-hot). Computed without autograd in float32 (float64 when the inputs
    are), using O(T * d) memory per head: no [T, T] map is built. `spec` is the teacher layer's
    score scale and sliding window (default 1/sqrt(d), no window).

    head_outputs [B, M, T, d]: optionally, the teacher's attention output per head for the same
    q, k, v and mask (the input of its o_proj). Each head's map applied to its own value head is
    then read from it instead of computed again, which removes all attention calls here for a
    grouped-query teacher whose final groups each read one value head; at the teacher's precision
    (bf16 outputs carry ~3 significant digits into W).

    selected: under plan "select", the teacher head each student head distils (default: its
    group's first; `pipeline.shd.plan.selected_heads`; any teacher head, see `constant_weights`).
    """
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, objective, selection)
    batch, num_heads, length, head_dim = teacher_q.shape
    check_mask(attention_mask, batch, length)
    if head_outputs is not None and tuple(head_outputs.shape) != (batch, num_heads, length, teacher_v.shape[-1]):
        raise ValueError(f"head_outputs has shape {tuple(head_outputs.shape)}, expected [B, M, T, d] = "
                         f"[{batch}, {num_heads}, {length}, {teacher_v.shape[-1]}] (the teacher's attention "
                         "output per head, before o_proj)")
    structure = squeeze_plan(num_heads, num_student_heads, plan)
    dtype = compute_dtype(teacher_q, teacher_k, teacher_v)
    if not needs_maps(structure):
        return constant_weights(structure, batch, dtype, teacher_q.device, selected)
    grams = teacher_grams(teacher_q, teacher_k, teacher_v, o_proj_weight, structure, attention_mask, head_outputs, spec)
    with torch.no_grad():
        return merge_rounds(structure, grams, objective, selection, dtype)
