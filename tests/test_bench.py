"""The benchmark scripts of bench/: the step-cost smoke run, and the study's old command
(bench/distill_compare.py) forwarding to pipeline.study (whose own tests are tests/test_study.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_distill_compare_forwards_to_the_study(tmp_path):
    """`python bench/distill_compare.py` takes the study's flags."""
    r = subprocess.run([sys.executable, str(REPO / "bench/distill_compare.py"), "--dry-run", "--out",
                        str(tmp_path / "o"), "--data", "D", "--tokenizer", "T", "--teacher", "H", "--variants",
                        "kd,kd_shd", "--seeds", "1,", "--budget", "ci"], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "stage 2/2: kd_shd seed 1: CE + KD + SHD (pairwise): 12 steps" in r.stdout


def test_step_cost_smoke_dense_and_streaming_agree(tmp_path):
    """bench/step_cost.py runs its variants; the dense attention loss (maps from eager attention
    with output_attentions) and the engine's streaming SHD give the same total loss."""
    out = tmp_path / "step_cost.json"
    r = subprocess.run([sys.executable, str(REPO / "bench/step_cost.py"), "--pairs", "tiny", "--seq-lens", "64",
                        "--steps", "1", "--warmup", "1", "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"kd", "shd", "select", "dense"} and not any("error" in row for row in rows.values()), rows
    assert rows["shd"]["loss"] == pytest.approx(rows["dense"]["loss"], rel=1e-4)
    assert rows["shd"]["loss"] != pytest.approx(rows["kd"]["loss"], rel=1e-6)  # the attention term is there
    assert rows["select"]["loss"] != pytest.approx(rows["shd"]["loss"], rel=1e-6)  # another plan, another target
    assert "| tiny | 64 | dense |" in r.stdout
