"""Random teacher/student tensors shaped like one attention layer, shared by the SHD tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCase:
    teacher_q: torch.Tensor
    teacher_k: torch.Tensor
    teacher_v: torch.Tensor
    o_proj_weight: torch.Tensor
    student_q: torch.Tensor
    student_k: torch.Tensor
    attention_mask: torch.Tensor | None

    def rows(self, rows: slice) -> LayerCase:
        """The same layer over a slice of the batch (the weights unchanged): statistics that add
        over batches are checked on the parts against the whole."""
        return LayerCase(self.teacher_q[rows], self.teacher_k[rows], self.teacher_v[rows], self.o_proj_weight,
                         self.student_q[rows], self.student_k[rows],
                         None if self.attention_mask is None else self.attention_mask[rows])


def make_case(
    *,
    batch: int = 2,
    length: int = 19,
    teacher_heads: int = 8,
    teacher_kv_heads: int = 4,
    student_heads: int = 3,
    student_kv_heads: int = 1,
    teacher_dim: int = 8,
    student_dim: int = 6,
    d_model: int = 24,
    padding: str | None = "right",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> LayerCase:
    """Random layer tensors; `padding` is None, "right" (ragged lengths) or "left"."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    mask = None
    if padding is not None:
        mask = torch.ones(batch, length)
        for b in range(1, batch):
            cut = max(1, length - 3 * b)
            if padding == "right":
                mask[b, cut:] = 0
            else:
                mask[b, : length - cut] = 0
    return LayerCase(
        teacher_q=randn(batch, teacher_heads, length, teacher_dim, scale=1.5),
        teacher_k=randn(batch, teacher_kv_heads, length, teacher_dim, scale=1.5),
        teacher_v=randn(batch, teacher_kv_heads, length, teacher_dim),
        o_proj_weight=randn(d_model, teacher_heads * teacher_dim, scale=0.3),
        student_q=randn(batch, student_heads, length, student_dim, scale=1.2),
        student_k=randn(batch, student_kv_heads, length, student_dim, scale=1.2),
        attention_mask=mask,
    )
