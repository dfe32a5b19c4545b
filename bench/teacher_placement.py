"""Teacher placement: memory per GPU and bytes moved per step, computed for a cluster shape.

    python bench/teacher_placement.py                       # 8 B teacher, 1 B student, 1x8 and 8x8 GPUs
    python bench/teacher_placement.py --teacher-params 70e9 --nodes 1,4,16 --gpus-per-node 8

Computed, not measured: parameter bytes from the counts (bf16 weights, fp32 Adam state for the
student), traffic from ZeRO-3's all-gathers (each rank receives the whole model but its own share
per forward) and, for the student, its backward all-gather and gradient reduce-scatter. Activations
and buffers are left out; they do not depend on the placement. The formulas are
``pipeline.training.deepspeed_config.TeacherPlacement``'s, the ones the run log prints.
"""

from __future__ import annotations

from pipeline.training.deepspeed_config import TeacherPlacement
from shd_common.cli import command_parser

BF16 = 2
STUDENT_BYTES_PER_PARAM = 2 + 2 + 12  # bf16 weights + bf16 grads + fp32 master, m, v (ZeRO-3, partitioned)


def rows(teacher_params: float, student_params: float, nodes: int, gpus_per_node: int, micro_batches: int):
    """One row per placement: (placement, teacher GiB/GPU, student GiB/GPU, GiB received per step
    per GPU, of which across nodes)."""
    world = nodes * gpus_per_node
    teacher_bytes = teacher_params * BF16
    student_state = student_params * STUDENT_BYTES_PER_PARAM / world
    # student: forward and backward all-gathers of bf16 weights, reduce-scatter of bf16 gradients
    student_moved = 3 * student_params * BF16 * (world - 1) / world * micro_batches
    student_across = 3 * student_params * BF16 * (world - gpus_per_node) / world * micro_batches
    out = []
    for kind in ("partitioned", "node", "replicated"):
        pl = TeacherPlacement(kind=kind, world=world, ranks_per_node=gpus_per_node)
        if kind == "node" and nodes == 1:
            pl = TeacherPlacement(kind="partitioned", world=world, ranks_per_node=gpus_per_node)
        total, across = (b * micro_batches for b in pl.gathered_bytes_per_forward(teacher_bytes))
        out.append((kind, pl.param_bytes_per_rank(teacher_bytes) / 2**30, student_state / 2**30,
                    (total + student_moved) / 2**30, (across + student_across) / 2**30))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("python bench/teacher_placement.py", __doc__)
    ap.add_argument("--teacher-params", type=float, default=8.03e9, help="teacher parameters (Llama 3 8B)")
    ap.add_argument("--student-params", type=float, default=1.0e9)
    ap.add_argument("--nodes", default="1,8", help="comma-separated node counts")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step per GPU")
    a = ap.parse_args(argv)
    print(f"teacher {a.teacher_params / 1e9:.2f} B params (bf16), student {a.student_params / 1e9:.2f} B "
          f"(ZeRO-3, AdamW), {a.micro_batches} micro-batch(es) per step; GiB per GPU")
    print("| GPUs | placement | teacher weights / GPU | student state / GPU | received / step / GPU "
          "| of it across nodes |")
    print("|---|---|---|---|---|---|")
    for nodes in (int(n) for n in a.nodes.split(",")):
        for kind, t, s, moved, across in rows(a.teacher_params, a.student_params, nodes, a.gpus_per_node,
                                              a.micro_batches):
            name = kind + (" (= partitioned on one node)" if kind == "node" and nodes == 1 else "")
            print(f"| {nodes}x{a.gpus_per_node} | {name} | {t:.2f} | {s:.2f} | {moved:.2f} | {across:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
