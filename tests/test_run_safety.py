"""Nothing lost, nothing silent (issue 15), the parts that need no process group: checkpoint
verification and fallback, run-directory ownership, teacher content identity, preflight refusals.
The multi-process counterparts (real runs refused, moved aside, resumed past damage) are in
test_run_safety_mp.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline import checkpoint as ckpt
from pipeline.identity import teacher_identity
from pipeline.preflight import Preflight
from pipeline.config import ConfigError, config_from_dict
from pipeline.run_dir import RUN_FILE, RunDirRefused, RunDirs, claim
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

    from pipeline.data import read_manifest

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

    from pipeline.data import read_manifest

    vocab = read_manifest(tiny_data[1]).tokenizer.vocab_size
    Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=128).save_pretrained(tmp_path / "gemma2")
    cfg = config_from_dict(tiny_config(tmp_path / "run", tiny_data, tmp_path / "gemma2",
                                       **{"distill.layer_map": [0, 1]}))
    with pytest.raises(ConfigError, match="soft-capping") as e:
        Preflight(cfg)
    assert "distill.w_shd=0" in str(e.value)
