"""Distilling a student made by `python -m pipeline.prune` from its sources (issue 28, second part):
`student.init_from`'s pruning.json gives the layer map and, under plan=select, the heads
(`distill.select_heads=pruned`) unless the config gives them (pipeline/training/pruned.py).

The teacher is made so that what pruning removes contributes exactly nothing: its layers 1 and 3
are identities (o_proj and down_proj zero) and in layers 0 and 2 two of the four kv groups have zero
values (other groups in each layer). Pruned to 2 layers x 4 heads (2 kv heads), the student keeps
teacher layers [0, 2] (the uniform map would be [1, 3]) and, in each, the heads of the two other
groups, which are not the first heads of the contiguous 8 -> 4 grouping, GQA on both sides; and it
computes the teacher's residual stream exactly. Each student head's attention map is then its
source head's: at step 0 the SHD loss of the record's pairing is ~0 in every distilled layer (the
strongest check that layers and heads are paired right), while `first` heads or the uniform layer
map give a clearly larger one. q and k are scaled up so that the maps are sharp and differ.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.loss import capture as attn
from pipeline.prune import main as prune_main
from pipeline.pruning.record import head_sources, layer_sources, read_record
from pipeline.training import pruned
from pipeline.training.builders import build_student_module
from pipeline.training.preflight import Preflight
from tests.helpers import make_teacher, run_ranks, tiny_config
from tests.test_engine_units import _batch, _engine_shd_matches_reference

ZERO_KV = {0: (0, 2), 2: (1, 2)}  # teacher layer -> kv groups whose values are zero
SOURCE_LAYERS = [0, 2]
SOURCE_HEADS = [[2, 3, 6, 7], [0, 1, 6, 7]]  # the heads of the other kv groups (2 query heads per kv head)


@pytest.fixture(scope="module")
def pruned_pair(tmp_path_factory, tiny_data, tiny_teacher):
    """(teacher dir, pruned student dir) as the module's docstring says."""
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("pruned_pair")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            a.q_proj.weight.mul_(6.0)
            a.k_proj.weight.mul_(6.0)
            if i in (1, 3):  # an identity layer: pruning drops it, the residual stream is unchanged
                a.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            for kv in ZERO_KV.get(i, ()):  # these groups' heads add nothing: pruning drops them
                a.v_proj.weight[kv * a.head_dim:(kv + 1) * a.head_dim] = 0.0
    teacher = work / "teacher"
    model.save_pretrained(teacher)
    student = work / "student"
    assert prune_main(["--teacher", str(teacher), "--data", str(tiny_data[1]), "--out", str(student),
                       "--layers", "2", "--heads", "4", "--kv-heads", "2", "--calibration-batches", "2",
                       "--batch-size", "2", "--seq-len", "16", "--device", "cpu"]) == 0
    record = read_record(student)
    assert layer_sources(record) == SOURCE_LAYERS and head_sources(record) == SOURCE_HEADS
    return teacher, student


def _config(tmp_path, tiny_data, teacher, student, **over):
    base = {"student.init_from": str(student), "distill.plan": "select", "distill.w_shd": 1.0}
    return config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher, **{**base, **over}))


def _shd_losses(cfg, pre, tmp_path):
    """The SHD loss of each distilled layer at step 0 (checked against the dense reference)."""
    from transformers import AutoModelForCausalLM

    capture = pre.shd_capture()
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=torch.float32,
                                                   attn_implementation=attn.TEACHER_ATTN).eval()
    teacher.requires_grad_(False)
    student = build_student_module(cfg, pre.student_cfg, attn.STUDENT_ATTN)
    capture.attach(student, teacher)
    batch = _batch(pre, pad_last=3)
    got = _engine_shd_matches_reference(cfg, pre, capture, teacher, student, batch.input_ids, batch.mask)
    return capture, {s: float(v) for s, v in got.items()}


def test_record_pairs_each_student_layer_and_head_with_its_source(pruned_pair, tiny_data, tmp_path):
    """Left to the record: layer map = its source layers, select_heads = pruned, its heads selected
    (out of their contiguous groups), said at start-up; the SHD loss at step 0 is ~0 in every layer,
    and clearly larger with first heads or the uniform layer map."""
    teacher, student = pruned_pair
    cfg = _config(tmp_path, tiny_data, teacher, student)
    assert cfg.distill.layer_map is None and cfg.distill.select_heads == "first"  # as given: left to the record
    pre = Preflight(cfg)
    d = pre.cfg.distill
    assert d.layer_map == SOURCE_LAYERS and d.select_heads == "pruned"
    assert pre.pairs == {0: 0, 1: 2}
    assert pre.source_heads == {s: tuple(h) for s, h in enumerate(SOURCE_HEADS)}
    origin = f"from the pruning record {student / 'pruning.json'}"
    notes = "\n".join(pre.notes())
    assert f"distill.layer_map not given: {SOURCE_LAYERS}" in notes and "select_heads not given: pruned" in notes
    assert notes.count(origin) == 2
    capture, losses = _shd_losses(pre.cfg, pre, tmp_path)
    assert capture.chosen.selected == {0: (2, 3, 6, 7), 2: (0, 1, 6, 7)}
    assert capture.calibrated_state() == {"shd_selected_heads": {"0": [2, 3, 6, 7], "2": [0, 1, 6, 7]}}
    assert f"(pruned, {origin}): layer 0<-0: [2, 3, 6, 7], layer 1<-2: [0, 1, 6, 7]" in capture.describe()
    assert all(v < 1e-5 for v in losses.values()), losses

    # an explicit key overrides the record: first heads (the groups' first: [0, 2, 4, 6]) ...
    first = Preflight(_config(tmp_path, tiny_data, teacher, student, **{"distill.select_heads": "first"}))
    assert first.cfg.distill.select_heads == "first" and first.cfg.distill.layer_map == SOURCE_LAYERS
    assert "distill.select_heads=first given: overrides the source heads" in "\n".join(first.notes())
    capture, first_losses = _shd_losses(first.cfg, first, tmp_path)
    assert capture.chosen.selected == {0: (0, 2, 4, 6), 2: (0, 2, 4, 6)}
    # ... or the uniform layer map with the record's heads: clearly larger losses
    uniform = Preflight(_config(tmp_path, tiny_data, teacher, student, **{"distill.layer_map": [1, 3]}))
    assert uniform.pairs == {0: 1, 1: 3} and uniform.cfg.distill.select_heads == "pruned"
    _, uniform_losses = _shd_losses(uniform.cfg, uniform, tmp_path)
    for other in (first_losses, uniform_losses):
        assert all(v > 0.05 for v in other.values()), (losses, other)

    # plan pairwise: the layer map still comes from the record, no heads
    pairwise = Preflight(_config(tmp_path, tiny_data, teacher, student, **{"distill.plan": "pairwise"}))
    assert pairwise.pairs == {0: 0, 1: 2} and pairwise.source_heads is None
    assert pairwise.cfg.distill.select_heads == "first"


def test_pruned_refusals_name_the_key_and_the_fix(pruned_pair, tiny_data, tiny_teacher, tmp_path):
    """pruned without init_from or without a record, a record of another teacher (content or
    shape) or of another student, source heads that disagree on a shared teacher layer, and a
    resume whose record changed: refused before any weights load, naming the key and the fix."""
    teacher, student = pruned_pair
    with pytest.raises(ConfigError, match=r"distill.select_heads=pruned .* student.init_from is empty"):
        config_from_dict(tiny_config(tmp_path / "run", tiny_data, teacher,
                                     **{"distill.plan": "select", "distill.select_heads": "pruned"}))
    bare = tmp_path / "bare"  # the student without its record
    shutil.copytree(student, bare)
    (bare / "pruning.json").unlink()
    with pytest.raises(ConfigError, match=r"distill.select_heads=pruned needs the pruning record.*no pruning "
                                          r"record.*python -m pipeline.prune"):
        Preflight(_config(tmp_path, tiny_data, teacher, bare, **{"distill.select_heads": "pruned"}))
    plain = Preflight(_config(tmp_path, tiny_data, teacher, bare))  # no record, nothing asked: the defaults
    assert plain.cfg.distill.select_heads == "first" and plain.pairs == {0: 1, 1: 3} and plain.pruning is None

    # another teacher of the same shape: refused once its content is hashed (trainer, --check)
    other = Preflight(_config(tmp_path, tiny_data, tiny_teacher, student))
    with pytest.raises(ConfigError, match=r"pruned from another teacher.*content sha256.*set teacher.path to that "
                                          r"teacher.*give distill.layer_map explicitly"):
        other.check_teacher_content()
    Preflight(_config(tmp_path, tiny_data, teacher, student)).check_teacher_content()  # its own teacher passes
    # explicit layer map and heads: the record is not used, any teacher goes
    free = Preflight(_config(tmp_path, tiny_data, tiny_teacher, student,
                             **{"distill.layer_map": [1, 3], "distill.select_heads": "first"}))
    assert free.pruning is None
    free.check_teacher_content()
    # a teacher of another shape: refused from the configs
    wide = make_teacher(tmp_path / "wide", plain.vocab, layers=6)
    with pytest.raises(ConfigError, match="pruned from another teacher"):
        Preflight(_config(tmp_path, tiny_data, wide, student))

    # a record that is not this student's
    edited = tmp_path / "edited"
    shutil.copytree(student, edited)
    body = json.loads((edited / "pruning.json").read_text())
    body["student"]["shape"]["heads"] = 2
    (edited / "pruning.json").write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=r"does not describe the student.*heads 2 \(record\) / 4 \(student\)"):
        Preflight(_config(tmp_path, tiny_data, teacher, edited))

    # two student layers on one teacher layer, cut from other heads
    with pytest.raises(ConfigError, match=r"student layers 0 and 1 both distil teacher layer 2 \(distill.layer_map"):
        Preflight(_config(tmp_path, tiny_data, teacher, student, **{"distill.layer_map": [2, 2]}))

    # a resume whose record names other sources than the checkpoint's
    record = Preflight(_config(tmp_path, tiny_data, teacher, student)).pruning
    pruned.check_resumed(record, {pruned.STATE_KEY: record.sources()}, "ckpt")
    pruned.check_resumed(record, {}, "ckpt")  # a checkpoint of a run that did not use a record
    changed = {**record.sources(), "heads": [[0, 1, 2, 3], SOURCE_HEADS[1]]}
    with pytest.raises(ConfigError, match="refusing to resume from ckpt: the pruning record .* now names other"):
        pruned.check_resumed(record, {pruned.STATE_KEY: changed}, "ckpt")


@pytest.mark.multiprocess
def test_two_ranks_distil_a_pruned_student_from_its_record_and_keep_it_on_resume(pruned_pair, tiny_data,
                                                                                  tmp_path):
    """2 ranks, ZeRO-3 (teacher partitioned): the run log states the record's layer map and heads, the
    SHD term at step 1 is ~0 (the student is its sources), the checkpoint keeps them; a resume with the
    same config takes the same and says the config is unchanged."""
    teacher, student = pruned_pair
    over = {"student.init_from": str(student), "distill.plan": "select", "optim.max_steps": 2,
            "checkpoint.every_steps": 0, "eval.at_end": False}
    cfg = tiny_config(tmp_path / "run", tiny_data, teacher, **over)
    records = run_ranks(2, cfg, tmp_path / "a")
    first = (tmp_path / "a" / "logs" / "rank0.log").read_text()
    record = student / "pruning.json"
    heads = f"teacher head per student head (pruned, from the pruning record {record}): " \
            f"layer 0<-0: [2, 3, 6, 7], layer 1<-2: [0, 1, 6, 7]"
    assert f"distill.layer_map not given: {SOURCE_LAYERS}, the teacher layer each student layer was cut from " \
           f"(from the pruning record {record})" in first
    assert "layers (student->teacher) {0: 0, 1: 2}" in first and heads in first
    shd = {r["step"]: r["loss/shd"] for r in records if "loss/shd" in r}
    assert shd[1] < 1e-4, shd
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["shd_selected_heads"] == {"0": [2, 3, 6, 7], "2": [0, 1, 6, 7]}
    assert state[pruned.STATE_KEY] == {"path": str(record), "layers": SOURCE_LAYERS, "heads": SOURCE_HEADS}
    saved = yaml.safe_load((ckpt / "resolved_config.yaml").read_text())["distill"]
    assert saved["layer_map"] == SOURCE_LAYERS and saved["select_heads"] == "pruned"

    cfg["optim"]["max_steps"] = 3  # the same config, one more step
    run_ranks(2, cfg, tmp_path / "b")
    resumed = (tmp_path / "b" / "logs" / "rank0.log").read_text()
    assert "resumed from" in resumed and heads in resumed
    assert "optim.max_steps: 2 -> 3" in resumed  # the resume contract's diff: nothing of the record changed
    assert "distill.layer_map:" not in resumed and "distill.select_heads:" not in resumed
