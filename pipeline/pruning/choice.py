"""What the student keeps of the teacher, from the calibrated importance (Minitron's choices).

- depth: the `layers` teacher layers of highest block influence, in the teacher's order;
- attention, per kept layer: the `kv_heads` kv groups of highest group importance, then in each
  kept group its `heads // kv_heads` most important query heads. Student head n then reads student
  kv head n // (heads // kv_heads), which is its own teacher kv head: grouped-query attention stays
  valid without changing any head's keys or values, and head_dim is unchanged;
- MLP, per kept layer: the `intermediate_size` neurons of highest importance;
- embedding: the `hidden_size` channels of highest importance (one set for the whole model: the
  residual stream is shared by every layer).

Every kept set is listed in increasing teacher index; ties go to the lower index, so a choice is
a pure function of the importance.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .importance import Importance
from .shape import StudentShape


def top_indices(scores: Tensor, k: int) -> tuple[int, ...]:
    """The indices of the `k` highest scores, in increasing index order (ties: the lower index)."""
    values = scores.tolist()
    best = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    return tuple(sorted(best))


@dataclass(frozen=True)
class LayerChoice:
    """One student layer: its teacher layer, the teacher query and kv heads it keeps (student order:
    head n is `q_heads[n]`, kv head j is `kv_heads[j]`) and the kept MLP neurons."""

    teacher_layer: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    neurons: tuple[int, ...]


@dataclass(frozen=True)
class PruneChoice:
    """The whole student: its layers in order and the kept hidden channels."""

    layers: tuple[LayerChoice, ...]
    channels: tuple[int, ...]
    teacher_heads_per_kv: int

    def kv_of(self, teacher_head: int) -> int:
        """The teacher kv head a teacher query head reads."""
        return teacher_head // self.teacher_heads_per_kv


def choose(importance: Importance, shape: StudentShape, teacher_kv_heads: int) -> PruneChoice:
    """The units to keep for `shape` (already checked by `shape.resolve_shape`)."""
    teacher_heads = importance.heads.shape[1]
    group = teacher_heads // teacher_kv_heads
    per_kv = shape.heads // shape.kv_heads
    groups = importance.kv_groups(teacher_kv_heads)
    layers = []
    for t in top_indices(importance.layers, shape.layers):
        kv_heads = top_indices(groups[t], shape.kv_heads)
        q_heads = tuple(kv * group + h for kv in kv_heads
                        for h in top_indices(importance.heads[t, kv * group:(kv + 1) * group], per_kv))
        layers.append(LayerChoice(teacher_layer=t, q_heads=q_heads, kv_heads=kv_heads,
                                  neurons=top_indices(importance.neurons[t], shape.intermediate_size)))
    return PruneChoice(layers=tuple(layers), channels=top_indices(importance.channels, shape.hidden_size),
                       teacher_heads_per_kv=group)
