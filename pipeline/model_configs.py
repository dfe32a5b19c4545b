"""The teacher's and the student's Hugging Face configs, and every check between them, the
tokenizer and the data that can be made before any weights load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from pydantic import model_validator

from pipeline.settings import ConfigError, Float, Section, setting

if TYPE_CHECKING:
    from pipeline.config import RunConfig


class TeacherConfig(Section):
    path: Optional[str] = setting(None, "Hugging Face LLaMA-family model directory of the frozen teacher "
                                        "(required for stage 'distill', must be empty for stage 'pretrain').")
    placement: Literal["partitioned", "replicated", "node"] = setting(
        "partitioned", "Where the frozen teacher's weights live. partitioned = ZeRO-3 over all ranks (fits "
                       "any size; every micro-batch all-gathers the whole teacher, across nodes too); "
                       "replicated = the whole teacher on every rank (no gathers: fastest when it fits one "
                       "GPU); node = ZeRO-3 within each node only (ZeRO++ hpZ: a copy of the teacher per node, "
                       "gathers never cross the network; on one node it is 'partitioned', with one rank per "
                       "node 'replicated'). docs/teacher-placement.md compares them.")
    offload_params: bool = setting(False, "Keep the teacher's ZeRO-3 parameter partitions in CPU memory "
                                          "(placement 'partitioned' only).")

    @model_validator(mode="after")
    def _offload_needs_partitioned(self) -> "TeacherConfig":
        if self.offload_params and self.placement != "partitioned":
            raise ConfigError(f"teacher.offload_params=true needs teacher.placement=partitioned (got "
                              f"{self.placement!r}): a replicated or per-node teacher is kept on the GPU to "
                              f"avoid gathers; offloading it would move it over PCIe every step instead")
        return self


class StudentConfig(Section):
    init_from: Optional[str] = setting(None, "Hugging Face directory to start the student from; when set, "
                                             "the shape fields below are ignored and taken from it.")
    num_layers: int = setting(4, "Decoder layers.")
    hidden_size: int = setting(256, "Model width.")
    num_heads: int = setting(4, "Attention (query) heads.")
    num_kv_heads: Optional[int] = setting(None, "Key/value heads (grouped-query attention); empty = num_heads.")
    intermediate_size: Optional[int] = setting(None, "FFN width; empty = 8/3 * hidden rounded up to a multiple "
                                                     "of 64.")
    vocab_size: Optional[int] = setting(None, "Empty = the tokenizer's vocabulary size (from the data manifest).")
    max_position_embeddings: int = setting(2048, "Largest sequence length the student supports.")
    rope_theta: Float = setting(10000.0, "RoPE base.")
    rms_norm_eps: Float = setting(1e-5, "RMSNorm epsilon.")
    tie_word_embeddings: bool = setting(False, "Share input embedding and LM head.")
    init_std: Float = setting(0.02, "Std of the normal initialisation of a student built from config.")
    activation_checkpointing: bool = setting(False, "Recompute each decoder layer in backward (non-reentrant).")

    @model_validator(mode="after")
    def _shape(self) -> "StudentConfig":
        if self.init_from is not None:
            return self
        for k in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
            if getattr(self, k) < 1:
                raise ConfigError(f"student.{k} must be >= 1, got {getattr(self, k)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"student.hidden_size ({self.hidden_size}) must be divisible by student.num_heads "
                              f"({self.num_heads})")
        kv = self.num_kv_heads or self.num_heads
        if kv < 1 or self.num_heads % kv:
            raise ConfigError(f"student.num_heads ({self.num_heads}) must be a multiple of student.num_kv_heads "
                              f"({kv})")
        return self


def teacher_hf_config(cfg: RunConfig):
    from transformers import AutoConfig

    p = Path(cfg.teacher.path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"teacher.path {p} is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(p)


def student_hf_config(cfg: RunConfig, tokenizer_vocab: int):
    from transformers import AutoConfig, LlamaConfig

    s = cfg.student
    if s.init_from:
        p = Path(s.init_from)
        if not (p / "config.json").is_file():
            raise ConfigError(f"student.init_from {p} is not a Hugging Face model directory (no config.json)")
        return AutoConfig.from_pretrained(p)
    inter = s.intermediate_size or int(math.ceil(s.hidden_size * 8 / 3 / 64) * 64)
    return LlamaConfig(
        vocab_size=s.vocab_size or tokenizer_vocab,
        hidden_size=s.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads or s.num_heads,
        max_position_embeddings=s.max_position_embeddings,
        rope_theta=s.rope_theta,
        rms_norm_eps=s.rms_norm_eps,
        tie_word_embeddings=s.tie_word_embeddings,
        initializer_range=s.init_std,
        use_cache=False,
    )


def model_shape(hf_config) -> dict:
    """The architecture fields a checkpoint depends on (resume refuses a change)."""
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")
    return {k: getattr(hf_config, k, None) for k in keys}


def distill_pairs(cfg: RunConfig, student_cfg, teacher_cfg) -> dict[int, int]:
    """{student layer: teacher layer} of the layers that get the SHD term."""
    from pipeline.shd import layer_map

    ls, lt = student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers
    d = cfg.distill
    if d.layer_map is not None:
        if len(d.layer_map) != ls:
            raise ConfigError(f"distill.layer_map has {len(d.layer_map)} entries but the student has {ls} "
                              f"layers: give one teacher layer per student layer")
        bad = [t for t in d.layer_map if not 0 <= t < lt]
        if bad:
            raise ConfigError(f"distill.layer_map entries {bad} are out of range: the teacher has {lt} "
                              f"layers (valid 0..{lt - 1})")
    mapping = layer_map(ls, lt, d.layer_map)
    layers = d.student_layers if d.student_layers is not None else list(range(ls))
    bad = [s for s in layers if not 0 <= s < ls]
    if bad:
        raise ConfigError(f"distill.student_layers entries {bad} are out of range: the student has {ls} "
                          f"layers (valid 0..{ls - 1})")
    return {s: int(mapping[s]) for s in sorted(layers)}


def check_compatibility(cfg: RunConfig, student_cfg, teacher_cfg, tokenizer_vocab: int) -> None:
    """Raise ConfigError naming the fix for every model/tokenizer/data mismatch (before any compute)."""
    T = cfg.data.seq_len
    models = [("student", student_cfg)] + ([("teacher", teacher_cfg)] if teacher_cfg is not None else [])
    for name, mc in models:
        if mc.vocab_size < tokenizer_vocab:
            raise ConfigError(f"{name} vocab size ({mc.vocab_size}) is smaller than the tokenizer's "
                              f"({tokenizer_vocab}): use a {name} built for this tokenizer")
        if mc.vocab_size != tokenizer_vocab and not cfg.distill.allow_padded_vocab:
            raise ConfigError(f"{name} vocab size ({mc.vocab_size}) differs from the tokenizer's "
                              f"({tokenizer_vocab}): if the extra rows are padding set "
                              f"distill.allow_padded_vocab=true, otherwise use a {name} built for this "
                              f"tokenizer (student.vocab_size empty = the tokenizer's)")
        maxpos = getattr(mc, "max_position_embeddings", None)
        if maxpos is not None and T > maxpos:
            raise ConfigError(f"data.seq_len ({T}) exceeds the {name}'s max_position_embeddings ({maxpos}): "
                              f"lower data.seq_len")
    if teacher_cfg is None:
        return
    if cfg.uses_shd:
        pairs = distill_pairs(cfg, student_cfg, teacher_cfg)
        n, m = student_cfg.num_attention_heads, teacher_cfg.num_attention_heads
        for s, t in pairs.items():
            if n > m:
                raise ConfigError(f"student layer {s} has {n} heads but its teacher layer {t} has {m}: SHD "
                                  f"needs student heads <= teacher heads; lower student.num_heads or set "
                                  f"distill.w_shd=0")
        # head dims may differ: SHD compares attention maps, not vectors


def check_model_tokenizers(cfg: RunConfig, manifest) -> None:
    """The tokenizer a teacher or starting student directory records (export marker, tokenizer
    files) must be the data's: same-size vocabularies of different tokenizers pass every shape check
    and train on ids that mean other text. Directories that record no tokenizer are not checked."""
    if not cfg.data.check_model_tokenizers:
        return
    from pipeline.identity import model_tokenizer_claims

    want = manifest.tokenizer.files_sha256
    models = [("teacher.path", cfg.teacher.path if cfg.uses_teacher else None),
              ("student.init_from", cfg.student.init_from)]
    for field, path in models:
        for source, sha in model_tokenizer_claims(Path(path)) if path else ():
            if sha != want:
                raise ConfigError(f"{field} {path} was trained with tokenizer sha256 {sha[:12]} ({source}), "
                                  f"but the data in {cfg.data.dir} was prepared with tokenizer sha256 {want[:12]}: "
                                  f"prepare the data with that model's tokenizer (python -m data_prep.shard "
                                  f"--tokenizer {path} ...), or set data.check_model_tokenizers=false if the ids agree")


def check_tokenizer(cfg: RunConfig, manifest) -> None:
    """The data manifest's tokenizer must be the configured tokenizer directory's."""
    if not cfg.data.tokenizer_dir:
        return
    from pipeline.data import tokenizer_identity

    ident = tokenizer_identity(cfg.data.tokenizer_dir)
    if ident != manifest.tokenizer:
        diff = [f for f in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "files_sha256")
                if getattr(ident, f) != getattr(manifest.tokenizer, f)]
        raise ConfigError(f"data.tokenizer_dir {cfg.data.tokenizer_dir} does not match the tokenizer the "
                          f"data in {cfg.data.dir} was prepared with (differs in: {', '.join(diff)}): "
                          f"point data.tokenizer_dir at that tokenizer or re-run data_prep")
