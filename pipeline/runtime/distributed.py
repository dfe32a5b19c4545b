"""The process group of a run: start-up from the launcher's environment and the few collectives
the components share (each a no-op in a world of one).

The ranks meet (rendezvous) as with torch's ``env://`` (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT: rank 0 hosts the TCP store), but under a wait of its own, ``SHD_RENDEZVOUS_TIMEOUT_S``
(default 600 s), instead of the collectives' timeout, and its two usual failures are one line
each (exit 2): a MASTER_PORT already in use, and WORLD_SIZE processes that never all start.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import register_rendezvous_handler

from shd_common.settings import ConfigError

T = TypeVar("T")

#: Seconds the ranks wait for each other at start-up; generous, as ranks of a real cluster job
#: start minutes apart (image pulls, module loads, a slow shared filesystem).
RENDEZVOUS_TIMEOUT_ENV = "SHD_RENDEZVOUS_TIMEOUT_S"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600.0
_SCHEME = "shd"


def rendezvous_timeout_s() -> float:
    """The start-up wait in seconds: ``SHD_RENDEZVOUS_TIMEOUT_S`` or 600."""
    given = os.environ.get(RENDEZVOUS_TIMEOUT_ENV, "").strip()
    if not given:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"{RENDEZVOUS_TIMEOUT_ENV}={given!r}: give a number of seconds > 0 "
                          f"(default {DEFAULT_RENDEZVOUS_TIMEOUT_S:g})")
    return seconds


def _rendezvous(url: str, **_: object) -> Iterator[tuple[dist.Store, int, int]]:
    """torch rendezvous handler of ``shd://``: ``env://``'s store, with the wait of
    :func:`rendezvous_timeout_s` (torch sets the collectives' timeout on it afterwards) and a
    :class:`ConfigError` naming the variable to fix when the port is taken or ranks are missing."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    wait = rendezvous_timeout_s()
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timedelta(seconds=wait),
                              multi_tenant=True)
    except RuntimeError as e:  # DistNetworkError, DistStoreError
        text = str(e)
        if "EADDRINUSE" in text:
            raise ConfigError(f"MASTER_PORT {port} on {addr} is in use: set MASTER_PORT to a free port "
                              f"(another run or program listens on it)") from None
        joined = re.search(r"(\d+)/(\d+) clients joined", text)
        if joined or "timed out" in text.lower():
            who = (f"only {joined[1]} of WORLD_SIZE={world} ranks joined" if joined else
                   f"rank {rank} of WORLD_SIZE={world} could not reach rank 0 at MASTER_ADDR={addr} "
                   f"MASTER_PORT={port}")
            raise ConfigError(f"the ranks did not all start within {wait:g} s ({RENDEZVOUS_TIMEOUT_ENV}): {who}. "
                              f"Start WORLD_SIZE processes (RANK 0 to {world - 1}), or correct WORLD_SIZE/RANK "
                              f"(and MASTER_ADDR/MASTER_PORT: every rank must name rank 0's)") from None
        raise
    yield store, rank, world
    raise RuntimeError("shd:// cannot rendezvous again (as env://)")


register_rendezvous_handler(_SCHEME, _rendezvous)


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed (NCCL on GPU, gloo on CPU) from the launcher's environment, through
    the ``shd://`` rendezvous (:func:`_rendezvous`); (rank, world size)."""
    import deepspeed

    if torch.cuda.is_available():  # before NCCL starts: else every rank opens a context on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m pipeline.train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        # torchelastic's agent hosts the store itself: its env:// rendezvous is kept as it is
        elastic = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   init_method=None if elastic else f"{_SCHEME}://")
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


def shut_down(agreed: bool, exit_code: int | None = None) -> None:
    """Close the process group, if one was started (``python -m`` entry points, at exit). After
    an exit every rank agreed on (the loop's decisions are all-reduced), the ranks first meet at a
    barrier, so that none tears down its communicator while a peer still uses it; after an error
    on some ranks only there is nothing to wait for.

    With ``exit_code`` (the training entry point) the process then ends here, with that code, by
    :func:`exit_without_finalizing`. ``destroy_process_group`` does not stop gloo: DeepSpeed keeps
    the groups (ZeRO-3's ``param.ds_process_group``, ``deepspeed.utils.groups``, its module-level
    ``FWD_MODULE_STACK``), so gloo's worker threads outlive it, and a worker that releases a
    finished collective's tensors takes the GIL (torch decrefs the tensor's Python object). If that
    happens while Python finalizes the interpreter, CPython ends the thread with ``pthread_exit``
    inside that noexcept destructor and the rank aborts: "terminate called without an active
    exception" (docs/bad-inputs.md, mechanism 10)."""
    if not dist.is_initialized():
        return
    if agreed and world() > 1:
        dist.barrier()
    dist.destroy_process_group()
    if exit_code is not None:
        exit_without_finalizing(exit_code)


def exit_without_finalizing(code: int) -> NoReturn:
    """End the process as ``sys.exit(code)`` from the main thread would, less the interpreter's
    finalization: non-daemon threads joined, atexit handlers run (logging's flush among them),
    Python's and C's standard streams flushed, then ``os._exit(code)``. Threads that C++ libraries
    started (gloo's) are ended by the exit itself, never by CPython's finalization."""
    import atexit
    import ctypes
    import threading

    main = threading.main_thread()
    for t in threading.enumerate():
        if t is not main and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C stdio buffers (extensions that printf to a redirected stdout)
    except (OSError, AttributeError):
        pass
    os._exit(code)
