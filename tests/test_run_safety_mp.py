"""Nothing lost, nothing silent (issue 15) on real runs: one rank, real DeepSpeed (CPU, gloo).

- a fresh run in a used output dir is refused and touches nothing; --move-aside keeps the old run;
- a damaged newest checkpoint is named, passed over by --resume auto and refused when named;
- non-finite weights are never saved (exit 3, the last good checkpoint stays the newest);
- a teacher whose weights were replaced in place is refused at resume, a touched one is not
  (with a GPT-2 teacher, which trains logit KD with SHD off);
- a second run in a live run's output_dir is refused naming it, and once that run is killed its
  directory is adopted only by the same run (issue 24, cases 2 and 3).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.checkpoint import records as ckpt
from pipeline.checkpoint.run_lock import LOCK_FILE
from pipeline.runtime.faults import CONFIG_ERROR_EXIT_CODE, NONFINITE_EXIT_CODE
from tests.helpers import launch_ranks, logs, read_metrics, run_ranks, tiny_config, wait_for, write_config

pytestmark = pytest.mark.multiprocess


def _snapshot(root: Path) -> dict[str, str]:
    """Every file's hash, but the lock file's (it names whoever holds the directory now)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def _pretrain(out: Path, tiny_data, **over) -> dict:
    base = {"optim.max_steps": 6, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
            "eval.every_steps": 2, "optim.warmup_steps": 1}
    base.update(over)
    return tiny_config(out, tiny_data, None, **base)


def test_fresh_run_in_a_used_output_dir_is_refused_then_moved_aside(tmp_path, tiny_data):
    out = tmp_path / "run"
    run_ranks(1, _pretrain(out, tiny_data), tmp_path / "a")
    log_a = (tmp_path / "a" / "logs" / "rank0.log").read_text()
    # the step's checkpoint is written before its evaluation, and reported before the pruning
    assert log_a.index(f"saved checkpoint {out / 'checkpoints' / 'step_00000004'}") < log_a.index("eval step 4:")
    assert log_a.index(f"saved checkpoint {out / 'checkpoints' / 'step_00000006'}") \
        < log_a.index("removed old checkpoint step_00000002")
    before = _snapshot(tmp_path / "run")

    for extra in (["--resume", "none"], ["checkpoint.resume=none"]):
        work = tmp_path / f"b{len(extra)}"
        run_ranks(1, _pretrain(out, tiny_data, seed=8), work, *extra, expect=CONFIG_ERROR_EXIT_CODE)
        text = (work / "logs" / "rank0.log").read_text()
        assert f"output_dir {out} already holds another run (newest checkpoint step_00000006)" in text, text
        assert "--move-aside" in text and "Traceback" not in text
        assert _snapshot(tmp_path / "run") == before  # nothing written, nothing removed

    recs = run_ranks(1, _pretrain(out, tiny_data, seed=8, **{"optim.max_steps": 2}), tmp_path / "c",
                     "--resume", "none", "--move-aside")
    assert [r["step"] for r in recs if "loss/total" in r] == [1, 2]  # a metrics file of its own
    (aside,) = tmp_path.glob("run.moved-*")
    assert _snapshot(aside) == before  # the old run, byte for byte, under the new name
    assert [p.name for p in ckpt.complete_checkpoints(aside / "checkpoints")] == ["step_00000004", "step_00000006"]
    assert [p.name for p in ckpt.complete_checkpoints(out / "checkpoints")] == ["step_00000002"]
    assert ckpt.run_id_of(out / "checkpoints" / "step_00000002") != ckpt.run_id_of(
        aside / "checkpoints" / "step_00000006")
    assert (out / "checkpoints" / ckpt.POINTER).read_text().strip() == "step_00000002"


def test_damaged_checkpoint_is_passed_over_and_nonfinite_weights_are_never_saved(tmp_path, tiny_data):
    out = tmp_path / "run"
    cfg = _pretrain(out, tiny_data, **{"optim.max_steps": 4, "checkpoint.keep_last": 3, "eval.every_steps": 0})
    run_ranks(1, cfg, tmp_path / "a")
    newest = out / "checkpoints" / "step_00000004"
    optim = max(newest.glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    optim.write_bytes(optim.read_bytes()[:-100])  # cut short, as by a full disk or a bad copy

    run_ranks(1, cfg, tmp_path / "named", "--resume", str(newest), expect=CONFIG_ERROR_EXIT_CODE)
    text = (tmp_path / "named" / "logs" / "rank0.log").read_text()
    assert f"{optim}: " in text and "truncated" in text and "Traceback" not in text

    more = dict(cfg, optim=dict(cfg["optim"], max_steps=6), debug={"nonfinite_weights_at_step": 5})
    run_ranks(1, more, tmp_path / "auto", expect=NONFINITE_EXIT_CODE)
    text = (tmp_path / "auto" / "logs" / "rank0.log").read_text()
    assert f"WARNING: skipping damaged checkpoint {newest}" in text, logs(tmp_path / "auto" / "logs")
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'}" in text
    assert "moved damaged checkpoint step_00000004" in text
    assert "refusing to save step 6: non-finite student weights" in text
    complete = ckpt.complete_checkpoints(out / "checkpoints")
    assert [p.name for p in complete] == ["step_00000002", "step_00000004"]  # no step 6
    assert all(ckpt.verify(p) == [] for p in complete)
    assert list((out / "checkpoints").glob("step_00000004.damaged-*"))  # kept, not deleted


def test_teacher_replaced_in_place_is_refused_at_resume(tmp_path, tiny_data):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.data.reader import read_manifest

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    teacher = tmp_path / "gpt2"

    def save_teacher(seed: int) -> None:
        torch.manual_seed(seed)
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4)).save_pretrained(teacher)

    save_teacher(0)
    cfg = tiny_config(tmp_path / "run", tiny_data, teacher, **{"distill.w_shd": 0.0, "optim.max_steps": 2})
    recs = run_ranks(1, cfg, tmp_path / "a")
    assert recs[-1]["loss/kd"] > 0  # logit KD from a GPT-2 teacher trains
    weights = teacher / "model.safetensors"
    st = weights.stat()
    weights.touch()  # copied again, same bytes: not a change
    run_ranks(1, cfg, tmp_path / "touched")
    assert "resumed from" in (tmp_path / "touched" / "logs" / "rank0.log").read_text()

    save_teacher(1)  # same shapes and file size, other weights
    assert weights.stat().st_size == st.st_size
    run_ranks(1, cfg, tmp_path / "replaced", expect=CONFIG_ERROR_EXIT_CODE)
    text = (tmp_path / "replaced" / "logs" / "rank0.log").read_text()
    assert "refusing to resume" in text and "teacher: checkpoint has" in text and "content_sha256" in text


def test_a_live_runs_directory_is_refused_and_a_dead_ones_adopted_only_by_the_same_run(tmp_path, tiny_data):
    """Case 2: two runs at once in one output_dir both ran, mixing their files; case 3: a run killed
    before its first checkpoint was continued by a start with another config."""
    out = tmp_path / "run"
    cfg = _pretrain(out, tiny_data, **{"optim.max_steps": 50, "checkpoint.every_steps": 0, "eval.every_steps": 0,
                                       "debug.sleep_per_step": 0.5})
    config = write_config(tmp_path / "a" / "config.yaml", cfg)
    (live,) = launch_ranks(1, ["--config", str(config)], tmp_path / "a" / "logs")
    try:
        wait_for(lambda: len(read_metrics(out)) >= 2, 120, "the first run's second step", tmp_path / "a" / "logs")
        run_ranks(1, _pretrain(out, tiny_data, seed=8), tmp_path / "b", expect=CONFIG_ERROR_EXIT_CODE)
        text = (tmp_path / "b" / "logs" / "rank0.log").read_text()
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        assert f"output_dir {out} is in use by a live run (host " in text and f"pid {live.pid}, run {run_id}" in text
    finally:
        live.kill()
        live.wait()
    steps = [r["step"] for r in read_metrics(out)]
    run_ranks(1, _pretrain(out, tiny_data, seed=8, **{"checkpoint.every_steps": 0}), tmp_path / "c",
              expect=CONFIG_ERROR_EXIT_CODE)
    text = (tmp_path / "c" / "logs" / "rank0.log").read_text()
    assert "(it stopped before its first checkpoint)" in text and "seed: run.json has 7, this run has 8" in text
    assert "--move-aside" in text and "Traceback" not in text
    assert [r["step"] for r in read_metrics(out)] == steps  # nothing appended
