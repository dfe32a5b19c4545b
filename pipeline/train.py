"""Train a student: distillation from a frozen teacher (stage 'distill') or plain CE ('pretrain').

One process per GPU (or CPU rank), every process reads the same config:

    # one GPU / one CPU process
    python -m pipeline.train --config configs/tiny_cpu.yaml
    # 8 GPUs on one node
    torchrun --nproc_per_node 8 -m pipeline.train --config configs/distill.yaml optim.max_steps=2000
    deepspeed --num_gpus 8 --module pipeline.train --config configs/distill.yaml
    # CPU, two ranks (gloo)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m pipeline.train --config configs/tiny_cpu.yaml

Overrides are ``key.sub=value`` (YAML values); ``--help-config`` lists every key.
``--resume auto`` (default) continues from the newest complete checkpoint in checkpoint.dir.
``--check`` validates the config, the data manifest and the model configs (no weights, no
process group), prints one line and exits: what a login node can check before a submission.
Options are never abbreviated (``--resum none`` is an error, not ``--resume none``), and a flag
given together with its config key (``--resume`` and ``checkpoint.resume=``) is refused.
Exit codes: 0 done, 75 preempted after saving (requeue), 3 too many non-finite steps,
2 refused at start-up (see pipeline/runtime/faults.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from pipeline.runtime.faults import CONFIG_ERROR_EXIT_CODE, StopRequest, ignore_stop_signals
from shd_common.cli import command_parser

if TYPE_CHECKING:
    from pipeline.config import RunConfig

#: Flags that set a config key: (option, its dest in the namespace, the key, the override it adds).
_FLAG_KEYS = (
    ("--resume", "resume", "checkpoint.resume", None),  # None: the flag's own value
    ("--force-resume", "force_resume", "checkpoint.force_resume", "true"),
    ("--move-aside", "move_aside", "checkpoint.move_aside", "true"),
    ("--rollback", "rollback", "checkpoint.rollback", "true"),
)


class _Once(argparse.Action):
    """Store an option's value, refusing the option given twice (argparse keeps the last one)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} is given twice: give it once")
        setattr(namespace, self.dest, values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = command_parser("python -m pipeline.train", __doc__)
    ap.add_argument("--config", action=_Once, help="YAML run config")
    ap.add_argument("--resume", action=_Once, default=None, help="auto (default) | none | CHECKPOINT_DIR "
                                                                 "(a step_N directory; same as checkpoint.resume=...)")
    ap.add_argument("--force-resume", action="store_true",
                    help="resume although the teacher changed (other identity changes are always refused; "
                         "same as checkpoint.force_resume=true)")
    ap.add_argument("--rollback", action="store_true",
                    help="resume a checkpoint older than the run's newest: rename the newer ones to "
                         "<name>.rolled-back-<timestamp> first (same as checkpoint.rollback=true)")
    ap.add_argument("--move-aside", action="store_true",
                    help="starting fresh where another run's directories are: rename them to "
                         "<dir>.moved-<timestamp> first (same as checkpoint.move_aside=true)")
    ap.add_argument("--check", action="store_true",
                    help="check the config, data manifest and model configs (no weights, no process "
                         "group), print one line and exit 0 (2 when refused)")
    ap.add_argument("--help-config", action="store_true", help="list all config keys and exit")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    return ap.parse_intermixed_args(argv)


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The command line's overrides plus those its flags stand for; a flag given together with
    the override of its own key is refused (which of the two was meant?)."""
    from pipeline.config import ConfigError, parse_override

    given = {parse_override(o)[0]: o for o in args.overrides}
    overrides = list(args.overrides)
    for option, dest, key, value in _FLAG_KEYS:
        flag = getattr(args, dest)
        if flag in (None, False):
            continue
        if key in given:
            raise ConfigError(f"{option} and '{given[key]}' are both given: they set the same key "
                              f"({key}); give one of them")
        overrides.append(f"{key}={json.dumps(flag) if value is None else value}")  # the flag's text, as a string
    return overrides


def check(cfg: RunConfig, config_path: str | None) -> int:
    """``--check``: the start-up checks that need no weights and no process group, one OK line."""
    from pipeline.training.preflight import Preflight

    pre = Preflight(cfg)
    pre.check_teacher_content()  # a pruned student's record names its teacher (hashes the teacher's files)
    s = pre.student_cfg
    teacher = (f"teacher {pre.teacher_cfg.num_hidden_layers} layers x {pre.teacher_cfg.num_attention_heads} heads"
               if pre.teacher_cfg is not None else "no teacher")
    print(f"config OK: {config_path or '(no file)'}: stage {cfg.stage}, student {s.num_hidden_layers} layers "
          f"x {s.num_attention_heads} heads (vocab {s.vocab_size}), {teacher}, data {cfg.data.dir} "
          f"({len(pre.manifest.shards)} shards), {cfg.optim.max_steps} steps, output_dir {cfg.output_dir}",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch deprecations triggered inside DeepSpeed's collectives, once per call: noise in the log
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from pipeline.config import ConfigError, help_text, load_config
    from shd_common.integrity import DiskFull
    from shd_common.manifest import DataError

    args = parse_args(argv)
    if args.help_config:
        print(help_text())
        return 0
    try:
        cfg = load_config(args.config, flag_overrides(args))
        if args.check:
            return check(cfg, args.config)
        from pipeline.training.trainer import Trainer

        trainer = Trainer(cfg)
        return trainer.fit()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE
    except DiskFull as e:  # a save that ran out of space (shd_common.integrity.naming_disk_full)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE
    except DataError as e:  # the data directory (manifest, shards) refused by the reader
        print(f"data error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE


if __name__ == "__main__":
    # Before main()'s heavy imports (seconds of torch and DeepSpeed): a SIGTERM/SIGUSR1 during
    # start-up is recorded here and taken over by the trainer, which saves after its first step.
    StopRequest().install()
    code = main()
    ignore_stop_signals()  # the run is over: a late stop signal must not kill the exiting process
    try:
        if "pipeline.runtime.distributed" in sys.modules:  # not imported (a refused start): no group to close
            from pipeline.runtime import distributed
            from pipeline.runtime.faults import NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE

            distributed.shut_down(agreed=code in (0, NONFINITE_EXIT_CODE, PREEMPTED_EXIT_CODE), exit_code=code)
    finally:
        sys.exit(code)
