"""Held-out perplexity of a student: a training checkpoint or an exported Hugging Face directory.

    # a checkpoint (tag directory, or the checkpoint root = its newest complete checkpoint): one
    # process, or as many as saved it (each evaluates its share of the batches), e.g.
    python -m pipeline.evaluate --checkpoint runs/x/checkpoints
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m pipeline.evaluate --checkpoint runs/x/checkpoints
    # an exported model (one process, no DeepSpeed)
    python -m pipeline.evaluate --checkpoint runs/x/export --data data/tiny

Prints ``perplexity <value>`` (and loss, tokens) on rank 0.

The model's tokenizer must be the one the data was prepared with, else the perplexity measures
nothing: the tokenizer files of an exported directory, its export marker's recorded identity, a
checkpoint's ``identity.tokenizer_sha256`` and ``--tokenizer DIR`` are each compared with the data
manifest's tokenizer, and a mismatch is refused (exit 2). A model that records no tokenizer at all
(an arbitrary HF directory without tokenizer files) is refused unless ``--tokenizer DIR`` names
its tokenizer, or ``--skip-tokenizer-check`` says the caller vouches for the ids.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.export import ExportRefused, NonFiniteWeights
from pipeline.models.identity import Claim, model_tokenizer_claims
from pipeline.runtime.faults import CONFIG_ERROR_EXIT_CODE, NONFINITE_EXIT_CODE
from shd_common.cli import command_parser
from shd_common.manifest import DataError, read_manifest, tokenizer_files_sha256


def checkpoint_tokenizer_claims(path: Path, state: dict) -> list[Claim]:
    """The tokenizer a training checkpoint was trained with (trainer_state identity)."""
    sha = (state.get("identity") or {}).get("tokenizer_sha256")
    return [(f"checkpoint {path} (trainer_state.json)", sha)] if sha else []


def check_tokenizer(claims: list[Claim], model: Path, data_dir: str | Path) -> None:
    """Refuse (DataError) data prepared with another tokenizer than every claim names, or a model
    with no claim at all: its token ids could mean anything."""
    if not claims:
        raise DataError(f"{model} records no tokenizer (no tokenizer files, no export marker): pass "
                        f"--tokenizer DIR with the tokenizer it was trained with, or --skip-tokenizer-check")
    want = read_manifest(data_dir).tokenizer.files_sha256
    for source, sha in claims:
        if sha != want:
            raise DataError(f"{source} (tokenizer sha256 {sha[:12]}) does not match the data in {data_dir} "
                            f"(prepared with tokenizer sha256 {want[:12]}): pass --data prepared with the "
                            f"model's tokenizer (python -m data_prep.shard --tokenizer ...)")


def _perplexity(model, evaluator, dump: str | None) -> dict:
    """Perplexity of a plain model over the evaluator's split, each rank of the launch taking its
    data-parallel share, as the trainer's evaluation does; ``dump`` gets rank 0's first batch and
    its logits (tests)."""
    from pipeline.runtime import distributed

    model.to(evaluator.device)
    batches = evaluator.batches()  # collective: on every rank
    out = evaluator(model, batches)
    if dump and distributed.rank() == 0:
        first = batches[0]
        with torch.no_grad():
            logits = model.eval()(input_ids=first.input_ids, attention_mask=first.mask).logits
        torch.save({"input_ids": first.input_ids.cpu(), "logits": logits.cpu()}, dump)
    return out


def _checkpoint_perplexity(path: Path, overrides: list[str], dump: str | None,
                           tokenizer_claims: list[Claim] | None) -> dict:
    """Perplexity of a resolved checkpoint's student, its ZeRO shards consolidated into a plain
    model (no optimizer, no teacher); launched with the world size that saved it, or with one
    process. `tokenizer_claims` None: the tokenizer is not checked."""
    import yaml

    from pipeline.checkpoint import records as ckpt
    from pipeline.config import config_from_dict
    from pipeline.export import load_student
    from pipeline.runtime import distributed
    from pipeline.training.evaluator import Evaluator

    saved = yaml.safe_load((path / "resolved_config.yaml").read_text())
    saved.pop("derived", None)
    # the student alone, CE only: the teacher need not exist where the evaluation runs
    cfg = config_from_dict(saved, ["stage=pretrain", "teacher.path=null", "distill.w_ce=1",
                                   "distill.w_kd=0", "distill.w_shd=0", *overrides])
    state = ckpt.read_state(path)
    if tokenizer_claims is not None:
        check_tokenizer(checkpoint_tokenizer_claims(path, state) + tokenizer_claims, path, cfg.data.dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.get("world_size") != world:
        if world != 1:
            raise ConfigError(f"{path} was saved by {state.get('world_size')} ranks and this evaluation runs "
                              f"{world}: run it with {state.get('world_size')} processes, or with one")
        print(f"{path} was saved by {state.get('world_size')} ranks: evaluating its consolidated weights in "
              "this one process", file=sys.stderr)
    if world > 1:
        distributed.init_distributed()
    model = load_student(path)
    out = _perplexity(model, Evaluator.for_run(cfg, model_vocab_size=model.config.vocab_size,
                                               device=distributed.device()), dump)
    distributed.barrier()
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = command_parser("python -m pipeline.evaluate", __doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint (tag dir or root) or exported HF dir")
    ap.add_argument("--data", help="data dir (default: the training run's, from the checkpoint's or the "
                                   "export's config)")
    ap.add_argument("--split", default=None, help="data split (default: eval.split of the config, or val)")
    ap.add_argument("--max-batches", type=int, default=None, metavar="N",
                    help="evaluate the first N x micro-batch-size sequences of the split, the same ones "
                         "whatever the number of processes (default: the checkpoint's eval.max_batches; "
                         "a model dir: the whole split)")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="sequences per forward on each process (default: the checkpoint's eval or data "
                         "micro_batch_size; a model dir: 4)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="model dir only (default: the training run's data.seq_len for an export, else 128)")
    ap.add_argument("--tokenizer", default=None,
                    help="the model's tokenizer dir, for a model dir without tokenizer files (also checked "
                         "against the data)")
    ap.add_argument("--skip-tokenizer-check", action="store_true",
                    help="do not compare the model's tokenizer with the data's (you vouch for the token ids)")
    ap.add_argument("--dump-logits", default=None, help=argparse.SUPPRESS)  # tests: first batch's logits
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _evaluate(a: argparse.Namespace) -> dict | None:
    """The metrics on rank 0 (None on other ranks)."""
    from pipeline.checkpoint import records as ckpt

    path = Path(a.checkpoint)
    user_claims = [] if a.tokenizer is None else [(f"--tokenizer {a.tokenizer}",
                                                   tokenizer_files_sha256(Path(a.tokenizer)))]
    if a.skip_tokenizer_check:
        print("warning: --skip-tokenizer-check: the model's tokenizer is not compared with the data's",
              file=sys.stderr)
    if (path / "config.json").is_file() and not (path / "trainer_state.json").is_file():
        data, seq_len = _export_data(path, a.data, a.seq_len)
        if not a.skip_tokenizer_check:
            check_tokenizer(model_tokenizer_claims(path) + user_claims, path, data)
        from transformers import AutoModelForCausalLM

        from pipeline.data.reader import PackedSampleReader
        from pipeline.runtime import distributed
        from pipeline.training.evaluator import Evaluator

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        # no run config here: the flags (or the export's training_config.yaml) name the data
        reader = PackedSampleReader(data, split=a.split or "val", seq_len=seq_len, dp_rank=distributed.rank(),
                                    dp_world_size=distributed.world(), verify_checksums=False,
                                    model_vocab_size=model.config.vocab_size)
        evaluator = Evaluator(reader, micro_batch_size=a.micro_batch_size or 4, max_batches=a.max_batches,
                              vocab=reader.manifest.tokenizer.vocab_size, chunk=512, device=distributed.device())
        return _perplexity(model, evaluator, a.dump_logits)
    out = _checkpoint_perplexity(ckpt.resolve(path), _checkpoint_overrides(a), a.dump_logits,
                                 None if a.skip_tokenizer_check else user_claims)
    import torch.distributed as dist

    return out if not dist.is_initialized() or dist.get_rank() == 0 else None


def _export_data(model_dir: Path, data: str | None, seq_len: int | None) -> tuple[str, int]:
    """(data dir, seq_len) for a model directory: the flags, else what its training run used
    (an export's training_config.yaml), else an error naming the flag to pass."""
    import yaml

    recorded = model_dir / "training_config.yaml"
    saved = yaml.safe_load(recorded.read_text()) if recorded.is_file() else None
    trained = (saved or {}).get("data") or {}
    if data is None:
        data = trained.get("dir")
        if data is None:
            raise ConfigError(f"{model_dir} records no training data (no training_config.yaml, not made by "
                              "pipeline.export): pass --data DIR")
        if not Path(data).is_dir():
            raise ConfigError(f"{recorded} names data.dir {data}, which does not exist here: pass --data DIR")
    return data, seq_len or trained.get("seq_len") or 128


def _checkpoint_overrides(a: argparse.Namespace) -> list[str]:
    """The command line as overrides of the checkpoint's run config."""
    over = []
    if a.data:
        over.append(f"data.dir={a.data}")
    if a.split:
        over.append(f"eval.split={a.split}")
    if a.max_batches is not None:
        over.append(f"eval.max_batches={a.max_batches}")
    if a.micro_batch_size:
        over.append(f"eval.micro_batch_size={a.micro_batch_size}")
    if a.skip_tokenizer_check:
        over.append("data.tokenizer_dir=null")  # else training's preflight compares it with the data
    return over


def main(argv: list[str] | None = None) -> int:
    a = _parse_args(argv)
    try:
        out = _evaluate(a)
    except (ConfigError, DataError, ExportRefused) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return NONFINITE_EXIT_CODE if isinstance(e, NonFiniteWeights) else CONFIG_ERROR_EXIT_CODE
    if out is not None:
        print(f"perplexity {out['eval/perplexity']:.6f} | loss {out['eval/loss']:.8f} | "
              f"tokens {int(out['eval/tokens'])}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    from pipeline.runtime import distributed

    distributed.shut_down(agreed=code == 0)
    sys.exit(code)
