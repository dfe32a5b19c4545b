"""Held-out perplexity of a student: a training checkpoint or an exported Hugging Face directory.

    # a checkpoint (tag directory, or the checkpoint root = its newest complete checkpoint);
    # launched with the world size it was saved with (ZeRO-3 partitions), e.g.
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m pipeline.evaluate --checkpoint runs/x/checkpoints
    # an exported model (one process, no DeepSpeed)
    python -m pipeline.evaluate --checkpoint runs/x/export --data data/tiny

Prints ``perplexity <value>`` (and loss, tokens) on rank 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def _hf_perplexity(model_dir: Path, data_dir: str, seq_len: int, split: str, mb: int,
                   max_batches: int | None, dump: str | None) -> dict:
    from transformers import AutoModelForCausalLM

    from pipeline.data import PackedSampleReader, read_manifest
    from pipeline.engine import split_tokens
    from pipeline.losses import ce_kd_sums

    tok = read_manifest(data_dir).tokenizer
    pad = tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reader = PackedSampleReader(data_dir, split=split, seq_len=seq_len, verify_checksums=False,
                                model_vocab_size=model.config.vocab_size)
    s = n = 0.0
    with torch.no_grad():
        for i, b in enumerate(reader.eval_batches(mb, max_batches=max_batches)):
            inp, labels, valid, mask = split_tokens(b, pad)
            logits = model(input_ids=inp, attention_mask=mask).logits
            if i == 0 and dump:
                torch.save({"input_ids": inp, "logits": logits}, dump)
            ce, _ = ce_kd_sums(logits, labels, valid, vocab=tok.vocab_size)
            s += ce.item()
            n += valid.sum().item()
    loss = s / max(n, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50)), "eval/tokens": n}


def _checkpoint_perplexity(path: Path, overrides: list[str], dump: str | None) -> dict:
    import torch.distributed as dist

    from pipeline import checkpoint as ckpt
    from pipeline.config import config_from_dict
    from pipeline.engine import Trainer
    import yaml

    path = ckpt.resolve(path)
    saved = yaml.safe_load((path / "resolved_config.yaml").read_text())
    saved.pop("derived", None)
    # the student alone, CE only: the teacher need not exist where the evaluation runs
    cfg = config_from_dict(saved, ["stage=pretrain", "teacher.path=null", "distill.w_ce=1",
                                   "distill.w_kd=0", "distill.w_shd=0", *overrides])
    t = Trainer(cfg, for_eval=True)
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size") != t.world:
        raise SystemExit(f"error: {path} was saved by {state.get('world_size')} ranks; evaluate it with "
                         f"that many processes, or export it first (python -m pipeline.export)")
    t.student.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True,
                              load_optimizer_states=False, load_lr_scheduler_states=False)
    out = t.evaluate()
    if dump:
        from pipeline.data import PackedSampleReader

        reader = PackedSampleReader(cfg.data.dir, split=cfg.eval.split, seq_len=cfg.data.seq_len,
                                    dp_rank=t.rank, dp_world_size=t.world, verify_checksums=False)
        b = next(iter(reader.eval_batches(cfg.eval.micro_batch_size or cfg.data.micro_batch_size, 1)))
        inp, _, _, mask = t._split(b)
        t.student.eval()
        with torch.no_grad():
            logits = t.student(input_ids=inp, attention_mask=mask, use_cache=False).logits
        if t.rank == 0:
            torch.save({"input_ids": inp.cpu(), "logits": logits.cpu()}, dump)
    if dist.is_initialized():
        dist.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint (tag dir or root) or exported HF dir")
    ap.add_argument("--data", help="data dir (default: the one in the checkpoint's config)")
    ap.add_argument("--split", default=None, help="data split (default: eval.split of the config, or val)")
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None, help="HF dir only (default 128 or the model's max)")
    ap.add_argument("--dump-logits", default=None, help=argparse.SUPPRESS)  # tests: first batch's logits
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    path = Path(a.checkpoint)
    if (path / "config.json").is_file() and not (path / "trainer_state.json").is_file():
        if not a.data:
            raise SystemExit("error: --data is required to evaluate an exported model directory")
        out = _hf_perplexity(path, a.data, a.seq_len or 128, a.split or "val", a.micro_batch_size or 4,
                             a.max_batches, a.dump_logits)
        rank0 = True
    else:
        over = []
        if a.data:
            over.append(f"data.dir={a.data}")
        if a.split:
            over.append(f"eval.split={a.split}")
        if a.max_batches is not None:
            over.append(f"eval.max_batches={a.max_batches}")
        if a.micro_batch_size:
            over.append(f"eval.micro_batch_size={a.micro_batch_size}")
        out = _checkpoint_perplexity(path, over, a.dump_logits)
        import torch.distributed as dist

        rank0 = dist.get_rank() == 0
    if rank0:
        print(f"perplexity {out['eval/perplexity']:.4f} | loss {out['eval/loss']:.4f} | "
              f"tokens {int(out['eval/tokens'])}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
