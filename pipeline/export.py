"""Export the student of a checkpoint as a Hugging Face model directory (safetensors + tokenizer).

    python -m pipeline.export --checkpoint runs/x/checkpoints --out runs/x/export
    python -m pipeline.export --checkpoint runs/x/checkpoints/step_00001000 --out runs/x/export

One process, no GPU and no process group: the ZeRO-3 partitions of all ranks are consolidated
into float32 weights on CPU (DeepSpeed's zero_to_fp32). ``AutoModelForCausalLM.from_pretrained``
on the result gives the training-time student's logits. Only the student is exported: the
teacher was never part of the checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch


def export(checkpoint: str | Path, out: str | Path) -> Path:
    import yaml
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline import checkpoint as ckpt

    path = ckpt.resolve(checkpoint)
    config = AutoConfig.from_pretrained(path / "student_config.json")
    config._attn_implementation = "sdpa"  # the training-time function is SDPA plus a side loss
    config.use_cache = True
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise SystemExit(f"error: checkpoint does not match the student: missing {missing}, "
                         f"unexpected {unexpected}")
    if tied:
        model.tie_weights()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    saved = yaml.safe_load((path / "resolved_config.yaml").read_text())
    tok = (saved.get("data") or {}).get("tokenizer_dir")
    if tok and Path(tok).is_dir():
        for f in Path(tok).iterdir():
            if f.is_file() and f.name not in ("config.json",):
                shutil.copy2(f, out / f.name)
    else:
        print(f"warning: no tokenizer copied (data.tokenizer_dir={tok!r} not found)", file=sys.stderr)
    shutil.copy2(path / "resolved_config.yaml", out / "training_config.yaml")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint tag dir, or the checkpoint root (newest)")
    ap.add_argument("--out", required=True, help="output Hugging Face directory")
    a = ap.parse_args(argv)
    out = export(a.checkpoint, a.out)
    print(f"exported student to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
