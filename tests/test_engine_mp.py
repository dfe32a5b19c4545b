"""Real 2-rank ZeRO-3 runs (CPU, gloo): every plan trains; 2 ranks == 1 rank on the same global batch.

Each run builds a partitioned teacher engine and a student engine in every process
(``stage3_param_persistence_threshold: 0`` so that even tiny parameters are really partitioned).
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest

from tests.helpers import REF_STEPS, read_metrics, run_ranks, step_losses, tiny_config

pytestmark = pytest.mark.multiprocess


def _train_records(records):
    return [r for r in records if "loss/total" in r]


def _check_trains(records, steps):
    tr = _train_records(records)
    assert [r["step"] for r in tr] == list(range(1, steps + 1))
    losses = [r["loss/total"] for r in tr]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses  # learns the corpus
    for r in tr:
        assert math.isfinite(r["loss/shd"]) and r["loss/shd"] > 0
        assert r["optim/step_applied"] == 1.0


def test_reference_run_pairwise(ref_run):
    """pairwise 8 -> 3 heads (teacher GQA 8/4): trains, logs every term, TensorBoard readable."""
    work, cfg, records = ref_run
    _check_trains(records, REF_STEPS)
    last = _train_records(records)[-1]
    assert {"loss/ce", "loss/kd", "loss/shd", "shd/layer_00", "shd/layer_01", "optim/lr", "optim/grad_norm",
            "perf/tokens_per_s", "perf/step_time_s", "perf/peak_mem_mib", "optim/skipped_steps",
            "shd_weights/layer_00_mean_max", "shd_weights/layer_01_entropy"} <= set(last)
    # per-layer tags name the student layer (teacher layers 1 and 3 are distilled into 0 and 1)
    assert {k.split("/")[1][:8] for k in last if k.startswith(("shd/", "shd_weights/"))} == {"layer_00", "layer_01"}
    assert any("eval/perplexity" in r for r in records)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(work / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/shd", "shd/layer_00", "optim/lr", "eval/perplexity"} <= tags
    tb = [e.value for e in acc.Scalars("loss/total")]
    assert tb == pytest.approx([r["loss/total"] for r in _train_records(records)], rel=1e-6)


@pytest.mark.parametrize("plan, heads, kv, objective, ac", [
    ("group", 3, 1, "output", False),     # 8 -> 3 in groups of 3, 3, 2; student GQA
    ("mean", 4, 2, "output", True),       # with per-layer activation checkpointing under ZeRO-3
    ("select", 4, 4, "per_head", False),
])
def test_other_plans_train_on_two_ranks(tmp_path, tiny_data, tiny_teacher, plan, heads, kv, objective, ac):
    cfg = tiny_config(tmp_path / "run", tiny_data, tiny_teacher,
                      **{"distill.plan": plan, "student.num_heads": heads, "student.num_kv_heads": kv,
                         "student.hidden_size": 16 * heads, "distill.objective": objective,
                         "student.activation_checkpointing": ac, "checkpoint.save_at_end": False})
    _check_trains(run_ranks(2, cfg, tmp_path), cfg["optim"]["max_steps"])


def test_two_ranks_equal_one_rank_on_same_global_batch(ref_run, tmp_path, tiny_data, tiny_teacher):
    """Same global batch (1 rank x 4 samples vs 2 ranks x 2): same first-step loss, same updates."""
    _, _, ref_records = ref_run
    cfg = tiny_config(tmp_path / "run", tiny_data, tiny_teacher,
                      **{"optim.max_steps": REF_STEPS, "data.micro_batch_size": 4,
                         "checkpoint.save_at_end": False})
    one = step_losses(run_ranks(1, cfg, tmp_path))
    two = step_losses(ref_records)
    assert one[1] == pytest.approx(two[1], rel=1e-6, abs=1e-7)
    for s in (2, 3):  # after updates computed from partitioned gradients of the two ranks
        assert one[s] == pytest.approx(two[s], rel=1e-5)
    for key in ("loss/ce", "loss/kd", "loss/shd"):
        assert step_losses(read_metrics(tmp_path / "run"), key)[1] == pytest.approx(
            step_losses(ref_records, key)[1], rel=1e-6, abs=1e-9)


GOLDEN = Path(__file__).parent / "golden" / "ref_run_losses.json"
GOLDEN_KEYS = ("loss/total", "loss/ce", "loss/kd", "loss/shd", "optim/grad_norm", "eval/loss")


def test_reference_run_losses_match_the_golden_file(ref_run):
    """Every logged number of the reference run equals the checked-in golden file (torchtitan's
    loss-compare habit): a refactor that changes no arithmetic changes no number.

    Exact on the CPU kind, torch and transformers that wrote the file (float arithmetic is only
    reproducible on the same kernels: transformers 5.25 moved the teacher's KL terms by ~1e-8);
    elsewhere within rel 1e-5 or abs 1e-7, and the reason is printed. The absolute part
    is for the KL terms (loss/kd, loss/shd ~1e-4 here): a KL between near-equal distributions is a
    sum of O(1) float32 log-probability differences, so its rounding error is absolute, about
    float32's epsilon (1.2e-7), not relative to the small result (AVX2 vs AVX512 kernels: 1.7e-8). After an intended change of the
    numbers, regenerate with SHD_WRITE_GOLDEN=1 bash tests/run.sh tests/test_engine_mp.py -k golden
    and say why in the commit.
    """
    import torch

    _, _, records = ref_run
    got = {k: {str(s): v for s, v in step_losses(records, k).items()} for k in GOLDEN_KEYS}
    import transformers

    cpu = (f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} torch {torch.__version__} "
           f"transformers {transformers.__version__}")
    if os.environ.get("SHD_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"written_on": cpu, "values": got}, indent=1, sort_keys=True) + "\n")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: write it with SHD_WRITE_GOLDEN=1 (see this test's docstring)"
    golden = json.loads(GOLDEN.read_text())
    assert all(got[k] for k in ("loss/total", "loss/shd", "eval/loss")), got
    if golden["written_on"] == cpu:
        assert got == golden["values"]
    else:
        print(f"golden file written on {golden['written_on']}, this is {cpu}: comparing within rel 1e-5 "
              f"or abs 1e-7")
        assert got.keys() == golden["values"].keys()
        for k, want in golden["values"].items():
            assert got[k].keys() == want.keys(), k
            steps = sorted(want, key=int)  # the file's keys are sorted as strings ('10' before '2')
            assert [got[k][s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-5, abs=1e-7), k
