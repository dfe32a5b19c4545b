"""Static head selection: which teacher head of its group each student head distils under "select",
chosen once from a calibration set by a stated criterion.

Per final group G of the "select" plan (contiguous groups, as `squeeze_plan`), with A_i teacher
head i's map and X_i its value-output circuit (shd-method.md), summed over every valid row of
every calibration sequence:

- "reconstruct": E_m = || sum_{i in G} A_i X_i - A_m X_G ||^2 with X_G = sum_{i in G} X_i, the error
  of head m's map alone on the group's combined circuit: SHD's own "output" objective at a simplex
  vertex, i.e. the static counterpart of the dynamic hard selection (`selection="hard"`), which
  takes the same argmin per sequence;
- "contribution": -||A_m X_m||^2, the head with the largest output contribution.

Both are linear in the group's Gram tensor <A_i X_x, A_j X_y> (`weights.GroupGram`), so batches
and ranks are accumulated by adding costs, and no [T, T] map is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import MapSpec, check_mask
from .plan import SqueezePlan, squeeze_plan
from .weights import check_teacher_inputs, teacher_grams

CRITERIA = ("reconstruct", "contribution")
"""Calibrated selection criteria (lower cost = better head of its group)."""


def selection_costs(
    teacher_q: Tensor,
    teacher_k: Tensor,
    teacher_v: Tensor,
    o_proj_weight: Tensor | None,
    num_student_heads: int,
    *,
    criterion: str,
    attention_mask: Tensor | None = None,
    head_outputs: Tensor | None = None,
    spec: MapSpec = MapSpec(),
) -> Tensor:
    """Cost of each teacher head [M] (float64) as its group's single target, summed over the batch.

    Shapes as `squeeze_weights`; costs of different batches (and ranks) add up.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown selection criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    check_teacher_inputs(teacher_q, teacher_k, teacher_v, o_proj_weight, "output", "soft")
    batch, num_heads, length, _ = teacher_q.shape
    check_mask(attention_mask, batch, length)
    plan = squeeze_plan(num_heads, num_student_heads, "select")
    costs = torch.zeros(num_heads, dtype=torch.float64, device=teacher_q.device)
    with torch.no_grad():
        for gram in teacher_grams(teacher_q, teacher_k, teacher_v, o_proj_weight, plan, attention_mask,
                                  head_outputs, spec):
            group, g = gram.group, gram.gram.sum(0)
            own = torch.einsum("iijj->", g)  # ||sum_i A_i X_i||^2
            for m_index, head in enumerate(group):
                if criterion == "contribution":
                    costs[head] = -g[m_index, m_index, m_index, m_index]
                else:
                    cross = torch.einsum("iiy->", g[:, :, m_index])  # <sum_i A_i X_i, A_m X_G>
                    alone = g[m_index, :, m_index].sum()  # ||A_m X_G||^2
                    costs[head] = own - 2.0 * cross + alone
    return costs


def pick_heads(plan: SqueezePlan, costs: Tensor) -> tuple[int, ...]:
    """The least-cost head of each group (the first among equals, as "select" without calibration)."""
    return tuple(group[int(torch.argmin(costs[list(group)]))] for group in plan.groups)
