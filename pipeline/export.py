"""Export the student of a checkpoint as a Hugging Face model directory (safetensors + tokenizer).

    python -m pipeline.export --checkpoint runs/x/checkpoints --out runs/x/export
    python -m pipeline.export --checkpoint runs/x/checkpoints/step_00001000 --out runs/x/export

One process, no GPU and no process group: the ZeRO-3 partitions of all ranks are consolidated
into float32 weights on CPU (DeepSpeed's zero_to_fp32). ``AutoModelForCausalLM.from_pretrained``
on the result gives the training-time student's logits. Only the student is exported: the
teacher was never part of the checkpoint.

Nothing is lost: the export is written into a temporary directory beside ``--out`` and moved into
place only when complete, with a marker (``shd_export.json``: source checkpoint, step, tokenizer
identity, and the size and sha256 of every file written). A non-empty ``--out`` that is not an
earlier export of the same run (same checkpoint directory) is refused (exit 2) unless
``--overwrite``: the teacher's directory, a downloaded model, another run's export. When ``--out``
is replaced, its previous contents are moved aside to ``OUT.moved-<time>``; that copy is deleted only
when it is an export of the same run holding exactly the files its marker lists, unchanged (so
re-exporting into the same directory leaves no clutter, and a file anyone else put or edited there
is kept). A checkpoint with NaN/inf weights is refused with exit 3 and nothing written.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from pipeline.models.identity import MARKER, MARKER_FORMAT, read_marker
from pipeline.models.loading import load_weights
from pipeline.runtime.faults import CONFIG_ERROR_EXIT_CODE, NONFINITE_EXIT_CODE
from shd_common.cli import command_parser
from shd_common.integrity import DiskFull, file_digests, naming_disk_full
from shd_common.manifest import TOKENIZER_FILES, DataError, tokenizer_files_sha256
from shd_common.safe_remove import MOVED_INFIX, replace_dir


class ExportRefused(ValueError):
    """Refused input (destination, checkpoint, tokenizer): the message names it and the fix; exit 2."""


class NonFiniteWeights(ExportRefused):
    """The checkpoint's weights hold NaN or inf: the checkpoint is not usable; exit 3."""


# --------------------------------------------------------------------------------------------
# Checks before anything is written
# --------------------------------------------------------------------------------------------


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of `state` holding NaN or inf, in `state`'s order."""
    return [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(state: Mapping[str, torch.Tensor], checkpoint: Path) -> None:
    """Refuse (NonFiniteWeights) a consolidated state with a NaN/inf weight, naming the first ones."""
    bad = nonfinite_tensors(state)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteWeights(f"checkpoint {checkpoint} has non-finite weights (NaN/inf) in "
                               f"{', '.join(bad[:3])}{more}: it is not usable; export an earlier "
                               f"checkpoint (--checkpoint {checkpoint.parent}/step_...)")


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _export_of_run(directory: Path, checkpoint: Path) -> dict | None:
    """The marker of `directory` if it is an export of a checkpoint of the same run (same checkpoint
    directory) as `checkpoint`; an export of another run (e.g. a teacher exported by this project) is
    as foreign as any other directory."""
    marker = read_marker(directory)
    if marker is None or Path(str(marker.get("checkpoint"))).parent != checkpoint.resolve().parent:
        return None
    return marker


def check_destination(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuse an --out that overlaps the checkpoint, or that holds anything but an earlier export of
    the same run unless `overwrite` (its contents are then moved aside, never deleted)."""
    if _overlaps(out, checkpoint):
        raise ExportRefused(f"--out {out} overlaps the checkpoint {checkpoint} (is, holds or is inside it): "
                            f"choose another --out")
    if overwrite or _is_empty(out) or _export_of_run(out, checkpoint) is not None:
        return
    marker = read_marker(out)
    what = (f"holds the export of another run ({marker.get('checkpoint')})" if marker is not None
            else f"is not empty and is not an earlier export (no {MARKER})")
    raise ExportRefused(f"--out {out} {what}: choose another --out, or pass --overwrite to move its "
                        f"contents aside to {out}{MOVED_INFIX}<time> (nothing is deleted)")


def tokenizer_to_copy(given: str | None, configured: str | None, trained_sha256: str | None) -> Path | None:
    """The tokenizer directory to ship: --tokenizer, else the run's data.tokenizer_dir (None, with a
    warning, when that is gone). Refuses one whose files are not the tokenizer the checkpoint was
    trained with (trainer_state identity.tokenizer_sha256): the export would tokenize differently."""
    if given is None and not (configured and Path(configured).is_dir()):
        print(f"warning: no tokenizer copied (data.tokenizer_dir={configured!r} not found): pass "
              f"--tokenizer DIR to include it", file=sys.stderr)
        return None
    flag, directory = ("--tokenizer", given) if given is not None else ("data.tokenizer_dir", configured)
    directory = Path(directory)
    sha = tokenizer_files_sha256(directory)
    if trained_sha256 and sha != trained_sha256:
        raise ExportRefused(f"{flag} {directory} is not the tokenizer the checkpoint was trained with "
                            f"(tokenizer files sha256 {sha[:12]}, the checkpoint records "
                            f"{trained_sha256[:12]}): pass --tokenizer DIR with the training tokenizer")
    return directory


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def load_student(path: Path):
    """The checkpoint's student as a float32 HF model, after refusing non-finite weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path / "student_config.json")
    config._attn_implementation = "sdpa"  # the training-time function is SDPA plus a side loss
    config.use_cache = True
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    check_finite(state, path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    misfit = load_weights(model, state)
    if misfit:
        raise ExportRefused(f"checkpoint {path} does not match its student_config.json: {misfit}")
    return model


def write_export(tmp: Path, model, checkpoint: Path, tokenizer: Path | None, trainer_state: dict) -> None:
    """Weights, config, tokenizer files and the training config into `tmp`; the marker last."""
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES if tokenizer is not None else ():
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, tmp / name)
    shutil.copy2(checkpoint / "resolved_config.yaml", tmp / "training_config.yaml")
    marker = {
        "format": MARKER_FORMAT,
        "checkpoint": str(checkpoint.resolve()),
        "step": trainer_state.get("step"),
        "tokenizer_sha256": (trainer_state.get("identity") or {}).get("tokenizer_sha256"),
        "tokenizer_dir": str(tokenizer.resolve()) if tokenizer is not None else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": file_digests(tmp, leave_out=MARKER),
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")


def _is_unchanged_export(directory: Path, checkpoint: Path) -> bool:
    """An export of `checkpoint`'s run holding exactly the files its marker lists, unchanged."""
    marker = _export_of_run(directory, checkpoint)
    return marker is not None and file_digests(directory, leave_out=MARKER) == marker.get("files")


def install(tmp: Path, out: Path, checkpoint: Path) -> Path | None:
    """Move the finished export `tmp` to `out` (`shd_common.safe_remove.replace_dir`). Whatever was at
    `out` is moved aside to ``OUT.moved-<time>`` and kept, unless it is an unchanged earlier export of
    `checkpoint`'s run, which is deleted. Returns the kept copy."""
    return replace_dir(tmp, out, ours=lambda old: _is_unchanged_export(old, checkpoint),
                       reason=f"replaced by the export of {checkpoint}")


def export(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
           tokenizer: str | None = None) -> tuple[Path, Path | None]:
    """Export the student of `checkpoint` to `out`; returns (out, where the previous contents went)."""
    import yaml

    from pipeline.checkpoint import records as ckpt

    path = ckpt.resolve(checkpoint)
    out = Path(out)
    check_destination(out, path, overwrite)
    saved = yaml.safe_load((path / "resolved_config.yaml").read_text())
    state = ckpt.read_state(path)
    tok = tokenizer_to_copy(tokenizer, (saved.get("data") or {}).get("tokenizer_dir"),
                            (state.get("identity") or {}).get("tokenizer_sha256"))
    model = load_student(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        with naming_disk_full(out.parent, f"the export was not written and --out {out} is as it was: free "
                                          f"space there (or choose another --out) and export again"):
            write_export(tmp, model, path, tok, state)
        return out, install(tmp, out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("python -m pipeline.export", __doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint tag dir, or the checkpoint root (newest)")
    ap.add_argument("--out", required=True,
                    help="output Hugging Face directory: new, empty, or an earlier export (replaced)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out that is not an earlier export; its contents are moved "
                         "aside to OUT.moved-<time>, never deleted")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer dir to ship (default: the run's data.tokenizer_dir); must be the one "
                         "the checkpoint was trained with")
    a = ap.parse_args(argv)
    try:
        out, _ = export(a.checkpoint, a.out, overwrite=a.overwrite, tokenizer=a.tokenizer)  # moves are logged
    except (ExportRefused, DataError, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return NONFINITE_EXIT_CODE if isinstance(e, NonFiniteWeights) else CONFIG_ERROR_EXIT_CODE
    print(f"exported student to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
