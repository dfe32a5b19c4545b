"""Calibrated (static) mixing weights (pipeline.shd.calibrated): the per-sequence weights on one
sequence, additive statistics, and the least summed reconstruction error over several sequences,
checked on dense [T, T] maps."""

import pytest
import torch

from pipeline.shd import attention_maps, squeeze_plan, squeeze_weights
from pipeline.shd.calibrated import calibrated_weights, gram_statistics
from tests.shd_cases import make_case


def _stats(case, student, plan):
    return gram_statistics(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight,
                           student, plan=plan, attention_mask=case.attention_mask)


@pytest.mark.parametrize("plan", ["pairwise", "group"])
@pytest.mark.parametrize("heads,padding", [((8, 4, 4), "right"), ((12, 4, 3), "left"), ((9, 3, 2), None)],
                         ids=["8->4", "12->3", "9->2"])
def test_one_sequence_gives_its_per_sequence_weights_and_statistics_add_up(plan, heads, padding):
    teacher, teacher_kv, student = heads
    case = make_case(batch=3, length=17, teacher_heads=teacher, teacher_kv_heads=teacher_kv, student_heads=student,
                     padding=padding, seed=3)
    for b in range(3):
        one = case.rows(slice(b, b + 1))
        got = calibrated_weights(_stats(one, student, plan), teacher, student, plan=plan)
        want = squeeze_weights(one.teacher_q, one.teacher_k, one.teacher_v, one.o_proj_weight,
                               student, plan=plan, attention_mask=one.attention_mask)[0]
        torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=1e-8)
    whole = _stats(case, student, plan)
    parts = [_stats(case.rows(s), student, plan) for s in (slice(0, 2), slice(2, 3))]
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-9)
    w = calibrated_weights(whole, teacher, student, plan=plan)
    assert w.shape == (student, teacher) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(student, dtype=torch.float64))


def _summed_error(case, group, weights):
    """sum over sequences and valid rows of || sum_i A_i X_i - (sum_i w_i A_i) X_G ||^2 (dense)."""
    q, k, v, w_o, mask = case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, case.attention_mask
    heads, dim = q.shape[1], q.shape[-1]
    maps = attention_maps(q, k, mask)
    values = v.repeat_interleave(heads // v.shape[1], dim=1)
    circuits = {h: values[:, h] @ w_o[:, h * dim:(h + 1) * dim].T for h in group}
    out = sum(maps[:, i] @ circuits[i] for i in group)
    merged = sum(weights[i] * maps[:, i] for i in group) @ sum(circuits.values())
    rows = torch.ones(q.shape[0], q.shape[2], dtype=q.dtype) if mask is None else mask.to(q.dtype)
    return float((((out - merged) ** 2).sum(-1) * rows).sum())


def test_calibrated_weights_minimise_the_error_summed_over_sequences():
    """Group plan (one merge per student head): the calibrated row of W has the least error summed
    over the calibration sequences, below every sequence's own weights and random simplex points."""
    case = make_case(batch=4, length=15, teacher_heads=9, teacher_kv_heads=3, student_heads=3, padding="right",
                     seed=11)
    w = calibrated_weights(_stats(case, 3, "group"), 9, 3, plan="group")
    per_sequence = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3,
                                   plan="group", attention_mask=case.attention_mask)
    torch.manual_seed(0)
    for n, group in enumerate(squeeze_plan(9, 3, "group").groups):
        best = _summed_error(case, group, w[n])
        others = [per_sequence[b, n].double() for b in range(4)]
        others += [torch.zeros(9, dtype=torch.float64).index_put_(
            (torch.tensor(group),), torch.distributions.Dirichlet(torch.ones(len(group))).sample().double())
            for _ in range(20)]
        assert all(best <= _summed_error(case, group, o) * (1 + 1e-9) for o in others)
        assert any(best < _summed_error(case, group, o) * (1 - 1e-6) for o in others[:4])  # not one sequence's


def test_statistics_of_another_shape_are_refused():
    case = make_case(batch=1, length=9, teacher_heads=8, teacher_kv_heads=4, student_heads=4, padding=None, seed=0)
    stats = _stats(case, 4, "pairwise")
    with pytest.raises(ValueError, match="expected"):
        calibrated_weights(stats, 8, 2, plan="pairwise")
    with pytest.raises(ValueError, match="pairwise or group"):
        gram_statistics(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 4, plan="select")
