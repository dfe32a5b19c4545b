"""The held-out perplexity of a teacher the study did not train (``--teacher``).

A pre-trained teacher's perplexity comes from its own run's evaluations; a given one is evaluated
once per setting with ``python -m pipeline.evaluate`` on the students' evaluation batches (same
split, sequence length, micro-batch and batch count), so the report's "teacher" line and the plots'
dashed line mean the same thing for both. The result is kept in the setting's directory with the
content identities it was computed from, and reused while they match.
"""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.config import config_from_dict

from .inputs import RunInputs
from .plan import Setting
from .runner import REPO_ROOT, log

RESULT_NAME = "teacher_eval.json"


def evaluate_given_teacher(setting: Setting, inputs: RunInputs) -> dict | None:
    """{"final_eval_ppl", "final_eval_loss"} of the setting's given teacher (None for a pre-trained one)."""
    if setting.teacher.run_dir is not None:
        return None
    cfg = setting.students[0].config
    run = config_from_dict(cfg)  # the values the students run with, defaults included
    e = run.eval
    args = ["--checkpoint", str(setting.teacher.export), "--data", run.data.dir, "--split", e.split,
            "--seq-len", str(run.data.seq_len),
            "--micro-batch-size", str(e.micro_batch_size or run.data.micro_batch_size)]
    if e.max_batches is not None:
        args += ["--max-batches", str(e.max_batches)]
    key = {"args": args, "inputs": inputs.of(cfg)}
    result_path = setting.out_dir / RESULT_NAME
    try:
        saved = json.loads(result_path.read_text())
        if saved["key"] == key:
            return saved["result"]
    except (OSError, ValueError, KeyError):
        pass
    log(f"  evaluating the given teacher {setting.teacher.export} on the students' evaluation batches")
    done = subprocess.run([sys.executable, "-m", "pipeline.evaluate", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    # "perplexity P | loss L | tokens N"
    line = next((line for line in done.stdout.splitlines() if line.startswith("perplexity ")), "")
    values = dict(field.split() for field in line.split(" | ") if len(field.split()) == 2)
    if done.returncode != 0 or "perplexity" not in values:
        log(f"  teacher evaluation failed (exit {done.returncode}); the report shows no teacher perplexity:\n"
            + (done.stdout + done.stderr)[-2000:])
        return None
    result = {"final_eval_ppl": float(values["perplexity"]), "final_eval_loss": float(values.get("loss", "nan"))}
    setting.out_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps({"key": key, "result": result}, indent=1) + "\n")
    return result
