"""Config: keys, types, values, overrides, derived values; every shipped config loads; the file's
syntax (line and column of an error, keys given twice, encoding); the train command line (no
abbreviations, a flag and its own key together refused, ``--check``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict, config_from_saved, derive, dump_yaml, load_config
from pipeline.runtime.faults import CONFIG_ERROR_EXIT_CODE
from pipeline.train import flag_overrides, main, parse_args
from pipeline.training.deepspeed_config import build_ds_configs
from tests.helpers import tiny_config, write_config

REPO = Path(__file__).resolve().parents[1]
BASE = {"teacher": {"path": "t"}, "data": {"dir": "d"}}


def cfg(**over):
    return config_from_dict(BASE, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    c = load_config(path)
    student_ds, teacher_ds = build_ds_configs(c, world_size=2)
    assert student_ds["train_batch_size"] == c.data.micro_batch_size * c.optim.grad_accum_steps * 2
    assert teacher_ds["zero_optimization"]["stage"] == 3 and "optimizer" not in teacher_ds


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_ds_configs_build(path):
    c = config_from_dict(BASE, [f"deepspeed.config={path}"])
    student_ds, _ = build_ds_configs(c, world_size=4)
    assert student_ds["zero_optimization"]["stage"] == 3
    assert student_ds["gradient_accumulation_steps"] == c.optim.grad_accum_steps
    assert student_ds["bf16"]["enabled"] is False  # CPU: auto -> fp32


def test_overrides_and_types():
    c = cfg(**{"optim.lr": "1e-3", "distill.student_layers": "[0, 2]", "student.num_kv_heads": "null",
               "distill.plan": "group", "optim.max_steps": "10", "optim.warmup_steps": "0"})
    assert c.optim.lr == 1e-3 and c.distill.student_layers == [0, 2] and c.distill.plan == "group"
    assert c.student.num_kv_heads is None
    assert cfg(**{"optim.lr": "1"}).optim.lr == 1.0  # int accepted for float


@pytest.mark.parametrize("over, fragment", [
    ({"optim.lrr": "1"}, "unknown config key(s): optim.lrr"),
    ({"nonsense.x": "1"}, "unknown config key(s): nonsense"),
    ({"optim.max_steps": "ten"}, "config key 'optim.max_steps': expected int"),
    ({"optim.max_steps": "1.5"}, "config key 'optim.max_steps': expected int"),
    ({"student.activation_checkpointing": "1"}, "'student.activation_checkpointing': expected bool"),
    ({"distill.plan": "pairs"}, "'distill.plan': expected one of 'pairwise'"),
    ({"distill.student_layers": "[0, x]"}, "'distill.student_layers[1]': expected int"),
    ({"checkpoint.keep_last": "1"}, "checkpoint.keep_last must be >= 2"),
    ({"optim.warmup_steps": "5000"}, "optim.warmup_steps (5000) must be in"),
    ({"data.seq_len": "4096", "student.max_position_embeddings": "2048"}, "exceeds student.max_position_embeddings"),
    ({"student.num_heads": "5"}, "must be divisible by student.num_heads"),
    ({"student.num_kv_heads": "3"}, "must be a multiple of student.num_kv_heads"),
    ({"teacher.path": "null"}, "teacher.path is required for stage 'distill'"),
    ({"stage": "pretrain"}, "teacher.path is set but stage is 'pretrain'"),
    ({"teacher.offload_params": "true", "teacher.placement": "replicated"},
     "teacher.offload_params=true needs teacher.placement=partitioned"),
    ({"teacher.placement": "everywhere"}, "'teacher.placement': expected one of"),
    ({"distill.tau_kd": "0"}, "distill.tau_kd must be > 0"),
    ({"distill.sharpen": "0"}, "distill.sharpen must be > 0"),
    ({"distill.merge": "mean"}, "'distill.merge': expected one of 'prob'"),
    ({"distill.shd_divergence": "backward"}, "'distill.shd_divergence': expected one of 'forward'"),
    ({"distill.shd_warmup_steps": "-1"}, "distill.shd_warmup_steps must be >= 0"),
    ({"distill.select_calibration_batches": "0"}, "distill.select_calibration_batches must be >= 1"),
    ({"distill.select_heads": "best"}, "'distill.select_heads': expected one of 'first'"),
    ({"distill.plan": "pairwise", "distill.select_heads": "reconstruct"},
     "distill.select_heads=reconstruct only applies to distill.plan=select"),
    ({"distill.plan": "select", "distill.mixing_weights": "calibrated"},
     "distill.mixing_weights=calibrated only applies to distill.plan=pairwise or group"),
    ({"distill.mixing_weights": "static"}, "'distill.mixing_weights': expected one of 'per_sequence'"),
    ({"distill.w_ce": "0", "distill.w_kd": "0", "distill.w_shd": "0"}, "nothing to train"),
    ({"debug.nonfinite_weights_at_step": "x"}, "'debug.nonfinite_weights_at_step': expected int"),
    ({"debug.nonfinite_weights_at_step": "0"}, "debug.nonfinite_weights_at_step must be >= 1"),
    ({"debug.nan_loss_at_steps": "[0, 2]"}, "debug.nan_loss_at_steps must hold 1-based steps"),
])
def test_bad_values_fail_with_their_message(over, fragment):
    with pytest.raises(ConfigError) as e:
        cfg(**over)
    assert fragment in str(e.value)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher: {path: t}\ndata: {dir: d, seqlen: 3}\n")
    with pytest.raises(ConfigError, match=r"data\.seqlen"):
        load_config(p)


def test_ds_json_conflicts_are_refused(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 3}))
    c = config_from_dict(BASE, [f"deepspeed.config={p}"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=3"):
        build_ds_configs(c, 1)
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="stage must be 3"):
        build_ds_configs(c, 1)
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer' section"):
        build_ds_configs(c, 1)


def test_derived_and_resolved_roundtrip():
    c = cfg(**{"data.micro_batch_size": "4", "optim.grad_accum_steps": "3", "data.seq_len": "64",
               "optim.max_steps": "10", "optim.warmup_steps": "1"})
    d = derive(c, world_size=8)
    assert d.global_batch_size == 4 * 3 * 8 and d.tokens_per_step == 96 * 64
    assert d.total_tokens == 96 * 64 * 10
    text = dump_yaml(c, d)
    assert "global_batch_size: 96" in text
    assert config_from_saved(text) == c



# ------------------------------------------------------------------------------------------------
# Non-finite numbers, the file's syntax, overrides given twice
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("optim.lr", ".inf"), ("optim.min_lr", "-.inf"), ("distill.tau_kd", ".nan"), ("optim.eps", ".NaN"),
    ("student.rope_theta", "1e999"),  # YAML 1.1 leaves it a string; float() makes it inf
    ("distill.sharpen", "1.0e999"), ("optim.weight_decay", str(10**400)),  # an int too big for a float
])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"config key '{key}': .* is not a finite number"):
        cfg(**{key: value})


def test_non_finite_float_in_the_file_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher: {path: t}\ndata: {dir: d}\ndistill:\n  w_kd: .inf\n")
    with pytest.raises(ConfigError, match=r"'distill\.w_kd': inf is not a finite number"):
        load_config(p)


@pytest.mark.parametrize("text, key, lines", [
    ("optim:\n  lr: 0.1\ndata: {dir: d}\noptim:\n  max_steps: 9\n", "optim", (1, 4)),
    ("teacher: {path: t}\noptim:\n  lr: 0.1\n  warmup_steps: 0\n  lr: 0.2\n", "optim.lr", (3, 5)),
    ("distill:\n  student_layers: [0]\nteacher: {path: t, offload_params: true, path: u}\n", "teacher.path", (3, 3)),
])
def test_key_given_twice_in_the_file_is_refused(tmp_path, text, key, lines):
    p = tmp_path / "twice.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (f"config file {p}: key '{key}' is given twice (line {lines[0]} and line {lines[1]}): "
                            f"keep one (the second would silently replace the first)")


def test_anchors_and_aliases_still_load(tmp_path):
    p = tmp_path / "alias.yaml"
    p.write_text("teacher: {path: t}\ndata: &d {dir: d}\neval: {split: val}\nx_unused: *d\n")
    with pytest.raises(ConfigError, match="unknown config key"):  # read fine; the key itself is unknown
        load_config(p)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("teacher:\n  path: t\n offload_params: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"config file {p}: line 3, column 2: expected <block end>")
    assert "\n" not in str(e.value)


def test_config_file_that_is_not_utf8_or_a_directory(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("teacher: {path: t}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config file {p}: line 2: byte 0xe9 is not valid UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match=rf"config file {tmp_path}: is a directory"):
        load_config(tmp_path)


def test_same_override_twice_is_refused():
    with pytest.raises(ConfigError, match=r"override 'optim\.lr' is given twice \('optim\.lr=1' and "
                                          r"' optim\.lr=2'\): give it once"):
        cfg(**{"optim.lr": "1", " optim.lr": "2"})


def test_file_key_plus_override_is_the_normal_override(tmp_path):
    p = write_config(tmp_path / "c.yaml", {**BASE, "optim": {"lr": 0.1}})
    assert load_config(p, ["optim.lr=0.2"]).optim.lr == 0.2


# ------------------------------------------------------------------------------------------------
# The train command line
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [  # abbreviated flags: tests/test_cli_contract.py
    (["--resume", "a", "--resume", "b"], "--resume is given twice: give it once"),
    (["--config", "a", "optim.lr=1", "--config", "b"], "--config is given twice: give it once"),
])
def test_repeated_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == CONFIG_ERROR_EXIT_CODE and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, both", [
    (["--resume", "none", "checkpoint.resume=auto"], "--resume and 'checkpoint.resume=auto'"),
    (["checkpoint.force_resume=false", "--force-resume"], "--force-resume and 'checkpoint.force_resume=false'"),
    (["--move-aside", "checkpoint.move_aside=true"], "--move-aside and 'checkpoint.move_aside=true'"),
])
def test_flag_and_its_key_together_are_refused(tmp_path, capsys, argv, both):
    path = write_config(tmp_path / "c.yaml", BASE)
    assert main(["--config", str(path), *argv]) == CONFIG_ERROR_EXIT_CODE
    assert f"error: {both} are both given" in capsys.readouterr().err


def test_flags_set_their_keys():
    args = parse_args(["--resume", "none", "--force-resume", "--move-aside", "optim.lr=1"])
    c = config_from_dict(BASE, flag_overrides(args))
    assert (c.checkpoint.resume, c.checkpoint.force_resume, c.checkpoint.move_aside) == ("none", True, True)
    assert config_from_dict(BASE).checkpoint.move_aside is False


def test_check_validates_without_training(tmp_path, capsys, tiny_data, tiny_teacher):
    import torch.distributed as dist

    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", tiny_data, tiny_teacher))
    assert main(["--check", "--config", str(path), "optim.max_steps=3"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"config OK: {path}: stage distill, student 2 layers x 3 heads") and "\n" not in out
    assert "teacher 4 layers x 8 heads" in out and "3 steps" in out
    assert not dist.is_initialized() and not (tmp_path / "run").exists()  # no process group, nothing written
    assert main(["--check", "--config", str(path), f"data.dir={tmp_path}"]) == CONFIG_ERROR_EXIT_CODE
    assert "data error:" in capsys.readouterr().err
