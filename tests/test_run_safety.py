"""Nothing lost, nothing silent (issues 15 and 24), the parts that need no process group: checkpoint
verification and fallback, run-directory ownership (the lock, adoption by the same identity only,
no silent restart, explicit rollback), teacher content identity, preflight refusals. The
multi-process counterparts (real runs refused, moved aside, resumed past damage, a second live
run) are in test_run_safety_mp.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checkpoint import records as ckpt
from pipeline.checkpoint.resume_contract import RunIdentity
from pipeline.checkpoint.run_dir import RUN_FILE, RunDirRefused, RunDirs, claim, record_save
from pipeline.checkpoint.run_lock import LOCK_FILE, RunDirLocked, RunLock
from pipeline.config import ConfigError, config_from_dict
from pipeline.models.identity import teacher_identity
from pipeline.training.preflight import Preflight
from tests.helpers import tiny_config


def _checkpoint(root: Path, step: int, run_id: str | None, payload: bytes = b"x" * 300) -> Path:
    """A committed checkpoint directory as commit() leaves it (files stand in for DeepSpeed's)."""
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"model" * 10)
    state = {"step": step} if run_id is None else {"step": step, "run_id": run_id}
    ckpt.commit(root, path, ckpt.Records(state, "resolved: config\n", "{}"))
    return path


def test_verify_names_missing_truncated_and_corrupt_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "HASHED_MAX_BYTES", 100)  # the 300-byte file is checked by size only
    path = _checkpoint(tmp_path, 2, "run-a")
    assert ckpt.verify(path) == []
    optim = path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(b"x" * 299)
    model = path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model.write_bytes(b"MODEL" * 10)  # same size, other content
    (path / "rng_rank00000.pt").unlink(missing_ok=True)
    (path / ckpt.STATE).unlink()
    problems = "\n".join(ckpt.verify(path))
    assert f"{optim}: 299 bytes, COMPLETE records 300" in problems
    assert f"{model}: content differs" in problems
    assert f"{path / ckpt.STATE}: missing" in problems


def test_legacy_empty_marker_still_resumes(tmp_path):
    path = _checkpoint(tmp_path, 2, None)
    (path / ckpt.COMPLETE).write_text("")
    assert ckpt.verify(path) == [] and ckpt.find_latest(tmp_path) == path


def test_find_latest_passes_over_a_damaged_checkpoint_with_a_warning(tmp_path):
    older = _checkpoint(tmp_path, 2, "run-a")
    newer = _checkpoint(tmp_path, 4, "run-a")
    (newer / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    warnings: list[str] = []
    assert ckpt.find_latest(tmp_path, warn=warnings.append) == older
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "optim_states.pt: 10 bytes" in warnings[0]
    (older / ckpt.STATE).unlink()
    assert ckpt.find_latest(tmp_path) is None


def test_resolve_refuses_a_damaged_checkpoint_naming_the_file(tmp_path, capsys):
    path = _checkpoint(tmp_path, 2, "run-a")
    (path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(SystemExit) as e:
        ckpt.resolve(path)
    assert e.value.code == 2
    assert "optim_states.pt: missing" in capsys.readouterr().err


def test_prune_counts_and_removes_only_this_runs_checkpoints(tmp_path):
    theirs = [_checkpoint(tmp_path, s, "run-a") for s in (2, 4, 6)]
    mine = [_checkpoint(tmp_path, s, "run-b") for s in (1, 3, 5)]
    (tmp_path / "step_00000000").mkdir()  # an incomplete leftover older than this run's newest
    removed = ckpt.prune(tmp_path, keep_last=2, run_id="run-b")
    assert removed == [mine[0], tmp_path / "step_00000000"]
    assert all(p.is_dir() for p in theirs + mine[1:])


# ----------------------------------------------------------------------------------------------
# run directory ownership
# ----------------------------------------------------------------------------------------------


def _dirs(tmp_path: Path) -> RunDirs:
    out = tmp_path / "run"
    return RunDirs(output=out, checkpoints=out / "checkpoints", tensorboard=out / "tb")


def _used(dirs: RunDirs) -> tuple[str, Path]:
    """A directory left by a finished run: marker, metrics, TensorBoard events, two checkpoints."""
    run_id, _ = claim(dirs, None, restart=False, move_aside=False)
    (dirs.output / "metrics.jsonl").write_text('{"step": 1}\n')
    dirs.tensorboard.mkdir(parents=True)
    (dirs.tensorboard / "events.out.tfevents.1.host").write_bytes(b"tb")
    _checkpoint(dirs.checkpoints, 2, run_id)
    return run_id, _checkpoint(dirs.checkpoints, 4, run_id)


def test_a_fresh_run_gets_an_id_and_configs_or_logs_do_not_make_a_dir_used(tmp_path):
    dirs = _dirs(tmp_path)
    dirs.output.mkdir()
    (dirs.output / "config.yaml").write_text("seed: 1\n")  # what the bench writes before a run
    (dirs.output / "launch.log").write_text("starting\n")
    run_id, moved = claim(dirs, None, restart=False, move_aside=False)
    assert moved == [] and json.loads(dirs.marker.read_text())["run_id"] == run_id


def test_a_new_run_in_a_used_dir_is_refused_and_nothing_is_touched(tmp_path):
    dirs = _dirs(tmp_path)
    _used(dirs)
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(RunDirRefused) as e:
        claim(dirs, None, restart=False, move_aside=False)
    msg = str(e.value)
    assert str(dirs.output) in msg and "step_00000004" in msg
    assert "new output_dir" in msg and "--move-aside" in msg and "--resume auto" in msg
    assert "resume=none" not in msg
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_move_aside_renames_the_old_run_and_deletes_nothing(tmp_path):
    dirs = _dirs(tmp_path)
    old_id, newest = _used(dirs)
    new_id, moved = claim(dirs, None, restart=False, move_aside=True)
    assert new_id != old_id and len(moved) == 4
    (aside,) = tmp_path.glob("run.moved-*")
    assert json.loads((aside / RUN_FILE).read_text())["run_id"] == old_id
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert ckpt.verify(aside / "checkpoints" / newest.name) == []
    assert (aside / "tb" / "events.out.tfevents.1.host").is_file()
    assert not dirs.checkpoints.exists() and json.loads(dirs.marker.read_text())["run_id"] == new_id


def test_move_aside_of_checkpoints_kept_outside_the_output_dir(tmp_path):
    out = tmp_path / "run"
    dirs = RunDirs(output=out, checkpoints=tmp_path / "scratch" / "ckpts", tensorboard=out / "tb")
    _used(dirs)
    claim(dirs, None, restart=False, move_aside=True)
    assert [p.name.split("-")[0] for p in (tmp_path / "scratch").iterdir()] == ["ckpts.moved"]


def test_resume_and_requeue_keep_the_run_id(tmp_path):
    dirs = _dirs(tmp_path)
    run_id, newest = _used(dirs)
    assert claim(dirs, newest, restart=False, move_aside=False) == (run_id, [])  # resume of its own checkpoint
    fresh = _dirs(tmp_path / "b")
    first, _ = claim(fresh, None, restart=True, move_aside=False)
    (fresh.output / "metrics.jsonl").write_text('{"step": 1}\n')
    assert claim(fresh, None, restart=True, move_aside=False) == (first, [])  # requeued before its first save
    with pytest.raises(RunDirRefused):  # but --resume none there is a new run
        claim(fresh, None, restart=False, move_aside=False)


def test_checkpoints_of_another_run_under_this_output_dir_are_refused(tmp_path):
    dirs = _dirs(tmp_path)
    _used(dirs)
    other = _checkpoint(dirs.checkpoints, 6, "someone-else")
    with pytest.raises(RunDirRefused, match="belong to different runs"):
        claim(dirs, other, restart=False, move_aside=False)


def test_starting_from_another_runs_checkpoint_in_a_used_dir_is_refused(tmp_path):
    dirs = _dirs(tmp_path)
    _used(dirs)
    source = _checkpoint(tmp_path / "elsewhere", 8, "source-run")
    with pytest.raises(RunDirRefused, match="new run from"):
        claim(dirs, source, restart=False, move_aside=False)
    fresh = _dirs(tmp_path / "new")
    run_id, _ = claim(fresh, source, restart=False, move_aside=False)
    assert run_id != "source-run"  # a new run that starts from that checkpoint


# ----------------------------------------------------------------------------------------------
# issue 24: one live run per directory, adoption by identity, no silent restart, explicit rollback
# ----------------------------------------------------------------------------------------------


def test_a_second_start_is_refused_naming_the_live_holder(tmp_path):
    """Case 2: two runs started together in one output_dir both ran (there was no lock)."""
    out = tmp_path / "run"
    held = RunLock(out)
    held.set_run_id("run-a")
    with pytest.raises(RunDirLocked) as e:
        RunLock(out)
    msg = str(e.value)
    assert f"output_dir {out} is in use by a live run (host {os.uname().nodename}, pid {os.getpid()}, run run-a" in msg
    assert "another output_dir" in msg
    held.release()
    RunLock(out).release()  # released: the next start takes it


def test_two_output_dirs_sharing_a_checkpoint_dir_are_refused(tmp_path):
    """Each output_dir was locked, but two live runs with different output_dirs and one
    checkpoint.dir would both write there: checkpoint.dir outside output_dir is locked too."""
    from pipeline.checkpoint.checkpointer import Checkpointer

    def start(out: str, ckpts: Path) -> Checkpointer:
        cfg = config_from_dict(tiny_config(tmp_path / out, (tmp_path / "tok", tmp_path / "data"), None,
                                           **{"checkpoint.dir": str(ckpts)}))
        c = Checkpointer(cfg, world=1, rank=0)
        c.lock_run_dir()
        return c

    shared = tmp_path / "shared_checkpoints"
    first = start("a", shared)
    with pytest.raises(RunDirLocked) as e:
        start("b", shared)
    assert f"checkpoint.dir {shared} is in use by a live run (host " in str(e.value)
    assert "another checkpoint.dir" in str(e.value)
    other = start("b", tmp_path / "own_checkpoints")  # the refused start left output_dir b free
    inside = start("c", tmp_path / "c" / "checkpoints")  # under its output_dir: one lock, as before
    assert [len(c.locks) for c in (first, other, inside)] == [2, 2, 1]
    for c in (first, other, inside):
        for lock in c.locks:
            lock.release()
    start("b", shared)  # released: the next start takes it


def test_a_dead_holders_lock_is_free(tmp_path):
    """The kernel drops the flock of a killed process: no stale lock to remove by hand."""
    out = tmp_path / "run"
    code = (f"from pathlib import Path; from pipeline.checkpoint.run_lock import RunLock; lock = RunLock(Path({str(out)!r})); "
            f"print('held', flush=True); import time; time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
            RunLock(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(out).release()
    assert (out / LOCK_FILE).is_file()


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        RunLock(tmp_path / "run")
    assert (tmp_path / "run").read_text() == "notes"


def _identity(seed: int = 7, teacher: str = "aa") -> RunIdentity:
    return RunIdentity({"seed": seed, "stage": "distill"}, {"teacher": {"path": "/t", "content_sha256": teacher}})


def test_a_dead_runs_directory_is_adopted_only_by_the_same_run(tmp_path):
    """Case 3: a run killed before its first checkpoint was continued by a start with another config."""
    dirs = _dirs(tmp_path)
    run_id, _ = claim(dirs, None, restart=True, move_aside=False, identity=_identity())
    (dirs.output / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirRefused) as e:
        claim(dirs, None, restart=True, move_aside=False, identity=_identity(seed=8, teacher="bb"))
    msg = str(e.value)
    assert f"run {run_id} in {dirs.output} (it stopped before its first checkpoint)" in msg
    assert "seed: run.json has 7, this run has 8" in msg and "teacher: run.json has" in msg
    assert "--move-aside" in msg and (dirs.output / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert claim(dirs, None, restart=True, move_aside=False, identity=_identity()) == (run_id, [])  # a requeue


def test_no_checkpoint_where_run_json_says_the_run_saved_some_is_refused(tmp_path):
    """Case 7 (checkpoint.dir changed on resume) and 8: the run trained again from step 1."""
    dirs = _dirs(tmp_path)
    run_id, _ = claim(dirs, None, restart=True, move_aside=False, identity=_identity())
    record_save(dirs, 8)
    record = json.loads(dirs.marker.read_text())
    assert (record["output_dir"], record["checkpoint_dir"]) == (str(dirs.output), str(dirs.checkpoints))
    assert record["saved_step"] == 8 and record["identity"] == _identity().to_json()
    elsewhere = RunDirs(output=dirs.output, checkpoints=tmp_path / "ck2", tensorboard=dirs.tensorboard)
    with pytest.raises(RunDirRefused) as e:
        claim(elsewhere, None, restart=True, move_aside=False, identity=_identity())
    msg = str(e.value)
    assert f"says run {run_id} saved checkpoints up to step 8 in {dirs.checkpoints}" in msg
    assert f"checkpoint.dir is now {tmp_path / 'ck2'}" in msg and f"checkpoint.dir={dirs.checkpoints}" in msg
    with pytest.raises(RunDirRefused, match="no checkpoint was found there: starting at step 1"):
        claim(dirs, None, restart=True, move_aside=False, identity=_identity())


def test_resuming_an_older_checkpoint_is_refused_and_rollback_moves_the_newer_aside(tmp_path):
    """Case 1: steps 7-8 trained from step 6, and the old step 8 stayed (the save returned early)."""
    dirs = _dirs(tmp_path)
    run_id, _ = _used(dirs)
    older = dirs.checkpoints / "step_00000002"
    newer = dirs.checkpoints / "step_00000004"
    (dirs.checkpoints / "step_00000004_universal").mkdir()
    before = sorted(p.name for p in dirs.checkpoints.iterdir())
    with pytest.raises(RunDirRefused) as e:
        claim(dirs, older, restart=False, move_aside=False)
    assert "older than this run's newest checkpoint(s) step_00000004" in str(e.value) and "--rollback" in str(e.value)
    assert sorted(p.name for p in dirs.checkpoints.iterdir()) == before
    assert claim(dirs, newer, restart=False, move_aside=False)[0] == run_id  # the newest: no rollback
    again, moved = claim(dirs, older, restart=False, move_aside=False, rollback=True)
    assert again == run_id and [src.name for src, _ in moved] == ["step_00000004", "step_00000004_universal"]
    assert all(dst.name.startswith(src.name + ".rolled-back-") and dst.is_dir() for src, dst in moved)
    assert [p.name for p in ckpt.complete_checkpoints(dirs.checkpoints)] == ["step_00000002"]


# ----------------------------------------------------------------------------------------------
# teacher identity and preflight
# ----------------------------------------------------------------------------------------------


def _llama(out: Path, vocab: int, seed: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    return out


def test_teacher_identity_sees_weights_replaced_in_place(tmp_path):
    teacher = _llama(tmp_path / "t", 100, seed=0)
    ident, files = teacher_identity(teacher)
    assert set(files) == {"config.json", "model.safetensors"}
    size = files["model.safetensors"]["bytes"]
    _llama(teacher, 100, seed=1)  # same shapes, other weights, same path
    assert (teacher / "model.safetensors").stat().st_size == size
    changed, _ = teacher_identity(teacher, known=files)
    assert changed["path"] == ident["path"] and changed["content_sha256"] != ident["content_sha256"]


def test_teacher_identity_rehashes_only_files_whose_size_or_mtime_changed(tmp_path):
    teacher = _llama(tmp_path / "t", 100, seed=0)
    ident, files = teacher_identity(teacher)
    # A recorded hash is trusted while size and mtime match, so it is not re-read: a wrong one shows.
    stale = {n: dict(r, sha256="0" * 64) for n, r in files.items()}
    assert teacher_identity(teacher, known=stale)[0] != ident
    weights = teacher / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched only
    again, refreshed = teacher_identity(teacher, known=files)
    assert again == ident and refreshed["model.safetensors"]["mtime_ns"] != files["model.safetensors"]["mtime_ns"]


def test_gpt2_teacher_is_refused_for_shd_before_loading_and_accepted_for_kd(tiny_data, tmp_path):
    from transformers import GPT2Config

    from pipeline.data.reader import read_manifest

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2")
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tmp_path / "gpt2",
                                       **{"distill.layer_map": [0, 1]}))
    with pytest.raises(ConfigError) as e:
        Preflight(cfg)
    assert "teacher (gpt2" in str(e.value) and "distill.w_shd=0" in str(e.value)
    kd_only = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tmp_path / "gpt2", **{"distill.w_shd": 0.0}))
    assert Preflight(kd_only).pairs is None


def test_missing_eval_split_is_refused_at_start_up(tiny_data, tmp_path):
    from data_prep.shard import ShardOptions, build_shards
    from tests.data_fixtures import tiny_documents, write_jsonl

    tok, _ = tiny_data
    corpus = write_jsonl(tmp_path / "corpus.jsonl", tiny_documents(120))
    data = tmp_path / "no_val"
    build_shards(ShardOptions(inputs=(str(corpus),), tokenizer=tok, out=data, val_fraction=0.0, shard_tokens=2000))
    over = {"data.dir": str(data), "eval.at_end": True}
    with pytest.raises(ConfigError) as e:
        Preflight(config_from_dict(tiny_config(tmp_path / "run", tiny_data, None, **over)))
    assert "eval.split='val'" in str(e.value) and "--val-fraction" in str(e.value)
    assert "eval.at_end=false" in str(e.value)
    off = dict(over, **{"eval.at_end": False})
    Preflight(config_from_dict(tiny_config(tmp_path / "run", tiny_data, None, **off)))


def test_soft_capped_teacher_is_refused_for_shd_from_its_config(tiny_data, tmp_path):
    from transformers import Gemma2Config

    from pipeline.data.reader import read_manifest

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=128).save_pretrained(tmp_path / "gemma2")
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tmp_path / "gemma2",
                                       **{"distill.layer_map": [0, 1]}))
    with pytest.raises(ConfigError, match="soft-capping") as e:
        Preflight(cfg)
    assert "distill.w_shd=0" in str(e.value)
