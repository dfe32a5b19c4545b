"""Exact least squares on the probability simplex, the core of every squeeze weight.

Each merge of K heads asks for weights w on the simplex minimising ||t - sum_k w_k y_k||^2.
Writing w_{K-1} = 1 - sum_{k<K-1} w_k and centring on the last head (y'_k = y_k - y_{K-1},
t' = t - y_{K-1}) leaves a least-squares problem in K-1 free weights, described by its Gram
matrix G = <y'_k, y'_l> and cross terms c = <y'_k, t'>. Centring before the inner products
avoids the cancellation of differencing large norms.
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

MAX_EXACT_HEADS = 12
"""Largest group solved exactly by support enumeration (2^K - 1 small linear systems)."""


def simplex_least_squares(gram: Tensor, cross: Tensor, tolerance: Tensor) -> Tensor:
    """Minimiser over the simplex of w'^T G w' - 2 c^T w' (w' = the first K-1 weights).

    `gram` [B, K-1, K-1] and `cross` [B, K-1] in float64; returns w [B, K] (all K weights).
    `tolerance` [B]: Gram entries this small are rounding noise, i.e. the heads' candidates are
    indistinguishable at working precision, and the heads get equal weights (alpha = 1/2 for
    two). Two heads: the closed form alpha = c / G clipped to [0, 1] (exact, the objective is a
    convex parabola). More heads: the exact optimum by enumerating supports.
    """
    batch, free = cross.shape
    uniform = torch.full((batch, free + 1), 1.0 / (free + 1), dtype=cross.dtype, device=cross.device)
    if free == 0:
        return uniform
    degenerate = gram.abs().flatten(1).amax(dim=1) <= tolerance
    if free == 1:
        g, c = gram[:, 0, 0], cross[:, 0]
        alpha = (c / torch.where(degenerate, torch.ones_like(g), g)).clamp(0.0, 1.0)
        solution = torch.stack([alpha, 1.0 - alpha], dim=-1)
    elif free + 1 > MAX_EXACT_HEADS:
        raise ValueError(
            f"the 'group' plan solves each group exactly and supports at most {MAX_EXACT_HEADS} teacher "
            f"heads per student head, got {free + 1}: use plan='pairwise' for this head ratio"
        )
    else:
        solution = _enumerate_supports(gram, cross)
    return torch.where(degenerate[:, None], uniform, solution)


def _enumerate_supports(gram: Tensor, cross: Tensor) -> Tensor:
    """Exact simplex QP for small K.

    In full variables the objective is f(w) = w^T Q w - 2 r^T w with Q = [[G, 0], [0, 0]] and
    r = [c, 0]. An optimum with minimal support P is the unique minimiser of f on the affine
    hull of its face, so solving the equality-constrained KKT system on every support and keeping
    the feasible candidate of least f finds it.
    """
    batch, free = cross.shape
    k = free + 1
    q = torch.zeros(batch, k, k, dtype=gram.dtype, device=gram.device)
    q[:, :free, :free] = gram
    r = torch.zeros(batch, k, dtype=cross.dtype, device=cross.device)
    r[:, :free] = cross
    scale = q.diagonal(dim1=1, dim2=2).abs().amax(dim=1).clamp_min(1e-300)
    best_w = torch.zeros(batch, k, dtype=q.dtype, device=q.device)
    best_w[:, -1] = 1.0
    best_f = torch.zeros(batch, dtype=q.dtype, device=q.device)
    for size in range(1, k + 1):
        for support in combinations(range(k), size):
            idx = torch.tensor(support, device=q.device)
            kkt = torch.zeros(batch, size + 1, size + 1, dtype=q.dtype, device=q.device)
            kkt[:, :size, :size] = 2.0 * q[:, idx][:, :, idx]
            kkt[:, :size, size] = 1.0
            kkt[:, size, :size] = 1.0
            rhs = torch.cat([2.0 * r[:, idx], torch.ones(batch, 1, dtype=q.dtype, device=q.device)], dim=1)
            sol = (torch.linalg.pinv(kkt) @ rhs[..., None])[..., 0]
            residual = (kkt @ sol[..., None])[..., 0] - rhs
            w_support = sol[:, :size]
            consistent = residual.abs().amax(dim=1) <= 1e-8 * (1.0 + scale)
            feasible = consistent & (w_support >= -1e-12).all(dim=1)
            w = torch.zeros(batch, k, dtype=q.dtype, device=q.device)
            w[:, idx] = w_support.clamp_min(0.0)
            w = w / w.sum(dim=1, keepdim=True)
            f = (w[:, None, :] @ q @ w[:, :, None])[:, 0, 0] - 2.0 * (w * r).sum(dim=1)
            better = feasible & (f < best_f - 1e-12 * scale)
            best_w = torch.where(better[:, None], w, best_w)
            best_f = torch.where(better, f, best_f)
    return best_w


def best_vertex(gram: Tensor, cross: Tensor, tolerance: Tensor) -> Tensor:
    """The single head (a simplex vertex) whose map alone best reproduces the target: one-hot [B, K].

    Vertex k < K-1 costs G_kk - 2 c_k relative to the last head's 0. Indistinguishable heads
    (Gram within `tolerance`) select the first, as the "select" plan does.
    """
    batch, free = cross.shape
    costs = torch.cat([gram.diagonal(dim1=1, dim2=2) - 2.0 * cross, cross.new_zeros(batch, 1)], dim=1)
    degenerate = (gram.abs().flatten(1).amax(dim=1) <= tolerance if free
                  else torch.ones(batch, dtype=torch.bool, device=cross.device))
    first = torch.zeros_like(costs[:, 0], dtype=torch.long)
    choice = torch.where(degenerate.to(costs.device), first, costs.argmin(dim=1))
    return torch.nn.functional.one_hot(choice, free + 1).to(cross.dtype)
