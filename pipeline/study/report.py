"""Reading the study's training runs and reporting the comparison.

Functions over the files the engine writes (``<run>/metrics.jsonl``, see pipeline/training/metrics.py):
no training, no DeepSpeed, so the report can be tested and regenerated on its own.

A run's record (``summarize_run``):
    held-out perplexity (the engine's evaluation at the end of the run, ``eval/perplexity``),
    final train CE (mean of ``loss/ce`` over the last 10 % of steps: comparable across variants,
    unlike ``loss/total`` whose terms differ), tokens/s (median of ``perf/tokens_per_s``), peak
    memory (max of ``perf/peak_mem_mib``, rank 0: peak RSS on CPU, max allocated on CUDA), and the
    SHD mixing-weight statistics (``shd_weights/layer_XX_mean_max`` and ``..._entropy``: per student layer XX,
    mean over sequences and student heads of the largest weight of a row of W and of its entropy),
    averaged over layers and over the last 10 % of steps.

Per setting the study writes ``results.md`` (``markdown``: table + paired differences),
``results.json`` (all numbers, curves included) and ``ppl.png`` (``plot``); a sweep adds one
table across settings (``sweep_table``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .plan import DataPlan, Setting, StudyOptions, tokens_per_step
from .variants import NO_ATTENTION, VARIANTS, split_variant, variant_label, variant_name

__all__ = ["PAIRS", "NO_ATTENTION", "SettingReport", "aggregate", "gap_to_kd", "markdown", "paired_differences",
           "plot", "read_metrics", "split_variant", "summarize_run", "sweep_table", "uniform_reference", "variant_name",
           "write_setting_report", "write_sweep_report"]

ISSUE14_VARIANTS = ("kd_select_ramp", "kd_select_rand", "kd_select_recon", "kd_select_contrib", "kd_select_rev",
                    "kd_shd_static", "kd_shd_rev")
# Pairs of interest: (a, b, what it answers). A difference is ppl(a) - ppl(b), per seed. With an
# attention-loss weight sweep (variant names "kd_shd@0.3", see ``split_variant``) a pair compares a and
# b at the same weight; ce and kd have no attention term and are compared as they are.
PAIRS = (
    ("kd", "ce", "logit KD vs CE only"),
    ("kd_shd", "ce", "KD+SHD vs CE only"),
    ("kd_select", "ce", "KD + attn KD (select) vs CE only"),
    ("kd_shd", "kd", "KD+SHD vs KD"),
    ("kd_shd", "kd_mean", "SHD (pairwise) vs constant mean merge"),
    ("kd_shd", "kd_select", "SHD (pairwise) vs select first head"),
    ("kd_group", "kd_shd", "group vs pairwise"),
    ("kd_group", "kd_mean", "SHD (group) vs constant mean merge"),
    ("shd_only", "ce", "SHD without KD vs CE only"),
    ("kd_hard", "kd_shd", "hard selection vs soft weights"),
    ("kd_logit", "kd_shd", "score-space vs probability merge"),
    ("kd_sharp", "kd_shd", "sharpened vs plain merged target"),
    # every attention variant against the two baselines of docs/shd-method.md's question
    *((v, "kd", f"{v} vs KD") for v in ("kd_mean", "kd_select", "kd_group", "kd_hard", "kd_logit", "kd_sharp")),
    *((v, "kd_select", f"{v} vs select first head")
      for v in ("kd_mean", "kd_group", "kd_hard", "kd_logit", "kd_sharp")),
    # issue 14: which head, which divergence, a ramp, static alphas
    *((v, b, f"{v} vs {what}") for v in ISSUE14_VARIANTS
      for b, what in (("kd", "KD"), ("kd_select", "select first head"))),
    ("kd_shd_static", "kd_shd", "static vs per-sequence alphas (pairwise)"),
    ("kd_shd_rev", "kd_shd", "reverse vs forward KL (pairwise)"),
)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl, one per step, the last write winning.

    A resumed run appends to the file, so a step can appear twice; the later record is the one of
    the run that finished.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    if not Path(path).exists():
        return [], []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: ignore it
            continue
        if "eval/perplexity" in rec:
            evals[rec["step"]] = rec
        elif "loss/total" in rec:
            train[rec["step"]] = rec
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _tail_mean(values: list[float], frac: float = 0.1) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan")
    n = max(1, int(round(len(vals) * frac)))
    return sum(vals[-n:]) / n


def summarize_run(run_dir: Path, tokens_per_step: int | None = None) -> dict:
    """The numbers of one finished run (see the module docstring)."""
    train, evals = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not train:
        raise ValueError(f"{run_dir}: no training records in metrics.jsonl")
    tps = tokens_per_step or (train[0].get("data/consumed_tokens") / max(train[0]["step"], 1))

    def tokens(rec: dict) -> float:
        return rec.get("data/consumed_tokens") or rec["step"] * tps

    out = {
        "steps": train[-1]["step"],
        "tokens": tokens(train[-1]),
        "final_eval_ppl": evals[-1]["eval/perplexity"] if evals else float("nan"),
        "final_eval_loss": evals[-1]["eval/loss"] if evals else float("nan"),
        "final_train_ce": _tail_mean([r.get("loss/ce") for r in train]),
        "final_train_total": _tail_mean([r.get("loss/total") for r in train]),
        "tokens_per_s": statistics.median([r["perf/tokens_per_s"] for r in train[1:] or train]),
        "step_time_s": statistics.median([r["perf/step_time_s"] for r in train[1:] or train]),
        "peak_mem_mib": max(r.get("perf/peak_mem_mib", float("nan")) for r in train),
        "skipped_steps": train[-1].get("optim/skipped_steps", 0.0),
        "curve_train": [[tokens(r), r.get("loss/ce"), r.get("loss/total")] for r in train],
        "curve_eval": [[r["step"] * tps, r["eval/perplexity"]] for r in evals],
    }
    for stat in ("mean_max", "entropy"):
        per_layer = sorted({k for r in train for k in r if k.startswith("shd_weights/") and k.endswith(stat)})
        if per_layer:
            out[f"w_{stat}"] = _tail_mean([sum(r[k] for k in per_layer) / len(per_layer)
                                           for r in train if all(k in r for k in per_layer)])
    return out


def uniform_reference(num_teacher_heads: int, num_student_heads: int, plan: str) -> dict:
    """The mixing-weight statistics W would have if every alpha were 1/2 (pairwise) or every
    group weight equal (group): the point the measured statistics are compared against."""
    from pipeline.shd.plan import squeeze_plan

    sp = squeeze_plan(num_teacher_heads, num_student_heads, "pairwise" if plan == "pairwise" else "group")
    rows = [{m: 1.0} for m in range(num_teacher_heads)]
    for rnd in sp.rounds:
        new = []
        for group in rnd:
            merged: dict[int, float] = {}
            for i in group:  # equal weights at every merge (alpha = 1/2 for a pair)
                for m, w in rows[i].items():
                    merged[m] = merged.get(m, 0.0) + w / len(group)
            new.append(merged)
        rows = new
    mean_max = sum(max(r.values()) for r in rows) / len(rows)
    entropy = sum(-sum(w * math.log(w) for w in r.values()) for r in rows) / len(rows)
    return {"w_mean_max": mean_max, "w_entropy": entropy}


def _stats(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per variant: mean/std/per-seed of the held-out perplexity and the means of the rest."""
    agg = {}
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        ppl = [by_seed[s]["final_eval_ppl"] for s in seeds]
        mean, std = _stats(ppl)
        a = {"seeds": seeds, "ppl_per_seed": ppl, "ppl_mean": mean, "ppl_std": std}
        for key in ("final_train_ce", "tokens_per_s", "step_time_s", "peak_mem_mib", "w_mean_max", "w_entropy",
                    "tokens", "steps"):
            vals = [by_seed[s].get(key) for s in seeds]
            a[key] = _stats([v for v in vals if v is not None])[0] if any(v is not None for v in vals) else None
        agg[variant] = a
    return agg


def paired_differences(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """For each pair of interest present (per attention-loss weight when swept): ppl(a) - ppl(b) on
    the seeds both have (same init and data order), its mean, its standard deviation over seeds
    and whether |mean| > std."""
    weights = sorted({split_variant(v)[1] for v in runs}, key=lambda w: (w is not None, w or 0.0))
    out = []
    for w in weights:
        for base_a, base_b, what in PAIRS:
            a, b = variant_name(base_a, w), variant_name(base_b, w)
            if a not in runs or b not in runs or (w is not None and base_a in NO_ATTENTION):
                continue
            seeds = sorted(set(runs[a]) & set(runs[b]))
            diffs = [runs[a][s]["final_eval_ppl"] - runs[b][s]["final_eval_ppl"] for s in seeds]
            mean, std = _stats(diffs)
            rel = [d / runs[b][s]["final_eval_ppl"] * 100 for d, s in zip(diffs, seeds)]
            exceeds = None if len(diffs) < 2 or not math.isfinite(std) else abs(mean) > std
            out.append({"a": a, "b": b, "what": what + (f" (w_shd {w:g})" if w is not None else ""), "seeds": seeds,
                        "diffs": diffs, "mean": mean, "std": std,
                        "mean_rel_pct": statistics.fmean(rel) if rel else float("nan"), "exceeds_spread": exceeds})
    return out


def gap_to_kd(runs: dict[str, dict[int, dict]], base: str = "kd") -> dict[str, list[dict]]:
    """Per variant with an attention term: at each held-out evaluation it and ``base`` both have,
    the paired gap ppl(variant) - ppl(base) over the seeds both ran (mean, std, per seed), against
    training tokens: whether the attention term's gain lasts as the student converges."""
    if base not in runs:
        return {}
    out = {}
    for v, by_seed in runs.items():
        seeds = sorted(set(by_seed) & set(runs[base]))
        if split_variant(v)[0] in NO_ATTENTION or not seeds:
            continue
        n = min(len(c) for s in seeds for c in (by_seed[s]["curve_eval"], runs[base][s]["curve_eval"]))
        points = []
        for i in range(n):
            diffs = [by_seed[s]["curve_eval"][i][1] - runs[base][s]["curve_eval"][i][1] for s in seeds]
            mean, std = _stats(diffs)
            points.append({"tokens": by_seed[seeds[0]]["curve_eval"][i][0], "mean": mean, "std": std, "diffs": diffs})
        if points:
            out[v] = points
    return out


def sweep_table(settings: list[tuple[str, dict, list[dict]]], labels: dict[str, str]) -> str:
    """One table over all settings (tag, aggregate, pairs): per variant and setting the held-out
    perplexity and its paired differences against KD and against `select` at the same weight; a
    variant "wins" a setting when it beats both by more than the paired seed spread."""
    variants = list(dict.fromkeys(v for _, agg, _ in settings for v in agg))
    head = "| variant | " + " | ".join(f"{tag}: ppl | vs KD | vs select" for tag, _, _ in settings) + " | wins |"
    lines = ["## All settings: held-out perplexity and paired differences", "", head,
             "|---|" + "---|---|---|" * len(settings) + "---|"]

    def diff(pairs: list[dict], a: str, b: str) -> tuple[str, bool]:
        p = next((p for p in pairs if p["a"] == a and p["b"] == b), None)
        if p is None:
            return "", False
        beats = bool(p["exceeds_spread"]) and p["mean"] < 0
        return f"{_f(p['mean'], '{:+.2f}')} ± {_f(p['std'])}" + (" *" if beats else ""), beats

    for v in variants:
        base, w = split_variant(v)
        cells, wins = [], 0
        for _, agg, pairs in settings:
            a = agg.get(v)
            ppl = f"{_f(a['ppl_mean'])} ± {_f(a['ppl_std'])}" if a else "-"
            vs_kd, beats_kd = diff(pairs, v, "kd")
            vs_sel, beats_sel = diff(pairs, v, variant_name("kd_select", w))
            wins += beats_kd and (beats_sel or base == "kd_select")
            cells += [ppl, vs_kd, vs_sel]
        lines.append(f"| {labels.get(v, v)} | " + " | ".join(cells) + f" | {wins}/{len(settings)} |")
    lines += ["", "Differences: mean ± std over paired seeds of ppl(variant) - ppl(baseline); * = lower by more "
              "than the spread. wins = settings where the variant beats KD and select (at the same w_shd) that way."]
    return "\n".join(lines) + "\n"


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def markdown(settings: dict, labels: dict[str, str], agg: dict[str, dict], pairs: list[dict],
             teacher: dict | None = None, reference: dict | None = None, title: str = "Distillation comparison",
             gaps: dict[str, list[dict]] | None = None) -> str:
    """The results table, paired differences and (``gaps``, from ``gap_to_kd``) the gap to KD
    at each evaluation, as Markdown."""
    gaps = gaps or {}
    lines = [f"# {title}", ""]
    s = settings
    lines.append(f"Teacher `{s.get('teacher')}` ({s.get('teacher_heads')} heads) -> student {s.get('student_layers')} "
                 f"layers x {s.get('student_heads')} heads; seq_len {s.get('seq_len')}, {s.get('tokens_per_step')} "
                 f"tokens/step, {s.get('steps')} steps = {s.get('tokens'):,} tokens per run, {s.get('nproc')} "
                 f"process(es); seeds {s.get('seeds')} (paired: same init and data order across variants).")
    if teacher and teacher.get("final_eval_ppl") is not None:
        lines.append(f"Teacher held-out perplexity: {_f(teacher['final_eval_ppl'])}.")
    lines += ["", "| variant | held-out ppl (mean ± std) | per seed | final train CE | tokens/s | peak mem (MiB) "
              "| W mean max | W entropy |", "|---|---|---|---|---|---|---|---|"]
    for v, a in agg.items():
        per_seed = ", ".join(_f(p) for p in a["ppl_per_seed"])
        std = f" ± {_f(a['ppl_std'])}" if a["ppl_std"] is not None and math.isfinite(a["ppl_std"]) else ""
        lines.append(f"| {labels.get(v, v)} | {_f(a['ppl_mean'])}{std} | {per_seed} "
                     f"| {_f(a['final_train_ce'], '{:.3f}')} "
                     f"| {_f(a['tokens_per_s'], '{:.0f}')} | {_f(a['peak_mem_mib'], '{:.0f}')} "
                     f"| {_f(a.get('w_mean_max'), '{:.3f}')} | {_f(a.get('w_entropy'), '{:.3f}')} |")
    lines.append("")
    lines.append("Held-out perplexity: the engine's evaluation at the end of each run on the same validation "
                 "batches. Final train CE: mean of the CE term over the last 10 % of steps. W: SHD mixing "
                 "weights (rows of W, one per student head), mean over layers and the last 10 % of steps.")
    if reference:
        refs = ", ".join(f"{p}: mean max {r['w_mean_max']:.3f}, entropy {r['w_entropy']:.3f}"
                         for p, r in reference.items())
        lines.append(f"With every alpha = 1/2 (equal weights) W would have {refs}; `select` has mean max 1, entropy 0.")
    if pairs:
        lines += ["", "## Paired differences of held-out perplexity (a - b, per seed)", "",
                  "| a vs b | question | mean diff | std | mean diff % | per seed | exceeds spread? |",
                  "|---|---|---|---|---|---|---|"]
        for p in pairs:
            ex = {True: "yes", False: "no", None: "n/a (1 seed)"}[p["exceeds_spread"]]
            diffs = ", ".join(_f(d, "{:+.2f}") for d in p["diffs"])
            lines.append(f"| {p['a']} vs {p['b']} | {p['what']} | {_f(p['mean'], '{:+.2f}')} | {_f(p['std'])} "
                         f"| {_f(p['mean_rel_pct'], '{:+.1f}')} | {diffs} | {ex} |")
        lines.append("")
        lines.append("Negative = a has the lower (better) perplexity. 'Exceeds spread': |mean| > standard "
                     "deviation of the per-seed differences.")
        if any(p["exceeds_spread"] is None for p in pairs):
            lines.append("")
            lines.append("One seed and one teacher: these differences say what these runs did, not which loss is "
                         "better. Gaps of several perplexity points changed sign between teachers trained the same "
                         "way (docs/results.md section 7); `--seeds 3` measures the seed spread.")
    if gaps and max(len(g) for g in gaps.values()) > 1:
        tokens = [pt["tokens"] for pt in max(gaps.values(), key=len)]
        lines += ["", "## Gap to KD against training tokens (ppl(a) - ppl(KD) at each evaluation, paired)", "",
                  "| a | " + " | ".join(f"{x / 1000:,.0f} k" for x in tokens) + " |", "|---|" + "---|" * len(tokens)]
        for v, points in gaps.items():
            cells = [_f(pt["mean"], "{:+.2f}") + (f" ± {_f(pt['std'])}" if math.isfinite(pt["std"]) else "")
                     for pt in points]
            lines.append(f"| {labels.get(v, v)} | " + " | ".join(cells + [""] * (len(tokens) - len(cells))) + " |")
        lines += ["", "Mean ± standard deviation over seeds of the per-seed differences; negative = a is better."]
    return "\n".join(lines) + "\n"


def plot(path: Path, labels: dict[str, str], runs: dict[str, dict[int, dict]], teacher: dict | None = None,
         title: str = "") -> Path:
    """Train CE loss and held-out perplexity against tokens (mean over seeds, band = min..max),
    and, when KD ran and was evaluated more than once, a third panel: the paired gap to KD
    (mean over seeds, band = ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = {v: g for v, g in gap_to_kd(runs).items() if len(g) > 1}
    fig, axes = plt.subplots(1, 3 if gaps else 2, figsize=(18 if gaps else 12, 4.5))
    ax_loss, ax_ppl = axes[0], axes[1]
    colors = {}
    for v, by_seed in runs.items():
        seeds, color = sorted(by_seed), None
        # train CE, smoothed by a running mean over ~5 % of the steps
        curves = [by_seed[s]["curve_train"] for s in seeds]
        n = min(len(c) for c in curves)
        if n:
            x = [curves[0][i][0] for i in range(n)]
            ys = [[c[i][1] for i in range(n)] for c in curves]
            mean = [statistics.fmean(col) for col in zip(*ys)]
            w = max(1, n // 20)
            smooth = [statistics.fmean(mean[max(0, i - w + 1): i + 1]) for i in range(n)]
            (line,) = ax_loss.plot(x, smooth, label=labels.get(v, v))
            color = line.get_color()
        evs = [by_seed[s]["curve_eval"] for s in seeds]
        m = min(len(e) for e in evs)
        if m:
            x = [evs[0][i][0] for i in range(m)]
            cols = [[e[i][1] for e in evs] for i in range(m)]
            (eval_line,) = ax_ppl.plot(x, [statistics.fmean(c) for c in cols], marker="o", ms=3,
                                       label=labels.get(v, v), color=color)
            colors[v] = eval_line.get_color()
            if len(seeds) > 1:
                ax_ppl.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2, color=colors[v])
    if teacher and teacher.get("final_eval_ppl") and math.isfinite(teacher["final_eval_ppl"]):
        ax_ppl.axhline(teacher["final_eval_ppl"], ls="--", color="gray", label="teacher")
    ax_loss.set(xlabel="training tokens", ylabel="train CE loss (smoothed)", title="training loss (CE term)")
    ax_ppl.set(xlabel="training tokens", ylabel="held-out perplexity", title="held-out perplexity", yscale="log")
    if gaps:
        ax_gap = axes[2]
        for v, points in gaps.items():
            x, mean = [pt["tokens"] for pt in points], [pt["mean"] for pt in points]
            ax_gap.plot(x, mean, marker="o", ms=3, label=labels.get(v, v), color=colors.get(v))
            std = [pt["std"] for pt in points]
            if all(math.isfinite(s) for s in std):
                ax_gap.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    alpha=0.2, color=colors.get(v))
        ax_gap.axhline(0.0, ls="--", color="gray", label="KD")
        ax_gap.set(xlabel="training tokens", ylabel="ppl(variant) - ppl(KD)",
                   title="gap to KD (paired, band = ± std over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class SettingReport:
    """What one setting's report holds: the sweep table combines these."""

    tag: str
    markdown: str
    aggregate: dict[str, dict]
    pairs: list[dict]


def write_setting_report(setting: Setting, opts: StudyOptions, data: DataPlan, command: str,
                         given_teacher: dict | None = None) -> SettingReport:
    """Read the setting's finished runs and write its table, curves and numbers into its directory:
    ``opts.report_name`` (Markdown, ending with ``command``), ``opts.plot_name`` and results.json.
    ``given_teacher``: the held-out numbers of a --teacher the study did not train."""
    runs: dict[str, dict[int, dict]] = {}
    for st in setting.students:
        runs.setdefault(st.variant, {})[st.seed] = summarize_run(st.run_dir)
    # the teacher's held-out perplexity on the same evaluation batches
    teacher = summarize_run(setting.teacher.run_dir) if setting.teacher.run_dir else given_teacher
    cfg = setting.students[-1].config
    student = cfg["student"]
    tps = tokens_per_step(cfg, opts.nproc)
    info = {"teacher": str(setting.teacher.export), "teacher_heads": setting.heads,
            "student_layers": student["num_layers"], "student_heads": student["num_heads"],
            "seq_len": setting.seq_len, "steps": setting.steps, "tokens_per_step": tps, "tokens": setting.steps * tps,
            "nproc": opts.nproc, "seeds": list(opts.seeds), "budget": opts.budget_name, "data": str(data.shards),
            "tokenizer": str(data.tokenizer)}
    labels = {v: variant_label(v) for v in opts.variants}
    agg = aggregate(runs)
    pairs = paired_differences(runs)
    plans = sorted({p for v in opts.variants if (p := VARIANTS[split_variant(v)[0]].dynamic_plan)})
    ref = {p: uniform_reference(setting.heads, student["num_heads"], p) for p in plans}
    title = "Demo: CE vs CE + KD vs CE + KD + attention KD" if opts.preset == "demo" else "Distillation comparison"
    gaps = gap_to_kd(runs)
    md = markdown(info, labels, agg, pairs, teacher, ref, title=title + (f" ({setting.tag})" if setting.tag else ""),
                  gaps=gaps)
    md += f"\nProduced by `{command}`.\n"
    (setting.out_dir / opts.report_name).write_text(md)
    plot(setting.out_dir / opts.plot_name, labels, runs, teacher,
         title=f"{student['num_layers']}-layer {student['num_heads']}-head student, {setting.heads}-head teacher, "
               f"T={setting.seq_len}")
    (setting.out_dir / "results.json").write_text(json.dumps(
        {"setting": info, "labels": labels, "aggregate": agg, "pairs": pairs, "gap_to_kd": gaps, "teacher": teacher,
         "uniform_reference": ref, "runs": runs}, indent=1, default=str))
    return SettingReport(setting.tag, md, agg, pairs)


def write_sweep_report(path: Path, reports: Sequence[SettingReport], labels: dict[str, str]) -> None:
    """The sweep's report: one table across settings, then every setting's report."""
    table = sweep_table([(r.tag, r.aggregate, r.pairs) for r in reports], labels)
    Path(path).write_text("\n\n".join([table] + [r.markdown for r in reports]))
