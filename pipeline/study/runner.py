"""Running the study's stages through the project's normal entry points, with DONE markers.

Every engine run goes through ``launch/local.sh CONFIG`` (``python -m pipeline.train`` under
ZeRO-3 with NPROC processes) or the ``--launcher`` command, so what is measured is what users
run. A stage that succeeded writes a ``DONE`` marker and is skipped when run again with the same
configuration and, for engine runs, the same data and teacher content (``inputs``); an interrupted
training run resumes from its newest complete checkpoint (the engine's ``--resume auto``) or starts
over when it has none or its configuration or inputs changed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from shd_common.safe_remove import clear, made_here, mark

from .inputs import RunInputs, record_inputs, recorded_inputs
from .plan import CommandStage, StudentRun, TeacherPlan, load_yaml, tokens_per_step
from .variants import variant_label

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LAUNCHER = ("bash", str(REPO_ROOT / "launch/local.sh"))


def log(msg: str) -> None:
    """A timestamped progress line of the study."""
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


#: The `safe_remove` marker kind of the run and TensorBoard directories the study makes.
RUN_KIND = "study-run"


def config_changes(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs between two nested configs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


class Runner:
    """Starts engine runs and data commands, keeps their DONE markers and numbers the stages."""

    def __init__(self, launcher: Sequence[str], nproc: int, total_stages: int, dry_run: bool = False):
        self.launcher = list(launcher)
        self.nproc = nproc
        self.total = total_stages
        self.dry_run = dry_run
        self.done_stages = 0
        self.t0 = time.time()
        self._lock = threading.Lock()  # --jobs: several runs report their stages at once
        self.inputs = RunInputs()

    def _header(self, name: str, what: str) -> None:
        with self._lock:
            self.done_stages += 1
            log(f"stage {self.done_stages}/{self.total}: {name}: {what} (elapsed {time.time() - self.t0:.0f} s)")

    def finished(self, run_dir: Path, cfg: dict, inputs: dict | None = None) -> bool:
        """True when run_dir holds a finished run with this configuration and the current content
        of its data and teacher (``inputs``, computed here when not given)."""
        saved = run_dir / "config.yaml"
        if not ((run_dir / "DONE").exists() and saved.exists() and load_yaml(saved) == cfg):
            return False
        inputs = self.inputs.of(cfg) if inputs is None else inputs
        return inputs is not None and recorded_inputs(run_dir) == inputs

    @staticmethod
    def prepare_dir(run_dir: Path, cfg: dict, inputs: dict | None) -> None:
        """Make run_dir ready for cfg and inputs: a changed config or changed (or unrecorded) inputs
        start over; an interrupted run with a complete checkpoint is resumed by the engine (--resume
        auto); without one, it restarts.

        Starting over clears run_dir and its TensorBoard dir through `shd_common.safe_remove`, logged:
        deleted only when the study made them (its marker) and they hold no result; a finished or
        checkpointed run, or a directory the study did not make (a --teacher-root that is a user's
        model), is moved aside to NAME.moved-<time>."""
        from pipeline.checkpoint import records as ckpt  # torch: only when a run really starts

        saved = run_dir / "config.yaml"
        ckdir = Path(cfg.get("checkpoint", {}).get("dir") or run_dir / "checkpoints")
        checkpointed = ckdir.exists() and ckpt.find_latest(ckdir) is not None
        reasons = []
        if saved.exists() and load_yaml(saved) != cfg:
            reasons.append(f"its config changed: {', '.join(config_changes(load_yaml(saved), cfg))}")
        if recorded_inputs(run_dir) != inputs:
            reasons.append("its data or teacher content changed (or was not recorded)")
        if not checkpointed:
            reasons.append("no complete checkpoint to resume")
        tb = (cfg.get("logging") or {}).get("tb_dir")
        dirs = [run_dir] + ([Path(tb)] if tb else [])
        if reasons:
            keep = checkpointed or (run_dir / "DONE").exists()
            for path in dirs:
                made = made_here(path, RUN_KIND)
                why = (f"the study starts {run_dir} over ({'; '.join(reasons)})" if made else
                       f"the study writes run {run_dir} here, and did not make this directory")
                clear(path, ours=lambda _, made=made: made and not keep, log=log,
                      reason=why + ("; it holds that run's results" if made and keep else ""))
        for path in dirs:
            mark(path, RUN_KIND)
        saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if inputs is not None:  # None: no data or teacher there; the engine's preflight says which
            record_inputs(run_dir, inputs)

    def train(self, name: str, run_dir: Path, cfg: dict, what: str,
              extra_env: Mapping[str, str] | None = None) -> None:
        """One engine run of config cfg in run_dir (skipped when finished with the same config)."""
        self._header(name, what)
        inputs = self.inputs.of(cfg)
        if self.finished(run_dir, cfg, inputs):
            log(f"  {name}: already done ({run_dir}/DONE), reusing it")
            return
        if self.dry_run:
            log(f"  would run: NPROC={self.nproc} {shlex.join(self.launcher)} {run_dir}/config.yaml")
            return
        self.prepare_dir(run_dir, cfg, inputs)
        cmd = [*self.launcher, str(run_dir / "config.yaml")]
        # the launch scripts run `python`: make it this interpreter even when no venv is activated
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, NPROC=str(self.nproc), PYTHONUNBUFFERED="1", SHD_ENV_SETUP="0", PATH=path,
                   **(extra_env or {}))
        log(f"  $ NPROC={self.nproc} {shlex.join(cmd)}   (full log: {run_dir}/launch.log)")
        self._stream(cmd, env, run_dir / "launch.log", name)
        (run_dir / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    @staticmethod
    def _stream(cmd: list[str], env: dict, log_path: Path, name: str) -> None:
        """Run cmd, keep its whole output in log_path, show rank 0's step/eval lines as progress."""
        t0 = time.time()
        with open(log_path, "a", buffering=1) as f:  # line-buffered: a killed study keeps the log so far
            p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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

    def command(self, stage: CommandStage) -> None:
        """A non-training stage with its DONE.<name> marker (skipped when the marker has its key).

        The marker is written before the command runs too (``{"running": key}``): it says the study
        owns the stage's ``--out`` from then on, so a rerun (another key, or after a failure) lets the
        command replace it (``--overwrite``). Without a marker, whatever is already at ``--out`` (a
        user's tokenizer or shards under --data-root) is moved aside first, and logged."""
        self._header(stage.name, stage.what)
        if stage.done():
            log(f"  {stage.name}: already done ({stage.marker}), reusing it")
            return
        if self.dry_run:
            log(f"  would run: {shlex.join(stage.cmd)}")
            return
        if not stage.marker.exists():  # no run of this stage here yet: what --out holds is not the study's
            out = Path(stage.cmd[stage.cmd.index("--out") + 1])
            clear(out, ours=lambda p: False, log=log,
                  reason=f"the study's {stage.name} stage writes {out} and did not make what is there "
                         f"(no {stage.marker})")
        stage.run_dir.mkdir(parents=True, exist_ok=True)
        stage.marker.write_text(json.dumps({"running": stage.key}))  # from here on the stage's --out is the study's
        log(f"  $ {shlex.join(stage.cmd)}")
        t0 = time.time()
        log_path = stage.run_dir / f"{stage.name}.log"
        with open(log_path, "w") as f:
            rc = subprocess.run(stage.cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        if rc != 0:
            print("\n".join(log_path.read_text().splitlines()[-30:]), file=sys.stderr)
            raise SystemExit(f"error: {stage.name} failed with exit code {rc}; log: {log_path}")
        log(f"  {stage.name} done in {time.time() - t0:.0f} s")
        stage.marker.write_text(json.dumps(stage.key))

    def teacher(self, teacher: TeacherPlan) -> None:
        """Pre-train and export a teacher (two stages), or count a reused one as done."""
        if teacher.run_dir is None or teacher.config is None:  # given with --teacher: no stages
            return
        if teacher.reused:
            with self._lock:
                self.done_stages += 2
            log(f"stages {self.done_stages - 1}-{self.done_stages}/{self.total}: teacher: already done "
                f"({teacher.run_dir}/DONE), reusing it")
            return
        st = teacher.config["student"]
        self.train("teacher", teacher.run_dir, teacher.config,
                   f"pre-train a {st['num_layers']}-layer, {st['num_heads']}-head ({st['num_kv_heads']} kv) "
                   f"LLaMA, {teacher.config['optim']['max_steps']} steps (stage pretrain)")
        self.command(teacher.export_stage())

    def students(self, runs: Sequence[StudentRun], jobs: int) -> None:
        """Train the students, ``jobs`` at once (each told to use cores / (jobs * nproc) threads).

        With several jobs every run is tried; the finished ones keep their DONE markers for the
        next attempt, and the failures are reported together at the end.
        """
        env = {}
        if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (jobs * self.nproc)))

        def one(run: StudentRun) -> None:
            what = (f"{variant_label(run.variant)}: {run.config['optim']['max_steps']} steps x "
                    f"{tokens_per_step(run.config, self.nproc)} tokens")
            self.train(run.name, run.run_dir, run.config, what, env)

        if jobs == 1 or self.dry_run:
            for run in runs:
                one(run)
            return
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, run) for run in runs]
            failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            raise SystemExit("; ".join(str(e) for e in failed))
