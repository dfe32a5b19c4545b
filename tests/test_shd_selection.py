"""Static head selection (pipeline.shd.selection): the calibration costs against a dense
computation from full maps, and their agreement with SHD's own dynamic hard selection."""

import pytest
import torch

from pipeline.shd import attention_maps, squeeze_plan, squeeze_weights
from pipeline.shd.selection import pick_heads, selection_costs
from tests.shd_cases import make_case


def _dense_costs(case, num_student_heads: int, criterion: str) -> torch.Tensor:
    """The documented costs from [T, T] maps and explicit circuits X_i = V_kv(i) W_O^(i)^T."""
    q, k, v, w_o, mask = case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, case.attention_mask
    batch, heads, length, dim = q.shape
    maps = attention_maps(q, k, mask)  # [B, M, T, T]
    values = v.repeat_interleave(heads // v.shape[1], dim=1)
    circuits = torch.stack([values[:, h] @ w_o[:, h * dim:(h + 1) * dim].T for h in range(heads)], 1)  # [B, M, T, D]
    rows = torch.ones(batch, length, dtype=q.dtype) if mask is None else mask.to(q.dtype)
    costs = torch.zeros(heads, dtype=torch.float64)
    for group in squeeze_plan(heads, num_student_heads, "select").groups:
        out = sum(maps[:, i] @ circuits[:, i] for i in group)
        combined = sum(circuits[:, i] for i in group)
        for m in group:
            if criterion == "reconstruct":
                diff = out - maps[:, m] @ combined
            else:
                diff = maps[:, m] @ circuits[:, m]
            energy = ((diff ** 2).sum(-1) * rows).sum()
            costs[m] = energy if criterion == "reconstruct" else -energy
    return costs


@pytest.mark.parametrize("criterion", ["reconstruct", "contribution"])
@pytest.mark.parametrize("heads,padding", [((8, 4, 4), "right"), ((16, 4, 4), "left"), ((9, 3, 2), None)],
                         ids=["8->4", "16->4", "9->2"])
def test_costs_equal_the_dense_computation(criterion, heads, padding):
    teacher, teacher_kv, student = heads
    case = make_case(batch=3, length=17, teacher_heads=teacher, teacher_kv_heads=teacher_kv, student_heads=student,
                     padding=padding, seed=5)
    got = selection_costs(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student,
                          criterion=criterion, attention_mask=case.attention_mask)
    want = _dense_costs(case, student, criterion)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # costs add over batches: the first two sequences plus the third are the whole batch
    split = [selection_costs(part.teacher_q, part.teacher_k, part.teacher_v, part.o_proj_weight, student,
                             criterion=criterion, attention_mask=part.attention_mask)
             for part in (case.rows(slice(0, 2)), case.rows(slice(2, 3)))]
    torch.testing.assert_close(split[0] + split[1], got, rtol=1e-12, atol=1e-9)


def test_reconstruct_picks_what_dynamic_hard_selection_picks_on_one_sequence():
    """On a single sequence the calibrated argmin is the per-sequence hard selection of the
    one-step group squeeze (the same objective at the simplex vertices)."""
    for seed in range(4):
        case = make_case(batch=1, length=19, teacher_heads=12, teacher_kv_heads=4, student_heads=3, padding=None,
                         seed=seed)
        costs = selection_costs(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3,
                                criterion="reconstruct")
        hard = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, plan="group",
                               selection="hard")
        plan = squeeze_plan(12, 3, "select")
        assert pick_heads(plan, costs) == tuple(int(h) for h in hard[0].argmax(-1))


def test_unknown_criterion_is_refused():
    case = make_case()
    with pytest.raises(ValueError, match="reconstruct, contribution"):
        selection_costs(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, criterion="entropy")
