"""bench/gpu_check.py, the one-GPU check, run as far as a CPU allows: its dry run (--device cpu
--quick) runs every part at tiny sizes, so each code path the GPU run takes is known to work; its
time boxes kill what overruns and keep the other parts' results; bad arguments are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

from tests.helpers import rank_env  # noqa: E402


def _run(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out), *args], cwd=REPO, env=rank_env(), capture_output=True, text=True,
                          timeout=timeout)
    results = out / "results.json"
    return proc, json.loads(results.read_text())["rows"] if results.is_file() else []


def _status(rows: list[dict], part: str, words: str) -> list[str]:
    return [r["status"] for r in rows if r["part"] == part and words in r["check"]]


def test_dry_run_numerics_and_benches(tmp_path):
    """The parts that need no DeepSpeed, at tiny sizes on the CPU: the numerics meet the bounds and
    both benches report their rows; the summary table holds every row."""
    proc, rows = _run(tmp_path, "--parts", "oracle,shd_loss,step_cost", timeout=600)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + log[-4000:]
    assert not [r for r in rows if r["status"] == "FAIL"]
    assert {r["part"] for r in rows} == {"oracle", "shd_loss", "step_cost"}
    # numerics: weights (2 plans) and loss + gradients, fp32 and bf16, two paddings, all bounded
    oracle = [r for r in rows if r["part"] == "oracle"]
    assert len(oracle) == 2 * 2 * (2 * 2 + 2)
    assert all(r["status"] == "PASS" and r["value"] <= r["limit"] for r in oracle)
    # bench/shd_loss.py: a row per length and the growth bound; bench/step_cost.py: the ratio
    assert [r["T"] for r in rows if r["part"] == "shd_loss" and "T" in r] == list(gpu_check.QUICK.shd_lengths)
    assert _status(rows, "shd_loss", "growth") == ["PASS"]
    assert [r["T"] for r in rows if r["part"] == "step_cost"] == list(gpu_check.QUICK.step_lengths)
    assert all(r["ratio"] > 0 for r in rows if r["part"] == "step_cost")
    # the table: one line per row, five cells each (pipes inside cells escaped)
    table = [line for line in (tmp_path / "out" / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert all(line.replace("\\|", "").count("|") == 6 for line in table)
    assert table[0] in proc.stdout  # printed as well as written


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dry_run_engine_stop_and_resume(tmp_path):
    """The engine part at tiny sizes on the CPU (three DeepSpeed runs, so outside the default
    suite, which tests stop and resume in fp32 already): the bf16 run is stopped by SIGUSR1 and
    resumed bit for bit."""
    proc, rows = _run(tmp_path, "--parts", "engine", timeout=600)
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + log[-4000:]
    assert _status(rows, "engine", "SIGUSR1") == ["PASS"]
    assert _status(rows, "engine", "per-step loss/total") == ["PASS", "PASS"]
    assert _status(rows, "engine", "precision bf16") == ["PASS"]
    assert "resumed from" in log and "torch.bfloat16" in log  # the children's output is in the log


def test_a_part_past_its_time_box_is_killed_and_the_next_part_still_runs(tmp_path):
    proc, rows = _run(tmp_path, "--parts", "shd_loss:2,oracle", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert _status(rows, "shd_loss", "bench/shd_loss.py run") == ["FAIL"]
    oracle = [r["status"] for r in rows if r["part"] == "oracle"]
    assert oracle and set(oracle) == {"PASS"}


def test_time_box_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    start = time.time()
    code = gpu_check.run_boxed(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], 1.0,
                               subprocess.DEVNULL, new_group=True)
    assert code is None and time.time() - start < 10
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # gone (or a zombie awaiting its reaper)


def test_unused_time_passes_on_and_given_seconds_are_kept():
    boxes = dict(gpu_check.part_boxes("engine:100,oracle,step_cost", 240))
    assert boxes["engine"] == 100
    share = 140 / (gpu_check.BOXES["oracle"] + gpu_check.BOXES["step_cost"])
    assert boxes["oracle"] == pytest.approx(gpu_check.BOXES["oracle"] * share)
    assert sum(boxes.values()) == pytest.approx(240)


@pytest.mark.parametrize("args,message", [
    (["--parts", "oracle,nope"], "--parts oracle,nope: unknown part 'nope'"),
    (["--parts", "engine:soon"], "the seconds after ':' must be a number > 0"),
    (["--budget", "0"], "--budget 0.0: must be > 0"),
    (["--device", "tpu"], "--device tpu: use cuda, cuda:N or cpu"),
])
def test_bad_arguments_are_refused_in_one_line(args, message, capsys, tmp_path):
    assert gpu_check.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_cuda_asked_for_on_a_machine_without_one_is_refused(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device is visible here" in capsys.readouterr().err
