"""Squeeze weights: closed form vs brute force, streaming vs explicit maps."""

import itertools

import pytest
import torch

from pipeline.shd import attention_maps, squeeze_weights, squeeze_weights_reference
from pipeline.shd.masking import repeat_kv
from tests.shd_cases import make_case


def _merge_objective(maps, circuits, objective, weights):
    """||reconstruction error||^2 of merging the heads with each row of `weights` [G, K]."""
    weights = torch.as_tensor(weights, dtype=maps.dtype)
    merged = torch.einsum("gk,kij->gij", weights, maps)
    if objective == "output":
        target = torch.einsum("kij,kje->ie", maps, circuits)
        return ((target - merged @ circuits.sum(0)) ** 2).sum(dim=(1, 2))
    own = torch.einsum("kij,kje->kie", maps, circuits)
    return sum(((own[k] - merged @ circuits[k]) ** 2).sum(dim=(1, 2)) for k in range(maps.shape[0]))


@pytest.mark.parametrize("objective", ["output", "per_head"])
@pytest.mark.parametrize("seed", range(6))
def test_closed_form_alpha_is_the_grid_minimiser(objective, seed):
    case = make_case(batch=1, teacher_heads=2, teacher_kv_heads=2, length=11, padding=None, seed=seed)
    if seed % 3 == 2:  # make one head's circuit dominate so that the optimum is clipped at the boundary
        case.o_proj_weight[:, :8] *= 30.0
    alpha = squeeze_weights(
        case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 1, objective=objective
    )[0, 0, 0].item()
    maps = attention_maps(case.teacher_q, case.teacher_k)[0]
    circuits = torch.einsum("htd,ehd->hte", case.teacher_v[0], case.o_proj_weight.reshape(24, 2, 8))
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    values = _merge_objective(maps, circuits, objective, torch.stack([grid, 1 - grid], dim=1))
    best = grid[values.argmin()].item()
    assert abs(alpha - best) <= 2e-5
    assert _merge_objective(maps, circuits, objective, [[alpha, 1 - alpha]])[0] <= values.min() * (1 + 1e-12)


def _simplex_grid(heads, steps):
    for corner in itertools.product(range(steps + 1), repeat=heads - 1):
        if sum(corner) <= steps:
            yield tuple(c / steps for c in corner) + (1 - sum(corner) / steps,)


@pytest.mark.parametrize("objective", ["output", "per_head"])
@pytest.mark.parametrize("heads,steps,idle_head", [(3, 200, None), (4, 40, 3)])
def test_group_weights_are_the_simplex_grid_minimiser(objective, heads, steps, idle_head):
    case = make_case(batch=1, teacher_heads=heads, teacher_kv_heads=heads, length=9, padding=None, seed=3)
    if idle_head is not None:  # a uniform head that writes nothing: the optimum lies on a face of the simplex
        case.teacher_q[:, idle_head] = 0.0
        case.o_proj_weight[:, 8 * idle_head : 8 * (idle_head + 1)] = 0.0
    weights = squeeze_weights(
        case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 1, plan="group", objective=objective
    )[0, 0]
    maps = attention_maps(case.teacher_q, case.teacher_k)[0]
    circuits = torch.einsum("htd,ehd->hte", case.teacher_v[0], case.o_proj_weight.reshape(24, heads, 8))

    grid = list(_simplex_grid(heads, steps))
    grid_values = _merge_objective(maps, circuits, objective, grid)
    assert weights.min() >= 0 and abs(weights.sum().item() - 1) < 1e-12
    assert _merge_objective(maps, circuits, objective, weights[None])[0] <= grid_values.min() + 1e-12
    assert (weights - torch.tensor(grid[grid_values.argmin()], dtype=weights.dtype)).abs().max() <= 2.0 / steps
    if idle_head is not None:
        assert (weights == 0).any(), "the case was meant to exercise a boundary optimum"


CASES = [
    # (teacher heads, teacher kv heads, student heads)
    (8, 4, 3),
    (25, 5, 12),
    (16, 4, 6),
    (9, 3, 3),
    (6, 6, 6),
    (4, 1, 1),
]


@pytest.mark.parametrize("plan", ["pairwise", "group", "mean", "select"])
@pytest.mark.parametrize("objective", ["output", "per_head"])
@pytest.mark.parametrize("heads", CASES, ids=lambda h: f"{h[0]}->{h[2]}")
def test_streaming_weights_equal_weights_from_dense_maps(plan, objective, heads):
    teacher, teacher_kv, student = heads
    for padding, use_o_proj in [("right", True), ("left", True), (None, False)]:
        case = make_case(
            teacher_heads=teacher, teacher_kv_heads=teacher_kv, student_heads=student, padding=padding, length=21
        )
        o_proj = case.o_proj_weight if use_o_proj else None
        args = (case.teacher_q, case.teacher_k, case.teacher_v, o_proj, student)
        kwargs = dict(plan=plan, objective=objective, attention_mask=case.attention_mask)
        streamed = squeeze_weights(*args, **kwargs)
        dense = squeeze_weights_reference(*args, **kwargs)
        assert streamed.shape == (2, student, teacher)
        assert (streamed >= 0).all()
        torch.testing.assert_close(streamed.sum(-1), torch.ones(2, student, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(streamed, dense, rtol=1e-8, atol=1e-10)
        # the teacher's own attention outputs (what o_proj reads) reused instead of recomputed
        reused = squeeze_weights(*args, **kwargs, head_outputs=_head_outputs(case))
        torch.testing.assert_close(reused, dense, rtol=1e-8, atol=1e-10)


def _head_outputs(case):
    """Each teacher head's attention output A_h V_kv(h) [B, M, T, d], from explicit maps."""
    maps = attention_maps(case.teacher_q, case.teacher_k, case.attention_mask)
    return maps @ repeat_kv(case.teacher_v, case.teacher_q.shape[1])


def test_weights_use_only_real_rows():
    """Changing what padding rows hold must not move the weights."""
    case = make_case(padding="right", length=17)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, attention_mask=case.attention_mask)
    noisy_q = case.teacher_q.clone()
    padded = case.attention_mask[1] == 0
    noisy_q[1, :, padded] += 5.0
    moved = squeeze_weights(noisy_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, attention_mask=case.attention_mask)
    torch.testing.assert_close(weights, moved, rtol=1e-10, atol=1e-12)


def test_identical_heads_split_evenly():
    case = make_case(batch=1, teacher_heads=4, teacher_kv_heads=4, padding=None)
    q = case.teacher_q[:, :1].expand(-1, 4, -1, -1).contiguous()
    k = case.teacher_k[:, :1].expand(-1, 4, -1, -1).contiguous()
    v = case.teacher_v[:, :1].expand(-1, 4, -1, -1).contiguous()
    for objective in ["output", "per_head"]:
        weights = squeeze_weights(q, k, v, case.o_proj_weight, 2, objective=objective)
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(weights[0, 0, :2], torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_float32_and_bf16_inputs_give_float32_weights_close_to_float64():
    case = make_case(padding="right")
    exact = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, attention_mask=case.attention_mask)
    for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)]:
        low = squeeze_weights(
            *(t.to(dtype) for t in (case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight)),
            3,
            attention_mask=case.attention_mask,
        )
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), exact, rtol=0, atol=tol)
        reused = squeeze_weights(
            *(t.to(dtype) for t in (case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight)),
            3, attention_mask=case.attention_mask, head_outputs=_head_outputs(case).to(dtype),
        )
        torch.testing.assert_close(reused.double(), exact, rtol=0, atol=tol)


def test_bad_shapes_are_refused_with_the_expected_shape():
    case = make_case()
    with pytest.raises(ValueError, match=r"expected \[d_model, 64\]"):
        squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight[:, :10], 3)
    with pytest.raises(ValueError, match="unknown squeeze objective"):
        squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3, objective="l2")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"head_outputs has shape \(2, 8, 19, 4\), expected \[B, M, T, d\]"):
        squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3,
                        head_outputs=torch.zeros(2, 8, 19, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="9 student heads"):
        squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 9)


@pytest.mark.parametrize("objective", ["output", "per_head"])
def test_hard_selection_picks_the_best_single_head(objective):
    """Dynamic selection: each group's weight goes to the head whose map alone reconstructs best."""
    case = make_case(batch=3, teacher_heads=3, teacher_kv_heads=3, length=10, padding=None, seed=8)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 1,
                              plan="group", objective=objective, selection="hard")
    dense = squeeze_weights_reference(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 1,
                                      plan="group", objective=objective, selection="hard")
    torch.testing.assert_close(weights, dense, rtol=0, atol=0)
    chosen = []
    for b in range(3):
        maps = attention_maps(case.teacher_q[b : b + 1], case.teacher_k[b : b + 1])[0]
        circuits = torch.einsum("htd,ehd->hte", case.teacher_v[b], case.o_proj_weight.reshape(24, 3, 8))
        costs = _merge_objective(maps, circuits, objective, torch.eye(3, dtype=torch.float64))
        assert weights[b, 0].tolist() == torch.eye(3)[costs.argmin()].tolist()
        chosen.append(int(costs.argmin()))
    assert len(set(chosen)) > 1, "the case should make different sequences pick different heads"


@pytest.mark.parametrize("teacher_kv", [8, 2])
def test_both_gram_computations_agree(teacher_kv):
    """The merges' inner products, reduced in value space or in circuit space, are the same."""
    from pipeline.shd.weights import GroupGram, StreamingMaps, circuit_fn

    case = make_case(teacher_heads=8, teacher_kv_heads=teacher_kv, padding="right", length=300)
    group = (0, 1, 2, 5)
    circuits = circuit_fn(case.teacher_v, case.o_proj_weight, 8)(group)
    maps = StreamingMaps(case.teacher_q, case.teacher_k, case.attention_mask, 8**-0.5)
    attended = maps.apply(list(group), circuits)
    rows = case.attention_mask.double()
    by_values = GroupGram(group, attended, circuits, rows, method="values").gram
    by_circuits = GroupGram(group, attended, circuits, rows, method="circuits").gram
    assert by_values.shape == (2, 4, 4, 4, 4)
    torch.testing.assert_close(by_values, by_circuits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("plan,padding", [("pairwise", "left"), ("pairwise", None), ("group", "right")])
def test_windowed_and_scaled_weights_equal_weights_from_dense_maps(plan, padding, monkeypatch):
    """Under a sliding window and a module scale the streaming weights equal the dense oracle's
    (the window is applied to the maps, in blocks of rows), and differ from unwindowed weights."""
    from pipeline.shd import MapSpec
    from pipeline.shd import weights as weights_module

    spec = MapSpec(window=4, scale=0.3)
    case = make_case(teacher_heads=8, teacher_kv_heads=8, student_heads=3, padding=padding, length=21, seed=5)
    args = (case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3)
    kwargs = dict(plan=plan, attention_mask=case.attention_mask)
    dense = squeeze_weights_reference(*args, **kwargs, spec=spec)
    for block in (weights_module.WEIGHTS_BLOCK_SIZE, 5):  # one block, and blocks shorter than the sequence
        monkeypatch.setattr(weights_module, "WEIGHTS_BLOCK_SIZE", block)
        torch.testing.assert_close(squeeze_weights(*args, **kwargs, spec=spec), dense, rtol=1e-8, atol=1e-10)
    maps = attention_maps(case.teacher_q, case.teacher_k, case.attention_mask, spec=spec)
    reused = squeeze_weights(*args, **kwargs, spec=spec, head_outputs=maps @ case.teacher_v)
    torch.testing.assert_close(reused, dense, rtol=1e-8, atol=1e-10)
    assert (dense - squeeze_weights_reference(*args, **kwargs)).abs().max() > 1e-3
