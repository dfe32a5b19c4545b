"""Run logging on rank 0: TensorBoard scalars, a JSON-lines file, a console line, a progress bar.

Every scalar of a step goes to TensorBoard (``<output_dir>/tb``) and, as one JSON object per
step, to ``<output_dir>/metrics.jsonl`` (what the tests and scripts read). The console gets a
concise line every ``logging.every_steps`` steps; a tqdm bar is shown when stderr is a terminal.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by this process on CUDA; peak resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_now_mib() -> float:
    """GPU memory allocated now on CUDA; on CPU the process's anonymous resident memory, i.e.
    without file pages such as a memory-mapped checkpoint (which the peak RSS counts in full)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        _, resident, shared, *_ = (int(x) for x in f.read().split())
    return (resident - shared) * resource.getpagesize() / 2**20


class MetricsLogger:
    def __init__(self, *, enabled: bool, tb_dir: Path, jsonl_path: Path, console_every: int,
                 progress: str, total_steps: int, start_step: int) -> None:
        self.enabled = enabled
        self.console_every = console_every
        self.tb = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        tb_dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(log_dir=str(tb_dir))
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(jsonl_path, "a", buffering=1)
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=False)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log_step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v) and k.startswith("eval")):
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{scalars.get('loss/total', float('nan')):.4f}")
        if step % self.console_every == 0:
            self.info(console_line(step, scalars))

    def log_eval(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.info(f"eval step {step}: " + " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in scalars.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def console_line(step: int, s: dict[str, float]) -> str:
    parts = [f"step {step}", f"loss {s['loss/total']:.4f}"]
    for k in ("loss/ce", "loss/kd", "loss/shd"):
        if k in s:
            parts.append(f"{k.split('/')[1]} {s[k]:.4f}")
    parts.append(f"lr {s['optim/lr']:.2e}")
    gn = s.get("optim/grad_norm")
    if gn is not None:
        parts.append(f"gnorm {gn:.3f}")
    parts.append(f"{s['perf/tokens_per_s']:.0f} tok/s")
    parts.append(f"{s['perf/step_time_s'] * 1000:.0f} ms")
    parts.append(f"mem {s['perf/peak_mem_mib']:.0f} MiB")
    if s.get("optim/skipped_steps"):
        parts.append(f"skipped {int(s['optim/skipped_steps'])}")
    return " | ".join(parts)
