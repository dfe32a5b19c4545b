"""The streaming SHD loss against its dense oracle: values, gradients, edge cases, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.shd import MapSpec, shd_loss, shd_loss_reference, squeeze_weights
from pipeline.shd.weights import WEIGHTS_BLOCK_SIZE
from tests.shd_cases import make_case


def _loss_and_grads(fn, case, weights, **kwargs):
    q = case.student_q.clone().requires_grad_(True)
    k = case.student_k.clone().requires_grad_(True)
    loss = fn(q, k, case.teacher_q, case.teacher_k, weights, attention_mask=case.attention_mask, **kwargs)
    grad_q, grad_k = torch.autograd.grad(loss, [q, k])
    return loss.detach(), grad_q, grad_k


# (teacher heads, teacher kv heads, student heads, student kv heads)
HEADS = [(8, 4, 3, 1), (25, 5, 12, 4), (16, 4, 6, 2), (9, 3, 3, 3), (6, 6, 6, 3)]


@pytest.mark.parametrize("plan", ["pairwise", "group", "mean", "select"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}->{h[2]}")
def test_streaming_loss_and_gradients_equal_dense_float64(plan, heads):
    teacher, teacher_kv, student, student_kv = heads
    case = make_case(
        batch=3, length=23, teacher_heads=teacher, teacher_kv_heads=teacher_kv,
        student_heads=student, student_kv_heads=student_kv, padding="left" if teacher % 2 else "right",
    )
    weights = squeeze_weights(
        case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student,
        plan=plan, attention_mask=case.attention_mask,
    )
    streamed = _loss_and_grads(shd_loss, case, weights, tau=1.7, block_size=5)
    dense = _loss_and_grads(shd_loss_reference, case, weights, tau=1.7)
    assert streamed[0] > 0
    for got, want in zip(streamed, dense):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_streaming_loss_equals_dense_float32(block_size):
    case = make_case(batch=2, length=40, padding="right", dtype=torch.float32, seed=4)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, attention_mask=case.attention_mask)
    streamed = _loss_and_grads(shd_loss, case, weights, tau=0.7, block_size=block_size)
    dense = _loss_and_grads(shd_loss_reference, case, weights, tau=0.7)
    assert streamed[0].dtype == torch.float32
    for got, want in zip(streamed, dense):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gradcheck():
    case = make_case(batch=2, length=6, teacher_heads=4, teacher_kv_heads=2, student_heads=2, student_kv_heads=1, padding="right")
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 2, attention_mask=case.attention_mask)
    q = case.student_q.clone().requires_grad_(True)
    k = case.student_k.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k: shd_loss(q, k, case.teacher_q, case.teacher_k, weights, tau=1.3, attention_mask=case.attention_mask, block_size=4),
        (q, k),
    )


def test_single_token_sequences():
    case = make_case(length=1, padding=None)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3)
    loss, grad_q, grad_k = _loss_and_grads(shd_loss, case, weights)
    # one key: every map is [1.0], so student and target agree exactly
    assert loss.item() == 0.0 and (grad_q == 0).all() and (grad_k == 0).all()


def test_fully_padded_sequence_contributes_nothing():
    case = make_case(batch=3, length=12, padding="right", seed=2)
    case.attention_mask[2] = 0
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, attention_mask=case.attention_mask)
    assert torch.isfinite(weights).all()
    loss, grad_q, grad_k = _loss_and_grads(shd_loss, case, weights, block_size=5)
    assert torch.isfinite(loss) and torch.isfinite(grad_q).all() and torch.isfinite(grad_k).all()
    assert (grad_q[2] == 0).all() and (grad_k[2] == 0).all()
    trimmed = make_case(batch=3, length=12, padding="right", seed=2)
    trimmed.attention_mask = trimmed.attention_mask[:2]
    for name in ("teacher_q", "teacher_k", "student_q", "student_k"):
        setattr(trimmed, name, getattr(trimmed, name)[:2])
    alone = _loss_and_grads(shd_loss, trimmed, weights[:2], block_size=5)
    torch.testing.assert_close(loss, alone[0], rtol=1e-12, atol=0)

    everything_padded = make_case(batch=1, length=5, padding=None)
    everything_padded.attention_mask = torch.zeros(1, 5)
    w = squeeze_weights(everything_padded.teacher_q, everything_padded.teacher_k, everything_padded.teacher_v, None, 3, attention_mask=everything_padded.attention_mask)
    loss, grad_q, _ = _loss_and_grads(shd_loss, everything_padded, w)
    assert loss.item() == 0.0 and (grad_q == 0).all()


def test_student_matching_its_target_has_zero_loss():
    """With N == M, identical head dims and the teacher's own q/k, the student already matches."""
    case = make_case(teacher_heads=4, teacher_kv_heads=2, student_heads=4, padding="right")
    case.student_q, case.student_k = case.teacher_q.clone(), case.teacher_k.clone()
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 4, attention_mask=case.attention_mask)
    loss, grad_q, _ = _loss_and_grads(shd_loss, case, weights, tau=2.0)
    assert abs(loss.item()) < 1e-12 and grad_q.abs().max() < 1e-12


def test_bf16_inputs_are_computed_in_float32():
    case = make_case(length=33, padding="right", dtype=torch.float32, seed=5)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3, attention_mask=case.attention_mask)
    bf16 = make_case(length=33, padding="right", dtype=torch.bfloat16, seed=5)
    loss, grad_q, grad_k = _loss_and_grads(shd_loss, bf16, weights.bfloat16())
    assert loss.dtype == torch.float32 and grad_q.dtype == torch.bfloat16 and grad_k.dtype == torch.bfloat16
    # the same bf16-rounded inputs through the float64 oracle
    exact_case = make_case(length=33, padding="right", dtype=torch.bfloat16, seed=5)
    for name in ("teacher_q", "teacher_k", "student_q", "student_k"):
        setattr(exact_case, name, getattr(exact_case, name).double())
    exact = _loss_and_grads(shd_loss_reference, exact_case, weights.bfloat16().double())
    torch.testing.assert_close(loss.double(), exact[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_q.double(), exact[1], rtol=2e-2, atol=1e-4)


def test_no_gradient_reaches_teacher_tensors_or_weights():
    case = make_case(padding=None)
    tq = case.teacher_q.clone().requires_grad_(True)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3).requires_grad_(True)
    q = case.student_q.clone().requires_grad_(True)
    shd_loss(q, case.student_k, tq, case.teacher_k, weights).backward()
    assert tq.grad is None and weights.grad is None and q.grad is not None


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("padding,merge", [(None, "prob"), ("left", "prob"), (None, "logit")])
def test_no_full_attention_map_is_ever_built(padding, merge):
    """Forward and backward of the loss, and the weights, stay within B * H * block * T numbers."""
    batch, teacher_heads, student_heads, length, block = 1, 8, 3, 512, 32
    case = make_case(
        batch=batch, length=length, teacher_heads=teacher_heads, teacher_kv_heads=2, student_heads=student_heads,
        padding=padding, dtype=torch.float32,
    )
    if padding == "left":  # make the mask genuinely left-padded for sequence 0 as well
        case.attention_mask[0, :3] = 0
    budget = batch * teacher_heads * block * length
    full_map = batch * teacher_heads * length * length
    with _LargestTensor() as weights_probe:
        weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student_heads, attention_mask=case.attention_mask)
    q = case.student_q.clone().requires_grad_(True)
    with _LargestTensor() as loss_probe:
        shd_loss(q, case.student_k, case.teacher_q, case.teacher_k, weights, attention_mask=case.attention_mask,
                 block_size=block, merge=merge, sharpen=0.5).backward()
    assert loss_probe.largest <= budget < full_map
    assert weights_probe.largest <= batch * teacher_heads * WEIGHTS_BLOCK_SIZE * length < full_map


@pytest.mark.parametrize("merge", ["prob", "logit"])
@pytest.mark.parametrize("sharpen", [1.0, 0.5])
@pytest.mark.parametrize("heads", [(8, 4, 3, 1), (16, 4, 6, 2)], ids=lambda h: f"{h[0]}->{h[2]}")
def test_target_variants_stream_like_the_dense_oracle(merge, sharpen, heads):
    teacher, teacher_kv, student, student_kv = heads
    case = make_case(batch=2, length=21, teacher_heads=teacher, teacher_kv_heads=teacher_kv,
                     student_heads=student, student_kv_heads=student_kv, padding="left", seed=6)
    for selection in ["soft", "hard"]:
        weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student,
                                  attention_mask=case.attention_mask, selection=selection)
        kwargs = dict(tau=1.4, merge=merge, sharpen=sharpen)
        streamed = _loss_and_grads(shd_loss, case, weights, block_size=4, **kwargs)
        dense = _loss_and_grads(shd_loss_reference, case, weights, **kwargs)
        for got, want in zip(streamed, dense):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_logit_merge_is_sharper_than_prob_merge_and_agrees_on_one_head():
    """A product of experts is at least as sharp as the mixture; with one-hot weights both are the head."""
    from pipeline.shd import attention_maps
    from pipeline.shd.loss import merged_target
    from pipeline.shd.masking import BlockMask

    case = make_case(batch=1, length=16, padding=None, seed=1)
    hidden = BlockMask(None, True, 0, 16, "cpu")
    scores = (case.teacher_q @ case.teacher_k.repeat_interleave(2, 1).transpose(-1, -2)) * 8**-0.5
    even = torch.full((1, 1, 8), 1 / 8, dtype=torch.float64)

    def entropy(p):
        return -(torch.xlogy(p, p)).sum(-1).mean()

    prob = merged_target(scores.clone(), hidden, even, "prob", 1.0)
    logit = merged_target(scores.clone(), hidden, even, "logit", 1.0)
    assert entropy(logit) < entropy(prob)
    one_hot = torch.zeros(1, 1, 8, dtype=torch.float64)
    one_hot[0, 0, 5] = 1.0
    head = attention_maps(case.teacher_q, case.teacher_k)[:, 5:6]
    for merge in ["prob", "logit"]:
        torch.testing.assert_close(merged_target(scores.clone(), hidden, one_hot, merge, 1.0), head)
    sharpened = merged_target(scores.clone(), hidden, even, "prob", 0.25)
    assert entropy(sharpened) < entropy(prob)


def test_variants_are_validated():
    case = make_case()
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3)
    with pytest.raises(ValueError, match="prob, logit"):
        shd_loss(case.student_q, case.student_k, case.teacher_q, case.teacher_k, weights, merge="geometric")
    with pytest.raises(ValueError, match="sharpen"):
        shd_loss(case.student_q, case.student_k, case.teacher_q, case.teacher_k, weights, sharpen=0.0)
    with pytest.raises(ValueError, match="soft, hard"):
        squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3, selection="argmax")


# (teacher spec, student spec): sliding windows and non-default scales, as taken from the modules
SPECS = [
    (MapSpec(window=5), MapSpec()),  # Mistral-style teacher, LLaMA student
    (MapSpec(window=4, scale=0.21), MapSpec(window=9)),  # both windowed, the student's wider
    (MapSpec(window=6), MapSpec(window=6, scale=0.5)),  # the same window on both sides
    (MapSpec(window=100), MapSpec(scale=0.3)),  # a window longer than the sequence: none
]


@pytest.mark.parametrize("specs", SPECS, ids=lambda s: f"t{s[0].window}-s{s[1].window}")
@pytest.mark.parametrize("padding,merge", [("right", "prob"), ("left", "prob"), ("left", "logit"), (None, "prob")])
def test_windowed_and_scaled_maps_stream_like_the_dense_oracle(specs, padding, merge):
    """Values and gradients of the streaming loss equal the float64 oracle under sliding windows
    and module scales, with blocks smaller and larger than the window."""
    teacher_spec, student_spec = specs
    case = make_case(batch=3, length=23, padding=padding, seed=8)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3,
                              attention_mask=case.attention_mask, spec=teacher_spec)
    kwargs = dict(tau=1.3, merge=merge, teacher_spec=teacher_spec, student_spec=student_spec)
    dense = _loss_and_grads(shd_loss_reference, case, weights, **kwargs)
    assert dense[0] > 0
    for block_size in (3, 8, 64):
        streamed = _loss_and_grads(shd_loss, case, weights, block_size=block_size, **kwargs)
        for got, want in zip(streamed, dense):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_window_changes_the_target():
    """A windowed teacher's target is not the unwindowed one, and a student scored with the same
    window and the teacher's own q, k matches it exactly."""
    case = make_case(teacher_heads=4, teacher_kv_heads=2, student_heads=4, student_dim=8, length=30, seed=3)
    case.student_q, case.student_k = case.teacher_q.clone(), case.teacher_k.clone()
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 4, attention_mask=case.attention_mask)
    windowed = MapSpec(window=7)
    same, _, _ = _loss_and_grads(shd_loss, case, weights, teacher_spec=windowed, student_spec=windowed, block_size=8)
    assert abs(same.item()) < 1e-12
    unwindowed_student, _, _ = _loss_and_grads(shd_loss, case, weights, teacher_spec=windowed, block_size=8)
    assert unwindowed_student > 1e-3


def test_a_student_window_narrower_than_the_teacher_is_refused():
    case = make_case(length=20)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3)
    for teacher_spec in (MapSpec(), MapSpec(window=12)):
        for fn in (shd_loss, shd_loss_reference):
            with pytest.raises(ValueError, match="student's sliding window \\(8\\) is narrower"):
                fn(case.student_q, case.student_k, case.teacher_q, case.teacher_k, weights,
                   teacher_spec=teacher_spec, student_spec=MapSpec(window=8))
    with pytest.raises(ValueError, match="sliding window must be >= 1"):
        MapSpec(window=0)


def test_windowed_loss_and_weights_stay_within_the_window():
    """With a window W the loss holds at most B * H * block * (block + W) numbers, the weights
    B * H * WEIGHTS_BLOCK_SIZE * (WEIGHTS_BLOCK_SIZE + W): far below one block over all T keys."""
    batch, teacher_heads, student_heads, length, block, window = 1, 8, 3, 512, 16, 32
    case = make_case(batch=batch, length=length, teacher_heads=teacher_heads, teacher_kv_heads=2,
                     student_heads=student_heads, padding="left", dtype=torch.float32)
    spec = MapSpec(window=window)
    with _LargestTensor() as weights_probe:
        weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student_heads,
                                  attention_mask=case.attention_mask, spec=spec)
    q = case.student_q.clone().requires_grad_(True)
    with _LargestTensor() as loss_probe:
        shd_loss(q, case.student_k, case.teacher_q, case.teacher_k, weights, attention_mask=case.attention_mask,
                 block_size=block, teacher_spec=spec, student_spec=spec).backward()
    # q, k themselves are B * H * T * d: the buffers of one block must not exceed the larger of the two
    inputs = batch * teacher_heads * length * case.teacher_q.shape[-1]
    one_block_all_keys = batch * teacher_heads * block * length
    assert loss_probe.largest <= max(inputs, batch * teacher_heads * block * (block + window)) < one_block_all_keys
    rows = WEIGHTS_BLOCK_SIZE
    assert weights_probe.largest <= max(inputs, batch * teacher_heads * rows * (rows + window))


# ----------------------------------------------------------------------------------------------
# the reverse (mode-seeking) divergence, KL(student || target)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan,merge,sharpen", [("select", "prob", 1.0), ("pairwise", "prob", 1.0),
                                                ("mean", "prob", 0.5), ("group", "logit", 1.0)])
@pytest.mark.parametrize("heads", [(8, 4, 3, 1), (16, 4, 6, 2)], ids=lambda h: f"{h[0]}->{h[2]}")
def test_reverse_divergence_streams_like_the_dense_oracle(plan, merge, sharpen, heads):
    """Values and gradients of KL(student || target) equal the float64 oracle's, for one-head
    targets (select) and merged ones, with padding on either side."""
    teacher, teacher_kv, student, student_kv = heads
    case = make_case(batch=3, length=21, teacher_heads=teacher, teacher_kv_heads=teacher_kv, student_heads=student,
                     student_kv_heads=student_kv, padding="left" if plan in ("select", "mean") else "right", seed=9)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student,
                              plan=plan, attention_mask=case.attention_mask)
    kwargs = dict(tau=1.3, merge=merge, sharpen=sharpen, divergence="reverse")
    dense = _loss_and_grads(shd_loss_reference, case, weights, **kwargs)
    forward = _loss_and_grads(shd_loss, case, weights, tau=1.3, merge=merge, sharpen=sharpen, block_size=4)
    assert dense[0] > 0 and abs(dense[0] - forward[0]) > 1e-6  # another divergence, not the forward one
    for block_size in (4, 64):
        streamed = _loss_and_grads(shd_loss, case, weights, block_size=block_size, **kwargs)
        for got, want in zip(streamed, dense):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_reverse_divergence_gradcheck_and_zero_at_the_target():
    case = make_case(batch=2, length=6, teacher_heads=4, teacher_kv_heads=2, student_heads=2, student_kv_heads=1,
                     padding="right")
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 2,
                              attention_mask=case.attention_mask)
    q = case.student_q.clone().requires_grad_(True)
    k = case.student_k.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k: shd_loss(q, k, case.teacher_q, case.teacher_k, weights, tau=1.3, divergence="reverse",
                              attention_mask=case.attention_mask, block_size=4), (q, k))
    same = make_case(teacher_heads=4, teacher_kv_heads=2, student_heads=4, padding="right")
    same.student_q, same.student_k = same.teacher_q.clone(), same.teacher_k.clone()
    w = squeeze_weights(same.teacher_q, same.teacher_k, same.teacher_v, None, 4, attention_mask=same.attention_mask)
    loss, grad_q, _ = _loss_and_grads(shd_loss, same, w, tau=2.0, divergence="reverse")
    assert abs(loss.item()) < 1e-12 and grad_q.abs().max() < 1e-12


def test_reverse_divergence_is_finite_beyond_a_narrower_teacher_window():
    """Keys outside the teacher's window have target 0 where the student may attend: the reverse KL
    floors log 0 (a large, finite penalty) and matches the oracle; float32 stays finite too."""
    for dtype in (torch.float64, torch.float32):
        case = make_case(batch=2, length=20, padding="right", dtype=dtype, seed=2)
        weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, 3,
                                  plan="select", attention_mask=case.attention_mask)
        kwargs = dict(divergence="reverse", teacher_spec=MapSpec(window=4), student_spec=MapSpec())
        streamed = _loss_and_grads(shd_loss, case, weights, block_size=6, **kwargs)
        dense = _loss_and_grads(shd_loss_reference, case, weights, **kwargs)
        assert all(bool(torch.isfinite(t).all()) for t in streamed) and streamed[0] > 10
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        for got, want in zip(streamed, dense):
            torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("merge", ["prob", "logit"])
def test_reverse_divergence_builds_no_full_attention_map(merge):
    batch, teacher_heads, student_heads, length, block = 1, 8, 3, 512, 32
    case = make_case(batch=batch, length=length, teacher_heads=teacher_heads, teacher_kv_heads=2,
                     student_heads=student_heads, padding="left", dtype=torch.float32)
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, case.o_proj_weight, student_heads,
                              attention_mask=case.attention_mask)
    q = case.student_q.clone().requires_grad_(True)
    with _LargestTensor() as probe:
        shd_loss(q, case.student_k, case.teacher_q, case.teacher_k, weights, attention_mask=case.attention_mask,
                 block_size=block, merge=merge, divergence="reverse").backward()
    assert probe.largest <= batch * teacher_heads * block * length < batch * teacher_heads * length * length


def test_divergence_is_validated():
    case = make_case()
    weights = squeeze_weights(case.teacher_q, case.teacher_k, case.teacher_v, None, 3)
    for fn in (shd_loss, shd_loss_reference):
        with pytest.raises(ValueError, match="forward, reverse"):
            fn(case.student_q, case.student_k, case.teacher_q, case.teacher_k, weights, divergence="backward")
