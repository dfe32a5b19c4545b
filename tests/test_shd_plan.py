"""Merge plans and the layer map: structure only, no tensors."""

import pytest

from pipeline.shd import PLANS, layer_map, squeeze_plan


def test_pairwise_does_not_overshoot_25_to_12():
    plan = squeeze_plan(25, 12, "pairwise")
    assert [len(r) for r in plan.rounds] == [13, 12]
    # round 1 merges 12 adjacent pairs and carries head 24; round 2 merges only the first pair
    assert plan.rounds[0][:2] == ((0, 1), (2, 3)) and plan.rounds[0][-1] == (24,)
    assert plan.rounds[1][0] == (0, 1) and all(len(g) == 1 for g in plan.rounds[1][1:])
    assert plan.groups[0] == (0, 1, 2, 3)
    assert sorted(h for g in plan.groups for h in g) == list(range(25))


@pytest.mark.parametrize("m,n", [(25, 12), (16, 6), (9, 3), (8, 3), (16, 4), (7, 1)])
def test_every_plan_partitions_the_teacher_heads(m, n):
    for name in PLANS:
        plan = squeeze_plan(m, n, name)
        assert len(plan.groups) == n
        assert [h for g in plan.groups for h in g] == list(range(m)), "groups are contiguous and ordered"
        if name != "pairwise":
            sizes = [len(g) for g in plan.groups]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_equal_head_counts_are_identity():
    for name in PLANS:
        plan = squeeze_plan(6, 6, name)
        assert plan.rounds == () and plan.groups == tuple((i,) for i in range(6))


@pytest.mark.parametrize("m,n", [(4, 5), (4, 0)])
def test_impossible_head_counts_name_both(m, n):
    with pytest.raises(ValueError) as err:
        squeeze_plan(m, n, "pairwise")
    assert f"{m} teacher heads" in str(err.value) and f"{n} student heads" in str(err.value)


def test_unknown_plan_lists_the_choices():
    with pytest.raises(ValueError, match="pairwise, group, mean, select"):
        squeeze_plan(8, 4, "average")


def test_uniform_layer_map_ends_on_the_last_teacher_layer():
    assert layer_map(2, 4) == [1, 3]
    assert layer_map(4, 6) == [1, 2, 4, 5]  # halves round up
    assert layer_map(3, 3) == [0, 1, 2]
    assert layer_map(5, 24)[-1] == 23


def test_explicit_layer_map_is_validated():
    assert layer_map(2, 4, [0, 2]) == [0, 2]
    with pytest.raises(ValueError, match="one teacher layer index per student layer"):
        layer_map(2, 4, [0])
    with pytest.raises(ValueError, match="out of range"):
        layer_map(2, 4, [0, 4])


def test_selected_heads_first_and_seeded_random():
    """"first" is each group's first head; "random" one head of each group, the same for the same
    (seed, layer), other heads for other seeds or layers; weights are one-hot on the selection."""
    import torch

    from pipeline.shd.plan import selected_heads
    from pipeline.shd.weights import constant_weights

    plan = squeeze_plan(16, 4, "select")
    assert selected_heads(plan) == (0, 4, 8, 12)
    draws = {(seed, layer): selected_heads(plan, "random", seed, layer) for seed in range(4) for layer in range(3)}
    for picks in draws.values():
        assert all(h in group for h, group in zip(picks, plan.groups))
    assert draws[(1, 2)] == selected_heads(plan, "random", 1, 2)  # a pure function: ranks and resumes agree
    assert len(set(draws.values())) > 6 and any(p != (0, 4, 8, 12) for p in draws.values())
    w = constant_weights(plan, 2, torch.float64, "cpu", draws[(1, 2)])
    assert w.sum(-1).eq(1).all() and [int(i) for i in w[0].argmax(-1)] == list(draws[(1, 2)])
    # any teacher head, in the student head's group or not (select_heads=pruned: the head it was cut from)
    w = constant_weights(plan, 1, torch.float64, "cpu", (1, 2, 3, 15))
    assert [int(i) for i in w[0].argmax(-1)] == [1, 2, 3, 15] and w.sum(-1).eq(1).all()
    for bad in ((1, 2, 3), (0, 4, 8, 16), (-1, 4, 8, 12)):
        with pytest.raises(ValueError, match="do not name one teacher head"):
            constant_weights(plan, 1, torch.float64, "cpu", bad)
    with pytest.raises(ValueError, match="first, random"):
        selected_heads(plan, "best")
