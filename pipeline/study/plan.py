"""The study's plan: every stage and every run config, built and validated before anything runs.

A plan is data derived from the command line and the base configs: the data stages (tokenizer,
shards) unless --data is given; one teacher per (teacher heads, seq_len) unless --teacher is
given; and per setting (teacher heads x seq_len x student steps) one student per variant and
seed. :func:`validate_plan` checks every generated config with the engine's own validation
(``pipeline.config.config_from_dict``), so a typo in a variant or an ``--override`` stops the
study before its first stage instead of when that run starts, maybe hours later. Paths that
stages will create (shards, the teacher's export) are already filled in: the engine's config
check looks at keys, types and values, not at files.

A run config is the base YAML with three layers applied, later ones winning: the study's own
values (paths, seed, budget), the variant's overrides, the user's ``--override`` list. Within one
override list a key may appear only once, as on the engine's command line.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data_prep.tokenizer import TRAINING_RECIPE
from pipeline.config import ConfigError, config_from_dict
from shd_common import settings
from shd_common.settings import set_dotted

from .inputs import data_identity, recorded_inputs
from .variants import VARIANTS, Budget, split_variant

# --------------------------------------------------------------------------------------------
# config dicts
# --------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    """The parsed YAML file (configs and the config.yaml a run directory keeps)."""
    return yaml.safe_load(Path(path).read_text())


def with_values(cfg: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A copy of cfg with each dotted key of ``values`` set to its value."""
    out = copy.deepcopy(dict(cfg))
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """A copy of cfg with ``key.sub=value`` overrides applied by the run config's parser
    (``shd_common.settings``: YAML values, the same key twice refused)."""
    return settings.apply_overrides(copy.deepcopy(dict(cfg)), list(overrides))


def tokens_per_step(cfg: Mapping[str, Any], nproc: int) -> int:
    """Tokens one optimizer step of this run consumes over ``nproc`` ranks."""
    return (cfg["data"]["micro_batch_size"] * cfg["data"]["seq_len"] * nproc
            * (cfg.get("optim", {}).get("grad_accum_steps") or 1))


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyOptions:
    """The study's resolved command line (pipeline.study.cli.parse_args makes it)."""

    preset: str  # "bench" or "demo" (titles and default file names)
    out: Path
    budget_name: str
    budget: Budget  # the preset's numbers with --steps, --batch-tokens, ... applied
    variants: tuple[str, ...]  # expanded names, weights included ("kd_shd@0.3")
    seeds: tuple[int, ...]
    teacher_heads: tuple[int, ...]
    seq_lens: tuple[int, ...]
    steps_list: tuple[int, ...]  # student optimizer steps, one setting each
    nproc: int
    jobs: int
    launcher: tuple[str, ...]  # command that runs a config file
    student_base: dict  # the --student-config YAML
    teacher_base: dict  # the --teacher-config YAML
    student_heads: int | None
    overrides: tuple[str, ...]  # --override, for every student
    teacher: Path | None  # a given Hugging Face teacher
    data: Path | None  # given shards
    tokenizer: Path | None
    corpus: tuple[str, ...]
    val_fraction: float
    data_root: Path
    teacher_roots: tuple[Path, ...]  # where a finished teacher is looked for; the first gets new ones
    report_name: str
    plot_name: str
    dry_run: bool


@dataclass(frozen=True)
class CommandStage:
    """A non-training stage (tokenizer, shards, export); ``key`` is what its DONE marker records:
    the stage is skipped when the marker holds the same key."""

    name: str
    run_dir: Path
    cmd: tuple[str, ...]
    what: str
    key: dict

    @property
    def marker(self) -> Path:
        return self.run_dir / f"DONE.{self.name}"

    def done(self) -> bool:
        """True when the stage already ran with this key (its marker holds it)."""
        try:
            return json.loads(self.marker.read_text()) == self.key
        except (OSError, ValueError):
            return False


@dataclass(frozen=True)
class DataPlan:
    """The tokenizer and shards the runs read, and the stages that make them (none with --data)."""

    tokenizer: Path
    shards: Path
    stages: tuple[CommandStage, ...] = ()


@dataclass(frozen=True)
class TeacherPlan:
    """A setting's teacher: given (--teacher: no run), reused (a finished pre-training with the
    same configuration) or to be pre-trained in ``run_dir`` and exported to ``export``."""

    export: Path
    run_dir: Path | None = None
    config: dict | None = None
    reused: bool = False

    def export_stage(self) -> CommandStage:
        """Export the pre-trained teacher as a Hugging Face model."""
        assert self.run_dir is not None
        cmd = (sys.executable, "-m", "pipeline.export", "--checkpoint", str(self.run_dir / "checkpoints"),
               "--out", str(self.export))
        return CommandStage("export", self.run_dir, cmd, "export the teacher as a Hugging Face model",
                            {"config": self.config})


@dataclass(frozen=True)
class StudentRun:
    """One student: a variant trained with one seed."""

    variant: str
    seed: int
    run_dir: Path
    config: dict

    @property
    def name(self) -> str:
        return f"{self.variant} seed {self.seed}"


@dataclass(frozen=True)
class Setting:
    """One point of the sweep grid: every variant x seed with the same teacher, shape and budget."""

    heads: int  # teacher heads
    seq_len: int
    steps: int
    tag: str  # "h8_T128_s120" in a sweep, "" for a single setting
    out_dir: Path
    teacher: TeacherPlan
    students: tuple[StudentRun, ...]


@dataclass(frozen=True)
class Plan:
    """Everything the study will run, in order."""

    data: DataPlan
    teachers: tuple[TeacherPlan, ...]  # one per (heads, seq_len), shared by the settings using it
    settings: tuple[Setting, ...]

    @property
    def total_stages(self) -> int:
        """Stages counted in the progress lines: data, pre-training + export of each teacher, students."""
        trained = sum(t.run_dir is not None for t in self.teachers)
        return len(self.data.stages) + 2 * trained + sum(len(s.students) for s in self.settings)

    def configs(self) -> Iterator[tuple[str, str, dict]]:
        """(run group, run, config) of every engine run: the teachers, then the students."""
        for t in self.teachers:
            if t.config is not None:
                yield "teacher", str(t.run_dir), t.config
        for s in self.settings:
            where = f" (setting {s.tag})" if s.tag else ""
            for st in s.students:
                yield f"variant {st.variant}{where}", f"seed {st.seed}", st.config


def data_plan(opts: StudyOptions) -> DataPlan:
    """The given shards and tokenizer, or the stages that make them from --corpus in --data-root."""
    if opts.data is not None:
        assert opts.tokenizer is not None  # parse_args requires it
        return DataPlan(opts.tokenizer, opts.data)
    b, root, py, corpus = opts.budget, opts.data_root, sys.executable, list(opts.corpus)
    stages = []
    tok = opts.tokenizer  # e.g. the teacher's own tokenizer: no training, shard with it
    if tok is None:
        tok = root / "tokenizer"
        stages.append(CommandStage(
            "tokenizer", root, (py, "-m", "data_prep.tokenizer", "train", "--input", *corpus, "--vocab-size",
                                str(b.vocab), "--max-sentences", str(b.tok_sentences), "--out", str(tok),
                                "--overwrite"),
            f"SentencePiece tokenizer, vocabulary {b.vocab}, on {' '.join(corpus)}",
            {"corpus": corpus, "vocab": b.vocab, "sentences": b.tok_sentences, "recipe": TRAINING_RECIPE}))
    shards = root / "shards"
    stages.append(CommandStage(
        "shards", root, (py, "-m", "data_prep.shard", "--input", *corpus, "--tokenizer", str(tok), "--out",
                         str(shards), "--workers", str(max(1, os.cpu_count() or 1)), "--val-fraction",
                         str(opts.val_fraction), "--overwrite"),
        "tokenize, pack and shard the corpus (train + val)",
        {"corpus": corpus, "tokenizer": str(tok), "vocab": b.vocab, "sentences": b.tok_sentences,
         "tokenizer_recipe": TRAINING_RECIPE}))
    return DataPlan(tok, shards, tuple(stages))


def teacher_config(opts: StudyOptions, data: DataPlan, heads: int, seq_len: int, run_dir: Path,
                   tb_dir: Path) -> dict:
    """The teacher's pre-training config: the base teacher with ``heads`` heads (kv heads: the
    base's, lowered to a divisor of heads), this data and sequence length, the teacher budget."""
    base = opts.teacher_base
    steps = opts.budget.teacher_steps
    mb = opts.budget.micro_batch(seq_len)
    kv = base["student"].get("num_kv_heads") or heads
    while heads % kv:
        kv -= 1
    return with_values(base, {
        "output_dir": str(run_dir), "logging.tb_dir": str(tb_dir), "data.dir": str(data.shards),
        "data.tokenizer_dir": str(data.tokenizer), "data.seq_len": seq_len, "data.micro_batch_size": mb,
        "student.num_heads": heads, "student.num_kv_heads": kv,
        "optim.max_steps": steps, "optim.warmup_steps": min(base["optim"]["warmup_steps"], max(1, steps // 10)),
        "checkpoint.every_steps": max(1, steps // 4), "logging.every_steps": max(1, steps // 10),
        "eval.every_steps": max(1, steps // 4), "eval.max_batches": opts.budget.eval_batches * opts.nproc,
        "eval.micro_batch_size": mb,
    })


def student_config(opts: StudyOptions, variant: str, seed: int, teacher: Path, data: DataPlan, seq_len: int,
                   steps: int, run_dir: Path, tb_dir: Path) -> dict:
    """A student's config: the base student with the study's values (paths, seed, budget), then
    the variant's overrides (and its attention-loss weight), then the user's --override list."""
    b = opts.budget
    mb = b.micro_batch(seq_len)
    values: dict[str, Any] = {
        "output_dir": str(run_dir), "logging.tb_dir": str(tb_dir), "seed": seed, "teacher.path": str(teacher),
        "data.dir": str(data.shards), "data.tokenizer_dir": str(data.tokenizer), "data.seq_len": seq_len,
        "data.micro_batch_size": mb,
        "optim.max_steps": steps, "optim.warmup_steps": min(b.warmup, max(1, steps // 10)),
        "checkpoint.every_steps": 0, "logging.every_steps": max(1, steps // 10),
        "eval.every_steps": b.eval_every, "eval.max_batches": b.eval_batches * opts.nproc, "eval.micro_batch_size": mb,
    }
    if opts.student_heads:
        values |= {"student.num_heads": opts.student_heads, "student.num_kv_heads": opts.student_heads}
    base, w_shd = split_variant(variant)
    cfg = apply_overrides(with_values(opts.student_base, values), VARIANTS[base].overrides)
    if w_shd is not None:
        cfg = with_values(cfg, {"distill.w_shd": w_shd})
    return apply_overrides(cfg, opts.overrides)


def _same_run(a: dict, b: dict) -> bool:
    """Configs equal up to where the logs go."""
    return {k: v for k, v in a.items() if k != "logging"} == {k: v for k, v in b.items() if k != "logging"}


def teacher_plan(opts: StudyOptions, data: DataPlan, heads: int, seq_len: int, tag: str) -> TeacherPlan:
    """The given teacher, or a finished one with the same configuration in any of the teacher
    roots (the demo's among them), or a new pre-training in the first root."""
    if opts.teacher is not None:
        return TeacherPlan(opts.teacher)
    tb_dir = opts.out / "tb" / "teacher" / tag
    roots = opts.teacher_roots
    candidates = []
    for i, root in enumerate(roots):
        run_dir = root / tag if tag else (root / "default" if i == 0 and len(roots) > 1 else root)
        candidates.append((run_dir, teacher_config(opts, data, heads, seq_len, run_dir, tb_dir)))
    # data still to be made: no teacher is known to match it yet (the runner checks its own root's
    # teacher again once the data exists)
    current = {"data": data_identity(data.shards), "teacher": None} \
        if all(stage.done() for stage in data.stages) else None
    for run_dir, cfg in candidates:
        saved = run_dir / "config.yaml"
        if (run_dir / "DONE").exists() and (run_dir / "DONE.export").exists() and saved.exists() \
                and _same_run(load_yaml(saved), cfg) and current is not None \
                and recorded_inputs(run_dir) == current:
            return TeacherPlan(run_dir / "export", run_dir, cfg, reused=True)
    run_dir, cfg = candidates[0]
    return TeacherPlan(run_dir / "export", run_dir, cfg)


def build_plan(opts: StudyOptions) -> Plan:
    """Every stage and run config of the study, in the order they run (nothing is run or written)."""
    data = data_plan(opts)
    grid = list(itertools.product(opts.teacher_heads, opts.seq_lens, opts.steps_list))
    teacher_sweep = len(opts.teacher_heads) > 1 or len(opts.seq_lens) > 1
    teachers: dict[tuple[int, int], TeacherPlan] = {}
    settings = []
    for heads, seq_len, steps in grid:
        tag = f"h{heads}_T{seq_len}_s{steps}" if len(grid) > 1 else ""
        if (heads, seq_len) not in teachers:
            teachers[(heads, seq_len)] = teacher_plan(opts, data, heads, seq_len,
                                                      f"h{heads}_T{seq_len}" if teacher_sweep else "")
        teacher = teachers[(heads, seq_len)]
        students = []
        for variant in opts.variants:
            dir_name = variant.replace("@", "_w")
            for seed in opts.seeds:
                run_dir = opts.out / tag / "runs" / dir_name / f"seed{seed}"
                tb_dir = opts.out / "tb" / tag / f"{dir_name}_seed{seed}"
                cfg = student_config(opts, variant, seed, teacher.export, data, seq_len, steps, run_dir, tb_dir)
                students.append(StudentRun(variant, seed, run_dir, cfg))
        settings.append(Setting(heads, seq_len, steps, tag, opts.out / tag, teacher, tuple(students)))
    return Plan(data, tuple(teachers.values()), tuple(settings))


def validate_plan(plan: Plan) -> None:
    """Check every run config of the plan with the engine's validation before anything runs.

    Raises ConfigError listing each failing run group (teacher, or variant and setting) with its
    runs (seeds) and the engine's message, which names the key.
    """
    failures: dict[tuple[str, str], list[str]] = {}
    for group, run, cfg in plan.configs():
        try:
            config_from_dict(cfg)
        except ConfigError as e:
            failures.setdefault((group, str(e)), []).append(run)
    if failures:
        lines = [f"  {group} ({', '.join(runs)}): {msg}" for (group, msg), runs in failures.items()]
        raise ConfigError("invalid run config(s); nothing was run:\n" + "\n".join(lines))
