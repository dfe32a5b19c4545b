"""The study's command line: ``python -m pipeline.study`` (and ``bench/distill_compare.py``).

``parse_args`` resolves the flags into a :class:`~pipeline.study.plan.StudyOptions`; ``main``
builds the plan, validates every run config, then runs the stages and writes the reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

import pipeline.study
from pipeline.config import ConfigError
from shd_common.cli import command_parser

from .plan import StudyOptions, apply_overrides, build_plan, load_yaml, validate_plan
from .report import write_setting_report, write_sweep_report
from .runner import DEFAULT_LAUNCHER, REPO_ROOT, Runner, log
from .teacher_eval import evaluate_given_teacher
from .variants import BUDGETS, DEFAULT_VARIANTS, DEMO_VARIANTS, VARIANTS, check_variant, expand_variants, variant_label


def build_parser() -> argparse.ArgumentParser:
    """The study's flags (the package docstring is the --help epilog)."""
    doc = pipeline.study.__doc__ or ""
    ap = command_parser("python -m pipeline.study", doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=doc)
    ap.add_argument("--preset", choices=["bench", "demo"], default="bench",
                    help=f"demo: what launch/demo.sh runs (variants {','.join(DEMO_VARIANTS)}, 1 seed, budget demo, "
                         "--out runs/demo, summary.md + curves.png)")
    ap.add_argument("--out", help="output directory (default runs/distill_compare; demo: runs/demo)")
    ap.add_argument("--variants", help=f"comma list from {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)}); "
                                       "a name may carry its attention-loss weight: kd_shd@0.3")
    ap.add_argument("--w-shd-list", help="sweep: comma list of attention-loss weights, applied to every variant "
                                         "with an attention term (ce and kd run once); e.g. 0.1,0.3,1.0")
    ap.add_argument("--seeds", help="a count N (seeds 1..N) or a comma list of seeds ('7,' = seed 7 only); "
                                    "default 3, demo '1234,'")
    g = ap.add_argument_group("budget")
    g.add_argument("--budget", choices=list(BUDGETS), help="preset of the numbers below (default small; demo: demo)")
    g.add_argument("--steps", type=int, help="optimizer steps per student")
    g.add_argument("--tokens", type=int, help="tokens per student (sets --steps from the tokens per step)")
    g.add_argument("--steps-list", help="sweep: comma list of student steps (training length)")
    g.add_argument("--teacher-steps", type=int, help="optimizer steps of the teacher pre-training")
    g.add_argument("--batch-tokens", type=int, help="tokens per rank per micro-batch (micro batch = this / seq_len)")
    g.add_argument("--eval-every", type=int, help="held-out evaluation every N steps")
    g.add_argument("--eval-batches", type=int, help="evaluation micro-batches per rank")
    g.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", 2)), help="processes per run (default 2)")
    g.add_argument("--jobs", type=int, default=1,
                   help="student runs at once (default 1); each gets cores/(jobs*nproc) threads. On a small "
                        "CPU machine --jobs 2 --nproc 1 trains about 1.7x as many students per hour as one "
                        "2-process run at a time")
    g.add_argument("--launcher", help="command that runs a config (default 'bash launch/local.sh'); e.g. "
                                      "'sbatch --wait launch/slurm/train.sbatch'")
    s = ap.add_argument_group("models and data")
    s.add_argument("--teacher", help="Hugging Face teacher directory (default: pre-train the demo's)")
    s.add_argument("--teacher-heads", help="sweep: comma list of teacher head counts (pre-trains one teacher each)")
    s.add_argument("--student-heads", type=int, help="student heads (default: the student config's)")
    s.add_argument("--seq-lens", help="sweep: comma list of sequence lengths (default: the config's)")
    s.add_argument("--data", help="shard directory made by data_prep.shard (needs --tokenizer)")
    s.add_argument("--tokenizer", help="tokenizer directory (the teacher's when --teacher is given)")
    s.add_argument("--corpus", nargs="+", default=["python-stdlib"],
                   help="inputs of data_prep when --data is not given (default python-stdlib)")
    s.add_argument("--vocab", type=int, help="tokenizer vocabulary when one is trained (default: the budget's)")
    s.add_argument("--val-fraction", type=float, default=0.01, help="held-out fraction of documents")
    s.add_argument("--data-root", help="where prepared data goes (default runs/demo/data)")
    s.add_argument("--teacher-root", help="where teachers are trained (default OUT/teachers; the demo's "
                                          "runs/demo/teacher is reused when it is the same teacher)")
    s.add_argument("--student-config", default=str(REPO_ROOT / "configs/demo_student.yaml"))
    s.add_argument("--teacher-config", default=str(REPO_ROOT / "configs/demo_teacher.yaml"))
    s.add_argument("--override", action="append", default=[],
                   help="extra key=value for every student (repeatable; each key once)")
    s.add_argument("--teacher-placement", choices=("auto", "partitioned", "replicated", "node"),
                   help="teacher.placement of every student (default: the student config's)")
    s.add_argument("--teacher-dtype", choices=("same", "fp32", "bf16"),
                   help="teacher.dtype of every student (default: the student config's)")
    o = ap.add_argument_group("output")
    o.add_argument("--report-name", help="table file (default results.md; demo summary.md)")
    o.add_argument("--plot-name", help="PNG file (default ppl.png; demo curves.png)")
    o.add_argument("--dry-run", action="store_true", help="check every run config, print the plan and "
                                                          "commands, run nothing")
    return ap


def _numbers(ap: argparse.ArgumentParser, flag: str, text: str | None, kind: type = int) -> list:
    """A comma list flag as numbers ([] when not given); a bad item is a usage error."""
    try:
        return [kind(x) for x in text.split(",") if x] if text else []
    except ValueError:
        ap.error(f"{flag} {text!r}: give comma-separated numbers")


def _base_config(ap: argparse.ArgumentParser, flag: str, path: str) -> dict:
    """The YAML mapping of a base config file; an unreadable one is a usage error."""
    try:
        cfg = load_yaml(Path(path))
    except (OSError, yaml.YAMLError) as e:
        ap.error(f"{flag} {path}: {e}")
    if not isinstance(cfg, dict):
        ap.error(f"{flag} {path}: expected a YAML mapping (a run config), got {type(cfg).__name__}")
    return cfg


def _absolute(path: str | Path) -> Path:
    """path itself when absolute, else resolved against the working directory."""
    return Path(path) if Path(path).is_absolute() else Path(path).resolve()


def _given_teacher_heads(teacher: str, default: int) -> int:
    """The attention heads of a --teacher directory, from its config.json (`default` when it has none
    yet: the engine refuses a teacher that is not a model directory when the first student starts)."""
    config = Path(teacher) / "config.json"
    return int(json.loads(config.read_text())["num_attention_heads"]) if config.is_file() else default


def parse_args(argv: Sequence[str] | None = None) -> StudyOptions:
    """The resolved options of the command line (usage errors exit with status 2)."""
    ap = build_parser()
    a = ap.parse_args(argv)
    demo = a.preset == "demo"

    names = a.variants.split(",") if a.variants else list(DEMO_VARIANTS if demo else DEFAULT_VARIANTS)
    for name in names:
        try:
            check_variant(name)
        except ValueError as e:
            ap.error(str(e))
    w_list = _numbers(ap, "--w-shd-list", a.w_shd_list, float)
    if any(not w > 0 for w in w_list):
        ap.error(f"--w-shd-list {a.w_shd_list!r}: weights must be > 0 (the kd variant is w_shd = 0)")
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    seeds_text = a.seeds or ("1234," if demo else "3")
    # "N" (no comma) = seeds 1..N; "a,b,c" or "a," = exactly those seeds
    seeds = _numbers(ap, "--seeds", seeds_text)
    if "," not in seeds_text:
        seeds = list(range(1, seeds[0] + 1))
    if not seeds:
        ap.error(f"--seeds {seeds_text!r}: give a count N >= 1 or a comma list of seeds")
    try:
        a.override += [f"teacher.{key}={value}" for key, value in
                       (("placement", a.teacher_placement), ("dtype", a.teacher_dtype)) if value]
        apply_overrides({}, a.override)  # syntax, and each key once
    except ConfigError as e:
        ap.error(f"--override: {e}")

    budget_name = a.budget or os.environ.get("DEMO_BUDGET") or ("demo" if demo else "small")
    if budget_name not in BUDGETS:
        ap.error(f"unknown budget {budget_name!r}; choose from {list(BUDGETS)}")
    given = {"steps": a.steps, "teacher_steps": a.teacher_steps, "batch_tokens": a.batch_tokens,
             "eval_every": a.eval_every, "eval_batches": a.eval_batches, "vocab": a.vocab}
    budget = dataclasses.replace(BUDGETS[budget_name], **{k: v for k, v in given.items() if v})
    if any(given.values()):  # the preset's name alone would claim numbers the command line replaced
        budget_name += " with " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v)

    student_base = _base_config(ap, "--student-config", a.student_config)
    teacher_base = _base_config(ap, "--teacher-config", a.teacher_config)
    teacher_heads = _numbers(ap, "--teacher-heads", a.teacher_heads) or [
        _given_teacher_heads(a.teacher, teacher_base["student"]["num_heads"]) if a.teacher
        else teacher_base["student"]["num_heads"]]
    seq_lens = _numbers(ap, "--seq-lens", a.seq_lens) or [student_base["data"]["seq_len"]]
    steps_list = _numbers(ap, "--steps-list", a.steps_list)
    if not steps_list and a.tokens:
        steps_list = [max(1, -(-a.tokens // (budget.batch_tokens * a.nproc)))]

    if a.teacher and a.teacher_heads:
        ap.error("--teacher-heads pre-trains teachers; it cannot be combined with --teacher")
    if a.data and not a.tokenizer:
        ap.error("--data needs --tokenizer (the tokenizer the shards were made with)")
    tokenizer = a.tokenizer or (a.teacher if a.teacher and not a.data else None)  # KD needs the teacher's vocabulary
    # Data and teacher: the demo's (runs/demo/...) are shared with the bench when they are the same
    # thing (same corpus, vocabulary, teacher shape and budget); otherwise they live under --out.
    out = _absolute(a.out or ("runs/demo" if demo else "runs/distill_compare"))
    demo_budget = BUDGETS["demo"]
    same_data = (a.corpus == ["python-stdlib"] and budget.vocab == demo_budget.vocab
                 and budget.tok_sentences == demo_budget.tok_sentences)
    if demo:
        data_root = a.data_root or out / "data"
        teacher_roots = [a.teacher_root or out / "teacher"]
    else:
        data_root = a.data_root or ("runs/demo/data" if same_data else out / "data")
        teacher_roots = [a.teacher_root] if a.teacher_root else \
            [out / "teachers"] + (["runs/demo/teacher"] if same_data else [])

    return StudyOptions(
        preset=a.preset, out=out, budget_name=budget_name, budget=budget,
        variants=tuple(expand_variants(names, w_list)), seeds=tuple(seeds),
        teacher_heads=tuple(teacher_heads), seq_lens=tuple(seq_lens), steps_list=tuple(steps_list or [budget.steps]),
        nproc=a.nproc, jobs=a.jobs,
        launcher=tuple(shlex.split(a.launcher)) if a.launcher else DEFAULT_LAUNCHER,
        student_base=student_base, teacher_base=teacher_base, student_heads=a.student_heads,
        overrides=tuple(a.override), teacher=Path(a.teacher) if a.teacher else None,
        data=Path(a.data) if a.data else None, tokenizer=Path(tokenizer) if tokenizer else None,
        corpus=tuple(a.corpus), val_fraction=a.val_fraction, data_root=_absolute(data_root),
        teacher_roots=tuple(Path(r).resolve() for r in teacher_roots),
        report_name=a.report_name or ("summary.md" if demo else "results.md"),
        plot_name=a.plot_name or ("curves.png" if demo else "ppl.png"), dry_run=a.dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study: plan, validate every config, then data, teachers, students, reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    try:
        plan = build_plan(opts)
        validate_plan(plan)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    runner = Runner(opts.launcher, opts.nproc, plan.total_stages, opts.dry_run)
    log(f"{len(plan.settings)} setting(s) x {len(opts.variants)} variant(s) x {len(opts.seeds)} seed(s); budget "
        f"{opts.budget_name}; {opts.nproc} process(es) per run; output {opts.out}; "
        f"{sum(1 for _ in plan.configs())} run config(s) checked")

    for stage in plan.data.stages:
        runner.command(stage)
    command = shlex.join(["python", "-m", "pipeline.study", *argv])
    teachers_done: set[Path] = set()
    reports = []
    for setting in plan.settings:
        if setting.teacher.export not in teachers_done:
            runner.teacher(setting.teacher)
            teachers_done.add(setting.teacher.export)
        runner.students(setting.students, opts.jobs)
        if opts.dry_run:
            continue
        reports.append(write_setting_report(setting, opts, plan.data, command,
                                            evaluate_given_teacher(setting, runner.inputs)))
        log(f"setting {setting.tag or '(single)'} done: {setting.out_dir / opts.report_name}, "
            f"{setting.out_dir / opts.plot_name}")
    if opts.dry_run:
        log("dry run: nothing was run")
        return 0
    if len(plan.settings) > 1:
        write_sweep_report(opts.out / opts.report_name, reports, {v: variant_label(v) for v in opts.variants})
    log(f"all done in {time.time() - runner.t0:.0f} s; table: {opts.out / opts.report_name}")
    return 0
