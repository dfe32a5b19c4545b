"""Teacher precision (teacher.dtype): step time and the KD/SHD losses, fp32 against bf16.

    python bench/teacher_dtype.py --config configs/smollm2_student.yaml [--steps 20] [--out DIR]

Trains the config's student twice for --steps steps (one process, same seed and data), once with
the teacher in fp32 and once in bf16 (the student stays in its own precision), and prints, per
teacher precision, the median step time and the step-1 and last-step losses, with the relative
change of each loss term. The losses of step 1 compare the teachers on identical student weights;
later steps include the drift of two trainings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TERMS = ("loss/total", "loss/ce", "loss/kd", "loss/shd")


def train(config: Path, out: Path, dtype: str, steps: int) -> list[dict]:
    """Metrics records of a `steps`-step run with teacher.dtype=`dtype`."""
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(config), f"output_dir={out}",
           f"teacher.dtype={dtype}", f"optim.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
           "eval.every_steps=0", "eval.at_end=false", "checkpoint.every_steps=0", "logging.every_steps=1"]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss/total"' in line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, help="run directories (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="teacher_dtype_"))
    runs = {dtype: train(args.config.resolve(), work / dtype, dtype, args.steps) for dtype in ("fp32", "bf16")}
    print(f"| teacher | median step (s) | {' | '.join(f'step 1 {t[5:]}' for t in TERMS)} | "
          f"{' | '.join(f'step {args.steps} {t[5:]}' for t in TERMS)} |")
    print("|---" * (2 + 2 * len(TERMS)) + "|")
    for dtype, records in runs.items():
        first, last = records[0], records[-1]
        cells = [f"{statistics.median(r['perf/step_time_s'] for r in records[1:]):.3f}"]
        for rec in (first, last):
            for term in TERMS:
                if term not in rec:
                    cells.append("-")
                    continue
                ref = (runs["fp32"][0] if rec is first else runs["fp32"][-1]).get(term)
                change = "" if dtype == "fp32" or not ref else f" ({(rec[term] - ref) / ref:+.2%})"
                cells.append(f"{rec[term]:.4f}{change}")
        print(f"| {dtype} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
