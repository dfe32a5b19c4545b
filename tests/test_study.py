"""The comparison study (pipeline/study/): its variant table, plan, config validation, report
and runner, on synthetic metrics and dry runs: no training here (the demo tests run the real thing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, config_from_dict
from pipeline.study import cli, report
from pipeline.study.inputs import data_identity, record_inputs
from pipeline.study.plan import DataPlan, apply_overrides, build_plan, student_config
from pipeline.study.runner import Runner
from pipeline.study.variants import BUDGETS, VARIANTS, check_variant, expand_variants, split_variant, variant_label

REPO = Path(__file__).resolve().parents[1]


def _write_run(run_dir: Path, ppl_curve: list[float], ce0: float, *, steps: int = 20, shd: bool = False,
               resumed_dup: bool = False) -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss/ce": ce0 - 0.01 * s, "loss/total": ce0 - 0.01 * s, "perf/tokens_per_s": 1000.0 + s,
               "perf/step_time_s": 0.5, "perf/peak_mem_mib": 400.0 + s, "data/consumed_tokens": 512.0 * s,
               "optim/skipped_steps": 0.0}
        if shd:
            rec.update({"shd_weights/layer_01_mean_max": 0.5, "shd_weights/layer_01_entropy": 0.9,
                        "shd_weights/layer_03_mean_max": 0.7, "shd_weights/layer_03_entropy": 0.5})
        lines.append(rec)
    every = steps // len(ppl_curve)
    for i, p in enumerate(ppl_curve):
        lines.append({"step": every * (i + 1), "eval/loss": math.log(p), "eval/perplexity": p, "eval/tokens": 99.0})
    if resumed_dup:  # a resumed run appends: the later record of a step wins
        lines.append({"step": steps, "eval/loss": 0.0, "eval/perplexity": ppl_curve[-1] - 1, "eval/tokens": 99.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "trunc')
    return run_dir


def _given(tmp_path: Path) -> list[str]:
    """Flags of a study on given (fake) data and teacher: nothing to prepare."""
    return ["--out", str(tmp_path / "o"), "--data", str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok"),
            "--teacher", str(tmp_path / "teacher")]


# --------------------------------------------------------------------------------------------
# variants and configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_makes_a_valid_student_config(tmp_path, name):
    """The engine's config validation accepts each variant of the table (representative budget)."""
    opts = cli.parse_args(_given(tmp_path) + ["--budget", "small"])
    data = DataPlan(tmp_path / "tok", tmp_path / "shards")
    cfg = student_config(opts, name, 1, tmp_path / "teacher" / "export", data, 128, opts.budget.steps,
                         tmp_path / "runs" / name, tmp_path / "tb" / name)
    run = config_from_dict(cfg)
    assert run.optim.max_steps == BUDGETS["small"].steps and run.seed == 1
    assert run.uses_teacher == (name != "ce")


def test_variant_names_and_weights():
    assert VARIANTS["kd_shd"].dynamic_plan == "pairwise" and VARIANTS["kd_select"].dynamic_plan is None
    assert report.NO_ATTENTION == ("ce", "kd")
    check_variant("kd_shd@0.3")
    for bad, msg in (("kd_shdd", "unknown variant"), ("kd@0.3", "no attention-loss term"),
                     ("kd_shd@x", "must be a number"), ("kd_shd@0", "must be > 0")):
        with pytest.raises(ValueError, match=msg):
            check_variant(bad)


def test_weight_sweep_pairs_and_table():
    """--w-shd-list: variants "x@w" are compared at the same weight; kd (no attention term) with all."""
    assert expand_variants(["kd", "kd_select", "kd_logit", "kd_hard@0.1"], [0.3, 1.0]) == \
        ["kd", "kd_select@0.3", "kd_select@1", "kd_logit@0.3", "kd_logit@1", "kd_hard@0.1"]
    assert cli.parse_args(["--variants", "kd,kd_mean@0.3", "--out", "o"]).variants == ("kd", "kd_mean@0.3")
    assert split_variant("kd_logit@0.3") == ("kd_logit", 0.3) and split_variant("kd") == ("kd", None)
    ppl = {"kd": [10.0, 12.0, 11.0], "kd_select@0.3": [9.5, 11.4, 10.6], "kd_logit@0.3": [9.0, 11.0, 10.0],
           "kd_select@1": [9.0, 11.0, 10.0], "kd_logit@1": [9.2, 11.5, 9.9]}
    runs = {v: {s: {"final_eval_ppl": p} for s, p in zip((1, 2, 3), ps)} for v, ps in ppl.items()}
    pairs = {(p["a"], p["b"]): p for p in report.paired_differences(runs)}
    assert pairs[("kd_logit@0.3", "kd_select@0.3")]["diffs"] == pytest.approx([-0.5, -0.4, -0.6])
    assert pairs[("kd_logit@1", "kd_select@1")]["diffs"] == pytest.approx([0.2, 0.5, -0.1])
    assert pairs[("kd_logit@0.3", "kd")]["exceeds_spread"] is True
    assert ("kd_logit@0.3", "kd_select@1") not in pairs and "w_shd 0.3" in pairs[("kd_logit@0.3", "kd")]["what"]
    agg = report.aggregate(runs)
    all_pairs = report.paired_differences(runs)
    table = report.sweep_table([("h8", agg, all_pairs), ("h16", agg, all_pairs)],
                               {v: variant_label(v) for v in runs})
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| CE")}
    assert rows["CE + KD + SHD, score-space merge, w_shd 0.3"].endswith("| 2/2 |")  # beats KD and select twice
    assert rows["CE + KD + SHD, score-space merge, w_shd 1"].endswith("| 0/2 |")  # ties select at w 1
    assert rows["CE + KD + attn KD, select, w_shd 1"].endswith("| 2/2 |")  # select: beating KD is enough
    opts = cli.parse_args(["--variants", "kd,kd_shd", "--w-shd-list", "0.1,1", "--out", "o", "--budget", "ci"])
    cfg = student_config(opts, "kd_shd@0.1", 1, Path("H"), DataPlan(Path("T"), Path("D")), 128, 5, Path("r"),
                         Path("tb"))
    assert cfg["distill"]["w_shd"] == 0.1 and cfg["distill"]["plan"] == "pairwise"
    with pytest.raises(SystemExit):
        cli.parse_args(["--w-shd-list", "0,1"])


def test_overrides_and_variant_configs(tmp_path):
    opts = cli.parse_args(["--out", str(tmp_path), "--data", "D", "--tokenizer", "T", "--teacher", "H"])
    data = DataPlan(Path("T"), Path("D"))
    cfgs = {v: student_config(opts, v, 3, Path("H"), data, 128, 50, tmp_path / v, tmp_path / "tb" / v)
            for v in VARIANTS}
    assert cfgs["ce"]["stage"] == "pretrain" and cfgs["ce"]["teacher"]["path"] is None
    assert cfgs["kd"]["distill"]["w_shd"] == 0.0 and cfgs["kd"]["distill"]["w_kd"] == 0.5
    assert cfgs["shd_only"]["distill"]["w_kd"] == 0.0 and cfgs["shd_only"]["distill"]["w_shd"] == 0.1
    assert {cfgs[v]["distill"]["plan"] for v in ("kd_shd", "kd_group", "kd_mean", "kd_select")} == \
        {"pairwise", "group", "mean", "select"}
    # same student, seed, data order, schedule and evaluation for every variant
    keys = lambda c: (c["student"], c["seed"], c["data"], c["optim"], c["eval"])  # noqa: E731
    assert len({json.dumps(keys(c), sort_keys=True) for c in cfgs.values()}) == 1
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2.5", "x.y=null", "a.b=[1, 2]"]) == \
        {"a": {"b": [1, 2], "c": 2.5}, "x": {"y": None}}
    with pytest.raises(ConfigError, match="'a.b' is given twice"):
        apply_overrides({}, ["a.b=1", "a.b=2"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["a.b"])


# --------------------------------------------------------------------------------------------
# validation before anything runs
# --------------------------------------------------------------------------------------------


def test_misspelt_override_stops_the_study_before_any_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(_given(tmp_path) + ["--variants", "kd,kd_shd", "--override", "distill.w_shdd=1", "--dry-run"])
    msg = str(e.value.code)
    assert "distill.w_shdd" in msg and "variant kd_shd" in msg and "variant kd " in msg and "nothing was run" in msg
    assert "stage " not in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_bad_value_in_a_sweep_names_the_setting(tmp_path):
    argv = _given(tmp_path) + ["--variants", "kd", "--seeds", "2", "--steps-list", "10,20", "--dry-run",
                               "--override", "optim.warmup_steps=15"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    msg = str(e.value.code)
    # 15 warm-up steps fit the 20-step setting, not the 10-step one
    assert "variant kd (setting h8_T128_s10) (seed 1, seed 2): optim.warmup_steps (15)" in msg, msg
    assert "s20" not in msg


def test_same_override_twice_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(_given(tmp_path) + ["--override", "distill.w_kd=1", "--override", "distill.w_kd=0.5", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "override 'distill.w_kd' is given twice" in err
    assert not (tmp_path / "o").exists()


def test_sweep_plan_dry_run(tmp_path):
    """--teacher-heads x --seq-lens x --steps-list: one teacher per (heads, seq_len), students per setting."""
    r = subprocess.run([sys.executable, "-m", "pipeline.study", "--dry-run", "--out",
                        str(tmp_path / "o"), "--teacher-heads", "8,16", "--student-heads", "4", "--seq-lens",
                        "128,512", "--steps-list", "10,20", "--variants", "kd,kd_shd", "--seeds", "2",
                        "--budget", "ci"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(": teacher: pre-train") == 4
    assert "16-head" in r.stdout and "h16_T512_s20" in r.stdout
    assert r.stdout.count("kd_shd seed 2:") == 8  # 2 heads x 2 seq lens x 2 lengths
    assert "36 run config(s) checked" in r.stdout  # 4 teachers + 8 settings x 2 variants x 2 seeds
    assert not any((tmp_path / "o").rglob("DONE*"))


# --------------------------------------------------------------------------------------------
# reuse: same config and same data and teacher content
# --------------------------------------------------------------------------------------------


def _finished_run(run_dir: Path, cfg: dict) -> Path:
    """A run directory as a finished study run leaves it (config, DONE; no inputs recorded)."""
    import yaml

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (run_dir / "DONE").write_text("2026-12-04 00:00:00\n")
    return run_dir


def test_finished_run_is_reused_only_with_the_data_and_teacher_it_read(tmp_path, tiny_data):
    """A rebuilt corpus or a teacher re-trained in place (same paths, same config) re-runs the student."""
    import shutil

    from tests.helpers import make_teacher

    _, data = tiny_data
    data_copy = tmp_path / "data"
    shutil.copytree(data, data_copy)
    vocab = json.loads((data_copy / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    teacher = make_teacher(tmp_path / "teacher", vocab, layers=1, hidden=32, heads=4, kv_heads=2)
    cfg = {"stage": "distill", "data": {"dir": str(data_copy)}, "teacher": {"path": str(teacher)}}
    run = _finished_run(tmp_path / "run", cfg)
    runner = Runner(["true"], 1, 1)
    assert not runner.finished(run, cfg), "a run with no recorded inputs (older study) must not be reused"
    record_inputs(run, runner.inputs.of(cfg))
    assert runner.finished(run, cfg)

    make_teacher(teacher, vocab, layers=1, hidden=32, heads=4, kv_heads=2, seed=1)  # same shapes, new weights
    assert not runner.finished(run, cfg)
    record_inputs(run, runner.inputs.of(cfg))
    assert runner.finished(run, cfg)

    manifest = json.loads((data_copy / "manifest.json").read_text())
    manifest["shards"][0]["bin"]["sha256"] = "0" * 64  # the shards were made again with other content
    (data_copy / "manifest.json").write_text(json.dumps(manifest))
    assert not runner.finished(run, cfg)
    shutil.rmtree(data_copy)
    assert not runner.finished(run, cfg) and runner.inputs.of(cfg) is None


def test_data_made_by_an_older_tokenizer_recipe_is_made_again(tmp_path):
    """Markers written before the seeded line sampling (no recipe in the key) do not reuse that data."""
    args = ["--out", str(tmp_path / "o"), "--data-root", str(tmp_path / "data"), "--budget", "ci"]
    stages = build_plan(cli.parse_args(args)).data.stages
    assert [s.name for s in stages] == ["tokenizer", "shards"]
    stages[0].run_dir.mkdir(parents=True)
    for stage in stages:
        old_key = {k: v for k, v in stage.key.items() if k not in ("recipe", "tokenizer_recipe")}
        stage.marker.write_text(json.dumps(old_key))
    assert not any(s.done() for s in build_plan(cli.parse_args(args)).data.stages)
    for stage in stages:
        stage.marker.write_text(json.dumps(stage.key))
    assert all(s.done() for s in build_plan(cli.parse_args(args)).data.stages)


def test_a_finished_teacher_is_reused_only_when_it_read_this_data(tmp_path, tiny_data):
    tok, data = tiny_data
    args = ["--out", str(tmp_path / "o"), "--data", str(data), "--tokenizer", str(tok), "--teacher-root",
            str(tmp_path / "teacher"), "--budget", "ci", "--variants", "kd", "--seeds", "1"]
    plan = build_plan(cli.parse_args(args))
    assert not plan.teachers[0].reused
    run = _finished_run(plan.teachers[0].run_dir, plan.teachers[0].config)
    (run / "DONE.export").write_text("{}")
    assert not build_plan(cli.parse_args(args)).teachers[0].reused  # no inputs recorded
    record_inputs(run, {"data": "another corpus", "teacher": None})
    assert not build_plan(cli.parse_args(args)).teachers[0].reused
    record_inputs(run, {"data": data_identity(data), "teacher": None})
    assert build_plan(cli.parse_args(args)).teachers[0].reused


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def test_summarize_run_reads_the_engine_metrics(tmp_path):
    r = report.summarize_run(_write_run(tmp_path / "a", [50.0, 40.0], 5.0, shd=True, resumed_dup=True))
    assert r["steps"] == 20 and r["tokens"] == 20 * 512
    assert r["final_eval_ppl"] == 39.0  # the appended (resumed) record wins
    assert r["final_train_ce"] == pytest.approx(5.0 - 0.01 * 19.5)  # mean of the last 10 % (2 steps)
    assert r["peak_mem_mib"] == 420.0
    assert r["w_mean_max"] == pytest.approx(0.6) and r["w_entropy"] == pytest.approx(0.7)
    assert [p for _, p in r["curve_eval"]] == [50.0, 39.0]


def test_paired_differences_and_spread():
    runs = {"kd": {1: {"final_eval_ppl": 10.0}, 2: {"final_eval_ppl": 12.0}, 3: {"final_eval_ppl": 11.0}},
            "kd_shd": {1: {"final_eval_ppl": 9.0}, 2: {"final_eval_ppl": 11.1}, 3: {"final_eval_ppl": 10.2}},
            "kd_mean": {1: {"final_eval_ppl": 8.0}, 2: {"final_eval_ppl": 12.0}, 3: {"final_eval_ppl": 10.2}}}
    pairs = {(p["a"], p["b"]): p for p in report.paired_differences(runs)}
    p = pairs[("kd_shd", "kd")]
    assert p["diffs"] == pytest.approx([-1.0, -0.9, -0.8]) and p["mean"] == pytest.approx(-0.9)
    assert p["exceeds_spread"] is True
    q = pairs[("kd_shd", "kd_mean")]
    assert q["diffs"] == pytest.approx([1.0, -0.9, 0.0]) and q["exceeds_spread"] is False
    assert ("kd_group", "kd_shd") not in pairs  # only pairs whose variants ran
    one = report.paired_differences({k: {1: v[1]} for k, v in runs.items()})
    assert all(p["exceeds_spread"] is None for p in one)


def test_uniform_reference_matches_the_plans():
    # 8 -> 3 pairwise: rounds 8 -> 4 -> 3, groups of 4, 2, 2 teacher heads
    ref = report.uniform_reference(8, 3, "pairwise")
    assert ref["w_mean_max"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2) / 3)
    assert ref["w_entropy"] == pytest.approx((math.log(4) + 2 * math.log(2)) / 3)
    # 8 -> 3 group: contiguous groups of 3, 3, 2
    ref = report.uniform_reference(8, 3, "group")
    assert ref["w_mean_max"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)
    assert report.uniform_reference(4, 4, "pairwise") == {"w_mean_max": 1.0, "w_entropy": 0.0}


def test_markdown_and_plot(tmp_path):
    runs = {v: {s: report.summarize_run(_write_run(tmp_path / v / str(s), [60.0 - s, 40.0 - i - s], 5.0 + i,
                                                    shd=v == "kd_shd"))
                for s in (1, 2)} for i, v in enumerate(("ce", "kd", "kd_shd"))}
    labels = {v: VARIANTS[v].label for v in runs}
    agg = report.aggregate(runs)
    assert agg["kd"]["ppl_per_seed"] == [38.0, 37.0] and agg["kd"]["ppl_mean"] == 37.5
    setting = {"teacher": "t", "teacher_heads": 8, "student_layers": 2, "student_heads": 3, "seq_len": 128,
               "tokens_per_step": 512, "steps": 20, "tokens": 10240, "nproc": 2, "seeds": [1, 2]}
    md = report.markdown(setting, labels, agg, report.paired_differences(runs), {"final_eval_ppl": 20.0},
                         {"pairwise": report.uniform_reference(8, 3, "pairwise")})
    for label in labels.values():
        assert f"| {label} |" in md
    assert "37.50 ± 0.71" in md and "kd_shd vs kd" in md and "Teacher held-out perplexity: 20.00" in md
    png = report.plot(tmp_path / "p.png", labels, runs, {"final_eval_ppl": 20.0})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_gap_to_kd_is_paired_per_evaluation_and_shown(tmp_path):
    # kd_select is 2, 1.5, 1.0 better than KD at the three evaluations in seed 1, 4, 2.5, 1.0 in seed 2
    curves = {("kd", 1): [60.0, 50.0, 40.0], ("kd", 2): [70.0, 55.0, 45.0],
              ("kd_select", 1): [58.0, 48.5, 39.0], ("kd_select", 2): [66.0, 52.5, 44.0],
              ("ce", 1): [90.0, 80.0, 70.0], ("ce", 2): [91.0, 81.0, 71.0]}
    runs: dict = {}
    for (v, s), curve in curves.items():
        runs.setdefault(v, {})[s] = report.summarize_run(_write_run(tmp_path / v / str(s), curve, 5.0, steps=30))
    gaps = report.gap_to_kd(runs)
    assert set(gaps) == {"kd_select"}  # CE and KD have no attention term
    assert [pt["tokens"] for pt in gaps["kd_select"]] == [10 * 512, 20 * 512, 30 * 512]
    assert [pt["diffs"] for pt in gaps["kd_select"]] == [[-2.0, -4.0], [-1.5, -2.5], [-1.0, -1.0]]
    assert [pt["mean"] for pt in gaps["kd_select"]] == pytest.approx([-3.0, -2.0, -1.0])
    assert gaps["kd_select"][2]["std"] == pytest.approx(0.0)
    labels = {v: VARIANTS[v].label for v in runs}
    setting = {"teacher": "t", "teacher_heads": 8, "student_layers": 2, "student_heads": 4, "seq_len": 128,
               "tokens_per_step": 512, "steps": 30, "tokens": 15360, "nproc": 1, "seeds": [1, 2]}
    md = report.markdown(setting, labels, report.aggregate(runs), report.paired_differences(runs), gaps=gaps)
    row = next(line for line in md.splitlines() if line.startswith(f"| {labels['kd_select']} | -3.00"))
    assert row.split(" | ")[1:] == ["-3.00 ± 1.41", "-2.00 ± 0.71", "-1.00 ± 0.00 |"], row
    assert "| a | 5 k | 10 k | 15 k |" in md
    assert report.gap_to_kd({v: r for v, r in runs.items() if v != "kd"}) == {}
    png = report.plot(tmp_path / "p.png", labels, runs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# runner (a fake launcher: no training)
# --------------------------------------------------------------------------------------------

FAKE_LAUNCHER = '''
import json, os, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
out = cfg["output_dir"]
start = time.time()
time.sleep(1.0)
if cfg["seed"] == int(os.environ.get("FAIL_SEED", "-1")) and cfg["distill"]["w_shd"] > 0:
    sys.exit(3)
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    for step in (1, 2):
        f.write(json.dumps({"step": step, "loss/total": 1.0, "loss/ce": 5.0 - cfg["distill"]["w_shd"],
                            "data/consumed_tokens": 100.0 * step, "perf/tokens_per_s": 10.0,
                            "perf/step_time_s": 0.1}) + "\\n")
    ppl = 50.0 - cfg["seed"] - cfg["distill"]["w_shd"]
    f.write(json.dumps({"step": 2, "eval/perplexity": ppl, "eval/loss": 3.9}) + "\\n")
with open(os.path.join(os.path.dirname(sys.argv[1]), "..", "..", "..", "spans.jsonl"), "a") as f:
    f.write(json.dumps({"start": start, "end": time.time(), "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
'''


def test_jobs_run_students_concurrently_and_report_failures(tmp_path, monkeypatch):
    """--jobs 2: two runs at a time (each told to use half the cores), the report as with one job;
    a failed run is reported after the others finished, which keep their DONE markers."""
    fake = tmp_path / "fake_launch.py"
    fake.write_text(FAKE_LAUNCHER)
    out = tmp_path / "o"
    argv = ["--out", str(out), "--data", "D", "--tokenizer", "T", "--teacher", "H", "--variants", "kd,kd_shd",
            "--w-shd-list", "0.5", "--seeds", "2", "--jobs", "2", "--budget", "ci",
            "--launcher", f"{sys.executable} {fake}"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli.main(argv) == 0
    spans = [json.loads(line) for line in (out / "spans.jsonl").read_text().splitlines()]
    assert len(spans) == 4
    at_once = max(sum(s["start"] <= t["start"] < s["end"] for s in spans) for t in spans)
    assert at_once == 2
    assert {s["omp"] for s in spans} == {str(max(1, (os.cpu_count() or 1) // 2))}
    results = json.loads((out / "results.json").read_text())
    assert results["aggregate"]["kd_shd@0.5"]["ppl_per_seed"] == [48.5, 47.5]
    md = (out / "results.md").read_text()
    assert "kd_shd@0.5 vs kd" in md and "Produced by `python -m pipeline.study --out" in md

    monkeypatch.setenv("FAIL_SEED", "1")
    out2 = tmp_path / "o2"
    with pytest.raises(SystemExit, match="kd_shd@0.5 seed 1 failed with exit code 3"):
        cli.main([a if a != str(out) else str(out2) for a in argv])
    done = sorted(p.parent.relative_to(out2 / "runs").as_posix() for p in (out2 / "runs").rglob("DONE"))
    assert done == ["kd/seed1", "kd/seed2", "kd_shd_w0.5/seed2"]


# --------------------------------------------------------------------------------------------
# issue 24, mechanism 5: the study deletes only what it made (case 4)
# --------------------------------------------------------------------------------------------


def _tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_teacher_root_that_is_a_users_model_is_moved_aside_not_deleted(tmp_path, tiny_data, capsys):
    """--teacher-root naming an existing model directory: the study used to rmtree it; now it is
    renamed to NAME.moved-<time> byte for byte, the log says so, and the teacher trains in its place."""
    tok, data = tiny_data
    mine = tmp_path / "my_model"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama"}')
    (mine / "model.safetensors").write_bytes(b"weights")
    before = _tree(mine)
    args = ["--out", str(tmp_path / "o"), "--data", str(data), "--tokenizer", str(tok), "--teacher-root",
            str(mine), "--budget", "ci", "--variants", "kd", "--seeds", "1"]
    teacher = build_plan(cli.parse_args(args)).teachers[0]
    assert teacher.run_dir == mine and not teacher.reused
    Runner(["true"], 1, 2).train("teacher", teacher.run_dir, teacher.config, "pre-train")
    moved = list(tmp_path.glob("my_model.moved-*"))
    assert len(moved) == 1 and _tree(moved[0]) == before
    assert (mine / "DONE").exists() and not (mine / "model.safetensors").exists()
    log = capsys.readouterr().out
    assert f"moved {mine} aside to {moved[0]}" in log and "did not make this directory" in log


def test_data_root_holding_a_users_tokenizer_and_shards_is_moved_aside(tmp_path, tiny_data, capsys):
    """--data-root DIR with tokenizer/ and shards/ the study did not make: moved aside before its
    stages write there (the stages passed --overwrite over them); once the study made them, a rerun
    with other settings lets the tools replace them."""
    import dataclasses
    import shutil

    tok, data = tiny_data
    root = tmp_path / "data"
    shutil.copytree(tok, root / "tokenizer")
    shutil.copytree(data, root / "shards")
    before = {name: _tree(root / name) for name in ("tokenizer", "shards")}
    args = ["--out", str(tmp_path / "o"), "--data-root", str(root), "--budget", "ci"]
    runner = Runner(["true"], 1, 2)
    for stage in build_plan(cli.parse_args(args)).data.stages:
        out = Path(stage.cmd[stage.cmd.index("--out") + 1])
        runner.command(dataclasses.replace(stage, cmd=("true", "--out", str(out))))
        moved = list(root.glob(f"{stage.name}.moved-*"))
        assert len(moved) == 1 and _tree(moved[0]) == before[stage.name], stage.name
        assert stage.done()
    assert capsys.readouterr().out.count("did not make what is there") == 2
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")  # as if the study's stage had written it
    stage = build_plan(cli.parse_args(args)).data.stages[0]
    stage.marker.write_text(json.dumps({**stage.key, "vocab": 1000}))  # made by the study, other settings
    runner.command(dataclasses.replace(stage, cmd=("true", "--out", str(root / "tokenizer"))))
    assert len(list(root.glob("tokenizer.moved-*"))) == 1  # the study's own: left to the tool's --overwrite


def test_changed_plan_moves_finished_runs_aside_and_says_so(tmp_path, capsys):
    """Another --steps: a finished run (or one with a checkpoint) is moved aside with the changed keys
    in the log, instead of being deleted without a word; an unfinished run the study made that has no
    checkpoint is deleted, and that is logged too."""
    cfg = {"optim": {"max_steps": 10}, "checkpoint": {}, "logging": {"tb_dir": str(tmp_path / "tb" / "kd")}}
    finished = tmp_path / "runs" / "kd" / "seed0"
    Runner.prepare_dir(finished, cfg, None)
    (finished / "metrics.jsonl").write_text('{"step": 10}\n')
    (finished / "DONE").write_text("done\n")
    (tmp_path / "tb" / "kd" / "events.out.tfevents.1").write_text("tb")
    before = _tree(finished)
    longer = {**cfg, "optim": {"max_steps": 20}}
    Runner.prepare_dir(finished, longer, None)
    moved = list(finished.parent.glob("seed0.moved-*"))
    assert len(moved) == 1 and _tree(moved[0]) == before
    assert len(list((tmp_path / "tb").glob("kd.moved-*"))) == 1
    log = capsys.readouterr().out
    assert "optim.max_steps: 10 -> 20" in log and f"moved {finished} aside" in log
    assert not (finished / "metrics.jsonl").exists() and (finished / "config.yaml").exists()
    (finished / "launch.log").write_text("interrupted before its first checkpoint\n")
    Runner.prepare_dir(finished, cfg, None)  # unfinished, no checkpoint, made by the study: deleted
    assert len(list(finished.parent.glob("seed0.moved-*"))) == 1 and not (finished / "launch.log").exists()
    assert f"deleted {finished}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# issue 26: a given teacher is described as it is; the budget line says what the command replaced
# --------------------------------------------------------------------------------------------


def test_a_given_teacher_sets_the_heads_and_the_command_line_names_its_budget(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"num_attention_heads": 9}))
    opts = cli.parse_args(["--out", str(tmp_path / "o"), "--data", "D", "--tokenizer", "T", "--teacher",
                           str(teacher), "--student-heads", "3", "--steps", "40", "--batch-tokens", "512",
                           "--teacher-placement", "replicated", "--teacher-dtype", "bf16"])
    assert opts.teacher_heads == (9,)
    assert opts.budget_name == "small with --steps 40, --batch-tokens 512"
    cfg = student_config(opts, "kd_select", 1, teacher, DataPlan(Path("T"), Path("D")), 128, 40, Path("r"),
                         Path("tb"))
    assert cfg["teacher"]["placement"] == "replicated" and cfg["teacher"]["dtype"] == "bf16"
    assert "max_position_embeddings" not in cfg["student"]  # left to the engine: derived from the teacher
    with pytest.raises(SystemExit):
        cli.parse_args(["--teacher", str(teacher), "--teacher-dtype", "bf16", "--override", "teacher.dtype=fp32"])
