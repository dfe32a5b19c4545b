"""The process group of a run: start-up from the launcher's environment and the few collectives
the components share (each a no-op in a world of one)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) from the launcher's environment;
    (rank, world size)."""
    import deepspeed

    if torch.cuda.is_available():  # before NCCL starts: else every rank opens a context on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m pipeline.train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """This rank's accelerator device (the CPU under DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """t reduced over all ranks, in place (returned)."""
    if world() > 1:
        dist.all_reduce(t, op=op)
    return t


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() computed on rank 0 only and broadcast (an exception there is raised on every rank)."""
    result: list = [None]
    if rank() == 0:
        try:
            result = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 -- re-raised on every rank below
            result = [("error", e)]
    if world() > 1:
        dist.broadcast_object_list(result, src=0)
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def shut_down(agreed: bool) -> None:
    """Close the process group, if one was started (``python -m`` entry points, at exit). After
    an exit every rank agreed on (the loop's decisions are all-reduced), the ranks first meet at a
    barrier, so that none tears down its communicator while a peer still uses it (gloo aborts
    that peer: "terminate called without an active exception"); after an error on some ranks only
    there is nothing to wait for."""
    if not dist.is_initialized():
        return
    if agreed and world() > 1:
        dist.barrier()
    dist.destroy_process_group()
