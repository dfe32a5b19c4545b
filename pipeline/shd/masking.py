"""Causal and padding masks for one block of query rows, shared by the weights and the loss.

Conventions (the whole package follows them): `attention_mask` is [B, T] with 1 = real token,
0 = padding, or None. A query row may attend to key j when j <= i and key j is real. A padding
query row is given its own diagonal so that its softmax is defined; it is then excluded from
every norm, inner product and loss by `valid_rows`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def valid_rows(attention_mask: Tensor | None, batch: int, length: int, dtype: torch.dtype, device) -> Tensor:
    """[B, T] weights of the query rows that count: 1 for real tokens, 0 for padding."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=dtype, device=device)
    return attention_mask.to(device=device, dtype=dtype)


def allowed_keys(attention_mask: Tensor | None, row_start: int, row_end: int, device) -> Tensor:
    """Boolean [B or 1, 1, rows, row_end] mask of the keys each query row of the block may see.

    Keys are cut at `row_end`: under causal masking no row of the block sees a later key.
    """
    rows = torch.arange(row_start, row_end, device=device)[:, None]
    keys = torch.arange(row_end, device=device)[None, :]
    causal = keys <= rows
    if attention_mask is None:
        return causal[None, None]
    real_keys = attention_mask[:, :row_end].to(device=device).bool()[:, None, None, :]
    return causal & (real_keys | (keys == rows))


class BlockMask:
    """Hides, in place, the keys that query rows [start, end) may not see (keys cut at `end`).

    With right padding or none, causal masking alone is exact for every real row (padding keys
    come after them), so only the block's diagonal square needs masking; padding rows then see
    other padding keys, which is harmless because they carry no weight. Otherwise the full
    `allowed_keys` mask of the block is applied.
    """

    def __init__(self, attention_mask: Tensor | None, right_padded: bool, start: int, end: int, device):
        if right_padded:
            self.columns = slice(start, end)
            square = torch.arange(end - start, device=device)
            self.hidden = square[None, :] > square[:, None]
        else:
            self.columns = slice(0, end)
            self.hidden = ~allowed_keys(attention_mask, start, end, device)

    def fill_(self, scores: Tensor, value: float) -> Tensor:
        """scores [..., rows, end] with the hidden keys set to value; returns scores."""
        scores[..., self.columns].masked_fill_(self.hidden, value)
        return scores


def is_right_padded(attention_mask: Tensor | None) -> bool:
    """True when every padding token follows all real tokens of its sequence.

    Then causal masking alone already hides padding keys from every real query row, so the
    fused scaled-dot-product kernels (`is_causal=True`) are exact for the rows that count.
    """
    if attention_mask is None:
        return True
    return bool((attention_mask.diff(dim=1) <= 0).all())


def check_mask(attention_mask: Tensor | None, batch: int, length: int) -> None:
    """Refuses a mask whose shape does not match the [B, T] of the inputs."""
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected [B, T] = [{batch}, {length}] "
            "with 1 for real tokens and 0 for padding"
        )


def repeat_kv(states: Tensor, num_heads: int) -> Tensor:
    """Expands grouped-query key/value heads [B, H_kv, T, d] to [B, H, T, d] (head h reads h // (H/H_kv))."""
    num_kv = states.shape[1]
    if num_heads % num_kv:
        raise ValueError(
            f"grouped-query attention needs the key/value head count to divide the query head count "
            f"({num_kv} key/value heads, {num_heads} query heads)"
        )
    return states if num_kv == num_heads else states.repeat_interleave(num_heads // num_kv, dim=1)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def normalized_weights(weights: Tensor, dtype: torch.dtype) -> Tensor:
    """Mixing weights in the compute dtype with rows summing to 1 (bf16 rounding breaks that)."""
    weights = weights.detach().to(dtype)
    return weights / weights.sum(dim=-1, keepdim=True)


def loss_dtype(student_q: Tensor) -> torch.dtype:
    """A loss keeps float32/float64 inputs' dtype and is float32 for half-precision inputs."""
    return student_q.dtype if student_q.dtype in (torch.float32, torch.float64) else torch.float32
