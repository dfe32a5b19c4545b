"""The one-command demo (`bash launch/demo.sh`), run as users run it.

The CI variant uses the demo's `--budget ci` (a few dozen optimizer steps in all, vocabulary 512)
and checks the table and the PNG; the full demo (default budget, < 20 minutes on 2 cores) is
marked slow: `bash tests/run.sh -m slow tests/test_demo.py`.
"""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "launch" / "demo.sh"
LABELS = ("CE only", "CE + KD", "CE + KD + attn KD, select")


def _run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run(["bash", str(DEMO), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _table_rows(summary: str) -> dict[str, float]:
    """{variant label: held-out perplexity} from the summary's first table (later tables, e.g. the
    gap to KD, repeat the labels)."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in LABELS and cells[0] not in rows:
            rows[cells[0]] = float(cells[1].split("±")[0])
    return rows


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_outputs(out: Path) -> dict[str, float]:
    summary = (out / "summary.md").read_text()
    rows = _table_rows(summary)
    assert set(rows) == set(LABELS), summary
    assert all(math.isfinite(p) and 1 < p < 1e5 for p in rows.values()), rows
    png = out / "curves.png"
    w, h = _png_size(png)
    assert w >= 600 and h >= 300 and png.stat().st_size > 20_000, (w, h, png.stat().st_size)
    assert any((out / "tb").rglob("events.out.tfevents.*")), "no TensorBoard logs under tb/"
    return rows


def test_demo_help_documents_the_options():
    r = _run_demo("--help", timeout=30)
    assert r.returncode == 0, r.stderr
    for opt in ("--budget", "--steps", "--corpus", "--teacher", "--seeds", "--fresh", "runs/demo/summary.md"):
        assert opt in r.stdout, opt


def test_demo_dry_run_plans_three_students_with_the_same_budget(tmp_path):
    r = _run_demo("--dry-run", "--out", str(tmp_path / "demo"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    students = re.findall(r"stage \d+/7: (ce|kd|kd_select) seed 1234: [^:]+: (\d+) steps x (\d+) tokens", r.stdout)
    assert [s[0] for s in students] == ["ce", "kd", "kd_select"], r.stdout
    assert len({s[1:] for s in students}) == 1, students  # same steps and tokens per step
    assert "tokenizer" in r.stdout and "teacher" in r.stdout
    assert not (tmp_path / "demo").exists() or not any((tmp_path / "demo").rglob("DONE*"))


@pytest.mark.multiprocess
def test_demo_ci_budget_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "demo"
    t0 = time.time()
    r = _run_demo("--budget", "ci", "--out", str(out), timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    first = time.time() - t0
    rows = _check_outputs(out)
    assert "tensorboard --logdir" in r.stdout and str(out / "summary.md") in r.stdout
    # re-running reuses every finished stage and rewrites the same table
    t0 = time.time()
    r2 = _run_demo("--budget", "ci", "--out", str(out), timeout=300)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-6000:]
    assert r2.stdout.count("already done") == 6, r2.stdout  # tokenizer, shards, teacher, 3 students
    assert _check_outputs(out) == rows
    print(f"demo --budget ci: {first:.0f} s, re-run {time.time() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_full_demo(tmp_path):
    """The README's demo at its default budget (about 10-13 minutes on 2 CPU cores)."""
    out = tmp_path / "demo"
    t0 = time.time()
    r = _run_demo("--out", str(out), timeout=3600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rows = _check_outputs(out)
    print(f"full demo: {time.time() - t0:.0f} s; {rows}")
