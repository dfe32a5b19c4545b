"""The lines a run logs once its models are built: sizes, batch, teacher placement, SHD layers."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pipeline.config import Derived, RunConfig
from pipeline.training.metrics import memory_now_mib, peak_memory_mib


class BuiltRun(Protocol):
    """What the summary reads of a built run (the trainer, once its models are built)."""

    cfg: RunConfig
    derived: Derived
    world: int
    dtype: torch.dtype
    teacher_dtype: torch.dtype
    student: Any  # the student's DeepSpeed engine
    teacher: Any  # the teacher (engine or module), or None in stage pretrain
    placement: Any  # training.deepspeed_config.TeacherPlacement
    placement_estimate: Any  # its PlacementEstimate when teacher.placement is auto, else None
    capture: Any  # the SHD capture, or None without SHD
    model_notes: list[str]


def describe(t: BuiltRun) -> str:
    cfg, d = t.cfg, t.derived
    n_s = sum(getattr(p, "ds_numel", p.numel()) for p in t.student.module.parameters())
    lines = [f"stage {cfg.stage} | {t.world} rank(s) | {t.dtype} | student {n_s / 1e6:.2f}M params"
             f" | global batch {d.global_batch_size} samples = {d.tokens_per_step} tokens/step"
             f" | {cfg.optim.max_steps} steps = {d.total_tokens} tokens"
             f" | memory after loading: peak {peak_memory_mib():.0f} MiB, now {memory_now_mib():.0f} MiB"
             f" (rank 0)"]
    lines += t.model_notes
    if t.teacher is not None:
        params = list(getattr(t.teacher, "module", t.teacher).parameters())
        n_t = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        t_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
        pl, gas = t.placement, cfg.optim.grad_accum_steps
        gathered, across = (b * gas for b in pl.gathered_bytes_per_forward(t_bytes))
        offload = ", offloaded to CPU" if cfg.teacher.offload_params else ""
        auto = (f"auto -> {pl.kind} from {t.placement_estimate.describe(pl.world)}"
                if t.placement_estimate is not None else pl.kind)
        lines.append(f"teacher {cfg.teacher.path} ({n_t / 1e6:.2f}M params, frozen, {t.teacher_dtype}) | placement "
                     f"{auto} ({pl.world} ranks, {pl.ranks_per_node} per node{offload}) | "
                     f"{pl.param_bytes_per_rank(t_bytes) / 2**20:.1f} MiB of teacher parameters per rank | "
                     f"gathered per step per rank {gathered / 2**20:.1f} MiB, {across / 2**20:.1f} MiB of it "
                     f"across nodes (computed)")
        if pl.kind == "node":
            secondary = sum(getattr(p, "ds_secondary_tensor", None) is not None for p in params)
            lines.append(f"teacher hpZ: {secondary} of {len(params)} parameters have a per-node secondary "
                         f"partition (their gathers stay within the node)")
    if t.capture is not None:
        lines.append(t.capture.describe())
    return "\n".join(lines)
