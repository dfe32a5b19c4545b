"""Config: keys, types, values, overrides, derived values; every shipped config loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict, config_from_saved, derive, dump_yaml, load_config
from pipeline.models import build_ds_configs

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
    ({"data.seq_len": "4096"}, "exceeds student.max_position_embeddings"),
    ({"student.num_heads": "5"}, "must be divisible by student.num_heads"),
    ({"student.num_kv_heads": "3"}, "must be a multiple of student.num_kv_heads"),
    ({"teacher.path": "null"}, "teacher.path is required for stage 'distill'"),
    ({"stage": "pretrain"}, "teacher.path is set but stage is 'pretrain'"),
    ({"distill.tau_kd": "0"}, "distill.tau_kd must be > 0"),
    ({"distill.sharpen": "0"}, "distill.sharpen must be > 0"),
    ({"distill.merge": "mean"}, "'distill.merge': expected one of 'prob'"),
    ({"distill.w_ce": "0", "distill.w_kd": "0", "distill.w_shd": "0"}, "nothing to train"),
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

