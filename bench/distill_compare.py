"""Does SHD help? Train identical students under several losses and compare held-out perplexity.

    python bench/distill_compare.py                                # 6 variants x 3 seeds, budget "small"
    python bench/distill_compare.py --variants kd,kd_shd,kd_mean --seeds 1,2,3,4,5
    python bench/distill_compare.py --teacher-heads 8,16 --student-heads 4   # where do the weights matter?
    python bench/distill_compare.py --seq-lens 128,512 --steps-list 150,600
    python bench/distill_compare.py --variants kd,kd_select,kd_shd --w-shd-list 0.1,0.3,1.0 --jobs 2 --nproc 1
    python bench/distill_compare.py --data DIR --tokenizer DIR --teacher HF_DIR --budget large \\
        --launcher "sbatch --wait launch/slurm/train.sbatch"      # one Slurm job per run, in turn
    python bench/distill_compare.py --dry-run                      # print the plan and the commands

Every run goes through the normal entry point (``launch/local.sh CONFIG`` = ``python -m
pipeline.train``, ``NPROC`` processes under ZeRO-3), so what is measured is what users run. For
one setting the students share architecture, budget (tokens), schedule and evaluation batches;
seed k gives every variant the same initial weights and data order (``seed`` sets both), so the
differences are paired. ``launch/demo.sh`` is this script with ``--preset demo`` (3 variants, 1
seed, small budget): one implementation.

Without ``--data``/``--teacher`` the demo's are used (``runs/demo/data``, ``runs/demo/teacher``),
made here if missing: the ``python-stdlib`` corpus, a SentencePiece tokenizer, shards, and a
teacher pre-trained with the engine's ``pretrain`` stage and exported. Every stage writes a
``DONE`` marker after it succeeds and is skipped when run again with the same configuration;
an interrupted stage resumes from its newest checkpoint (or starts over if it has none).

Outputs in ``--out`` (per setting in ``--out/<setting>`` when sweeping): ``results.json`` (all
numbers, curves included), ``results.md`` (table + paired differences), ``ppl.png`` (training
loss and held-out perplexity against tokens), TensorBoard logs under ``--out/tb``; a sweep also
writes ``--out/results.md`` with every setting and one table across settings (paired differences
against KD and ``select``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_report as report  # noqa: E402

VARIANTS: dict[str, tuple[str, list[str]]] = {
    # name: (label, overrides of the student config)
    "ce": ("CE only", ["stage=pretrain", "teacher.path=null", "distill.w_ce=1.0", "distill.w_kd=0.0",
                       "distill.w_shd=0.0"]),
    "kd": ("CE + KD", ["distill.w_shd=0.0"]),
    "kd_shd": ("CE + KD + SHD (pairwise)", ["distill.plan=pairwise"]),
    "kd_group": ("CE + KD + SHD (group)", ["distill.plan=group"]),
    "kd_mean": ("CE + KD + attn KD, mean merge", ["distill.plan=mean"]),
    "kd_select": ("CE + KD + attn KD, select", ["distill.plan=select"]),
    "shd_only": ("CE + SHD (no KD)", ["distill.plan=pairwise", "distill.w_kd=0.0"]),
    # the variants of docs/shd-method.md ("Variants under study"), pairwise weights
    "kd_hard": ("CE + KD + SHD, hard selection", ["distill.plan=pairwise", "distill.selection=hard"]),
    "kd_logit": ("CE + KD + SHD, score-space merge", ["distill.plan=pairwise", "distill.merge=logit"]),
    "kd_sharp": ("CE + KD + SHD, sharpened (0.5)", ["distill.plan=pairwise", "distill.sharpen=0.5"]),
}
DEFAULT_VARIANTS = "ce,kd,kd_shd,kd_group,kd_mean,kd_select"
# plans whose weights depend on the input (their mixing-weight statistics are compared with alpha = 1/2)
DYNAMIC_PLAN = {"kd_shd": "pairwise", "kd_group": "group", "shd_only": "pairwise", "kd_hard": "pairwise",
                "kd_logit": "pairwise", "kd_sharp": "pairwise"}

# Budgets: optimizer steps of a student and of a teacher, tokens per rank per micro-batch, the
# tokenizer's vocabulary and training lines, the evaluation cadence and size.
BUDGETS = {
    # CI: proves the whole path works in ~2-3 minutes on 2 cores; the numbers mean nothing.
    "ci": dict(steps=12, teacher_steps=24, batch_tokens=256, vocab=512, tok_sentences=20000,
               eval_every=6, eval_batches=2, warmup=3),
    # the demo: < 20 minutes on 2 CPU cores for data + teacher + 3 students
    "demo": dict(steps=300, teacher_steps=600, batch_tokens=1024, vocab=4096, tok_sentences=200000,
                 eval_every=50, eval_batches=16, warmup=30),
    # the bench on a 2-core machine: 6 variants x 3 seeds in about an hour (teacher reused)
    "small": dict(steps=120, teacher_steps=600, batch_tokens=1024, vocab=4096, tok_sentences=200000,
                  eval_every=40, eval_batches=16, warmup=20),
    # a cluster: longer students and teacher (pair it with bigger models in --student-config)
    "large": dict(steps=5000, teacher_steps=20000, batch_tokens=4096, vocab=16000, tok_sentences=2000000,
                  eval_every=500, eval_batches=50, warmup=200),
}


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# config helpers
# --------------------------------------------------------------------------------------------


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Dotted ``key.sub=value`` overrides (YAML values) applied to a nested dict, like the engine."""
    cfg = json.loads(json.dumps(cfg))
    for ov in overrides:
        key, _, raw = ov.partition("=")
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return cfg


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# running the engine
# --------------------------------------------------------------------------------------------


class Runner:
    """Starts engine runs through the launch scripts and keeps the stage markers."""

    def __init__(self, args, total_stages: int):
        self.args = args
        self.launcher = shlex.split(args.launcher) if args.launcher else ["bash", str(ROOT / "launch/local.sh")]
        self.total = total_stages
        self.done_stages = 0
        self.t0 = time.time()
        self._lock = threading.Lock()  # --jobs: several runs report their stages at once

    def _header(self, name: str, what: str) -> None:
        with self._lock:
            self.done_stages += 1
            log(f"stage {self.done_stages}/{self.total}: {name}: {what} (elapsed {time.time() - self.t0:.0f} s)")

    def skip(self, run_dir: Path, cfg: dict | None) -> bool:
        """True when run_dir holds a finished stage with this configuration."""
        done = run_dir / "DONE"
        if not done.exists():
            return False
        if cfg is None:
            return True
        saved = run_dir / "config.yaml"
        return saved.exists() and load_yaml(saved) == cfg

    def prepare_dir(self, run_dir: Path, cfg: dict) -> None:
        """Make run_dir ready for cfg: a changed config starts over; an interrupted run with a
        complete checkpoint is resumed by the engine (--resume auto); without one, it restarts."""
        saved = run_dir / "config.yaml"
        from pipeline import checkpoint as ckpt

        ckdir = Path(cfg.get("checkpoint", {}).get("dir") or run_dir / "checkpoints")
        restart = saved.exists() and load_yaml(saved) != cfg
        restart |= not (ckdir.exists() and ckpt.find_latest(ckdir) is not None)
        if restart and run_dir.exists():
            shutil.rmtree(run_dir)
            tb = (cfg.get("logging") or {}).get("tb_dir")
            if tb and Path(tb).exists():
                shutil.rmtree(tb)
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def train(self, name: str, run_dir: Path, cfg: dict, what: str, extra_env: dict | None = None) -> None:
        self._header(name, what)
        if self.skip(run_dir, cfg):
            log(f"  {name}: already done ({run_dir}/DONE), reusing it")
            return
        if self.args.dry_run:
            log(f"  would run: NPROC={self.args.nproc} {shlex.join(self.launcher)} {run_dir}/config.yaml")
            return
        self.prepare_dir(run_dir, cfg)
        cmd = [*self.launcher, str(run_dir / "config.yaml")]
        # the launch scripts run `python`: make it this interpreter even when no venv is activated
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, NPROC=str(self.args.nproc), PYTHONUNBUFFERED="1", SHD_ENV_SETUP="0", PATH=path,
                   **(extra_env or {}))
        log(f"  $ NPROC={self.args.nproc} {shlex.join(cmd)}   (full log: {run_dir}/launch.log)")
        self._stream(cmd, env, run_dir / "launch.log", name)
        (run_dir / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def _stream(self, cmd: list[str], env: dict, log_path: Path, name: str) -> None:
        """Run cmd, keep its whole output in log_path, show rank 0's step/eval lines as progress."""
        t0 = time.time()
        with open(log_path, "a") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1)
            assert p.stdout is not None
            for line in p.stdout:
                f.write(line)
                body = line.rstrip("\n")
                if body.startswith("[rank 0] ") and (" | loss " in body or "eval step" in body
                                                     or body.startswith("[rank 0] stage ")):
                    print(f"    {name} {time.time() - t0:5.0f}s  {body[9:]}", flush=True)
            rc = p.wait()
        if rc != 0:
            tail = log_path.read_text().splitlines()[-40:]
            print("\n".join(tail), file=sys.stderr)
            raise SystemExit(f"error: {name} failed with exit code {rc}; full log: {log_path}")

    def command(self, name: str, run_dir: Path, cmd: list[str], what: str, key: dict) -> None:
        """A non-training stage (tokenizer, shards, export) with its DONE marker."""
        self._header(name, what)
        marker = run_dir / f"DONE.{name}"
        if marker.exists() and json.loads(marker.read_text()) == key:
            log(f"  {name}: already done ({marker}), reusing it")
            return
        if self.args.dry_run:
            log(f"  would run: {shlex.join(cmd)}")
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"  $ {shlex.join(cmd)}")
        t0 = time.time()
        with open(run_dir / f"{name}.log", "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        if rc != 0:
            print("\n".join((run_dir / f"{name}.log").read_text().splitlines()[-30:]), file=sys.stderr)
            raise SystemExit(f"error: {name} failed with exit code {rc}; log: {run_dir / f'{name}.log'}")
        log(f"  {name} done in {time.time() - t0:.0f} s")
        marker.write_text(json.dumps(key))


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------


def prepare_data(runner: Runner, args, budget: dict) -> tuple[Path, Path]:
    """(tokenizer_dir, shard_dir): given, or made from --corpus into <data-root>."""
    if args.data:
        tok = Path(args.tokenizer) if args.tokenizer else None
        if tok is None:
            raise SystemExit("error: --data needs --tokenizer (the tokenizer the shards were made with)")
        return tok, Path(args.data)
    root = Path(args.data_root)
    py = sys.executable
    vocab = args.vocab or budget["vocab"]
    if args.tokenizer:  # e.g. the teacher's own tokenizer: no training, shard with it
        tok = Path(args.tokenizer)
        runner.done_stages += 1
    else:
        tok = root / "tokenizer"
        key = {"corpus": args.corpus, "vocab": vocab, "sentences": budget["tok_sentences"]}
        runner.command("tokenizer", root, [py, "-m", "data_prep.tokenizer", "train", "--input", *args.corpus,
                                           "--vocab-size", str(vocab), "--max-sentences",
                                           str(budget["tok_sentences"]), "--out", str(tok), "--overwrite"],
                       f"SentencePiece tokenizer, vocabulary {vocab}, on {' '.join(args.corpus)}", key)
    shards = root / "shards"
    key = {"corpus": args.corpus, "tokenizer": str(tok), "vocab": vocab, "sentences": budget["tok_sentences"]}
    runner.command("shards", root, [py, "-m", "data_prep.shard", "--input", *args.corpus, "--tokenizer", str(tok),
                                    "--out", str(shards), "--workers", str(max(1, os.cpu_count() or 1)),
                                    "--val-fraction", str(args.val_fraction), "--overwrite"],
                   "tokenize, pack and shard the corpus (train + val)", key)
    return tok, shards


def teacher_config(args, budget: dict, tok: Path, data: Path, heads: int, seq_len: int, run_dir: Path,
                   tb_dir: Path) -> dict:
    base = load_yaml(args.teacher_config)
    steps = args.teacher_steps or budget["teacher_steps"]
    mb = max(1, (args.batch_tokens or budget["batch_tokens"]) // seq_len)
    kv = base["student"].get("num_kv_heads") or heads
    while heads % kv:
        kv -= 1
    return apply_overrides(base, [
        f"output_dir={run_dir}", f"logging.tb_dir={tb_dir}", f"data.dir={data}", f"data.tokenizer_dir={tok}",
        f"data.seq_len={seq_len}", f"data.micro_batch_size={mb}", f"student.num_heads={heads}",
        f"student.num_kv_heads={kv}", f"student.max_position_embeddings={max(seq_len, 128)}",
        f"optim.max_steps={steps}", f"optim.warmup_steps={min(base['optim']['warmup_steps'], max(1, steps // 10))}",
        f"checkpoint.every_steps={max(1, steps // 4)}", f"logging.every_steps={max(1, steps // 10)}",
        f"eval.every_steps={max(1, steps // 4)}", f"eval.max_batches={args.eval_batches or budget['eval_batches']}",
        f"eval.micro_batch_size={mb}",
    ])


def _same_run(a: dict, b: dict) -> bool:
    """Configs equal up to where the logs go."""
    strip = lambda c: {k: v for k, v in c.items() if k != "logging"}  # noqa: E731
    return strip(a) == strip(b)


def make_teacher(runner: Runner, args, budget: dict, tok: Path, data: Path, heads: int, seq_len: int,
                 tag: str) -> tuple[Path, Path | None]:
    """(teacher HF dir, its run dir or None if given): pre-train with stage pretrain and export.

    A finished teacher with the same configuration in any of the teacher roots (the demo's among
    them) is reused; otherwise the first root gets a new one."""
    if args.teacher:  # not counted in the stage total
        return Path(args.teacher), None
    tb_dir = Path(args.out) / "tb" / "teacher" / tag
    cands = []
    for i, root in enumerate(args.teacher_roots):
        run_dir = Path(root) / tag if tag else Path(root) / ("default" if i == 0 and len(args.teacher_roots) > 1 else "")
        run_dir = Path(str(run_dir).rstrip("/"))
        cands.append((run_dir, teacher_config(args, budget, tok, data, heads, seq_len, run_dir, tb_dir)))
    for run_dir, cfg in cands:
        saved = run_dir / "config.yaml"
        if (run_dir / "DONE").exists() and (run_dir / "DONE.export").exists() and saved.exists() \
                and _same_run(load_yaml(saved), cfg):
            runner.done_stages += 2
            log(f"stages {runner.done_stages - 1}-{runner.done_stages}/{runner.total}: teacher: already done "
                f"({run_dir}/DONE), reusing it")
            return run_dir / "export", run_dir
    run_dir, cfg = cands[0]
    runner.train("teacher", run_dir, cfg, f"pre-train a {cfg['student']['num_layers']}-layer, {heads}-head "
                 f"({cfg['student']['num_kv_heads']} kv) LLaMA, {cfg['optim']['max_steps']} steps (stage pretrain)")
    export = run_dir / "export"
    runner.command("export", run_dir, [sys.executable, "-m", "pipeline.export", "--checkpoint",
                                       str(run_dir / "checkpoints"), "--out", str(export)],
                   "export the teacher as a Hugging Face model", {"config": cfg})
    return export, run_dir


def student_config(args, budget: dict, variant: str, seed: int, teacher: Path, tok: Path, data: Path,
                   seq_len: int, steps: int, run_dir: Path, tb_dir: Path) -> dict:
    base = load_yaml(args.student_config)
    mb = max(1, (args.batch_tokens or budget["batch_tokens"]) // seq_len)
    ov = [f"output_dir={run_dir}", f"logging.tb_dir={tb_dir}", f"seed={seed}", f"teacher.path={teacher}",
          f"data.dir={data}", f"data.tokenizer_dir={tok}", f"data.seq_len={seq_len}", f"data.micro_batch_size={mb}",
          f"student.max_position_embeddings={max(seq_len, 128)}", f"optim.max_steps={steps}",
          f"optim.warmup_steps={min(budget['warmup'], max(1, steps // 10))}", "checkpoint.every_steps=0",
          f"logging.every_steps={max(1, steps // 10)}", f"eval.every_steps={args.eval_every or budget['eval_every']}",
          f"eval.max_batches={args.eval_batches or budget['eval_batches']}", f"eval.micro_batch_size={mb}"]
    if args.student_heads:
        ov += [f"student.num_heads={args.student_heads}", f"student.num_kv_heads={args.student_heads}"]
    name, w_shd = report.split_variant(variant)
    ov += VARIANTS[name][1] + ([f"distill.w_shd={w_shd}"] if w_shd is not None else [])
    return apply_overrides(base, ov + list(args.override or []))


def variant_label(name: str) -> str:
    """The table label of a variant name, with its attention-loss weight when swept."""
    base, w_shd = report.split_variant(name)
    return VARIANTS[base][0] + (f", w_shd {w_shd:g}" if w_shd is not None else "")


def expand_variants(variants: list[str], w_shd_list: list[float] | None) -> list[str]:
    """Each variant with an attention term once per weight of --w-shd-list ("kd_shd@0.3"); CE and
    KD, and variants named with their weight already, once as they are."""
    if not w_shd_list:
        return variants
    return [report.variant_name(v, w) for v in variants
            for w in ([None] if v in report.NO_ATTENTION or "@" in v else w_shd_list)]


def train_students(runner: Runner, args, students: list[tuple[str, int, Path, dict]], steps: int) -> None:
    """Train (variant, seed, run_dir, config) runs, --jobs of them at once."""
    env = {}
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc)))

    def one(student: tuple[str, int, Path, dict]) -> None:
        variant, seed, run_dir, cfg = student
        runner.train(f"{variant} seed {seed}", run_dir, cfg,
                     f"{variant_label(variant)}: {steps} steps x {tokens_per_step(cfg, args.nproc)} tokens", env)

    if args.jobs == 1 or args.dry_run:
        for student in students:
            one(student)
        return
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(one, st) for st in students]
        failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:  # every run was tried; the finished ones keep their DONE markers for the next attempt
        raise SystemExit("; ".join(str(e) for e in failed))


def tokens_per_step(cfg: dict, nproc: int) -> int:
    return (cfg["data"]["micro_batch_size"] * cfg["data"]["seq_len"] * nproc
            * (cfg.get("optim", {}).get("grad_accum_steps") or 1))


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", choices=["bench", "demo"], default="bench",
                    help="demo: what launch/demo.sh runs (variants ce,kd,kd_shd, 1 seed, budget demo, --out runs/demo, "
                         "summary.md + curves.png)")
    ap.add_argument("--out", help="output directory (default runs/distill_compare; demo: runs/demo)")
    ap.add_argument("--variants", help=f"comma list from {','.join(VARIANTS)} (default {DEFAULT_VARIANTS}); "
                                       "a name may carry its attention-loss weight: kd_shd@0.3")
    ap.add_argument("--w-shd-list", help="sweep: comma list of attention-loss weights, applied to every variant "
                                         "with an attention term (ce and kd run once); e.g. 0.1,0.3,1.0")
    ap.add_argument("--seeds", help="a count N (seeds 1..N) or a comma list of seeds ('7,' = seed 7 only); default 3, demo '1234,'")
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
    s.add_argument("--student-config", default=str(ROOT / "configs/demo_student.yaml"))
    s.add_argument("--teacher-config", default=str(ROOT / "configs/demo_teacher.yaml"))
    s.add_argument("--override", action="append", help="extra key=value for every student (repeatable)")
    o = ap.add_argument_group("output")
    o.add_argument("--report-name", help="table file (default results.md; demo summary.md)")
    o.add_argument("--plot-name", help="PNG file (default ppl.png; demo curves.png)")
    o.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    args = ap.parse_args(argv)

    demo = args.preset == "demo"
    args.out = args.out or ("runs/demo" if demo else "runs/distill_compare")
    args.variants = (args.variants or ("ce,kd,kd_shd" if demo else DEFAULT_VARIANTS)).split(",")
    bad = [v for v in args.variants if report.split_variant(v)[0] not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)} (optionally with a weight: kd_shd@0.3)")
    try:
        w_list = [float(x) for x in args.w_shd_list.split(",") if x] if args.w_shd_list else None
    except ValueError:
        ap.error(f"--w-shd-list {args.w_shd_list!r}: give comma-separated numbers, e.g. 0.1,0.3,1.0")
    if w_list and any(w <= 0 for w in w_list):
        ap.error(f"--w-shd-list {args.w_shd_list!r}: weights must be > 0 (the kd variant is w_shd = 0)")
    args.variants = expand_variants(args.variants, w_list)
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    seeds = args.seeds or ("1234," if demo else "3")
    # "N" (no comma) = seeds 1..N; "a,b,c" or "a," = exactly those seeds
    args.seeds = list(range(1, int(seeds) + 1)) if "," not in seeds else [int(x) for x in seeds.split(",") if x]
    args.budget = args.budget or os.environ.get("DEMO_BUDGET") or ("demo" if demo else "small")
    if args.budget not in BUDGETS:
        ap.error(f"unknown budget {args.budget!r}; choose from {list(BUDGETS)}")
    args.report_name = args.report_name or ("summary.md" if demo else "results.md")
    args.plot_name = args.plot_name or ("curves.png" if demo else "ppl.png")
    # Data and teacher: the demo's (runs/demo/...) are shared with the bench when they are the same
    # thing (same corpus, vocabulary, teacher shape and budget); otherwise they live under --out.
    b = BUDGETS[args.budget]
    same_data = (args.corpus == ["python-stdlib"] and (args.vocab or b["vocab"]) == BUDGETS["demo"]["vocab"]
                 and b["tok_sentences"] == BUDGETS["demo"]["tok_sentences"])
    if demo:
        args.data_root = args.data_root or str(Path(args.out) / "data")
        args.teacher_roots = [args.teacher_root or str(Path(args.out) / "teacher")]
    else:
        args.data_root = args.data_root or ("runs/demo/data" if same_data else str(Path(args.out) / "data"))
        args.teacher_roots = [args.teacher_root] if args.teacher_root else \
            [str(Path(args.out) / "teachers")] + (["runs/demo/teacher"] if same_data else [])
    args.teacher_roots = [str(Path(r).resolve()) for r in args.teacher_roots]
    if args.teacher and args.teacher_heads:
        ap.error("--teacher-heads pre-trains teachers; it cannot be combined with --teacher")
    if args.teacher and not args.tokenizer and not args.data:
        args.tokenizer = args.teacher  # KD needs the teacher's vocabulary
    for k in ("out", "data_root"):
        setattr(args, k, str(Path(getattr(args, k)).resolve()) if not Path(getattr(args, k)).is_absolute()
                else getattr(args, k))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = dict(BUDGETS[args.budget])
    base_student = load_yaml(args.student_config)
    base_teacher = load_yaml(args.teacher_config)
    heads_list = [int(x) for x in args.teacher_heads.split(",")] if args.teacher_heads else \
        [base_teacher["student"]["num_heads"]]
    seq_list = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else [base_student["data"]["seq_len"]]
    if args.steps_list:
        steps_list = [int(x) for x in args.steps_list.split(",")]
    elif args.tokens:
        mb_tokens = (args.batch_tokens or budget["batch_tokens"])
        steps_list = [max(1, -(-args.tokens // (mb_tokens * args.nproc)))]
    else:
        steps_list = [args.steps or budget["steps"]]
    settings = list(itertools.product(heads_list, seq_list, steps_list))
    sweep = len(settings) > 1
    teachers_needed = len({(h, t) for h, t, _ in settings}) if not args.teacher else 0
    n_data = 0 if args.data else 2
    total = n_data + 2 * teachers_needed + len(settings) * len(args.variants) * len(args.seeds)
    runner = Runner(args, total)
    out = Path(args.out)
    log(f"{len(settings)} setting(s) x {len(args.variants)} variant(s) x {len(args.seeds)} seed(s); budget "
        f"{args.budget}; {args.nproc} process(es) per run; output {out}")

    tok, data = prepare_data(runner, args, budget)
    teachers: dict[tuple[int, int], tuple[Path, Path | None]] = {}
    combined = []
    for heads, seq_len, steps in settings:
        tag = f"h{heads}_T{seq_len}_s{steps}" if sweep else ""
        ttag = f"h{heads}_T{seq_len}" if (len(heads_list) > 1 or len(seq_list) > 1) else ""
        if (heads, seq_len) not in teachers:
            teachers[(heads, seq_len)] = make_teacher(runner, args, budget, tok, data, heads, seq_len, ttag)
        teacher, teacher_run = teachers[(heads, seq_len)]
        sdir = out / tag if tag else out
        students = []
        for variant in args.variants:
            for seed in args.seeds:
                dir_name = variant.replace("@", "_w")
                run_dir = sdir / "runs" / dir_name / f"seed{seed}"
                tb_dir = out / "tb" / (f"{tag}/" if tag else "") / f"{dir_name}_seed{seed}"
                cfg = student_config(args, budget, variant, seed, teacher, tok, data, seq_len, steps, run_dir, tb_dir)
                students.append((variant, seed, run_dir, cfg))
        train_students(runner, args, students, steps)
        if args.dry_run:
            continue
        runs: dict[str, dict[int, dict]] = {}
        for variant, seed, run_dir, cfg in students:
            runs.setdefault(variant, {})[seed] = report.summarize_run(run_dir)
        # the teacher's held-out perplexity on the same evaluation batches, when we trained it
        tsum = report.summarize_run(teacher_run) if teacher_run else None
        st = cfg["student"]
        setting = {"teacher": str(teacher), "teacher_heads": heads, "student_layers": st["num_layers"],
                   "student_heads": st["num_heads"], "seq_len": seq_len, "steps": steps,
                   "tokens_per_step": tokens_per_step(cfg, args.nproc),
                   "tokens": steps * tokens_per_step(cfg, args.nproc), "nproc": args.nproc, "seeds": args.seeds,
                   "budget": args.budget, "data": str(data), "tokenizer": str(tok)}
        labels = {v: variant_label(v) for v in args.variants}
        agg = report.aggregate(runs)
        pairs = report.paired_differences(runs)
        ref = {p: report.uniform_reference(heads, st["num_heads"], p)
               for p in sorted({DYNAMIC_PLAN[b] for b in (report.split_variant(v)[0] for v in args.variants)
                                if b in DYNAMIC_PLAN})}
        title = "Demo: CE vs CE + KD vs CE + KD + SHD" if args.preset == "demo" else "Distillation comparison"
        md = report.markdown(setting, labels, agg, pairs, tsum, ref, title=title + (f" ({tag})" if tag else ""))
        cmd = "python bench/distill_compare.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                         else sys.argv[1:]))
        md += f"\nProduced by `{cmd.strip()}`.\n"
        (sdir / args.report_name).write_text(md)
        report.plot(sdir / args.plot_name, labels, runs, tsum,
                    title=f"{st['num_layers']}-layer {st['num_heads']}-head student, {heads}-head teacher, T={seq_len}")
        strip = {v: {s: {k: x for k, x in r.items()} for s, r in by.items()} for v, by in runs.items()}
        (sdir / "results.json").write_text(json.dumps(
            {"setting": setting, "labels": labels, "aggregate": agg, "pairs": pairs, "teacher": tsum,
             "uniform_reference": ref, "runs": strip}, indent=1, default=str))
        combined.append((tag, md, agg, pairs))
        log(f"setting {tag or '(single)'} done: {sdir / args.report_name}, {sdir / args.plot_name}")
    if sweep and not args.dry_run:
        table = report.sweep_table([(tag, agg, pairs) for tag, _, agg, pairs in combined],
                                   {v: variant_label(v) for v in args.variants})
        (out / args.report_name).write_text("\n\n".join([table] + [md for _, md, _, _ in combined]))
    if not args.dry_run:
        log(f"all done in {time.time() - runner.t0:.0f} s; table: {out / args.report_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
