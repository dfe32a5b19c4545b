"""The DeepSpeed side of a run: precision, where the teacher lives, and the two engines' JSON.

The run config owns batch size, accumulation, clipping, optimizer and precision; the DeepSpeed
JSON (``deepspeed.config``) owns ZeRO-3's tuning. :func:`build_ds_configs` merges them and refuses
a JSON value that contradicts the run config (one source of truth per setting).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from shd_common.settings import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig


# Keys of the DeepSpeed JSON that this config owns: the JSON may omit them or say "auto".
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "gradient_clipping")


def resolve_dtype(cfg: RunConfig) -> torch.dtype:
    p = cfg.deepspeed.precision
    if p == "auto":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    return torch.bfloat16 if p == "bf16" else torch.float32


def resolve_teacher_dtype(cfg: RunConfig) -> torch.dtype:
    """``teacher.dtype``: the student's precision unless the teacher's own is set."""
    d = cfg.teacher.dtype
    return resolve_dtype(cfg) if d == "same" else torch.bfloat16 if d == "bf16" else torch.float32


# Share of a rank's memory that teacher.placement=auto lets the teacher and the student's states
# take; the rest is left to activations, the SHD/KD working set and the framework.
AUTO_MEMORY_SHARE = 0.5
# Bytes per student parameter held by ZeRO-3 (fp32 master weights, gradients, Adam's two moments),
# spread over all ranks.
STUDENT_STATE_BYTES = 16


@dataclass(frozen=True)
class PlacementEstimate:
    """What teacher.placement=auto decides on: model sizes and the memory of one rank."""

    teacher_bytes: int
    student_params: int
    memory_per_rank: int
    memory_source: str

    def fits(self, teacher_share: float, world: int) -> bool:
        """Whether `teacher_share` of the teacher plus the student's states fit a rank's share."""
        need = self.teacher_bytes * teacher_share + STUDENT_STATE_BYTES * self.student_params / world
        return need <= AUTO_MEMORY_SHARE * self.memory_per_rank

    def describe(self, world: int) -> str:
        gib = 2**30
        student_states = STUDENT_STATE_BYTES * self.student_params / world
        return (f"teacher {self.teacher_bytes / gib:.2f} GiB, student states {student_states / gib:.2f} "
                f"GiB per rank, {AUTO_MEMORY_SHARE:.0%} of {self.memory_per_rank / gib:.1f} GiB per rank "
                f"({self.memory_source})")


def placement_estimate(teacher_cfg, student_cfg, teacher_dtype: torch.dtype, device: torch.device,
                       ranks_per_node: int) -> PlacementEstimate:
    """Sizes from the model configs (no weights: the models are built on the meta device) and the
    memory of this rank's device (a GPU's, or the host's RAM shared by the node's ranks)."""
    if device.type == "cuda":
        memory, source = torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(ranks_per_node, 1)
        source = f"host RAM / {ranks_per_node} local rank(s)"
    itemsize = torch.tensor([], dtype=teacher_dtype).element_size()
    return PlacementEstimate(teacher_bytes=parameter_count(teacher_cfg) * itemsize,
                             student_params=parameter_count(student_cfg), memory_per_rank=int(memory),
                             memory_source=source)


def parameter_count(hf_config) -> int:
    """Parameters of the model `hf_config` describes (tied weights once), without allocating them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class TeacherPlacement:
    """Where the frozen teacher's weights live, resolved for this launch, and what a forward moves.

    ``kind`` is ``partitioned`` (ZeRO-3 over all ``world`` ranks), ``replicated`` (whole on every
    rank) or ``node`` (ZeRO-3 within each node of ``ranks_per_node`` ranks, through ZeRO++ hpZ's
    secondary partition, so the all-gathers of every forward stay inside the node).
    """

    kind: str
    world: int
    ranks_per_node: int

    @property
    def hpz_partition_size(self) -> int:
        return self.ranks_per_node if self.kind == "node" else 1

    def param_bytes_per_rank(self, teacher_bytes: int) -> float:
        """Teacher parameter bytes resident on one rank (the GPU's share; offload moves it to CPU)."""
        if self.kind == "replicated":
            return float(teacher_bytes)
        secondary = teacher_bytes / self.ranks_per_node if self.kind == "node" else 0.0
        return teacher_bytes / self.world + secondary

    def gathered_bytes_per_forward(self, teacher_bytes: int) -> tuple[float, float]:
        """(bytes one rank receives per teacher forward, of which across nodes), ZeRO-3's
        small persistent parameters ignored."""
        if self.kind == "replicated":
            return 0.0, 0.0
        if self.kind == "node":
            return teacher_bytes * (self.ranks_per_node - 1) / self.ranks_per_node, 0.0
        return (teacher_bytes * (self.world - 1) / self.world,
                teacher_bytes * (self.world - self.ranks_per_node) / self.world)


def auto_placement(cfg: RunConfig, world: int, ranks_per_node: int, estimate: PlacementEstimate) -> str:
    """teacher.placement=auto: ``replicated`` when the whole teacher fits beside the student's share
    on every rank (one rank: always, nothing to gather from), ``node`` when a node's share of it fits
    in a multi-node job, else ``partitioned`` (also with teacher.offload_params)."""
    if cfg.teacher.offload_params:
        return "partitioned"
    if world == 1 or estimate.fits(1.0, world):
        return "replicated"
    if world > ranks_per_node > 1 and not world % ranks_per_node and estimate.fits(1 / ranks_per_node, world):
        return "node"
    return "partitioned"


def resolve_placement(cfg: RunConfig, world: int, ranks_per_node: int,
                      estimate: PlacementEstimate | None = None) -> TeacherPlacement:
    """``teacher.placement`` for this launch (``auto`` decided from ``estimate``, which a run with a
    teacher always has): ``node`` with one rank per node is ``replicated``, on a single node it is
    ``partitioned`` (the same thing, without hpZ's second copy)."""
    kind = cfg.teacher.placement
    if kind == "auto":  # no estimate: no teacher to place (stage pretrain), its DeepSpeed JSON is unused
        kind = auto_placement(cfg, world, ranks_per_node, estimate) if estimate is not None else "partitioned"
    if kind == "node":
        if world % ranks_per_node:
            raise ConfigError(f"teacher.placement=node: {world} ranks are not a whole number of nodes of "
                              f"{ranks_per_node} ranks (LOCAL_WORLD_SIZE): launch the same number of "
                              f"processes on every node, or use teacher.placement=partitioned")
        if ranks_per_node == 1:
            kind = "replicated"
        elif ranks_per_node >= world:
            kind = "partitioned"
    return TeacherPlacement(kind=kind, world=world, ranks_per_node=min(ranks_per_node, world))


def load_ds_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: {p} does not exist (see ds_configs/ for examples)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON: {e}") from None


def build_ds_configs(cfg: RunConfig, world_size: int,
                     placement: TeacherPlacement | None = None) -> tuple[dict, dict]:
    """(student_ds_config, teacher_ds_config) filled from the run config; the teacher's is for a
    ZeRO-3 placement (partitioned, or node with hpZ), unused when the teacher is replicated.

    A value in the JSON that contradicts the run config is refused rather than silently
    overridden (one source of truth per setting)."""
    base = load_ds_json(cfg.deepspeed.config)
    dtype = resolve_dtype(cfg)
    want = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.optim.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for k in _OWNED:
        if k in base and base[k] != "auto" and base[k] != want[k]:
            raise ConfigError(f"deepspeed.config {cfg.deepspeed.config} sets {k}={base[k]!r} but the run "
                              f"config implies {want[k]!r}: set it to \"auto\" (or remove it) in the JSON "
                              f"and change the run config (data.micro_batch_size, optim.grad_accum_steps, "
                              f"optim.grad_clip) instead")
    for k in ("optimizer", "scheduler", "fp16"):
        if k in base and (k != "fp16" or base[k].get("enabled", False) not in (False, "auto")):
            raise ConfigError(f"deepspeed.config {cfg.deepspeed.config} has a '{k}' section: remove it "
                              f"(the optimizer and schedule come from the run config's 'optim' section; "
                              f"fp16 is not supported, use deepspeed.precision=bf16)")
    zero = base.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ConfigError(f"deepspeed.config {cfg.deepspeed.config}: zero_optimization.stage must be 3")
    student = copy.deepcopy(base)
    student.update(want)
    student["bf16"] = {"enabled": dtype == torch.bfloat16}
    student.pop("fp16", None)
    student["zero_allow_untested_optimizer"] = True  # torch.optim.AdamW, see build_optimizer
    student.setdefault("steps_per_print", 2**62)
    student.setdefault("wall_clock_breakdown", False)

    teacher_zero = {k: v for k, v in zero.items() if k.startswith("stage3_") or k in ("stage",)}
    teacher_zero.pop("stage3_gather_16bit_weights_on_model_save", None)
    if cfg.teacher.offload_params:
        teacher_zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if placement is not None and placement.hpz_partition_size > 1:
        teacher_zero["zero_hpz_partition_size"] = placement.hpz_partition_size
    teacher = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.micro_batch_size * world_size,
        "zero_optimization": teacher_zero,
        "bf16": {"enabled": resolve_teacher_dtype(cfg) == torch.bfloat16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    return student, teacher
