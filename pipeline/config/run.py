"""The run configuration: one YAML file plus dotted ``key.sub=value`` overrides.

A run is a config, not a fork of the trainer. Each section is a class of
:mod:`pipeline.config.sections` (``shd_common.settings.Section`` subclasses on pydantic v2, their
fields' descriptions printed by ``python -m pipeline.train --help-config``); this module composes
them. ``load_config``
validates once, in this order, and nothing is built before it passes:

0. syntax -- the file must be UTF-8 YAML (an error names the line and column) with no key given
             twice in one mapping (the second would silently replace the first), and no dotted
             override may be given twice;
1. keys   -- unknown keys (in the file or in an override) are errors naming the dotted key;
2. types  -- strict: an int, or a number YAML left as a string like ``3e-4``, is accepted where a
             float is expected, nothing else is coerced; a float must be finite (``.inf``/``.nan``
             would end the run with NaN weights);
3. values -- each section's ranges and rules, then the rules across sections, each message
             naming the key and the fix.

What needs the models and the data (vocabularies, head counts, layer maps, the eval split, the
DeepSpeed JSON) is checked next by ``pipeline.training.preflight``, still before any weights load.
Derived values (global batch, tokens per step, total tokens) depend on the number of
data-parallel ranks, so they are computed once at start-up by :func:`derive` and logged; the
resolved config (with the derived values) is saved beside every checkpoint.

Every key also has a class that says what changing it on resume means (:data:`RESUME_CLASSES`:
identity, identity-by-content, schedule, free; ``pipeline.checkpoint.resume_contract`` applies it), checked
complete when this module is imported. ``~`` in a path key is the home directory (a shell leaves
it alone after ``key=``); where the run lives (output, checkpoint and TensorBoard directories) is
used as an absolute path (:attr:`RunConfig.output_path`, ...), relative to the working directory.

    python -m pipeline.train --config configs/tiny_cpu.yaml optim.max_steps=20 distill.plan=group
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from pipeline.config.sections import (
    CheckpointConfig,
    DataConfig,
    DebugConfig,
    DeepSpeedSection,
    DistillConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
)
from shd_common.settings import (
    ConfigError,
    Section,
    apply_overrides,
    build,
    declared_classes,
    field_help,
    leaf_keys,
    parse_override,
    parse_yaml,
    setting,
)

#: The classes of a key on resume (``pipeline.checkpoint.resume_contract`` applies them): identity (refused),
#: identity by content (compared by content), schedule (applied from the next step), free (as given).
IDENTITY, CONTENT, SCHEDULE, FREE = "identity", "identity-by-content", "schedule", "free"

__all__ = ["CONTENT", "FREE", "IDENTITY", "KEY_CLASSES", "RESUME_CLASSES", "SCHEDULE", "ConfigError", "Derived",
           "RunConfig", "config_from_dict", "config_from_saved", "derive", "dump_yaml", "help_text", "load_config",
           "parse_override", "to_dict"]


class RunConfig(Section):
    stage: Literal["distill", "pretrain"] = setting("distill", "'pretrain' trains with CE only and no teacher.")
    seed: int = setting(1234, "Seed of model init and of the data order.")
    output_dir: str = setting("runs/default", "Run directory (checkpoints, TensorBoard).")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig  # no default: data.dir is required
    distill: DistillConfig = Field(default_factory=DistillConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    # Where the run lives, absolute (relative paths are relative to the working directory).
    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).absolute()

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir).absolute() if self.checkpoint.dir else self.output_path / "checkpoints"

    @property
    def tb_dir(self) -> Path:
        return Path(self.logging.tb_dir).absolute() if self.logging.tb_dir else self.output_path / "tb"

    @classmethod
    def key_classes(cls) -> dict[str, str]:
        """{dotted key: its class on resume} for every leaf key (:data:`RESUME_CLASSES`)."""
        return KEY_CLASSES

    @model_validator(mode="before")
    @classmethod
    def _expand_home(cls, data: Any) -> Any:
        """``~`` at the start of a path key (:data:`PATH_KEYS`) is the home directory."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in PATH_KEYS:
            section, _, name = key.rpartition(".")
            node = data.get(section) if section else data
            if isinstance(node, dict) and isinstance(node.get(name), str) and node[name].startswith("~"):
                node = dict(node, **{name: os.path.expanduser(node[name])})
                if section:
                    data[section] = node
                else:
                    data = node
        return data

    @property
    def uses_teacher(self) -> bool:
        return self.stage == "distill"

    @property
    def uses_shd(self) -> bool:
        return self.stage == "distill" and self.distill.w_shd > 0

    @property
    def uses_kd(self) -> bool:
        return self.stage == "distill" and self.distill.w_kd > 0

    @model_validator(mode="after")
    def _across_sections(self) -> RunConfig:
        """The rules between sections (each section checked its own values already)."""
        d, s = self.distill, self.student
        if self.stage == "distill":
            checks = [(bool(self.teacher.path), "teacher.path is required for stage 'distill' (set it to a Hugging "
                                                "Face model directory, or use stage=pretrain to train without one)"),
                      (d.w_ce + d.w_kd + d.w_shd > 0, "distill.w_ce, w_kd and w_shd are all 0: nothing to train"),
                      (d.select_heads != "pruned" or s.init_from is not None,
                       "distill.select_heads=pruned distils the teacher head each student head was cut from, "
                       "which a pruned student's pruning.json names, but student.init_from is empty: set "
                       "student.init_from to a student made by python -m pipeline.prune, or choose another "
                       "distill.select_heads (first, random, reconstruct, contribution)")]
        else:
            checks = [(not self.teacher.path, "teacher.path is set but stage is 'pretrain' (CE only): remove "
                                              "teacher.path or set stage=distill"),
                      (d.w_ce > 0, "stage 'pretrain' trains with CE only: distill.w_ce must be > 0")]
        if s.init_from is None and s.max_position_embeddings is not None:  # empty: checked once derived
            checks.append((self.data.seq_len <= s.max_position_embeddings,
                           f"data.seq_len ({self.data.seq_len}) exceeds student.max_position_embeddings "
                           f"({s.max_position_embeddings}): lower data.seq_len or raise the student's max positions"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self


#: What changing each key means when a run resumes (``pipeline.checkpoint.resume_contract``): every leaf
#: key in exactly one class (``section.*``: every key of the section), checked at import.
RESUME_CLASSES: dict[str, tuple[str, ...]] = {
    IDENTITY: ("stage", "seed", "student.max_position_embeddings", "student.rope_theta", "student.rms_norm_eps",
               "student.init_std", "data.seq_len", "deepspeed.precision",
               # chosen once per run and kept in its checkpoints (a resumed run reuses them)
               "distill.select_heads", "distill.select_seed", "distill.mixing_weights",
               "distill.select_calibration_batches"),
    # compared by what they hold or build: the checkpoint's identity record (content hashes, and
    # the student's shape, which an empty field derives from the teacher or student.init_from)
    CONTENT: ("teacher.path", "data.dir", "data.tokenizer_dir", "student.init_from", "student.num_layers",
              "student.hidden_size", "student.num_heads", "student.num_kv_heads", "student.intermediate_size",
              "student.vocab_size", "student.tie_word_embeddings"),
    SCHEDULE: ("data.micro_batch_size", "optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.max_steps",
               "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.grad_clip",
               "optim.grad_accum_steps", "distill.w_ce", "distill.w_kd", "distill.tau_kd", "distill.w_shd",
               "distill.tau_shd", "distill.plan", "distill.objective", "distill.selection", "distill.merge",
               "distill.sharpen", "distill.shd_divergence", "distill.shd_warmup_steps", "distill.student_layers",
               "distill.layer_map", "teacher.dtype"),
    FREE: ("output_dir", "teacher.placement", "teacher.offload_params", "student.activation_checkpointing",
           "data.verify_checksums", "data.check_model_tokenizers", "distill.kd_chunk_size",
           "distill.shd_block_size", "distill.allow_padded_vocab", "optim.max_consecutive_nonfinite",
           "deepspeed.config", "checkpoint.*", "logging.*", "eval.*", "debug.*"),
}
KEY_CLASSES = declared_classes(RunConfig, RESUME_CLASSES)

#: Keys that hold a path: ``~`` at their start is expanded.
PATH_KEYS = ("output_dir", "teacher.path", "student.init_from", "data.dir", "data.tokenizer_dir",
             "deepspeed.config", "checkpoint.dir", "checkpoint.resume", "logging.tb_dir")
if not set(PATH_KEYS) <= set(leaf_keys(RunConfig)):
    raise TypeError(f"PATH_KEYS names keys RunConfig does not have: {set(PATH_KEYS) - set(leaf_keys(RunConfig))}")


@dataclass(frozen=True)
class Derived:
    """Values computed once from the config and the launch (logged, saved with checkpoints)."""
    world_size: int
    global_batch_size: int  # samples per optimizer step = micro batch x grad accumulation x DP ranks
    tokens_per_step: int
    total_tokens: int


def derive(cfg: RunConfig, world_size: int) -> Derived:
    gbs = cfg.data.micro_batch_size * cfg.optim.grad_accum_steps * world_size
    tps = gbs * cfg.data.seq_len
    return Derived(world_size=world_size, global_batch_size=gbs, tokens_per_step=tps,
                   total_tokens=tps * cfg.optim.max_steps)


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------

_SECTIONS = tuple(name for name, f in RunConfig.model_fields.items()
                  if isinstance(f.annotation, type) and issubclass(f.annotation, Section))


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config of ``data`` (a parsed YAML mapping) with dotted overrides applied, validated:
    keys, types and each section's values, then the rules across sections."""
    tree = apply_overrides(copy.deepcopy(data or {}), overrides)
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping at the top level, got {tree!r}")
    for name in _SECTIONS:  # a section left out, or written as an empty "name:", takes its defaults
        if tree.get(name) is None:
            tree[name] = {}
    return build(RunConfig, tree)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML file ``path`` (or nothing), apply dotted overrides, check keys, types, values."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = parse_yaml(_read_text(p)) or {}
        except ConfigError as e:
            raise ConfigError(f"config file {p}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must contain a mapping at the top level")
    return config_from_dict(data, overrides)


def _read_text(p: Path) -> str:
    """The text of config file p; ConfigError when it is not a readable UTF-8 file."""
    if p.is_dir():
        raise ConfigError("is a directory: give the path of a YAML file in it (e.g. configs/tiny_cpu.yaml)")
    if not p.exists():
        raise ConfigError("does not exist")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot be read: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"line {line}: byte 0x{raw[e.start]:02x} is not valid UTF-8: save the file "
                          f"as UTF-8 text") from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump()


def dump_yaml(cfg: RunConfig, derived: Derived | None = None) -> str:
    d = to_dict(cfg)
    if derived is not None:
        d = {"derived": dataclasses.asdict(derived), **d}
    text: str = yaml.safe_dump(d, sort_keys=False)
    return text


def config_from_saved(text: str) -> RunConfig:
    """Rebuild a RunConfig from ``dump_yaml`` output (the 'derived' section is dropped)."""
    d = yaml.safe_load(text)
    d.pop("derived", None)
    return config_from_dict(d)


def help_text() -> str:
    """All keys with type, default and help (printed by ``python -m pipeline.train --help-config``)."""
    return "\n".join(field_help(RunConfig, classes=KEY_CLASSES))
