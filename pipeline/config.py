"""Typed run configuration: one YAML file plus dotted ``key.sub=value`` overrides.

A run is a config, not a fork of the trainer. Every section is a keyword-only dataclass whose
fields carry their help text; ``load_config`` validates once, in this order:

0. syntax -- the file must be UTF-8 YAML (an error names the line and column) with no key given
             twice in one mapping (the second would silently replace the first), and no dotted
             override may be given twice;
1. keys   -- unknown keys (in the file or in an override) are errors naming the dotted key;
2. types  -- each value is checked against the field's annotation (an int, or a number YAML left
             as a string like ``3e-4``, is accepted where a ``float`` is expected; nothing else is
             coerced; a float must be finite: ``.inf``/``.nan`` would end the run with NaN weights);
3. values -- ranges and cross-field rules, each message naming the key and the fix.

Derived values (global batch, tokens per step, total tokens) depend on the number of
data-parallel ranks, so they are computed once at start-up by :func:`derive` and logged; the
resolved config (with the derived values) is saved beside every checkpoint.

    python -m pipeline.train --config configs/tiny_cpu.yaml optim.max_steps=20 distill.plan=group
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TeacherConfig:
    path: Optional[str] = _f(None, "Hugging Face LLaMA-family model directory of the frozen teacher "
                                   "(required for stage 'distill', must be empty for stage 'pretrain').")
    placement: Literal["partitioned", "replicated", "node"] = _f(
        "partitioned", "Where the frozen teacher's weights live. partitioned = ZeRO-3 over all ranks (fits "
                       "any size; every micro-batch all-gathers the whole teacher, across nodes too); "
                       "replicated = the whole teacher on every rank (no gathers: fastest when it fits one "
                       "GPU); node = ZeRO-3 within each node only (ZeRO++ hpZ: a copy of the teacher per node, "
                       "gathers never cross the network; on one node it is 'partitioned', with one rank per "
                       "node 'replicated'). docs/teacher-placement.md compares them.")
    offload_params: bool = _f(False, "Keep the teacher's ZeRO-3 parameter partitions in CPU memory "
                                     "(placement 'partitioned' only).")


@dataclass(kw_only=True)
class StudentConfig:
    init_from: Optional[str] = _f(None, "Hugging Face directory to start the student from; when set, "
                                        "the shape fields below are ignored and taken from it.")
    num_layers: int = _f(4, "Decoder layers.")
    hidden_size: int = _f(256, "Model width.")
    num_heads: int = _f(4, "Attention (query) heads.")
    num_kv_heads: Optional[int] = _f(None, "Key/value heads (grouped-query attention); empty = num_heads.")
    intermediate_size: Optional[int] = _f(None, "FFN width; empty = 8/3 * hidden rounded up to a multiple of 64.")
    vocab_size: Optional[int] = _f(None, "Empty = the tokenizer's vocabulary size (from the data manifest).")
    max_position_embeddings: int = _f(2048, "Largest sequence length the student supports.")
    rope_theta: float = _f(10000.0, "RoPE base.")
    rms_norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    tie_word_embeddings: bool = _f(False, "Share input embedding and LM head.")
    init_std: float = _f(0.02, "Std of the normal initialisation of a student built from config.")
    activation_checkpointing: bool = _f(False, "Recompute each decoder layer in backward (non-reentrant).")


@dataclass(kw_only=True)
class DataConfig:
    dir: str = _f("", "Directory written by data_prep (manifest + shards).")
    tokenizer_dir: Optional[str] = _f(None, "Tokenizer directory; when set its identity must match the "
                                            "manifest's, and export copies it next to the model.")
    seq_len: int = _f(128, "Tokens per training sample (the reader yields seq_len + 1 for the shift).")
    micro_batch_size: int = _f(8, "Samples per rank per forward/backward.")
    verify_checksums: bool = _f(True, "Verify shard checksums when opening the data.")


@dataclass(kw_only=True)
class DistillConfig:
    w_ce: float = _f(1.0, "Weight of the cross-entropy term.")
    w_kd: float = _f(1.0, "Weight of the logit KD term (multiplied by tau_kd^2).")
    tau_kd: float = _f(1.0, "Temperature of the logit KD term.")
    kd_chunk_size: int = _f(512, "Positions per chunk of the LM head + CE/KD computation (the "
                                 "logits exist only as float32 [chunk, vocab] buffers).")
    w_shd: float = _f(1.0, "Weight of the SHD attention term (mean over distilled layers).")
    tau_shd: float = _f(1.0, "Temperature of the SHD attention maps.")
    plan: Literal["pairwise", "group", "mean", "select"] = _f(
        "select", "Head-squeezing plan: select = each student head distils the first teacher head of its "
                  "group (the default: it beat every merged target at 8->4 and 16->4 heads in "
                  "docs/results.md section 5); pairwise = the paper's SHD; group; mean.")
    objective: Literal["output", "per_head"] = _f("output", "Objective that chooses the mixing weights.")
    selection: Literal["soft", "hard"] = _f("soft", "soft = optimal mixing weights; hard = each merge snapped "
                                                    "to its best single head (dynamic selection).")
    merge: Literal["prob", "logit"] = _f("prob", "Merge squeezed teacher maps in probability space (paper) "
                                                 "or in score space (product of experts, stays sharp).")
    sharpen: float = _f(1.0, "Target temperature applied after merging (< 1 sharpens; 1 = off).")
    student_layers: Optional[list[int]] = _f(None, "Student layers that get the SHD term; empty = all.")
    layer_map: Optional[list[int]] = _f(None, "Teacher layer for each student layer (length = student "
                                             "layers); empty = uniform g(l) = round((l+1) Lt/Ls) - 1.")
    shd_block_size: int = _f(128, "Query rows per block of the streaming SHD loss.")
    allow_padded_vocab: bool = _f(False, "Allow model vocab sizes larger than the tokenizer's (padded "
                                         "embeddings); KD then uses the tokenizer's first V logits.")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = _f(3e-4, "Peak learning rate (AdamW).")
    min_lr: float = _f(3e-5, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = _f(100, "Linear warmup steps.")
    max_steps: int = _f(1000, "Optimizer steps of the run.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to norms and biases).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 = off).")
    grad_accum_steps: int = _f(1, "Micro-batches per optimizer step on each rank.")
    max_consecutive_nonfinite: int = _f(5, "Stop after this many consecutive skipped (non-finite) steps.")


@dataclass(kw_only=True)
class DeepSpeedSection:
    config: str = _f("ds_configs/zero3.json", "DeepSpeed JSON of the student engine (ZeRO-3). Batch, "
                                              "precision, clipping and optimizer fields are filled from "
                                              "this config; the JSON may leave them out or 'auto'.")
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = bf16 on a CUDA GPU that supports it, "
                                                           "else fp32.")


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: Optional[str] = _f(None, "Checkpoint directory; empty = <output_dir>/checkpoints.")
    every_steps: int = _f(500, "Save every this many steps (0 = only at the end and on preemption).")
    keep_last: int = _f(3, "Complete checkpoints kept (>= 2).")
    resume: str = _f("auto", "'auto' = newest complete checkpoint if any, 'none' = start fresh, "
                             "or a checkpoint directory.")
    force_resume: bool = _f(False, "Resume even if teacher/tokenizer/data/model shape changed.")
    move_aside: bool = _f(False, "When output_dir (or checkpoint.dir) already holds another run and this "
                                 "run starts fresh, rename the old run's directories to "
                                 "<dir>.moved-<timestamp> first (nothing is deleted); without it such a "
                                 "start is refused.")
    save_at_end: bool = _f(True, "Save when the run reaches max_steps.")


@dataclass(kw_only=True)
class LoggingConfig:
    tb_dir: Optional[str] = _f(None, "TensorBoard directory; empty = <output_dir>/tb.")
    every_steps: int = _f(10, "Console line every this many steps (TensorBoard gets every step).")
    progress_bar: Literal["auto", "on", "off"] = _f("auto", "auto = when stderr is a terminal.")


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = _f(500, "Held-out perplexity every this many steps (0 = off during training).")
    at_end: bool = _f(True, "Evaluate at the end of the run.")
    max_batches: Optional[int] = _f(50, "Eval micro-batches per rank; empty = the whole val split.")
    micro_batch_size: Optional[int] = _f(None, "Empty = data.micro_batch_size.")
    split: str = _f("val", "Data split used for evaluation.")


@dataclass(kw_only=True)
class DebugConfig:
    """Fault injection for tests; leave empty in real runs."""
    nan_loss_at_steps: list[int] = _f([], "Make the loss NaN on rank 0 at these (1-based) steps.")
    sleep_per_step: float = _f(0.0, "Seconds to sleep after each step (lets a test signal mid-run).")
    hang_in_save_at_step: Optional[int] = _f(None, "During this step's save, after the DeepSpeed files "
                                                   "are written and before the commit, touch "
                                                   "<ckpt>/SAVE_HANG and sleep (a test SIGKILLs it).")
    nonfinite_weights_at_step: Optional[int] = _f(None, "After this optimizer step, overwrite rank 0's share "
                                                        "of the student's weights with NaN (tests that no "
                                                        "checkpoint or export is written from non-finite "
                                                        "weights).")


@dataclass(kw_only=True)
class RunConfig:
    stage: Literal["distill", "pretrain"] = _f("distill", "'pretrain' trains with CE only and no teacher.")
    seed: int = _f(1234, "Seed of model init and of the data order.")
    output_dir: str = _f("runs/default", "Run directory (checkpoints, TensorBoard).")
    teacher: TeacherConfig = _f(default_factory=TeacherConfig)
    student: StudentConfig = _f(default_factory=StudentConfig)
    data: DataConfig = _f(default_factory=DataConfig)
    distill: DistillConfig = _f(default_factory=DistillConfig)
    optim: OptimConfig = _f(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = _f(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = _f(default_factory=CheckpointConfig)
    logging: LoggingConfig = _f(default_factory=LoggingConfig)
    eval: EvalConfig = _f(default_factory=EvalConfig)
    debug: DebugConfig = _f(default_factory=DebugConfig)

    # Paths with defaults relative to output_dir.
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    @property
    def tb_dir(self) -> Path:
        return Path(self.logging.tb_dir or Path(self.output_dir) / "tb")

    @property
    def uses_teacher(self) -> bool:
        return self.stage == "distill"

    @property
    def uses_shd(self) -> bool:
        return self.stage == "distill" and self.distill.w_shd > 0

    @property
    def uses_kd(self) -> bool:
        return self.stage == "distill" and self.distill.w_kd > 0


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
# Loading: dict -> dataclasses with key and type checks
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _check_value(tp: Any, value: Any, key: str) -> Any:
    """Return value checked against annotation tp, or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        alts = [a for a in args if a is not type(None)]
        if len(alts) == 1:  # Optional[X]: X's own (more precise) message
            return _check_value(alts[0], value, key)
        for a in alts:
            try:
                return _check_value(a, value, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_check_value(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(value, key)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return _finite(value, key)  # YAML 1.1 reads 3e-4 (no dot) as a string
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _finite(value: int | float | str, key: str) -> float:
    """float(value), refusing inf and nan (YAML ``.inf``, ``.nan``, ``1e999``): a run trained with
    such a setting ends with NaN weights instead of an error."""
    try:
        x = float(value)
    except OverflowError:  # an int too large for a float
        x = math.inf
    if not math.isfinite(x):
        raise ConfigError(f"config key '{key}': {value!r} is not a finite number (inf and nan are "
                          f"refused): give a finite value")
    return x


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)} "
                          f"(valid keys under '{prefix.rstrip('.') or '<root>'}': {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(tp, value, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value parsed as YAML (``3`` int, ``[1,2]`` list, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = _parse_yaml(raw) if raw.strip() else ""
    except ConfigError as e:
        raise ConfigError(f"override '{text}': cannot parse value: {e}") from None
    return key, value


def _apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """Set each ``key=value`` in data; the same key twice is refused (which one was meant?)."""
    given: dict[str, str] = {}
    for o in overrides:
        key, value = parse_override(o)
        if key in given:
            raise ConfigError(f"override '{key}' is given twice ('{given[key]}' and '{o}'): give it once")
        given[key] = o
        _set_dotted(data, key, value)


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = _deepcopy(data or {})
    _apply_overrides(data, overrides)
    cfg = _build(RunConfig, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML file ``path`` (or nothing), apply dotted overrides, check keys, types, values."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        try:
            data = _parse_yaml(_read_text(p)) or {}
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, "", set())
        return self.construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, path: str, visited: set[int]) -> None:
    """Raise ConfigError naming the dotted key and both lines of the first key given twice."""
    if id(node) in visited:  # an alias: checked where its anchor is (and recursive aliases end)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}  # scalar key -> the line it was first given on
        for key_node, value_node in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            dotted = ".".join(filter(None, (path, key_node.value if scalar else "?")))
            line = key_node.start_mark.line + 1
            if scalar and key_node.value in lines:
                raise ConfigError(f"key '{dotted}' is given twice (line {lines[key_node.value]} and line "
                                  f"{line}): keep one (the second would silently replace the first)")
            if scalar:
                lines[key_node.value] = line
            _refuse_duplicate_keys(value_node, dotted, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{i}]", visited)


def _parse_yaml(text: str) -> Any:
    """YAML text -> Python value; ConfigError with the line and column of a syntax error, or
    naming a key given twice in one mapping."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        if e.problem_mark is None:
            raise ConfigError(" ".join(str(e).split())) from None
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: {e.problem}"
        if e.context and e.context_mark is not None:
            where += f" ({e.context} that starts at line {e.context_mark.line + 1})"
        raise ConfigError(where) from None
    except yaml.reader.ReaderError as e:  # a control character: e.character is its code point
        raise ConfigError(f"line {text.count(chr(10), 0, e.position) + 1}: unacceptable character "
                          f"#x{e.character:04x}: {e.reason}") from None


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig, derived: Derived | None = None) -> str:
    d = to_dict(cfg)
    if derived is not None:
        d = {"derived": dataclasses.asdict(derived), **d}
    return yaml.safe_dump(d, sort_keys=False)


def config_from_saved(text: str) -> RunConfig:
    """Rebuild a RunConfig from ``dump_yaml`` output (the 'derived' section is dropped)."""
    d = yaml.safe_load(text)
    d.pop("derived", None)
    return config_from_dict(d)


def help_text() -> str:
    """All keys with type, default and help (printed by ``python -m pipeline.train --help-config``)."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): "
                         f"{f.metadata.get('help', '')}")

    walk(RunConfig, "")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Value validation (config alone; model/data/tokenizer compatibility is checked in models.py)
# --------------------------------------------------------------------------------------------


def validate(cfg: RunConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    if cfg.stage == "distill":
        need(bool(cfg.teacher.path), "teacher.path is required for stage 'distill' (set it to a Hugging "
                                     "Face model directory, or use stage=pretrain to train without one)")
    else:
        need(not cfg.teacher.path, "teacher.path is set but stage is 'pretrain' (CE only): remove "
                                   "teacher.path or set stage=distill")
    need(not (cfg.teacher.offload_params and cfg.teacher.placement != "partitioned"),
         f"teacher.offload_params=true needs teacher.placement=partitioned (got {cfg.teacher.placement!r}): "
         f"a replicated or per-node teacher is kept on the GPU to avoid gathers; offloading it would move "
         f"it over PCIe every step instead")
    need(bool(cfg.data.dir), "data.dir is required (the directory written by data_prep)")
    need(cfg.data.seq_len >= 2, f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    need(cfg.data.micro_batch_size >= 1, f"data.micro_batch_size must be >= 1, got {cfg.data.micro_batch_size}")

    s = cfg.student
    if s.init_from is None:
        for k in ("num_layers", "hidden_size", "num_heads", "max_position_embeddings"):
            need(getattr(s, k) >= 1, f"student.{k} must be >= 1, got {getattr(s, k)}")
        need(s.hidden_size % s.num_heads == 0,
             f"student.hidden_size ({s.hidden_size}) must be divisible by student.num_heads ({s.num_heads})")
        kv = s.num_kv_heads or s.num_heads
        need(kv >= 1 and s.num_heads % kv == 0,
             f"student.num_heads ({s.num_heads}) must be a multiple of student.num_kv_heads ({kv})")
        need(cfg.data.seq_len <= s.max_position_embeddings,
             f"data.seq_len ({cfg.data.seq_len}) exceeds student.max_position_embeddings "
             f"({s.max_position_embeddings}): lower data.seq_len or raise the student's max positions")

    d = cfg.distill
    for k in ("w_ce", "w_kd", "w_shd"):
        need(getattr(d, k) >= 0, f"distill.{k} must be >= 0, got {getattr(d, k)}")
    need(d.tau_kd > 0, f"distill.tau_kd must be > 0, got {d.tau_kd}")
    need(d.tau_shd > 0, f"distill.tau_shd must be > 0, got {d.tau_shd}")
    need(d.sharpen > 0, f"distill.sharpen must be > 0 (1 = off, < 1 sharpens), got {d.sharpen}")
    need(d.kd_chunk_size >= 1, f"distill.kd_chunk_size must be >= 1, got {d.kd_chunk_size}")
    need(d.shd_block_size >= 1, f"distill.shd_block_size must be >= 1, got {d.shd_block_size}")
    if cfg.stage == "distill":
        need(d.w_ce + d.w_kd + d.w_shd > 0, "distill.w_ce, w_kd and w_shd are all 0: nothing to train")
    else:
        need(d.w_ce > 0, "stage 'pretrain' trains with CE only: distill.w_ce must be > 0")
    if d.student_layers is not None:
        need(len(d.student_layers) > 0, "distill.student_layers is an empty list: leave it empty (null) "
                                         "for all layers or set distill.w_shd=0 to turn SHD off")
        need(len(set(d.student_layers)) == len(d.student_layers),
             f"distill.student_layers has duplicates: {d.student_layers}")

    o = cfg.optim
    need(o.max_steps >= 1, f"optim.max_steps must be >= 1, got {o.max_steps}")
    need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    need(0 <= o.min_lr <= o.lr, f"optim.min_lr ({o.min_lr}) must be in [0, optim.lr={o.lr}]")
    need(0 <= o.warmup_steps <= o.max_steps,
         f"optim.warmup_steps ({o.warmup_steps}) must be in [0, optim.max_steps={o.max_steps}]")
    need(o.grad_accum_steps >= 1, f"optim.grad_accum_steps must be >= 1, got {o.grad_accum_steps}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    need(o.max_consecutive_nonfinite >= 1, "optim.max_consecutive_nonfinite must be >= 1")

    c = cfg.checkpoint
    need(c.keep_last >= 2, f"checkpoint.keep_last must be >= 2 (a save interrupted mid-way must leave "
                           f"a complete one behind), got {c.keep_last}")
    need(c.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {c.every_steps}")
    need(cfg.logging.every_steps >= 1, f"logging.every_steps must be >= 1, got {cfg.logging.every_steps}")
    need(cfg.eval.every_steps >= 0, f"eval.every_steps must be >= 0, got {cfg.eval.every_steps}")
    need(not Path(cfg.deepspeed.config).suffix or Path(cfg.deepspeed.config).suffix == ".json",
         f"deepspeed.config must be a .json file, got {cfg.deepspeed.config}")

    g = cfg.debug  # steps are 1-based: a step 0 would never fire and the test would pass vacuously
    for k in ("hang_in_save_at_step", "nonfinite_weights_at_step"):
        need(getattr(g, k) is None or getattr(g, k) >= 1, f"debug.{k} must be >= 1 (a 1-based step) or "
                                                          f"empty, got {getattr(g, k)}")
    need(all(s >= 1 for s in g.nan_loss_at_steps),
         f"debug.nan_loss_at_steps must hold 1-based steps (>= 1), got {g.nan_loss_at_steps}")
