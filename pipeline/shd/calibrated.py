"""Calibrated (static) mixing weights: the "pairwise" and "group" plans' W solved once, over a
calibration set, then fixed for the run.

Per sequence, SHD chooses W by least squares on each final group's Gram tensor <A_i X_x, A_j X_y>
(`weights.GroupGram`). That objective is a sum over query rows, so summed over every row of every
calibration sequence (and over ranks) it is the same objective for the whole set: the merge rounds
run once on the summed Gram tensors and give one W [N, M], the weights that best reproduce the
teacher's group outputs on average instead of per sequence (the static counterpart of the paper's
alpha, as calibrated "select" heads are of the hard selection). The statistics of one batch are
one flat float64 vector, so batches and ranks accumulate by adding vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import MapSpec, check_mask
from .plan import squeeze_plan
from .weights import GroupGram, check_teacher_inputs, constant_weights, merge_rounds, needs_maps, teacher_grams

PLANS = ("pairwise", "group")
"""Plans whose weights depend on the maps, and so can be calibrated."""


def gram_statistics(
    teacher_q: Tensor,
    teacher_k: Tensor,
    teacher_v: Tensor,
    o_proj_weight: Tensor | None,
    num_student_heads: int,
    *,
    plan: str,
    attention_mask: Tensor | None = None,
    head_outputs: Tensor | None = None,
    spec: MapSpec = MapSpec(),
) -> Tensor:
    """Every final group's Gram tensor summed over the batch, flattened into one float64 vector
    (shapes as `squeeze_weights`); vectors of different batches and ranks add up."""
    if plan not in PLANS:
        raise ValueError(f"calibrated mixing weights need plan {' or '.join(PLANS)}, got {plan!r}")
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, "output", "soft")
    batch, num_heads, length, _ = teacher_q.shape
    check_mask(attention_mask, batch, length)
    structure = squeeze_plan(num_heads, num_student_heads, plan)
    if not needs_maps(structure):
        return torch.zeros(0, dtype=torch.float64, device=teacher_q.device)
    grams = teacher_grams(teacher_q, teacher_k, teacher_v, o_proj_weight, structure, attention_mask, head_outputs, spec)
    return torch.cat([g.gram.sum(0).flatten() for g in grams])


def calibrated_weights(statistics: Tensor, num_teacher_heads: int, num_student_heads: int, *, plan: str,
                       objective: str = "output", selection: str = "soft") -> Tensor:
    """W [N, M] (float64) of the merge rounds run once on the summed Gram tensors of
    `gram_statistics` (rows non-negative, summing to 1)."""
    structure = squeeze_plan(num_teacher_heads, num_student_heads, plan)
    if not needs_maps(structure):
        return constant_weights(structure, 1, torch.float64, statistics.device)[0]
    sizes = [len(group) ** 4 for group in structure.groups]
    if statistics.numel() != sum(sizes):
        raise ValueError(f"calibration statistics have {statistics.numel()} values, expected {sum(sizes)} for "
                         f"{num_teacher_heads} -> {num_student_heads} heads under plan {plan!r}")
    grams = [GroupGram.of(group, part.view(1, *(len(group),) * 4))
             for group, part in zip(structure.groups, torch.split(statistics.double(), sizes))]
    return merge_rounds(structure, grams, objective, selection, torch.float64)[0]
