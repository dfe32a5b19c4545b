"""Shared helpers of the tests: a tiny teacher, configs, real multi-rank runs (fixtures: conftest.py).

Multi-rank runs are real: ``launch_ranks`` starts one ``python -m pipeline.train`` process per
rank with the environment a launcher (torchrun, srun) would give it (RANK, WORLD_SIZE, MASTER_*),
so a test can signal or kill individual ranks and read each rank's exit code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from shd_common.settings import set_dotted

REPO = Path(__file__).resolve().parents[1]
TINY_DS = str(REPO / "ds_configs" / "zero3_tiny_cpu.json")
SEQ_LEN = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_teacher(out: Path, vocab_size: int, *, layers: int = 4, hidden: int = 64, heads: int = 8,
                 kv_heads: int = 4, seed: int = 0) -> Path:
    """A random LLaMA teacher (GQA) saved with save_pretrained (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, use_cache=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def tiny_config(out_dir: Path, tiny_data, teacher: Path | None, **over) -> dict:
    """A tiny fp32 distillation config as a dict; ``over`` maps dotted keys to values."""
    tok, data = tiny_data
    cfg = {
        "stage": "distill" if teacher else "pretrain",
        "seed": 7,
        "output_dir": str(out_dir),
        # partitioned, not auto: the engine tests exercise ZeRO-3's gathers of the teacher
        "teacher": {"path": str(teacher) if teacher else None, "placement": "partitioned"},
        "student": {"num_layers": 2, "hidden_size": 48, "num_heads": 3, "num_kv_heads": 3,
                    "intermediate_size": 96, "max_position_embeddings": 128},
        "data": {"dir": str(data), "tokenizer_dir": str(tok), "seq_len": SEQ_LEN, "micro_batch_size": 2},
        "distill": {"w_ce": 0.5, "w_kd": 0.5, "tau_kd": 2.0, "w_shd": 1.0, "plan": "pairwise",
                    "kd_chunk_size": 24, "shd_block_size": 8},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "max_steps": 8, "weight_decay": 0.0},
        "deepspeed": {"config": TINY_DS, "precision": "fp32"},
        "checkpoint": {"every_steps": 0, "keep_last": 2},
        "logging": {"every_steps": 1, "progress_bar": "off"},
        "eval": {"every_steps": 0, "at_end": False, "max_batches": 2},
    }
    if not teacher:
        cfg["distill"] = {"w_ce": 1.0, "w_kd": 0.0, "w_shd": 0.0}
    for k, v in over.items():
        set_dotted(cfg, k, v)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def rank_env() -> dict:
    """The environment of a child process: CPU DeepSpeed, this checkout importable, unbuffered."""
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_ranks(n: int, args: list[str], log_dir: Path, *, module: str = "pipeline.train",
                 ranks_per_node: int | None = None) -> list[subprocess.Popen]:
    """Start n ranks of ``python -m module args`` (as srun would: one process per rank);
    ``ranks_per_node`` < n simulates several nodes (LOCAL_RANK / LOCAL_WORLD_SIZE per node)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    per_node = ranks_per_node or n
    procs = []
    for r in range(n):
        env = rank_env()
        env.update(RANK=str(r), LOCAL_RANK=str(r % per_node), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(per_node),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = open(log_dir / f"rank{r}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                      stdout=out, stderr=subprocess.STDOUT))
    return procs


def wait_ranks(procs: list[subprocess.Popen], log_dir: Path, timeout: float = 300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("ranks timed out:\n" + logs(log_dir)) from None
    return codes


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-6000:]
                     for p in sorted(log_dir.glob("rank*.log")))


def run_ranks(n: int, cfg: dict, work: Path, *extra: str, expect: int = 0, timeout: float = 300,
              ranks_per_node: int | None = None) -> list[dict]:
    """Write cfg, run n ranks to completion, check exit codes, return metrics.jsonl records."""
    cfg_path = write_config(work / "config.yaml", cfg)
    log_dir = work / "logs"
    procs = launch_ranks(n, ["--config", str(cfg_path), *extra], log_dir, ranks_per_node=ranks_per_node)
    codes = wait_ranks(procs, log_dir, timeout)
    assert codes == [expect] * n, f"exit codes {codes}, expected {expect}\n" + logs(log_dir)
    return read_metrics(Path(cfg["output_dir"]))


def read_metrics(output_dir: Path) -> list[dict]:
    p = Path(output_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def step_losses(records: list[dict], key: str = "loss/total") -> dict[int, float]:
    """{step: value} of training records; a step logged twice (re-run after a resume) keeps the last."""
    return {r["step"]: r[key] for r in records if key in r}


def wait_for(pred, timeout: float, what: str, log_dir: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n" + (logs(log_dir) if log_dir else ""))


# The reference run shared by the multi-process tests (the ``ref_run`` fixture): 2 ranks, pairwise
# SHD, 10 steps, checkpoints every 2 steps. Resume, universal-checkpoint and export tests compare
# against it.

REF_STEPS = 10


def ref_config(out_dir: Path, tiny_data, teacher: Path, **over) -> dict:
    # eval.max_batches counts micro-batches of the whole job: 4 x 2 = the 8 sequences its 2 ranks read
    # when it counted per rank, so the golden eval/loss stands
    base = {"optim.max_steps": REF_STEPS, "checkpoint.every_steps": 2, "checkpoint.keep_last": 3,
            "eval.at_end": True, "optim.weight_decay": 0.1, "eval.max_batches": 4}
    base.update(over)
    return tiny_config(out_dir, tiny_data, teacher, **base)
