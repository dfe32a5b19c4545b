"""One paired report of study runs that live in several study outputs.

    python bench/paired_runs.py --out DIR --runs STUDY_OUT[:VARIANT[=NAME],...] [--runs ...] [--title TEXT]

A study reuses a finished run only in its own output, so a variant added later (another
`--variants` list, another `--out`) is a second study. Runs of the same setting (same student,
data, schedule, seeds) pair by seed across them: this reads `STUDY_OUT/runs/VARIANT/seedN` (every
variant of that output unless listed) and writes the study's own table (`results.md`, paired
differences and the gap to KD at every evaluation) and plot (`ppl.png`) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.study.plan import tokens_per_step as tokens_per_step_of
from pipeline.study.report import aggregate, gap_to_kd, markdown, paired_differences, plot, summarize_run, variant_label
from pipeline.study.variants import VARIANTS, split_variant


def collect(specs: list[str]) -> dict[str, dict[int, dict]]:
    """{name: {seed: summary}} of the runs named by ``STUDY_OUT[:VARIANT[=NAME],...]`` specs (NAME:
    how the variant is called here, when two outputs ran the same variant under other settings)."""
    runs: dict[str, dict[int, dict]] = {}
    for spec in specs:
        out, _, listed = spec.partition(":")
        names = dict((item.split("=", 1) + [item])[:2] for item in listed.split(",")) if listed else None
        for run_dir in sorted((Path(out) / "runs").glob("*/seed*")):
            variant = run_dir.parent.name.replace("_w", "@")  # kd_select_w0.1 is kd_select@0.1
            if names is not None and variant not in names:
                continue
            if not (run_dir / "metrics.jsonl").is_file():
                raise SystemExit(f"{run_dir}: no metrics.jsonl")
            name = names[variant] if names else variant
            if int(run_dir.name[4:]) in runs.get(name, {}):
                raise SystemExit(f"{run_dir}: {name} seed {run_dir.name[4:]} is given twice: name one VARIANT=NAME")
            runs.setdefault(name, {})[int(run_dir.name[4:])] = summarize_run(run_dir)
    return runs


def setting_of(run_dir: Path, runs: dict[str, dict[int, dict]]) -> dict:
    """The header fields of the study's table, from one run's config (the runs share them)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokens_per_step, steps = tokens_per_step_of(cfg, 1), cfg["optim"]["max_steps"]
    return {"teacher": cfg["teacher"]["path"], "teacher_heads": None, "student_layers": cfg["student"]["num_layers"],
            "student_heads": cfg["student"]["num_heads"], "seq_len": cfg["data"]["seq_len"], "steps": steps,
            "tokens_per_step": tokens_per_step, "tokens": steps * tokens_per_step, "nproc": 1,
            "seeds": sorted({s for by_seed in runs.values() for s in by_seed})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", action="append", required=True, help="STUDY_OUT[:VARIANT[=NAME],...] (repeatable)")
    ap.add_argument("--title", default="Paired runs")
    args = ap.parse_args(argv)
    runs = collect(args.runs)
    settings = setting_of(next(Path(args.runs[0].partition(":")[0]).glob("runs/*/seed*")), runs)
    labels = {v: variant_label(v) if split_variant(v)[0] in VARIANTS else v for v in runs}
    agg, pairs, gaps = aggregate(runs), paired_differences(runs), gap_to_kd(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/paired_runs.py", *(sys.argv[1:] if argv is None else argv)])
    md = markdown(settings, labels, agg, pairs, title=args.title, gaps=gaps) + f"\nProduced by `{command}`.\n"
    (args.out / "results.md").write_text(md)
    plot(args.out / "ppl.png", labels, runs, title=args.title)
    (args.out / "results.json").write_text(json.dumps({"aggregate": agg, "pairs": pairs, "gap_to_kd": gaps},
                                                      indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
