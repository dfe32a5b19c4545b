"""Merge plans: which teacher heads are squeezed into which student head, and in what order.

A plan is pure structure (no tensors): the merge rounds that turn M teacher heads into N student
heads. `pipeline.shd.weights` walks it to compute the mixing weights; the constant plans ("mean",
"select") need no walking at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PLANS = ("pairwise", "group", "mean", "select")
"""Merge plans: the paper's pairwise rounds, one-step group squeeze, and the two ablations."""

SELECT_HEADS = ("first", "random")
"""Which head of its group a student head distils under "select": the group's first, or one drawn
per group and layer from a seed (the control that shows whether the choice matters at all)."""


@dataclass(frozen=True)
class SqueezePlan:
    """The merge structure from `num_teacher_heads` to `num_student_heads` heads.

    `rounds[r]` lists, for every head after round r, the indices of the heads of round r-1 (the
    teacher heads for r = 0) merged into it; a 1-tuple carries a head unchanged. An empty
    `rounds` is the identity (N == M).
    """

    name: str
    num_teacher_heads: int
    num_student_heads: int
    rounds: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """For each student head, the teacher heads its target map is made of (in order)."""
        members: list[tuple[int, ...]] = [(m,) for m in range(self.num_teacher_heads)]
        for round_groups in self.rounds:
            members = [sum((members[i] for i in group), ()) for group in round_groups]
        return tuple(members)


def squeeze_plan(num_teacher_heads: int, num_student_heads: int, plan: str = "pairwise") -> SqueezePlan:
    """Builds the merge structure for `plan` (one of `PLANS`).

    "pairwise" is the paper's Algorithm 1 without its overshoot: each round merges only
    k = min(len // 2, len - N) adjacent pairs (0+1, 2+3, ...) and carries the rest in order.
    "group", "mean" and "select" split the heads into N contiguous groups whose sizes differ by at
    most one (numpy.array_split order) and merge each group in one step.
    """
    if plan not in PLANS:
        raise ValueError(f"unknown squeeze plan {plan!r}; choose one of {', '.join(PLANS)}")
    if num_student_heads < 1 or num_student_heads > num_teacher_heads:
        raise ValueError(
            f"cannot squeeze {num_teacher_heads} teacher heads into {num_student_heads} student heads: "
            f"the student needs between 1 and {num_teacher_heads} heads in a distilled layer "
            f"(num_student_heads={num_student_heads}, num_teacher_heads={num_teacher_heads})"
        )
    if num_student_heads == num_teacher_heads:
        return SqueezePlan(plan, num_teacher_heads, num_student_heads, ())
    if plan == "pairwise":
        rounds = _pairwise_rounds(num_teacher_heads, num_student_heads)
    else:
        split = np.array_split(np.arange(num_teacher_heads), num_student_heads)
        rounds = (tuple(tuple(int(i) for i in g) for g in split),)
    return SqueezePlan(plan, num_teacher_heads, num_student_heads, rounds)


def selected_heads(plan: SqueezePlan, how: str = "first", seed: int = 0, layer: int = 0) -> tuple[int, ...]:
    """The teacher head each student head distils under "select" (one per group of `plan`): the
    group's first, or ("random") one drawn uniformly from its group by a generator seeded with
    (seed, layer): the same heads on every rank and after every resume, other heads per layer."""
    if how not in SELECT_HEADS:
        raise ValueError(f"unknown head selection {how!r}; choose one of {', '.join(SELECT_HEADS)}")
    if how == "first":
        return tuple(group[0] for group in plan.groups)
    rng = np.random.default_rng([seed, layer])
    return tuple(group[int(rng.integers(len(group)))] for group in plan.groups)


def _pairwise_rounds(num_heads: int, target: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    rounds = []
    while num_heads > target:
        pairs = min(num_heads // 2, num_heads - target)
        merged = tuple((2 * i, 2 * i + 1) for i in range(pairs))
        carried = tuple((i,) for i in range(2 * pairs, num_heads))
        rounds.append(merged + carried)
        num_heads -= pairs
    return tuple(rounds)


def layer_map(
    num_student_layers: int, num_teacher_layers: int, explicit: list[int] | tuple[int, ...] | None = None
) -> list[int]:
    """The teacher layer matched to each student layer.

    Uniform by default: g(l) = round((l + 1) * L_t / L_s) - 1 with halves rounded up, so the last
    student layer always meets the last teacher layer. `explicit` is validated and returned.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1 (student {num_student_layers}, teacher {num_teacher_layers})"
        )
    if explicit is not None:
        mapping = [int(g) for g in explicit]
        if len(mapping) != num_student_layers:
            raise ValueError(
                f"explicit layer map has {len(mapping)} entries but the student has "
                f"{num_student_layers} layers: give one teacher layer index per student layer"
            )
        bad = [g for g in mapping if not 0 <= g < num_teacher_layers]
        if bad:
            raise ValueError(
                f"explicit layer map entries {bad} are out of range: the teacher has layers "
                f"0..{num_teacher_layers - 1}"
            )
        return mapping
    return [
        (2 * (layer + 1) * num_teacher_layers + num_student_layers) // (2 * num_student_layers) - 1
        for layer in range(num_student_layers)
    ]
