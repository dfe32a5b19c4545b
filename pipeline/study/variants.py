"""The study's variant table and budgets: what differs between the students, and how long they train.

A *variant* is one loss setup: the dotted overrides that turn the base student config
(``configs/demo_student.yaml``) into it. Every student of a setting differs from the others only
by its variant (and its seed), so the variants' held-out perplexities compare the losses.

A variant *name* in a run may carry an attention-loss weight, ``kd_shd@0.3`` (``distill.w_shd =
0.3``): that is how ``--w-shd-list`` sweeps the weight. Variants without an attention term (CE
only, CE + KD) take no weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One loss setup of the study.

    ``overrides`` are ``key.sub=value`` texts (as on the engine's command line) applied to the
    base student config. ``dynamic_plan`` names the squeeze plan of variants whose mixing weights
    depend on the input: the report compares their measured weight statistics with the ones of
    equal weights (alpha = 1/2) under that plan. ``attention`` is False for the variants without
    an attention-loss term, which a weight sweep leaves alone.
    """

    name: str
    label: str
    overrides: tuple[str, ...]
    dynamic_plan: str | None = None
    attention: bool = True


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("ce", "CE only", ("stage=pretrain", "teacher.path=null", "distill.w_ce=1.0", "distill.w_kd=0.0",
                              "distill.w_shd=0.0"), attention=False),
    Variant("kd", "CE + KD", ("distill.w_shd=0.0",), attention=False),
    Variant("kd_shd", "CE + KD + SHD (pairwise)", ("distill.plan=pairwise",), dynamic_plan="pairwise"),
    Variant("kd_group", "CE + KD + SHD (group)", ("distill.plan=group",), dynamic_plan="group"),
    Variant("kd_mean", "CE + KD + attn KD, mean merge", ("distill.plan=mean",)),
    Variant("kd_select", "CE + KD + attn KD, select", ("distill.plan=select",)),
    Variant("shd_only", "CE + SHD (no KD)", ("distill.plan=pairwise", "distill.w_kd=0.0"), dynamic_plan="pairwise"),
    # the variants of docs/shd-method.md ("Variants under study"), pairwise weights
    Variant("kd_hard", "CE + KD + SHD, hard selection", ("distill.plan=pairwise", "distill.selection=hard"),
            dynamic_plan="pairwise"),
    Variant("kd_logit", "CE + KD + SHD, score-space merge", ("distill.plan=pairwise", "distill.merge=logit"),
            dynamic_plan="pairwise"),
    Variant("kd_sharp", "CE + KD + SHD, sharpened (0.5)", ("distill.plan=pairwise", "distill.sharpen=0.5"),
            dynamic_plan="pairwise"),
    # issue 14: which head, and how the map loss is taken
    Variant("kd_select_rand", "CE + KD + attn KD, select (random head)",
            ("distill.plan=select", "distill.select_heads=random")),
    Variant("kd_select_recon", "CE + KD + attn KD, select (calibrated: best reconstruction)",
            ("distill.plan=select", "distill.select_heads=reconstruct")),
    Variant("kd_select_contrib", "CE + KD + attn KD, select (calibrated: largest output)",
            ("distill.plan=select", "distill.select_heads=contribution")),
    Variant("kd_select_rev", "CE + KD + attn KD, select, reverse KL",
            ("distill.plan=select", "distill.shd_divergence=reverse")),
    Variant("kd_shd_rev", "CE + KD + SHD (pairwise), reverse KL",
            ("distill.plan=pairwise", "distill.shd_divergence=reverse"), dynamic_plan="pairwise"),
    Variant("kd_select_ramp", "CE + KD + attn KD, select, w_shd ramp 50 steps",
            ("distill.plan=select", "distill.shd_warmup_steps=50")),
    Variant("kd_shd_static", "CE + KD + SHD (pairwise), calibrated static alphas",
            ("distill.plan=pairwise", "distill.mixing_weights=calibrated"), dynamic_plan="pairwise"),
)}
DEFAULT_VARIANTS: tuple[str, ...] = ("ce", "kd", "kd_shd", "kd_group", "kd_mean", "kd_select")
# the demo: CE only, CE + KD, and CE + KD + the default attention target (plan select, docs/results.md section 7)
DEMO_VARIANTS: tuple[str, ...] = ("ce", "kd", "kd_select")
# variants without an attention term: a weight sweep leaves them alone
NO_ATTENTION: tuple[str, ...] = tuple(v.name for v in VARIANTS.values() if not v.attention)


def split_variant(name: str) -> tuple[str, float | None]:
    """("kd_shd", 0.3) for "kd_shd@0.3"; (name, None) without a weight suffix."""
    base, sep, weight = name.partition("@")
    return base, (float(weight) if sep else None)


def variant_name(base: str, w_shd: float | None) -> str:
    """Inverse of split_variant (variants without an attention term keep their bare name)."""
    return base if w_shd is None or base in NO_ATTENTION else f"{base}@{w_shd:g}"


def check_variant(name: str) -> None:
    """Raise ValueError unless ``name`` is a table variant, with a weight > 0 only where it has an
    attention term."""
    base, sep, weight = name.partition("@")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {','.join(VARIANTS)} "
                         f"(optionally with a weight: kd_shd@0.3)")
    if not sep:
        return
    if not VARIANTS[base].attention:
        raise ValueError(f"variant {name!r}: {base} has no attention-loss term, so it takes no weight")
    try:
        w = float(weight)
    except ValueError:
        raise ValueError(f"variant {name!r}: the weight after '@' must be a number, e.g. kd_shd@0.3") from None
    if not w > 0:
        raise ValueError(f"variant {name!r}: the weight must be > 0 (the kd variant is w_shd = 0)")


def variant_label(name: str) -> str:
    """The table label of a variant name, with its attention-loss weight when swept."""
    base, w_shd = split_variant(name)
    return VARIANTS[base].label + (f", w_shd {w_shd:g}" if w_shd is not None else "")


def expand_variants(variants: Sequence[str], w_shd_list: Sequence[float] | None) -> list[str]:
    """Each variant with an attention term once per weight of --w-shd-list ("kd_shd@0.3"); CE and
    KD, and variants named with their weight already, once as they are."""
    if not w_shd_list:
        return list(variants)
    return [variant_name(v, w) for v in variants
            for w in ([None] if v in NO_ATTENTION or "@" in v else w_shd_list)]


@dataclass(frozen=True)
class Budget:
    """How long and how big the runs of a study are (the same for every variant of a setting)."""

    steps: int  # optimizer steps per student
    teacher_steps: int  # optimizer steps of the teacher's pre-training
    batch_tokens: int  # tokens per rank per micro-batch (micro batch = batch_tokens // seq_len)
    vocab: int  # vocabulary of the tokenizer trained on --corpus
    tok_sentences: int  # lines the tokenizer is trained on
    eval_every: int  # held-out evaluation of a student every N steps
    eval_batches: int  # evaluation micro-batches per rank (eval.max_batches = this x processes per run)
    warmup: int  # students' LR warm-up steps (at most a tenth of their steps)

    def micro_batch(self, seq_len: int) -> int:
        """Sequences per rank per micro-batch at this sequence length."""
        return max(1, self.batch_tokens // seq_len)


BUDGETS: dict[str, Budget] = {
    # CI: proves the whole path works in ~2-3 minutes on 2 cores; the numbers mean nothing.
    "ci": Budget(steps=12, teacher_steps=24, batch_tokens=256, vocab=512, tok_sentences=20000,
                 eval_every=6, eval_batches=2, warmup=3),
    # the demo: < 20 minutes on 2 CPU cores for data + teacher + 3 students
    "demo": Budget(steps=300, teacher_steps=600, batch_tokens=1024, vocab=4096, tok_sentences=200000,
                   eval_every=50, eval_batches=16, warmup=30),
    # the bench on a 2-core machine: 6 variants x 3 seeds in about an hour (teacher reused)
    "small": Budget(steps=120, teacher_steps=600, batch_tokens=1024, vocab=4096, tok_sentences=200000,
                    eval_every=40, eval_batches=16, warmup=20),
    # a cluster: longer students and teacher (pair it with bigger models in --student-config)
    "large": Budget(steps=5000, teacher_steps=20000, batch_tokens=4096, vocab=16000, tok_sentences=2000000,
                    eval_every=500, eval_batches=50, warmup=200),
}
