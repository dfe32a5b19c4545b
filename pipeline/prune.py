"""Make a student by pruning its teacher (Minitron): keep the most important layers, heads, MLP
neurons and hidden channels, measured on training shards, and write a Hugging Face model directory.

    python -m pipeline.prune --teacher TEACHER_DIR --data SHARDS_DIR --out STUDENT_DIR \\
        --layers 16 --heads 8 --kv-heads 2 --intermediate-size 2048 --hidden-size 1024 \\
        [--calibration-batches 16 --batch-size 8 --seq-len 256 --seed 0 --device auto --dtype float32]

Every pruning option left out keeps the teacher's size on that axis; head_dim is always the
teacher's. The student is the teacher's class (LLaMA, Mistral, Qwen2, Qwen3; biases, tied
embeddings, rope and window settings kept) and loads with ``from_pretrained``; the teacher's
tokenizer files are copied with it. ``STUDENT_DIR/pruning.json`` records the teacher and data
identities, the options, and the teacher layer and head each student layer and head comes from
(`pipeline.pruning.record`). The directory appears complete or not at all (written beside --out,
then renamed); a non-empty --out is refused.

Every option is checked against the teacher's config and the data's manifest before any weight
loads; a refusal names the flag and the fix (exit 2). See `pipeline.pruning` for the method.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import ConfigError
from pipeline.evaluate import check_tokenizer
from pipeline.models.architectures import plain_attn_implementation
from pipeline.models.identity import model_tokenizer_claims, teacher_identity
from pipeline.pruning import (
    PruneChoice,
    StudentShape,
    build_student,
    calibrate,
    calibration_batches,
    calibration_reader,
    choose,
    resolve_shape,
    student_config,
    student_state_dict,
)
from pipeline.pruning.record import RECORD_NAME, make_record, write_record
from pipeline.pruning.shape import check_family, head_dim
from pipeline.pruning.summary import summary_lines
from pipeline.runtime.faults import CONFIG_ERROR_EXIT_CODE
from shd_common.cli import command_parser
from shd_common.integrity import DiskFull, naming_disk_full
from shd_common.manifest import TOKENIZER_FILES, DataError, read_manifest
from shd_common.safe_remove import replace_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRUNING_OPTIONS = ("layers", "heads", "kv_heads", "intermediate_size", "hidden_size")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = command_parser("python -m pipeline.prune", __doc__)
    ap.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's Hugging Face model directory")
    ap.add_argument("--data", required=True, metavar="DIR",
                    help="shard directory (python -m data_prep.shard) whose train split calibrates")
    ap.add_argument("--out", required=True, metavar="DIR", help="the student's directory to create (absent or empty)")
    sizes = ap.add_argument_group("student shape (an option left out keeps the teacher's size)")
    sizes.add_argument("--layers", type=int, metavar="N", help="decoder layers (highest block influence, in order)")
    sizes.add_argument("--heads", type=int, metavar="N", help="query heads per layer (a multiple of --kv-heads)")
    sizes.add_argument("--kv-heads", type=int, metavar="N", help="kv heads (query groups) per layer")
    sizes.add_argument("--intermediate-size", type=int, metavar="N", help="MLP neurons per layer")
    sizes.add_argument("--hidden-size", type=int, metavar="N", help="hidden (embedding) channels")
    cal = ap.add_argument_group("calibration")
    cal.add_argument("--calibration-batches", type=int, metavar="N", default=16,
                     help="batches of the train split (default 16)")
    cal.add_argument("--batch-size", type=int, metavar="N", default=8, help="sequences per batch (default 8)")
    cal.add_argument("--seq-len", type=int, metavar="N", default=None,
                     help="tokens per sequence (default 256, or the teacher's max_position_embeddings if lower)")
    cal.add_argument("--seed", type=int, metavar="N", default=0,
                     help="the order in which training samples are drawn (default 0)")
    cal.add_argument("--device", default="auto",
                     help="torch device of the teacher: auto (cuda if available), cpu, cuda, cuda:1, ...")
    cal.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                     help="precision the teacher runs (and is sliced) in; not below its stored weights' "
                          "(default float32)")
    return ap.parse_args(argv)


def _teacher_config(teacher: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    if not (teacher / "config.json").is_file():
        hint = " (a GGUF file: import it first, python -m pipeline.import_gguf)" if teacher.suffix == ".gguf" else ""
        raise ConfigError(f"--teacher {teacher} is not a Hugging Face model directory (no config.json){hint}")
    return AutoConfig.from_pretrained(teacher)


def _check_calibration(a: argparse.Namespace, teacher_cfg: PretrainedConfig) -> int:
    """The calibration options' values; returns seq_len (its default resolved)."""
    for flag, value in (("--calibration-batches", a.calibration_batches), ("--batch-size", a.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    max_positions = getattr(teacher_cfg, "max_position_embeddings", None) or 256
    seq_len = a.seq_len if a.seq_len is not None else min(256, max_positions)
    if not 1 <= seq_len <= max_positions:
        raise ConfigError(f"--seq-len {seq_len}: choose between 1 and the teacher's max_position_embeddings "
                          f"{max_positions}")
    return seq_len


def _stored_dtype(teacher_cfg: PretrainedConfig) -> torch.dtype:
    dtype = getattr(teacher_cfg, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _check_dtype(a: argparse.Namespace, stored: torch.dtype) -> torch.dtype:
    """The calibration dtype; refused when slicing from it would lose precision of the stored weights."""
    dtype = DTYPES[a.dtype]
    if dtype not in (stored, torch.float32):
        raise ConfigError(f"--dtype {a.dtype}: the student is cut from the teacher as it runs, and its stored "
                          f"weights are {str(stored).removeprefix('torch.')}: use --dtype float32 (or the stored "
                          f"dtype)")
    return dtype


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory: choose a new --out (nothing there is "
                          f"replaced)")


def _check_data(data: Path, teacher: Path) -> None:
    """The data's manifest is complete and, when the teacher records a tokenizer, made with it."""
    try:
        manifest = read_manifest(data)
    except DataError as exc:
        raise DataError(f"--data {data}: {exc}") from exc
    if not manifest.split_shards("train"):
        raise DataError(f"--data {data} has no train split to calibrate on: pass a shard directory with one")
    claims = model_tokenizer_claims(teacher)
    if claims:
        check_tokenizer(claims, teacher, data)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"--device {name}: not a torch device ({exc}); use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); use "
                          f"--device cpu or auto")
    return device


def _load_teacher(teacher: Path, teacher_cfg: PretrainedConfig, dtype: torch.dtype,
                  device: torch.device) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=dtype,
                                                 attn_implementation=plain_attn_implementation(teacher_cfg))
    return model.to(device).eval().requires_grad_(False)


def _write(tmp: Path, student: PreTrainedModel, teacher: Path, record: dict[str, Any]) -> None:
    """Weights and config, the teacher's tokenizer and generation config, and the record (last)."""
    student.save_pretrained(tmp, safe_serialization=True)
    for name in (*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json"):
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, tmp / name)
    write_record(tmp, record)


def prune(a: argparse.Namespace, log: Callable[[str], None] = print) -> Path:
    """Run the whole command; returns the student's directory."""
    teacher, data, out = Path(a.teacher), Path(a.data), Path(a.out)
    teacher_cfg = _teacher_config(teacher)
    check_family(teacher_cfg, a.teacher)
    requested = {k: getattr(a, k) for k in PRUNING_OPTIONS}
    shape: StudentShape = resolve_shape(teacher_cfg, requested)
    student_config(teacher_cfg, shape, range(shape.layers))  # transformers' own checks, before any weight
    seq_len = _check_calibration(a, teacher_cfg)
    stored = _stored_dtype(teacher_cfg)
    dtype = _check_dtype(a, stored)
    _check_out(out)
    _check_data(data, teacher)
    device = _device(a.device)
    reader = calibration_reader(data, seq_len=seq_len, seed=a.seed, vocab_size=teacher_cfg.vocab_size)
    identity = teacher_identity(teacher)[0]  # of the files loaded next

    model = _load_teacher(teacher, teacher_cfg, dtype, device)
    every = max(1, a.calibration_batches // 10)

    def progress(done: int, tokens: int, seconds: float) -> None:
        if done % every == 0 or done == a.calibration_batches:
            log(f"calibration: {done}/{a.calibration_batches} batches, {tokens} tokens, {seconds:.1f} s")

    batches = calibration_batches(reader, batches=a.calibration_batches, batch_size=a.batch_size)
    importance = calibrate(model, batches, progress)
    choice: PruneChoice = choose(importance, shape, teacher_cfg.num_key_value_heads)
    for line in summary_lines(importance, choice):
        log(line)

    state = student_state_dict(model.state_dict(), choice, head_dim(teacher_cfg),
                               tied=bool(teacher_cfg.tie_word_embeddings))
    del model  # the slices are copies: the teacher's memory is free before the student is built
    student_cfg = student_config(teacher_cfg, shape, [layer.teacher_layer for layer in choice.layers])
    student = build_student(student_cfg, {k: v.cpu() for k, v in state.items()}, stored)
    record = make_record(
        teacher=identity, teacher_config=teacher_cfg,
        calibration={"data_dir": str(data.resolve()), "data_sha256": reader.state_dict()["data_sha256"],
                     "tokenizer_sha256": reader.manifest.tokenizer.files_sha256, "split": "train",
                     "batches": a.calibration_batches, "batch_size": a.batch_size, "seq_len": seq_len,
                     "seed": a.seed, "dtype": a.dtype},
        options=requested, shape=shape, choice=choice, importance=importance)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        with naming_disk_full(out.parent, f"the student was not written and --out {out} is as it was: free space "
                                          f"there (or choose another --out) and run the command again"):
            _write(tmp, student, teacher, record)
        replace_dir(tmp, out, ours=lambda _: False, reason=f"--out {out} was filled while pruning")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    log(f"wrote the student to {out} (provenance: {out / RECORD_NAME})")
    return out


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when the student is written, 2 when an option or input is refused."""
    a = _parse_args(argv)
    try:
        prune(a)
    except (ConfigError, DataError, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
