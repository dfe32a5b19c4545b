"""Convert a checkpoint to a DeepSpeed *universal* checkpoint, to resume on a different number of ranks.

    python -m pipeline.universal --checkpoint runs/x/checkpoints            # newest complete one
    python -m pipeline.universal --checkpoint runs/x/checkpoints/step_00000600

writes ``step_00000600_universal/`` beside it (one process, CPU only). Then start the run with the
new number of ranks as usual: ``--resume auto`` picks the universal copy of the newest checkpoint
when the world size differs from the one that saved it (or pass ``--resume <that dir>``). The data
position is a global sample count, so it carries over; per-rank RNG states are re-seeded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.checkpoint import records as ckpt
from pipeline.checkpoint.records import UNIVERSAL_MARKER, is_universal, universal_path
from shd_common.cli import command_parser
from shd_common.safe_remove import clear, replace_dir


def convert(checkpoint: str | Path, workers: int = 1) -> Path:
    path = ckpt.resolve(checkpoint)
    out = universal_path(path)
    tmp = out.with_name(out.name + ".tmp")
    clear(tmp, ours=lambda _: True, reason="left by a conversion that was killed (this module's scratch name)")
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                    "--output_folder", str(tmp), "--num_extract_workers", str(workers),
                    "--num_merge_workers", str(workers)], check=True)
    for f in ckpt.RECORD_FILES:
        shutil.copy2(path / f, tmp / f)
    (tmp / UNIVERSAL_MARKER).write_text(path.name + "\n")
    ckpt.write_complete(tmp)
    replace_dir(tmp, out, ours=is_universal, reason=f"replaced by a new conversion of {path}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = command_parser("python -m pipeline.universal", __doc__)
    ap.add_argument("--checkpoint", required=True, help="checkpoint tag dir, or the checkpoint root (newest)")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    print(f"wrote {convert(a.checkpoint, a.workers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
