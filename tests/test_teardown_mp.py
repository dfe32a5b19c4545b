"""Clean teardown of 2 gloo ranks (docs/bad-inputs.md, mechanism 10): 20 start/stop cycles, no abort.

The abort ("terminate called without an active exception", SIGABRT) is a race at interpreter exit:
DeepSpeed keeps the gloo process groups past ``destroy_process_group``, so gloo's worker threads are
still running when Python finalizes; a worker that releases a finished collective's tensors takes
the GIL (torch decrefs the tensor's Python object), and a thread asking for the GIL once Python has
started finalizing is ended by CPython with ``pthread_exit``, inside that noexcept destructor:
``std::terminate``. Left to chance it needs the worker to be late by a few milliseconds (rare).

Here every cycle forces that interleaving, through the project's rendezvous (``shd://``) and the
training entry point's ending (``distributed.shut_down(agreed=True, exit_code=...)``):

- each rank holds a gloo group past ``destroy_process_group``, as DeepSpeed does;
- rank 0 leaves an all-reduce on it pending, which rank 1 joins only once rank 0 is in the last of
  its exit handlers, one that holds the GIL for 0.3 s without running Python code (``usleep`` through
  ``ctypes.PyDLL``), so that rank 0's gloo worker finishes and waits for the GIL right there, at the
  start of finalization.

A launcher imports torch once and forks the ranks of every cycle (a rank ends the way a ``python -m``
process does: ``SystemExit`` through to the top level, then Python's own exit). The control runs the
same cycles with the ending ``pipeline.train`` had before (``shut_down(agreed=True)``, then
``sys.exit``): it must abort, or the harness no longer reproduces the race and the 20 cycles prove
nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, rank_env

pytestmark = pytest.mark.multiprocess

CYCLES = 20
CONTROL_CYCLES = 3

# Run with ``python -c``: its two exit handlers are registered before anything else is imported,
# so that they run last (atexit is last in, first out), right before finalization.
LAUNCHER = r'''
import atexit, ctypes, os, sys
_hold = ctypes.PyDLL(None).usleep  # PyDLL: the call keeps the GIL
_hold.argtypes = [ctypes.c_uint]
_marker = []
def _signal_last_handler():
    for path in _marker:
        open(path, "w").close()
atexit.register(_hold, 300_000)
atexit.register(_signal_last_handler)

import json, socket, threading, time
import torch
import torch.distributed as dist
from pipeline.runtime import distributed

_pinned = []  # module-level, as DeepSpeed's references are: alive until Python's finalization


def rank_main(rank, port, marker, ending):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", init_method="shd://")
    pinned = dist.new_group([0, 1])  # kept past destroy_process_group, as DeepSpeed keeps its groups
    _pinned.append(pinned)
    t = torch.ones(1024)
    if rank == 0:
        pinned.allreduce([t])  # pending until rank 1 joins it; its gloo worker then releases t
        _marker.append(marker)
    else:
        atexit.unregister(_hold)

        def join_late():
            while not os.path.exists(marker):
                time.sleep(0.001)
            time.sleep(0.02)  # rank 0 is in _hold by now
            pinned.allreduce([t]).wait()

        threading.Thread(target=join_late).start()
    if ending == "old":  # pipeline.train before the fix
        distributed.shut_down(agreed=True)
    else:
        distributed.shut_down(agreed=True, exit_code=0)
    sys.exit(0)


out_dir = sys.argv[1]
for spec in sys.argv[2:]:
    ending, cycles = spec.split(":")
    for cycle in range(int(cycles)):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        marker = os.path.join(out_dir, f"{ending}-{cycle}.last-handler")
        logs = [os.path.join(out_dir, f"{ending}-{cycle}.rank{r}.log") for r in (0, 1)]
        sys.stdout.flush()
        pids = []
        for r in (0, 1):
            pid = os.fork()
            if pid == 0:  # the rank: output to its log; its SystemExit ends this process as Python does
                fd = os.open(logs[r], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                rank_main(r, port, marker, ending)
            pids.append(pid)
        deadline = time.time() + 60
        codes = [None, None]
        while None in codes and time.time() < deadline:
            for i, pid in enumerate(pids):
                if codes[i] is None:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[i] = os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        for i, pid in enumerate(pids):
            if codes[i] is None:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                codes[i] = "timeout"
        text = [open(p, errors="replace").read() for p in logs]
        print(json.dumps({"ending": ending, "cycle": cycle, "codes": codes,
                          "terminate": ["terminate called" in x for x in text],
                          "tail": [x[-1500:] for x in text]}), flush=True)
os._exit(0)  # the launcher itself: without its own exit handlers (the 0.3 s hold)
'''


@pytest.fixture(scope="module")
def cycles(tmp_path_factory):
    """{ending: [cycle records]} of one launcher run: the control cycles, then the 20 cycles."""
    out = tmp_path_factory.mktemp("teardown")
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(out), f"old:{CONTROL_CYCLES}", f"fixed:{CYCLES}"],
                          cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records: dict[str, list[dict]] = {"old": [], "fixed": []}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            records[rec["ending"]].append(rec)
    return records


def test_control_old_ending_aborts(cycles):
    """The harness reproduces the race: with the ending before the fix, rank 0 aborts."""
    old = cycles["old"]
    assert len(old) == CONTROL_CYCLES
    aborted = [r for r in old if r["terminate"][0] and r["codes"][0] == -6]
    assert aborted, "the old ending did not abort: the harness no longer reproduces the race\n" + json.dumps(old)


def test_twenty_start_stop_cycles_without_abort(cycles):
    """20 cycles of 2 ranks through shut_down(..., exit_code=0): every rank exits 0, none aborts."""
    fixed = cycles["fixed"]
    assert len(fixed) == CYCLES
    bad = [r for r in fixed if r["codes"] != [0, 0] or any(r["terminate"])]
    assert not bad, json.dumps(bad, indent=1)
