"""The resume contract (issue 24, mechanisms 2-4): every config key has a declared class, identity
changes are refused before any model loads, schedule changes are applied for real, a rollback is
explicit and a run never silently restarts at step 1.

Unit tests of the declaration and of ``Checkpointer``'s start-up checks (on checkpoint directories
as ``commit`` leaves them), then one chain of real one-rank runs: a rollback with ``--rollback``
(case 1) and optimizer settings changed on resume (case 6).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest

from pipeline.checkpoint import records as ckpt
from pipeline.checkpoint.checkpointer import Checkpointer, ResumeRefused
from pipeline.checkpoint.resume_contract import CONTENT, FREE, IDENTITY, SCHEDULE
from pipeline.config import KEY_CLASSES, RESUME_CLASSES, RunConfig, config_from_dict, dump_yaml, help_text
from pipeline.train import flag_overrides, parse_args
from pipeline.training.builders import lr_lambda
from shd_common.settings import ConfigError, declared_classes, leaf_keys
from tests.helpers import run_ranks, step_losses, tiny_config

RECORD = {"teacher": {"path": "/models/t", "content_sha256": "aa"}, "tokenizer_sha256": "tok",
          "data_sha256": "data", "student_shape": {"layers": 2}, "seq_len": 32}


def _cfg(tmp_path: Path, **over) -> RunConfig:
    return config_from_dict(tiny_config(tmp_path / "run", (tmp_path / "tok", tmp_path / "data"), None, **over))


def _saved(cfg: RunConfig, step: int, record: dict = RECORD) -> Path:
    """A committed checkpoint of ``cfg`` at ``step`` (files stand in for DeepSpeed's)."""
    path = cfg.checkpoint_dir / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"model")
    state = {"step": step, "run_id": "run-a", "world_size": 1, "identity": record}
    ckpt.commit(cfg.checkpoint_dir, path, ckpt.Records(state, dump_yaml(cfg), "{}"))
    return path


def _check(saved_cfg: RunConfig, now: RunConfig, record: dict = RECORD, step: int = 6) -> Checkpointer:
    """Checkpointer.check_resume of ``now`` against a checkpoint saved by ``saved_cfg``."""
    _saved(saved_cfg, step)
    c = Checkpointer(now, world=1, rank=0)
    c.check_resume(c.choose_resume(), record)
    return c


# ----------------------------------------------------------------------------------------------
# the declaration
# ----------------------------------------------------------------------------------------------


def test_every_leaf_key_of_the_run_config_has_exactly_one_class():
    assert set(KEY_CLASSES) == set(leaf_keys(RunConfig))
    assert set(KEY_CLASSES.values()) == {IDENTITY, CONTENT, SCHEDULE, FREE}
    assert KEY_CLASSES["seed"] == IDENTITY and KEY_CLASSES["optim.lr"] == SCHEDULE
    assert KEY_CLASSES["teacher.path"] == CONTENT and KEY_CLASSES["checkpoint.dir"] == FREE
    missing = {cls: tuple(k for k in keys if k != "seed") for cls, keys in RESUME_CLASSES.items()}
    with pytest.raises(TypeError, match="seed has none"):
        declared_classes(RunConfig, missing)
    twice = dict(RESUME_CLASSES, **{FREE: RESUME_CLASSES[FREE] + ("seed",)})
    with pytest.raises(TypeError, match="seed has"):
        declared_classes(RunConfig, twice)
    with pytest.raises(TypeError, match="'optim.lrr', which is no key"):
        declared_classes(RunConfig, dict(RESUME_CLASSES, **{FREE: RESUME_CLASSES[FREE] + ("optim.lrr",)}))
    assert "  optim.lr (float, default 0.0003): Peak learning rate (AdamW). [on resume: schedule]" in help_text()


# ----------------------------------------------------------------------------------------------
# start-up checks of a resume (no model is built)
# ----------------------------------------------------------------------------------------------


def test_identity_change_is_refused_before_any_model_loads_naming_each_key(tmp_path):
    """The seed changed on resume was refused only after the models loaded (by the data reader)."""
    with pytest.raises(ResumeRefused) as e:
        _check(_cfg(tmp_path), _cfg(tmp_path, seed=8, **{"data.seq_len": 16, "deepspeed.precision": "bf16"}))
    msg = str(e.value)
    assert "deepspeed.precision: checkpoint has 'fp32', this run has 'bf16'" in msg  # was: FileNotFoundError
    assert "refusing to resume from" in msg and "seed: checkpoint has 7, this run has 8" in msg
    assert "data.seq_len: checkpoint has 32, this run has 16" in msg
    assert "new output_dir" in msg and "--move-aside" in msg and "force-resume" not in msg


def test_only_a_teacher_change_can_be_forced(tmp_path):
    other_teacher = dict(RECORD, teacher={"path": "/models/u", "content_sha256": "bb"})
    with pytest.raises(ResumeRefused) as e:
        _check(_cfg(tmp_path / "a"), _cfg(tmp_path / "a", **{"data.dir": "/moved/data"}), other_teacher)
    assert "teacher: checkpoint has" in str(e.value) and "data.dir: checkpoint has" in str(e.value)
    assert "--force-resume" in str(e.value)
    forced = _check(_cfg(tmp_path / "b"), _cfg(tmp_path / "b", **{"checkpoint.force_resume": True}), other_teacher)
    assert forced.resume.changes and "teacher: checkpoint has" in forced.resume.changes[0]
    other_data = dict(RECORD, data_sha256="changed")
    with pytest.raises(ResumeRefused) as e:  # the data reader would refuse it after loading
        _check(_cfg(tmp_path / "c"), _cfg(tmp_path / "c", **{"checkpoint.force_resume": True}), other_data)
    assert "data_sha256: checkpoint has 'data'" in str(e.value) and "force-resume" not in str(e.value)
    moved = dict(RECORD, teacher={"path": "/elsewhere/t", "content_sha256": "aa"})  # same content
    _check(_cfg(tmp_path / "d"), _cfg(tmp_path / "d"), moved)


def test_schedule_and_free_changes_are_printed_at_start(tmp_path):
    c = _check(_cfg(tmp_path), _cfg(tmp_path, **{"optim.lr": 1e-3, "optim.beta2": 0.5, "logging.every_steps": 5,
                                                 "optim.max_steps": 12}))
    (diff,) = [n for n in c.notices if n.startswith("resume contract")]
    assert "optim.lr: 0.003 -> 0.001 (schedule: applied from the next step)" in diff
    assert "optim.beta2: 0.95 -> 0.5 (schedule" in diff and "logging.every_steps: 1 -> 5 (free: as given)" in diff
    unchanged = _check(_cfg(tmp_path / "b"), _cfg(tmp_path / "b"))
    assert any("the config is the one" in n for n in unchanged.notices)


def test_max_steps_below_the_checkpoints_step_is_refused(tmp_path):
    """It trained nothing and said nothing (exit 0)."""
    with pytest.raises(ResumeRefused, match=r"optim.max_steps=4 is below the step of .*step_00000006 \(6\)"):
        _check(_cfg(tmp_path), _cfg(tmp_path, **{"optim.max_steps": 4}))


@pytest.mark.parametrize("given", ["None", "no", "off", "NONE", "false"])
def test_resume_none_however_written(tmp_path, given):
    """--resume None/no/off failed with 'expected str, got False (bool)'."""
    assert _cfg(tmp_path, **{"checkpoint.resume": given}).checkpoint.resume == "none"
    assert config_from_dict(tiny_config(tmp_path, ("t", "d"), None),
                            flag_overrides(parse_args(["--resume", given]))).checkpoint.resume == "none"
    with pytest.raises(ConfigError, match="give auto, none or a checkpoint directory"):
        _cfg(tmp_path, **{"checkpoint.resume": True})


def test_resume_naming_a_directory_of_checkpoints_says_which_to_name(tmp_path):
    """--resume RUN/checkpoints said only 'not a complete checkpoint (no COMPLETE file)'."""
    cfg = _cfg(tmp_path)
    _saved(cfg, 2)
    newest = _saved(cfg, 4)
    for given in (cfg.checkpoint_dir, cfg.output_path):
        c = Checkpointer(_cfg(tmp_path, **{"checkpoint.resume": str(given)}), world=1, rank=0)
        with pytest.raises(ResumeRefused) as e:
            c.choose_resume()
        assert f"--resume {newest}, the newest" in str(e.value) and "--resume auto" in str(e.value)


def test_paths_expand_home_and_the_run_lives_at_absolute_paths(tmp_path, monkeypatch):
    """data.dir=~/data was used as a directory named '~'; a relative output_dir is said in full."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(tiny_config(Path("runs/x"), ("~/tok", "~/data"), None, **{"checkpoint.dir": "~/ck"}))
    assert cfg.data.dir == str(tmp_path / "home" / "data") and cfg.data.tokenizer_dir == str(tmp_path / "home" / "tok")
    assert cfg.output_dir == "runs/x" and cfg.output_path == tmp_path / "runs" / "x"
    assert cfg.checkpoint_dir == tmp_path / "home" / "ck" and cfg.tb_dir == tmp_path / "runs" / "x" / "tb"
    c = Checkpointer(cfg, world=1, rank=0)
    assert c.choose_resume() is None
    assert c.notices == [f"no checkpoint in {tmp_path / 'home' / 'ck'}: this run starts at step 1 "
                         f"(output_dir {tmp_path / 'runs' / 'x'})"]


# ----------------------------------------------------------------------------------------------
# real runs: rollback (case 1), optimizer settings on resume (case 6), checkpoint.dir moved (case 7)
# ----------------------------------------------------------------------------------------------


def _hashes(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _log(work: Path) -> str:
    return (work / "logs" / "rank0.log").read_text()


def test_rollback_and_schedule_changes_on_real_runs(tmp_path, tiny_data):
    """Case 1: a branch from an older checkpoint trained steps 7-8 and kept the old step 8 (the save
    returned early); case 6: optimizer settings changed on resume were ignored. (Their refusals,
    and case 7, are decided by run_dir.claim: tests/test_run_safety.py.)"""
    out = tmp_path / "run"
    base = {"optim.max_steps": 8, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2, "optim.warmup_steps": 2,
            "optim.weight_decay": 0.1}
    run_ranks(1, tiny_config(out, tiny_data, None, **base), tmp_path / "a")
    ckpts = out / "checkpoints"
    step6, step8 = ckpts / "step_00000006", ckpts / "step_00000008"
    old8 = _hashes(step8)

    branched = tiny_config(out, tiny_data, None, **dict(base, **{"optim.lr": 1e-3, "optim.min_lr": 1e-4}))
    run_ranks(1, branched, tmp_path / "b", "--resume", str(step6), "--rollback")
    text = _log(tmp_path / "b")
    (aside,) = ckpts.glob("step_00000008.rolled-back-*")
    assert _hashes(aside) == old8 and f"moved {step8} to {aside}" in text  # kept byte for byte
    assert f"saved checkpoint {step8}" in text and ckpt.verify(step8) == []
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # the fp32 weights of ZeRO-3
    assert _hashes(step8)[optim] != old8[optim]

    changed = {"optim.max_steps": 12, "optim.lr": 1e-4, "optim.min_lr": 1e-5, "optim.weight_decay": 0.5,
               "optim.beta2": 0.5}
    resumed = tiny_config(out, tiny_data, None, **dict(base, **changed))
    records = run_ranks(1, resumed, tmp_path / "c")
    text = _log(tmp_path / "c")
    assert "optim.lr: 0.001 -> 0.0001 (schedule: applied from the next step)" in text
    assert "optim.max_steps: 8 -> 12" in text and "optim.weight_decay: 0.1 -> 0.5" in text
    assert "weight_decay after load: [0.5, 0.0], betas [(0.9, 0.5), (0.9, 0.5)]" in text
    lr = step_losses(records, "optim/lr")
    want = 1e-4 * lr_lambda(config_from_dict(resumed))(8)  # the new schedule at the loaded position
    assert math.isclose(lr[9], want, rel_tol=1e-12), (lr[9], want)
    assert sorted(lr)[-4:] == [9, 10, 11, 12]
