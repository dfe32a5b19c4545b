"""Turn a GGUF checkpoint (llama.cpp's format) into a Hugging Face directory a run can use as teacher.

    python -m pipeline.import_gguf --gguf MODEL.gguf --out TEACHER_DIR [--dtype float32|bfloat16]

transformers reads GGUF files (`from_pretrained(dir, gguf_file=...)`, de-quantising the weights) but
refuses to `save_pretrained` the result, and DeepSpeed's ZeRO-3 loading needs ordinary weight files.
So the de-quantised state dict is loaded into a plain model built from the same config (without its
`quantization_config`) and saved with the GGUF file's tokenizer. The weights are those of the
quantised model, exactly: a Q4 file gives a Q4-quality teacher in full precision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pipeline.models.loading import load_weights
from shd_common.cli import command_parser
from shd_common.integrity import sha256_file

MARKER = "gguf_import.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def import_gguf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """Write `out` (model, config, tokenizer and a `gguf_import.json` naming the source); returns it.

    Refuses a non-empty `out` that is not an earlier import of the same file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    if not gguf.is_file():
        raise SystemExit(f"--gguf {gguf}: file not found")
    digest = sha256_file(gguf)
    if out.exists() and any(out.iterdir()):
        previous = out / MARKER
        if previous.is_file() and json.loads(previous.read_text()).get("sha256") == digest:
            return out
        raise SystemExit(f"--out {out}: not empty and not an import of {gguf.name}; give an empty or new directory")
    source = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = AutoConfig.from_pretrained(**source)
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    misfit = load_weights(model, quantised.state_dict())
    if misfit:
        raise SystemExit(f"{gguf}: its tensors do not fit a {type(model).__name__} ({misfit})")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(**source).save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"gguf": str(gguf), "sha256": digest, "dtype": dtype}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("python -m pipeline.import_gguf", __doc__)
    parser.add_argument("--gguf", type=Path, required=True, help="the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype on disk")
    args = parser.parse_args(argv)
    out = import_gguf(args.gguf, args.out, args.dtype)
    print(f"[import_gguf] {args.gguf} -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
