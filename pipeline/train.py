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
Exit codes: 0 done, 75 preempted after saving (requeue), 3 too many non-finite steps,
2 refused at start-up (see pipeline/faults.py).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.faults import CONFIG_ERROR_EXIT_CODE


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="YAML run config")
    ap.add_argument("--resume", default=None, help="auto (default) | none | CHECKPOINT_DIR "
                                                   "(same as checkpoint.resume=...)")
    ap.add_argument("--force-resume", action="store_true",
                    help="resume even if teacher/tokenizer/data/model shape changed")
    ap.add_argument("--help-config", action="store_true", help="list all config keys and exit")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    import warnings

    # torch deprecations triggered inside DeepSpeed's collectives, once per call: noise in the log
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from pipeline.config import ConfigError, help_text, load_config

    args = parse_args(argv)
    if args.help_config:
        print(help_text())
        return 0
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.force_resume:
        overrides.append("checkpoint.force_resume=true")
    try:
        cfg = load_config(args.config, overrides)
        from pipeline.engine import Trainer

        trainer = Trainer(cfg)
        return trainer.fit()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE
    except ValueError as e:  # DataError from the reader is a ValueError
        if type(e).__name__ == "DataError":
            print(f"data error: {e}", file=sys.stderr, flush=True)
            return CONFIG_ERROR_EXIT_CODE
        raise


if __name__ == "__main__":
    code = main()
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.exit(code)
