"""Pruned vs random initialisation of a student, each with CE + KD and CE + KD + SHD (select).

    python bench/pruned_init.py --teacher runs/demo/teacher/export --data runs/demo/data/shards \
        --tokenizer runs/demo/data/tokenizer --out runs/prune28

Prunes the teacher to the student's shape (``python -m pipeline.prune``), then runs the demo study
(``python -m pipeline.study --preset demo``: 300 steps x 2048 tokens, 2 processes, paired seeds)
twice over the same student shape: from random weights, and with ``student.init_from`` the pruned
student (whose pruning record then sets the layer map and, under select, the heads). Prints the
held-out perplexity of every run at every evaluation and writes OUT/pruned_init.png. Finished
stages are kept (the study and the prune refuse or skip what is done).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shd_common.cli import command_parser  # noqa: E402

SHAPE = {"layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 256, "hidden_size": 64}
VARIANTS = ("kd", "kd_select")


def study(args, out: Path, extra: list[str]) -> None:
    overrides = [f"student.hidden_size={SHAPE['hidden_size']}", f"student.num_heads={SHAPE['heads']}",
                 f"student.num_kv_heads={SHAPE['kv_heads']}", f"student.intermediate_size={SHAPE['intermediate_size']}",
                 *extra]
    cmd = [sys.executable, "-m", "pipeline.study", "--preset", "demo", "--out", str(out), "--data", args.data,
           "--tokenizer", args.tokenizer, "--teacher", args.teacher, "--variants", ",".join(VARIANTS),
           "--seeds", args.seeds]
    for o in overrides:
        cmd += ["--override", o]
    subprocess.run(cmd, check=True, cwd=ROOT)


def curves(out: Path, seeds: list[str]) -> dict[tuple[str, str], dict[int, float]]:
    """{(init, variant): {step: held-out perplexity, mean over seeds}} from the runs' metrics."""
    result = {}
    for init in ("random", "pruned"):
        for v in VARIANTS:
            per_seed = []
            for seed in seeds:
                lines = (out / init / "runs" / v / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
                records = [json.loads(line) for line in lines]
                per_seed.append({r["step"]: r["eval/perplexity"] for r in records if "eval/perplexity" in r})
            common = set.intersection(*(set(s) for s in per_seed))
            result[(init, v)] = {t: sum(s[t] for s in per_seed) / len(per_seed) for t in sorted(common)}
    return result


def main() -> int:
    ap = command_parser("python bench/pruned_init.py", __doc__)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="1234,", help="the study's --seeds (default one seed, 1234)")
    args = ap.parse_args()
    student = (args.out / "student").resolve()
    if not (student / "pruning.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.prune", "--teacher", args.teacher, "--data", args.data,
                        "--out", str(student), "--layers", str(SHAPE["layers"]), "--heads", str(SHAPE["heads"]),
                        "--kv-heads", str(SHAPE["kv_heads"]), "--intermediate-size", str(SHAPE["intermediate_size"]),
                        "--hidden-size", str(SHAPE["hidden_size"]), "--seq-len", "128"], check=True, cwd=ROOT)
    study(args, args.out / "random", [])
    study(args, args.out / "pruned", [f"student.init_from={student}"])
    seeds = [s for s in args.seeds.split(",") if s]
    table = curves(args.out, seeds)
    steps = sorted(set().union(*table.values()))
    print("| init, loss | " + " | ".join(str(s) for s in steps) + " |")
    for (init, v), ppl in table.items():
        print(f"| {init}, {v} | " + " | ".join(f"{ppl[s]:.2f}" if s in ppl else "" for s in steps) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (init, v), ppl in table.items():
        ax.plot(list(ppl), list(ppl.values()), ("-" if init == "pruned" else "--") + ("o" if v == "kd" else "s"),
                label=f"{init} init, {'CE + KD' if v == 'kd' else 'CE + KD + SHD select'}")
    ax.set_xlabel("evaluation (optimizer step)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "pruned_init.png", dpi=120)
    print(f"wrote {args.out / 'pruned_init.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
