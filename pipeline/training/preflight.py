"""Preflight: every check of a run that needs no process group and no weights, in one place.

``python -m pipeline.train --check`` runs exactly this; the trainer runs it before building anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models import architectures
from pipeline.models.hf_configs import (
    check_compatibility,
    check_model_tokenizers,
    check_tokenizer,
    derived_student_fields,
    differences_from_teacher,
    distill_pairs,
    student_hf_config,
    teacher_hf_config,
)
from pipeline.training import pruned
from pipeline.training.deepspeed_config import build_ds_configs
from shd_common.settings import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def check_eval_split(cfg: RunConfig, model_vocab_size: int) -> None:
    """When the run evaluates, its split must be readable now, not at the first evaluation."""
    from pipeline.data.reader import DataError, open_reader

    e = cfg.eval
    if not (e.every_steps > 0 or e.at_end):
        return
    try:
        open_reader(cfg.data, e.split, model_vocab_size=model_vocab_size)
    except DataError as err:
        raise ConfigError(f"evaluation is on (eval.every_steps={e.every_steps}, eval.at_end={e.at_end}) but "
                          f"eval.split={e.split!r} cannot be read: {err}. Re-shard with a val split "
                          f"(python -m data_prep.shard ... --val-fraction 0.01), set eval.split to a split the "
                          f"data has, or turn evaluation off (eval.every_steps=0 eval.at_end=false)") from None


class Preflight:
    """Config + manifest + model configs, checked together before anything is built.

    ``cfg`` is the run's config as resolved here: the keys a pruned student's record gives when the
    config leaves them empty (``pipeline.training.pruned``); ``pruning`` is that record when the SHD
    term uses it (the trainer checks the teacher's content against it, `check_teacher_content`), and
    ``source_heads`` the teacher head each student head distils under ``select_heads=pruned``."""

    def __init__(self, cfg: RunConfig) -> None:
        from pipeline.data.reader import read_manifest

        self.given = self.cfg = cfg
        self.manifest = read_manifest(cfg.data.dir)
        tok = self.manifest.tokenizer
        self.vocab: int = tok.vocab_size
        check_tokenizer(cfg, self.manifest)
        check_model_tokenizers(cfg, self.manifest)
        self.teacher_cfg = teacher_hf_config(cfg) if cfg.uses_teacher else None
        self.student_cfg = student_hf_config(cfg, self.vocab, self.teacher_cfg)
        record = pruned.read_pruning_record(cfg)
        if record is not None:
            pruned.check_shapes(record, self.student_cfg, self.teacher_cfg)
        self.cfg = cfg = pruned.with_record_defaults(cfg, record)
        self.pruning = record if cfg.uses_shd else None
        if cfg.uses_shd:  # from the configs alone, before any weights load
            architectures.check_distillable("teacher", self.teacher_cfg)
            architectures.check_distillable("student", self.student_cfg)
        check_compatibility(cfg, self.student_cfg, self.teacher_cfg, self.vocab)
        self.pairs = distill_pairs(cfg, self.student_cfg, self.teacher_cfg) if cfg.uses_shd else None
        if self.pairs is not None:
            architectures.check_windows(self.student_cfg, self.teacher_cfg, self.pairs, cfg.data.seq_len)
        self.source_heads = (pruned.heads_by_layer(record, self.pairs)
                             if record is not None and self.pairs is not None and cfg.distill.plan == "select"
                             and cfg.distill.select_heads == "pruned" else None)
        check_eval_split(cfg, self.student_cfg.vocab_size)
        build_ds_configs(cfg, 1)  # JSON problems surface here too

    def check_teacher_content(self, identity: dict | None = None) -> None:
        """When the SHD term uses a pruning record, the teacher must be the one it was cut from:
        ``identity`` is ``teacher_identity``'s (hashed here when not given: it reads the teacher's files)."""
        if self.pruning is None:
            return
        if identity is None:
            from pipeline.models.identity import teacher_identity

            identity = teacher_identity(self.cfg.teacher.path)[0]
        pruned.check_teacher(self.pruning, identity)

    def shd_capture(self):
        """The run's SHD capture (``pipeline.loss.capture.ShdCapture``) for the resolved config, or
        None without SHD."""
        if self.pairs is None:
            return None
        from pipeline.loss.capture import ShdCapture

        origin = self.pruning.origin if self.pruning is not None else ""
        return ShdCapture.from_config(self.cfg.distill, self.pairs, self.student_cfg.num_attention_heads,
                                      source_heads=self.source_heads, source=origin)

    def notes(self) -> list[str]:
        """Start-up lines on what the run took without being told: the data's document separator, the
        student fields derived from the teacher, and where the student's architecture differs from it."""
        separator = self.manifest.options.get("separator") or {"id": self.manifest.tokenizer.eos_id, "token": "EOS"}
        lines = [f"data: documents separated by {separator['token']!r} (id {separator['id']}), an ordinary token "
                 f"for every loss; samples are packed, nothing is padding"]
        if self.cfg.student.init_from is None:
            derived = derived_student_fields(self.cfg.student, self.teacher_cfg)
            if derived:
                lines.append("student fields not given, derived: " + ", ".join(
                    f"{field}={value} ({source})" for field, (value, source) in derived.items()))
        if self.pruning is not None:
            lines += pruned.record_notes(self.given, self.cfg, self.pruning)
        if self.teacher_cfg is not None:
            lines.append("student differs from its teacher in (student/teacher): "
                         + ("; ".join(differences_from_teacher(self.student_cfg, self.teacher_cfg)) or "nothing"))
        return lines
