"""The teacher's and the student's Hugging Face configs, and every check between them, the
tokenizer and the data that can be made before any weights load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config.sections import StudentConfig
from shd_common.settings import ConfigError

if TYPE_CHECKING:
    from pipeline.config import RunConfig


def teacher_hf_config(cfg: RunConfig):
    from transformers import AutoConfig

    p = Path(cfg.teacher.path)
    if p.suffix == ".gguf":
        raise ConfigError(f"teacher.path {p} is a GGUF file: convert it once with `python -m pipeline.import_gguf "
                          f"--gguf {p} --out DIR` and set teacher.path=DIR")
    if not (p / "config.json").is_file():
        raise ConfigError(f"teacher.path {p} is not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(p)


# What a student built from config takes when neither the config nor a teacher says.
_NO_TEACHER = {"max_position_embeddings": 2048, "tie_word_embeddings": False,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


def _rope_parameters(hf_config) -> dict:
    """A config's RoPE settings (base, type, scaling) as transformers 5 names them."""
    rope = getattr(hf_config, "rope_parameters", None)
    if rope:
        return dict(rope)
    return {"rope_type": "default", "rope_theta": float(getattr(hf_config, "rope_theta", 10000.0))}


def derived_student_fields(s: StudentConfig, teacher_cfg) -> dict[str, tuple[object, str]]:
    """{field: (value, where it came from)} of the student fields the config leaves empty: the
    teacher's value where there is a teacher (a student that shares its teacher's RoPE, positions and
    embedding tying starts closer to it at no cost), else the historical default."""
    source = {} if teacher_cfg is None else {
        "max_position_embeddings": teacher_cfg.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(teacher_cfg, "tie_word_embeddings", False)),
        "rope_parameters": _rope_parameters(teacher_cfg)}
    return {k: (source[k], "teacher") if k in source else (_NO_TEACHER[k], "default")
            for k, v in _given_fields(s).items() if v is None}


def _given_fields(s: StudentConfig) -> dict[str, object]:
    """The derivable fields as the student section gives them (None = derive)."""
    return {"max_position_embeddings": s.max_position_embeddings, "tie_word_embeddings": s.tie_word_embeddings,
            "rope_parameters": None if s.rope_theta is None else {"rope_type": "default",
                                                                   "rope_theta": float(s.rope_theta)}}


def student_hf_config(cfg: RunConfig, tokenizer_vocab: int, teacher_cfg=None):
    """The student's HF config: `student.init_from`'s, or a LlamaConfig from the student section, its
    empty fields derived from the teacher (`derived_student_fields`)."""
    from transformers import AutoConfig, LlamaConfig

    s = cfg.student
    if s.init_from:
        p = Path(s.init_from)
        if not (p / "config.json").is_file():
            raise ConfigError(f"student.init_from {p} is not a Hugging Face model directory (no config.json)")
        return AutoConfig.from_pretrained(p)
    inter = s.intermediate_size or int(math.ceil(s.hidden_size * 8 / 3 / 64) * 64)
    fields = _given_fields(s)
    fields.update({k: v for k, (v, _) in derived_student_fields(s, teacher_cfg).items()})
    return LlamaConfig(
        vocab_size=s.vocab_size or tokenizer_vocab,
        hidden_size=s.hidden_size,
        intermediate_size=inter,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads or s.num_heads,
        rms_norm_eps=s.rms_norm_eps,
        initializer_range=s.init_std,
        use_cache=False,
        **fields,
    )


def differences_from_teacher(student_cfg, teacher_cfg) -> list[str]:
    """`field student/teacher` for the architecture fields where the student differs from its teacher."""
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    out = [f"{k} {getattr(student_cfg, k, None)}/{getattr(teacher_cfg, k, None)}" for k in keys
           if getattr(student_cfg, k, None) != getattr(teacher_cfg, k, None)]
    if _rope_parameters(student_cfg) != _rope_parameters(teacher_cfg):
        out.append(f"rope {_rope_parameters(student_cfg)}/{_rope_parameters(teacher_cfg)}")
    return out


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
    from pipeline.models.identity import model_tokenizer_claims

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
    from shd_common.manifest import tokenizer_identity

    ident = tokenizer_identity(cfg.data.tokenizer_dir)
    if ident != manifest.tokenizer:
        diff = [f for f in ("vocab_size", "bos_id", "eos_id", "pad_id", "unk_id", "files_sha256")
                if getattr(ident, f) != getattr(manifest.tokenizer, f)]
        raise ConfigError(f"data.tokenizer_dir {cfg.data.tokenizer_dir} does not match the tokenizer the "
                          f"data in {cfg.data.dir} was prepared with (differs in: {', '.join(diff)}): "
                          f"point data.tokenizer_dir at that tokenizer or re-run data_prep")
