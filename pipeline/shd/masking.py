"""Causal and padding masks for one block of query rows, shared by the weights and the loss.

Conventions (the whole package follows them): `attention_mask` is [B, T] with 1 = real token,
0 = padding, or None. A query row may attend to key j when j <= i and key j is real, and, under
a sliding window W (`MapSpec.window`), when also j > i - W (transformers' `sliding_window_overlay`:
each row sees its last W positions, itself included). A padding query row is given its own
diagonal so that its softmax is defined; it is then excluded from every norm, inner product and
loss by `valid_rows`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MapSpec:
    """How one model's attention layer turns queries and keys into a map, beyond causal and padding
    masking: its score scale (None = 1/sqrt(head_dim)) and its sliding window (None = none).

    Taken from the attention module itself (`pipeline.loss.capture.map_spec`), so that the maps SHD
    uses are the maps the model computes.
    """

    scale: float | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"sliding window must be >= 1 or None, got {self.window}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"attention scale must be > 0 or None, got {self.scale}")

    def scale_for(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else float(self.scale)

    def window_for(self, length: int) -> int | None:
        """The window that changes anything at this length (None when every row sees all its keys)."""
        return self.window if self.window is not None and self.window < length else None


def first_key(row_start: int, window: int | None) -> int:
    """The first key any row from `row_start` on may see under the window (0 without one)."""
    return 0 if window is None else max(0, row_start - window + 1)


def valid_rows(attention_mask: Tensor | None, batch: int, length: int, dtype: torch.dtype,
               device: torch.device | str) -> Tensor:
    """[B, T] weights of the query rows that count: 1 for real tokens, 0 for padding."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=dtype, device=device)
    return attention_mask.to(device=device, dtype=dtype)


def allowed_keys(attention_mask: Tensor | None, row_start: int, row_end: int, device: torch.device | str,
                 window: int | None = None, key_start: int = 0) -> Tensor:
    """Boolean [B or 1, 1, rows, row_end - key_start] mask of the keys [key_start, row_end) that each
    query row of the block may see.

    Keys are cut at `row_end`: under causal masking no row of the block sees a later key; with a
    window, keys before `first_key(row_start, window)` are hidden from every row of the block.
    """
    rows = torch.arange(row_start, row_end, device=device)[:, None]
    keys = torch.arange(key_start, row_end, device=device)[None, :]
    causal = keys <= rows
    if window is not None:
        causal = causal & (keys > rows - window)
    if attention_mask is None:
        return causal[None, None]
    real_keys = attention_mask[:, key_start:row_end].to(device=device).bool()[:, None, None, :]
    return causal & (real_keys | (keys == rows))


class BlockMask:
    """Hides, in place, the keys that query rows [start, end) may not see, in scores whose columns
    are keys [key_start, end).

    With right padding or none, causal masking alone is exact for every real row (padding keys
    come after them), so without a window only the block's diagonal square needs masking; padding
    rows then see other padding keys, which is harmless because they carry no weight. Otherwise
    the full `allowed_keys` mask of the block is applied (its window too).
    """

    def __init__(self, attention_mask: Tensor | None, right_padded: bool, start: int, end: int,
                 device: torch.device | str, window: int | None = None, key_start: int = 0) -> None:
        if right_padded and window is None:
            self.columns = slice(start - key_start, end - key_start)
            square = torch.arange(end - start, device=device)
            self.hidden = square[None, :] > square[:, None]
        else:
            self.columns = slice(0, end - key_start)
            mask = None if right_padded else attention_mask
            self.hidden = ~allowed_keys(mask, start, end, device, window, key_start)

    def fill_(self, scores: Tensor, value: float) -> Tensor:
        """scores [..., rows, end - key_start] with the hidden keys set to value; returns scores."""
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


def tensor_sum(terms: Iterable[Tensor]) -> Tensor:
    """The sum of (at least one) tensors, computed as the builtin ``sum`` does (0 + t0 + t1 + ...),
    but typed as a Tensor: for mypy, ``sum`` of tensors may be the int 0."""
    first, *rest = terms
    return sum(rest, 0 + first)
